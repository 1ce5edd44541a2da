"""Cost of the SSE alignment check (cpu/ssealign.py): a loop of aligned-SSE instructions, with and without it.

bench/guests/sse.S runs ITERS passes over a 4 KiB array: per element a movaps and an addps with an
m128 operand (each checked) among six other instructions. The same image is run in each mode several
ways in one process, best of R each: with the check off (no site hooked: what cpuvirt did before),
with an empty C hook on each site (the engine's call of a hook alone), with the check in C (the
default), and with --python the check in Python only (the extension not used); the ratios to "off"
are printed. The console must be the same in all of them.
usage: python bench/sse.py [--iters N] [--repeat R] [--modes native,full,...] [--python]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


def run(path: str, mode: str, how: str):
    from cpuvirt.cpu import ssealign
    from cpuvirt.runner import run_guest
    check, create, site = ssealign.is_aligned_sse, ssealign.SseAlign.create, ssealign.SseAlign.site
    if how == "off":
        ssealign.is_aligned_sse = lambda mnem, ops: False
    elif how == "python":
        ssealign.SseAlign.create = classmethod(lambda cls, uc, hflags: None)
    elif how == "empty":
        def empty_site(self, address, *args, **kw):
            hooked = site(self, address, *args, **kw)
            if hooked:
                self.sites[address][0].valid = 0    # the C hook returns at once: the engine's call alone
            return hooked
        ssealign.SseAlign.site = empty_site
    try:
        r = run_guest(path, mode=mode, max_insns=0)
    finally:
        ssealign.is_aligned_sse, ssealign.SseAlign.create, ssealign.SseAlign.site = check, create, site
    if r.outcome != "exit" or r.status != 0:
        raise RuntimeError(f"{mode}/{how}: {r.outcome} {r.status} {r.message}")
    return r


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--modes", default="native")
    ap.add_argument("--python", action="store_true", help="also time the Python-only check (slow)")
    a = ap.parse_args(argv)
    path = C.write_temp(C.build("sse", ITERS=a.iters), f"sse{a.iters}")
    hows = ("off", "empty", "c", "python") if a.python else ("off", "empty", "c")
    out = {}
    for mode in a.modes.split(","):
        best: dict[str, float] = {}
        consoles = set()
        for _ in range(a.repeat):
            for how in hows:
                r = run(path, mode, how)
                consoles.add(r.console)
                best[how] = min(best.get(how, r.wall_s), r.wall_s)
        if len(consoles) != 1:
            raise RuntimeError(f"{mode}: the console differs with the check on and off")
        checked = 2 * 256 * a.iters
        print(f"{mode}: {a.iters} passes, {checked:,} checked executions ({8 * 256 * a.iters:,} instructions)")
        for how in hows:
            print(f"  check {how:6s} {best[how]:8.3f} s   x{best[how] / best['off']:.2f} of off"
                  + ("" if how == "off" else f"   {(best[how] - best['off']) / checked * 1e9:7.0f} ns per check"))
        out[mode] = best
    return out


if __name__ == "__main__":
    main()
