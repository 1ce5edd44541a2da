"""`cpuvirt trace show`: one readable line per event, with the instruction that caused it."""

from __future__ import annotations

from cpuvirt.trace.format import read_trace


def _detail(d: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in d.items())


def _where(syms, eip: str) -> str:
    w = syms.describe(int(eip, 16)) if syms.source else ""
    return f"  @ {w}" if w else ""


def _meaning(syms, e: dict) -> str:
    """What the event is in the kernel's own terms (an xv6 kernel: `xv6: system call write (16)`)."""
    said = syms.kernel.meaning(e, syms) if syms.kernel is not None else None
    return f"  {syms.kernel.name}: {said}" if said else ""


def show(path: str, out, kinds=None, image: str | None = None) -> None:
    from cpuvirt.trace.symbols import for_trace

    t = read_trace(path)
    h = t.header
    syms = for_trace(h, image)
    out.write(
        f"# {h.get('guest')} under {h.get('mode')} (cpuvirt {h.get('cpuvirt')}, "
        f"image sha256 {str(h.get('image_sha256'))[:16]}...)\n"
    )
    if syms.source:
        out.write(f"# symbols and lines from {syms.source} (sha256 matches)\n")
    if syms.kernel is not None:
        out.write(
            f"# an {syms.kernel.name} kernel: its system calls ({len(syms.kernel.syscalls)}, from its "
            "syscalls[] table), interrupt vectors, page faults and context switches are named\n"
        )
    out.write(
        f"{'seq':>6} {'icount':>12} cpl {'kind':<13} {'reason':<18} {'eip':>10}  {'instruction':<28} "
        "detail -> action"
        f"{'  @ symbol file:line' if syms.source else ''}\n"
    )
    for e in t.events:
        if kinds and e["kind"] not in kinds:
            continue
        code = "" if e["code"] is None else f"({e['code']})"
        reason = f"{e['reason']}{code}"
        out.write(
            f"{e['seq']:>6} {e['icount']:>12} {e['cpl']:>3} {e['kind']:<13} {reason:<18} {e['eip']:>10}  "
            f"{e['insn']:<28} {_detail(e['detail'])} -> {e['action']}{_meaning(syms, e)}"
            f"{_where(syms, e['eip'])}\n"
        )
    present = {e["kind"] for e in t.events}
    for k in kinds or ():
        if k not in present:
            out.write(f"# no event of kind {k!r} in this trace (kinds here: {', '.join(sorted(present)) or 'none'})\n")
    f = t.footer
    if f is None:
        out.write("# no footer: the run did not finish (the trace is a prefix)\n")
    else:
        counts = ", ".join(f"{k} {v}" for k, v in f.get("counts", {}).items())
        out.write(f"# outcome {f['outcome']}, status {f['status']}, {f['icount']} instructions; {counts}\n")
