"""`cpuvirt bt`: a guest block beside its translation, for teaching (Adams & Agesen 2006, figure 1).

Each guest instruction is shown with what it became in the translation cache and how: IDENT (copied),
inline (rewritten in place, no hypervisor), callout (a jump into the hypervisor), chain (a direct
branch, patched to jump straight to the target's translation once that exists). The block is shown as
it stands after the run: chained jumps and filled inline caches are visible.
"""

from __future__ import annotations

from capstone import CS_ARCH_X86, CS_MODE_32, Cs

from cpuvirt.errors import CpuvirtError

_cs = Cs(CS_ARCH_X86, CS_MODE_32)
W_GUEST = 44


def _target(text: str):
    try:
        return int(text.split()[-1], 0)
    except (ValueError, IndexError):
        return None


def describe_jump(tc, target: int) -> str:
    """What a jump inside the TC leads to: a callout slot, a block, or an inline-cache entry."""
    site = tc.site_at(target)
    if site is not None:
        what = {
            "chain": f"chain callout: translate {site.target:#x} and patch this jump"
            if site.target is not None
            else "chain callout",
            "ret": "ret inline-cache miss: callout",
            "jmp_ind": "indirect jmp inline-cache miss: callout",
            "call_ind": "indirect call inline-cache miss: callout",
            "sensitive": f"callout: the hypervisor emulates `{site.insn.text}`" if site.insn else "callout",
            "adaptive": f"adaptive callout: `{site.insn.text}` done by the hypervisor" if site.insn else "callout",
        }.get(site.kind, site.kind)
        return f"-> {what}"
    b = tc.block_at(target)
    if b is not None and b.tc == target:
        return f"-> chained to the translation of guest {b.geip:#010x}" + ("" if b.alive else " (invalidated)")
    return ""


def format_block(tc, blk, tc_bytes) -> str:
    lines = [
        f"guest {blk.geip:#010x}..{blk.gend:#010x}  ->  TC {blk.tc:#010x}..{blk.tc_end:#010x}"
        f"  ({len([i for i in blk.insns if i.size])} guest instructions, {blk.tc_end - blk.tc} TC bytes"
        + (f"; depends on {', '.join(sorted(blk.deps))}" if blk.deps else "")
        + ("" if blk.alive else "; INVALIDATED")
        + ")"
    ]
    lines.append(f"  {'guest':<{W_GUEST}}  {'kind':<8} translation")
    for ins in blk.insns:
        left = f"{ins.geip:#010x}  {ins.text}" if ins.size else "(end of block: fall through)"
        code = tc_bytes(ins.tc, ins.tc_end - ins.tc)
        tcl = []
        for addr, _size, mnem, ops in _cs.disasm_lite(code, ins.tc):
            if mnem == "int3":
                continue  # padding of empty inline-cache entries
            text = f"{addr:#010x}  {mnem} {ops}".rstrip()
            if mnem.startswith("j"):
                t = _target(ops)
                if t is not None:
                    note = describe_jump(tc, t)
                    if note:
                        text += f"   {note}"
            tcl.append(text)
        tcl = tcl or ["(nothing)"]
        lines.append(f"  {left:<{W_GUEST}}  {ins.kind:<8} {tcl[0]}")
        for t in tcl[1:]:
            lines.append(f"  {'':<{W_GUEST}}  {'':<8} {t}")
    return "\n".join(lines)


def show(guest: str, mode, res, at: int | None = None, blocks: int = 3) -> str:
    """Format what a finished full-mode run of `guest` translated: the block at guest EIP `at`
    (translated now if the run never reached it) or the first `blocks` blocks translated. The caller
    runs the guest (the `cpuvirt bt` command): the translator's floor never imports the runner."""
    from cpuvirt.bt.translate import TranslateFault

    vcpu = mode.vcpu
    tc = vcpu.tc
    out = [
        f"{guest} under full: {res.outcome} (status {res.status}); "
        + ", ".join(f"{k} {v}" for k, v in tc.counters.as_dict().items() if v)
    ]
    if at is not None:
        blk = tc.blocks.get(at)
        if blk is None:
            vcpu.mmu.crs = None
            try:
                blk = vcpu.rt.translator.translate(at)
            except TranslateFault as f:
                raise CpuvirtError(f"--at {at:#x}: no guest code there (fetch faults at {f.gva:#x})") from None
            out.append(f"(the run never executed guest {at:#x}: translated now, with the final virtual CPU)")
        chosen = [blk]
    else:
        chosen = tc.order[:blocks]
    for blk in chosen:
        out.append("")
        out.append(format_block(tc, blk, vcpu.tc_bytes))
    return "\n".join(out) + "\n"
