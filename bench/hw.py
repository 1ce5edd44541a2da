"""Cost of hw-mode (simulated VT-x) exits, and hw-mode compute speed as a share of native mode.

Per event = (time of the guest loop with the event - time of the same loop without it) / N, as in
bench/events.py, on bench/guests/events.S under `run_guest(mode="hw")`:
  - CPUID round trip: EVENT=4 (xor eax, eax; cpuid) vs EVENT=0 (nop; nop), default preset,
  - I/O exit:         EVENT=1 (out 0x80, al) vs EVENT=0, default preset (unconditional_io_exiting=1),
  - EPT violation:    EVENT=5 (a pass over N fresh pages after a pass over N others) vs EVENT=6 (the
                      second pass over the pages the first mapped), both with --vmx lazy_ept=1, --mem 64.
The unit, measured in the same run: a bare Unicorn hook call (events.py's raw-Unicorn OUT-hook loop).
Then compute.S under hw (default preset, EPT mapped up front) vs native, interleaved best of R, and a
cProfile of one short run of each event loop (top functions by own time).
DESIGN.md 7 / the issue: an exit round trip <= 10x a bare hook call; hw compute >= 0.9 of native.
usage: python bench/hw.py [--n N] [--cpuid-n N] [--ept-n N] [--rounds R] [--repeat R] [--no-profile]
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
import rawuc  # noqa: E402
from events import bare_out_hook, per_event  # noqa: E402

LAZY = {"vmx": ["lazy_ept=1"]}


def hw_run(path: str, options=None, mem_mib: int = 32, mode: str = "hw"):
    from cpuvirt.runner import run_guest
    r = run_guest(path, mode=mode, max_insns=0, mem_mib=mem_mib, mode_options=options)
    if r.outcome != "exit" or r.status != 0:
        raise RuntimeError(f"{path} ({mode} {options}): {r.outcome} {r.status} {r.message} {r.console!r}")
    return r


def exits(r) -> dict:
    """{exit name: (count, mean handler us)} from RunResult.exit_stats."""
    return {row[0]: (row[2], row[4]) for row in r.exit_stats}


def profile_top(path: str, options, mem_mib: int, top: int) -> list[str]:
    pr = cProfile.Profile()
    pr.enable()
    hw_run(path, options, mem_mib)
    pr.disable()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(top)
    import os
    import site
    text = s.getvalue()
    for prefix in [*site.getsitepackages(), os.path.dirname(C.BENCH_DIR)]:
        text = text.replace(prefix + os.sep, "")
    lines = [ln for ln in text.splitlines() if ln.strip()]
    i = next(k for k, ln in enumerate(lines) if ln.lstrip().startswith("ncalls"))
    return lines[i:i + 1 + top]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20_000, help="I/O exits (and bare hook calls: 10x this)")
    ap.add_argument("--cpuid-n", type=int, default=10_000, help="CPUID instructions")
    ap.add_argument("--ept-n", type=int, default=3_000, help="fresh pages (EPT violations), <= 6144")
    ap.add_argument("--rounds", type=int, default=100, help="compute.S rounds (~1.2 M instructions each)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--top", type=int, default=8, help="profile rows per event")
    a = ap.parse_args(argv)

    hook_n = a.n * 10
    raw_imgs = {e: C.build("events", EVENT=e, N=hook_n) for e in (0, 1)}
    spec = {"io": (1, a.n), "io0": (0, a.n), "cpuid": (4, a.cpuid_n), "cpuid0": (0, a.cpuid_n),
            "ept": (5, a.ept_n), "ept0": (6, a.ept_n)}
    paths = {k: C.write_temp(C.build("events", EVENT=e, N=n), f"hw-{k}") for k, (e, n) in spec.items()}
    cpath = C.write_temp(C.build("compute", ROUNDS=a.rounds), f"compute{a.rounds}")

    last = {}

    def hw(options=None, mem=32):
        def run(k):
            r = hw_run(paths[k], options, mem)
            last[k] = r
            return r.wall_s
        return run

    hook_us, raw_with, raw_without = per_event(lambda img: rawuc.run(img, bare_out_hook)[1],
                                               raw_imgs[1], raw_imgs[0], hook_n, a.repeat)
    io_us, io_w, io_wo = per_event(hw(), "io", "io0", a.n, a.repeat)
    cpuid_us, cp_w, cp_wo = per_event(hw(), "cpuid", "cpuid0", a.cpuid_n, a.repeat)
    ept_us, ept_w, ept_wo = per_event(hw(LAZY, 64), "ept", "ept0", a.ept_n, a.repeat)

    # Exit counts, so that the per-instruction figures can be read per exit too.
    n_io = exits(last["io"]).get("IO_INSTRUCTION", (0, 0))[0] - exits(last["io0"]).get("IO_INSTRUCTION", (0, 0))[0]
    n_cpuid = exits(last["cpuid"]).get("CPUID", (0, 0))[0]
    n_ept = exits(last["ept"]).get("EPT_VIOLATION", (0, 0))[0] - exits(last["ept0"]).get("EPT_VIOLATION", (0, 0))[0]

    # Compute-bound: hw (default preset) vs native, interleaved, best of R.
    nat = hwc = None
    for _ in range(a.repeat):
        r = hw_run(cpath, mode="native")
        nat = r if nat is None or r.wall_s < nat.wall_s else nat
        r = hw_run(cpath)
        hwc = r if hwc is None or r.wall_s < hwc.wall_s else hwc
    if nat.console != hwc.console:
        raise RuntimeError(f"hw console {hwc.console!r} != native {nat.console!r}")

    C.header(f"hw: {a.cpuid_n} CPUID, {a.n} I/O exits, {a.ept_n} EPT violations; compute ROUNDS={a.rounds}")
    print(f"CPUID round trip   / bare hook call : {cpuid_us / hook_us:7.1f}x   (target <= 10x)")
    print(f"I/O exit           / bare hook call : {io_us / hook_us:7.1f}x   (target <= 10x)")
    print(f"EPT violation exit / bare hook call : {ept_us / hook_us:7.1f}x   (target <= 10x)")
    print(f"hw / native compute speed           : {nat.wall_s / hwc.wall_s:7.2f}    (target >= 0.9)")
    print(f"  bare Unicorn hook call : {hook_us:8.2f} us  (raw loop, {hook_n} OUTs: {raw_with:.3f} s - {raw_without:.3f} s)")
    print(f"  CPUID round trip       : {cpuid_us:8.2f} us  ({cp_w:.3f} s - {cp_wo:.3f} s; {n_cpuid} CPUID exits "
          f"for {a.cpuid_n} instructions, handler mean {exits(last['cpuid']).get('CPUID', (0, 0))[1]:.1f} us)")
    print(f"  I/O exit               : {io_us:8.2f} us  ({io_w:.3f} s - {io_wo:.3f} s; {n_io} extra exits, "
          f"handler mean {exits(last['io']).get('IO_INSTRUCTION', (0, 0))[1]:.1f} us)")
    print(f"  EPT violation exit     : {ept_us:8.2f} us  ({ept_w:.3f} s - {ept_wo:.3f} s; {n_ept} extra exits, "
          f"handler mean {exits(last['ept']).get('EPT_VIOLATION', (0, 0))[1]:.1f} us)")
    print(f"  compute.S              : native {nat.wall_s:.3f} s ({nat.icount / nat.wall_s / 1e6:.0f} MIPS), "
          f"hw {hwc.wall_s:.3f} s ({hwc.icount / hwc.wall_s / 1e6:.0f} MIPS); hw exits "
          + ", ".join(f"{k} {v[0]}" for k, v in exits(hwc).items()))
    if not a.no_profile:
        small = {"cpuid": (4, 2000, None, 32), "io": (1, 2000, None, 32), "ept": (5, 1000, LAZY, 64)}
        for name, (e, n, opts, mem) in small.items():
            p = C.write_temp(C.build("events", EVENT=e, N=n), f"hw-prof-{name}")
            print(f"  cProfile, {name} loop N={n} (top {a.top} by own time):")
            for ln in profile_top(p, opts, mem, a.top):
                print("    " + ln)
    return {"hook_us": hook_us, "cpuid_us": cpuid_us, "io_us": io_us, "ept_us": ept_us,
            "native_s": nat.wall_s, "hw_s": hwc.wall_s}


if __name__ == "__main__":
    main()
