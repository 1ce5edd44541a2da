"""Shadow paging costs: a hidden fault, a true fault and a ptemod, in us and in bare hook calls.

Under shadow paging with faults handled in the fill hook (the trap/full set-up: a miss walks inside
the hook), and under hw --no-ept (every shadow #PF is a VM exit, as KVM without EPT), per event =
(time of a guest loop with the event - time of the same loop without it) / N:
  - hidden fault (a fill that misses the shadow; the loop is built here): a read of each of N pages
    the shadow has not seen (native: one fill + walk; shadow: fill + walk + insert + trace), the
    whole pass / N (the loop's own 4 instructions a page are noise beside a Python fill);
  - ptemod: N `mov [pte], reg` into a guest page table the shadow traces, minus N stores to a data page;
  - true fault (#PF delivered through the guest IDT): events.S EVENT=2 minus EVENT=3 (both make one
    ptemod per iteration; EVENT=2 also a true fault and a second ptemod by its handler: subtracted).
The unit, measured in the same run: a bare Unicorn hook call (bench/rawuc.py, as bench/events.py).
usage: python bench/shadow.py [--n N] [--repeat R]
"""
from __future__ import annotations

import argparse
import struct
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
import events as EV  # noqa: E402
import rawuc  # noqa: E402

CODE, STACK, PD, PT0 = 0x100000, 0x130000, 0x200000, 0x201000
FIRST = 0x400000           # pages read by the hidden-fault loop (PDEs 1.. map them)


def _direct(source: str, shadow: bool, pages: int):
    """Run `source` at CODE on a bare machine with paging on (identity, 4 KiB pages over 0..(4 + pages
    / 1024) MiB); returns the run loop's wall time and the shadow (or None)."""
    from cpuvirt.engine import regs as R
    from cpuvirt.cpu.vcpu import Vcpu
    from cpuvirt.machine.machine import Machine
    from cpuvirt.memory.shadow import ShadowPaging
    from cpuvirt.toolchain.assemble import new_keystone
    code = bytes(new_keystone().asm(source, CODE)[0])
    m = Machine(64)
    vcpu = Vcpu(m)
    vcpu.install_hooks()
    sp = ShadowPaging(m.mmu) if shadow else None
    m.debug_exit.on_exit = lambda v: vcpu.finish("exit", v)
    m.write_gpa(CODE, code)
    tables = 1 + (pages + 1023) // 1024
    for t in range(tables):
        m.write_gpa(PD + 4 * t, struct.pack("<I", (PT0 + t * 0x1000) | 3))
        m.write_gpa(PT0 + t * 0x1000, b"".join(struct.pack("<I", ((t * 1024 + i) << 12) | 3) for i in range(1024)))
    m.set_flat_protected_mode(0x500)
    m.regs.write(R.ESP, STACK)
    m.regs.write(R.CR3, PD)
    m.regs.write(R.CR0, 0x80010011)
    t0 = time.perf_counter()
    out = vcpu.run(CODE)
    wall = time.perf_counter() - t0
    if (out.kind, out.status) != ("exit", 0):
        raise RuntimeError(f"bench loop: {out.kind} {out.status} {out.message}")
    return wall, sp


def _touch(n: int, passes: int) -> str:
    body = "".join(f"""
    mov edi, {FIRST:#x}
    mov ecx, {n}
pass{p}:
    mov eax, dword ptr [edi]
    add edi, 0x1000
    dec ecx
    jnz pass{p}
""" for p in range(passes))
    return body + "\n    xor eax, eax\n    out 0xf4, al\n"


def _stores(n: int, target: int) -> str:
    # Touch the page table once through a PTE walk so that the shadow traces it, then store N times.
    return f"""
    mov eax, dword ptr [{FIRST:#x}]
    mov ecx, {n}
    mov edx, {(FIRST + 0x5000) | 3:#x}
loop:
    mov dword ptr [{target:#x}], edx
    dec ecx
    jnz loop
    xor eax, eax
    out 0xf4, al
"""


def best(f, repeat):
    return min(f() for _ in range(repeat))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4000, help="events of each kind")
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args(argv)
    n = a.n

    imgs = {e: C.build("events", EVENT=e, N=n) for e in (0, 1, 2, 3)}
    hook_us = EV.per_event(lambda img: rawuc.run(img, EV.bare_out_hook)[1], imgs[1], imgs[0], n, a.repeat)[0]

    res = {}
    for name, shadow in (("fill, native walk", False), ("hidden fault (fill, shadow miss)", True)):
        # One pass over N fresh pages: each read is a TLB fill (4 instructions of loop around it).
        res[name] = best(lambda: _direct(_touch(n, 1), shadow, n)[0], a.repeat) / n * 1e6
    pte = PT0 + 4 * (FIRST >> 12) + 4 * 5          # a PTE in the traced page table of FIRST
    traced = best(lambda: _direct(_stores(n, pte), True, n)[0], a.repeat)
    plain = best(lambda: _direct(_stores(n, FIRST + 0x10), True, n)[0], a.repeat)
    res["ptemod"] = (traced - plain) / n * 1e6

    # True fault, through run_guest: native with the shadow strategy installed, and hw --no-ept.
    paths = {e: C.write_temp(imgs[e], f"shadow-events{e}") for e in (2, 3)}
    from cpuvirt.modes import native as N
    from cpuvirt.memory.shadow import ShadowPaging
    from cpuvirt.runner import run_guest
    orig = N.NativeMode.__init__

    def with_shadow(self, machine, **kw):
        orig(self, machine, **kw)
        ShadowPaging(machine.mmu)

    def guest(e, mode, **opts):
        r = run_guest(paths[e], mode, max_insns=0, mode_options=opts or None)
        if r.outcome != "exit" or r.status != 0:
            raise RuntimeError(f"events {e} under {mode}: {r.outcome} {r.message}")
        return r.wall_s

    N.NativeMode.__init__ = with_shadow
    try:
        pf2 = best(lambda: guest(2, "native"), a.repeat)
        pf3 = best(lambda: guest(3, "native"), a.repeat)
    finally:
        N.NativeMode.__init__ = orig
    res["true fault (shadow)"] = (pf2 - pf3) / n * 1e6 - res["ptemod"]     # EVENT=2 has one ptemod more
    nat2 = best(lambda: guest(2, "native"), a.repeat)
    nat3 = best(lambda: guest(3, "native"), a.repeat)
    res["true fault (native walk)"] = (nat2 - nat3) / n * 1e6
    hw2 = best(lambda: guest(2, "hw", ept=False), a.repeat)
    hw3 = best(lambda: guest(3, "hw", ept=False), a.repeat)
    ept2 = best(lambda: guest(2, "hw"), a.repeat)
    ept3 = best(lambda: guest(3, "hw"), a.repeat)
    res["EVENT=2 iteration, hw --no-ept"] = hw2 / n * 1e6
    res["EVENT=2 iteration, hw (EPT)"] = ept2 / n * 1e6
    res["true fault + ptemod, hw --no-ept"] = (hw2 - hw3) / n * 1e6
    res["true fault, hw (EPT)"] = (ept2 - ept3) / n * 1e6

    C.header(f"shadow paging: {n} events of each kind, best of {a.repeat}")
    print(f"  bare Unicorn hook call             : {hook_us:8.2f} us")
    for k, v in res.items():
        print(f"  {k:<35}: {v:8.2f} us  = {v / hook_us:6.1f} hook calls")
    res["hook_us"] = hook_us
    return res


if __name__ == "__main__":
    main()
