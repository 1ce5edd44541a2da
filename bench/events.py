"""Cost of an exit: an I/O event (`out 0x80, al`) and a page-fault delivery, under cpuvirt native.

Per event = (time of the guest loop with the event - time of the same loop without it) / N, for
  - I/O:  bench/guests/events.S EVENT=1 (out) vs EVENT=0 (nop; nop),
  - #PF:  EVENT=2 (clear PTE.P, invlpg, load -> #PF, handler sets P, retry) vs EVENT=10 (same, P kept:
          one refill per iteration, answered as the retry's is; EVENT=3 clears A instead, and its
          refill, a walk that sets A, is a Python fill dearer than a C-delivered #PF).
The unit of comparison, measured in the same run: a bare Unicorn hook call, i.e. the I/O loop on
raw Unicorn (bench/rawuc.py) whose Python UC_HOOK_INSN OUT hook returns at once for port 0x80.
DESIGN.md 7: an exit round trip should cost <= 10x a bare hook call.
usage: python bench/events.py [--n N] [--pf-n N] [--repeat R]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
import rawuc  # noqa: E402


def bare_out_hook(out):
    def on_out(uc, port, size, value, _):
        if port == 0x80:
            return
        if port == 0x3F8:
            out.append(value & 0xFF)
        elif port == 0xF4:
            uc.emu_stop()
    return on_out


def per_event(run, image_with, image_without, n, repeat):
    """(us per event, best time with, best time without), interleaved best-of-R."""
    t_with = t_without = None
    for _ in range(repeat):
        s = run(image_with)
        t_with = s if t_with is None else min(t_with, s)
        s = run(image_without)
        t_without = s if t_without is None else min(t_without, s)
    return (t_with - t_without) / n * 1e6, t_with, t_without


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200_000, help="I/O events")
    ap.add_argument("--pf-n", type=int, default=5_000, help="page faults (each costs far more)")
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args(argv)

    imgs = {e: C.build("events", EVENT=e, N=a.n if e < 2 else a.pf_n) for e in (0, 1, 2, 10)}
    paths = {e: C.write_temp(img, f"events{e}") for e, img in imgs.items()}

    def cv(e):
        r = C.cpuvirt_run(paths[e])
        if e == 2 and r.counts.get("page_fault") != a.pf_n:
            raise RuntimeError(f"expected {a.pf_n} page faults, got {r.counts}")
        return r.wall_s

    def raw(img):
        return rawuc.run(img, bare_out_hook)[1]

    hook_us, raw_with, raw_without = per_event(raw, imgs[1], imgs[0], a.n, a.repeat)
    io_us, io_with, io_without = per_event(cv, 1, 0, a.n, a.repeat)
    pf_us, pf_with, pf_without = per_event(cv, 2, 10, a.pf_n, max(1, a.repeat - 1))

    C.header(f"events: {a.n} I/O exits, {a.pf_n} page faults")
    print(f"I/O exit     / bare hook call : {io_us / hook_us:7.1f}x   (target <= 10x)")
    print(f"#PF delivery / bare hook call : {pf_us / hook_us:7.1f}x   (target <= 10x)")
    print(f"  bare Unicorn hook call : {hook_us:8.2f} us  (raw loop {raw_with:.3f} s - {raw_without:.3f} s)")
    print(f"  cpuvirt I/O exit       : {io_us:8.2f} us  ({io_with:.3f} s - {io_without:.3f} s)")
    print(f"  cpuvirt #PF delivery   : {pf_us:8.2f} us  ({pf_with:.3f} s - {pf_without:.3f} s; the baseline "
          f"loop itself costs {pf_without / a.pf_n * 1e6:.1f} us/iteration: a PTE store, invlpg, one TLB refill)")
    return {"hook_us": hook_us, "io_us": io_us, "pf_us": pf_us}


if __name__ == "__main__":
    main()
