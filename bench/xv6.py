"""xv6 under every mode, beside QEMU: outcome, console equality, wall time, events by kind.

    python bench/xv6.py XV6_DIR [--modes native,trap,full,hw,hw-noept] [--session quick|full|usertests]
                                [--max-insns N] [--no-qemu]

XV6_DIR is an xv6-public checkout where `make kernelmemfs` has run (docs/xv6.md), or the kernel file
itself. Each mode runs the same scripted session through COM1, one line per shell prompt (cpuvirt's
--input-prompt '$ '); QEMU (`-nographic -m 512 -smp 1`, its default machine) is driven the same way
and its console, from xv6's first line on, is the reference. Wall times are measured here, in one
run, on whatever else the machine is doing: compare the ratios, not the seconds. QEMU's time is from
its first prompt (SeaBIOS's boot excluded); cpuvirt's is its run loop, boot included.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import _common  # noqa: F401  (puts this tree first on sys.path)

from cpuvirt.runner import run_guest
from tests.qemu import qemu_available, qemu_xv6_session

SESSIONS = {
    "quick": ["echo hello xv6", "ls"],
    "full": ["ls", "echo hello xv6", "cat README", "wc README", "grep the README", "forktest", "stressfs",
             "usertests"],
    "usertests": ["usertests"],
}
MODES = {"native": ("native", None), "trap": ("trap", None), "full": ("full", None),
         "hw": ("hw", {"vmx": [], "ept": True}), "hw-noept": ("hw", {"vmx": [], "ept": False})}
MEM_MIB = 256


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("xv6")
    ap.add_argument("--modes", default="native,trap,full,hw,hw-noept")
    ap.add_argument("--session", default="quick", choices=sorted(SESSIONS))
    ap.add_argument("--max-insns", type=lambda s: int(s.replace("_", ""), 0), default=0,
                    help="budget per run (default 0: none)")
    ap.add_argument("--no-qemu", action="store_true")
    args = ap.parse_args()
    kernel = Path(args.xv6)
    if kernel.is_dir():
        kernel = kernel / "kernelmemfs"
    if not kernel.is_file():
        print(f"xv6.py: no kernel at {kernel} (run `make kernelmemfs` in the xv6 checkout)", file=sys.stderr)
        return 2
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        print(f"xv6.py: unknown mode(s) {', '.join(unknown)}; choose from {', '.join(MODES)}", file=sys.stderr)
        return 2
    lines = SESSIONS[args.session]
    script = "".join(f"{line}\n" for line in lines).encode()

    reference, qemu_s = None, None
    if not args.no_qemu and qemu_available():
        reference, qemu_s, completed = qemu_xv6_session(kernel, lines)
        print(f"qemu      {'completed' if completed else 'TIMED OUT'}  {qemu_s:8.1f} s  "
              f"({len(reference)} console bytes)", flush=True)

    print(f"{'mode':<9} {'outcome':<11} {'status':>6} {'console':<9} {'wall s':>8} {'x qemu':>7} "
          f"{'MIPS':>6}  events")
    worst = 0
    for name in modes:
        mode, opts = MODES[name]
        t0 = time.perf_counter()
        res = run_guest(str(kernel), mode, MEM_MIB, args.max_insns, input_data=script, input_prompt=b"$ ",
                        mode_options=opts)
        wall = time.perf_counter() - t0
        if reference is None:
            same = "-"
        else:
            same = "same" if res.console == reference else "DIFFERS"
        ok = res.outcome == "input_end" and same != "DIFFERS"
        if args.session != "quick":
            ok = ok and (b"ALL TESTS PASSED" in res.console)
        worst = worst or (0 if ok else 1)
        ratio = f"{wall / qemu_s:7.1f}" if qemu_s else "      -"
        mips = res.icount / wall / 1e6 if wall else 0
        events = ", ".join(f"{k} {v}" for k, v in sorted(res.counts.items(), key=lambda kv: -kv[1]))
        print(f"{name:<9} {res.outcome:<11} {res.status:>6} {same:<9} {wall:8.1f} {ratio} {mips:6.1f}  {events}",
              flush=True)
        if same == "DIFFERS":
            a, b = res.console, reference
            at = next((i for i in range(min(len(a), len(b))) if a[i] != b[i]), min(len(a), len(b)))
            print(f"          first difference at byte {at}: cpuvirt {a[at:at + 60]!r} / qemu {b[at:at + 60]!r}")
        if res.outcome != "input_end":
            print(f"          {res.message}; console tail {res.console[-200:]!r}")
    return worst


if __name__ == "__main__":
    sys.exit(main())
