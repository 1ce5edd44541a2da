"""xv6 under every mode, beside QEMU: outcome, console equality, wall time, events by kind.

    python bench/xv6.py XV6_DIR [--modes native,trap,full,hw,hw-noept] [--session quick|full|usertests]
                                [--max-insns N] [--no-qemu | --qemu-seconds S] [--console-dir DIR]

XV6_DIR is an xv6-public checkout where `make kernelmemfs` has run (docs/xv6.md), or the kernel file
itself. Each mode runs the same scripted session through COM1, one line per shell prompt (cpuvirt's
--input-prompt '$ '); QEMU (`-nographic -m 512 -smp 1`, its default machine) is driven the same way
and its console, from xv6's first line on, is the reference. Wall times are measured here, in one
run, on whatever else the machine is doing: compare the ratios, not the seconds. QEMU's time is from
its first prompt (SeaBIOS's boot excluded); cpuvirt's is its run loop, boot included.

Per mode: the outcome (and, for a session with usertests, whether it printed ALL TESTS PASSED),
whether the console is QEMU's byte for byte, the wall time and its ratio to QEMU's, and the events
by kind, each with its most frequent reasons (trap cli, VM exit EPT_VIOLATION...).
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
         "hw": ("hw", {"vmx": [], "ept": True}), "hw-noept": ("hw", {"vmx": [], "ept": False}),
         # hw as before APIC virtualization: every local APIC access an EPT_VIOLATION exit
         "hw-noapicv": ("hw", {"vmx": ["virtualize_apic_accesses=0"], "ept": True})}
MEM_MIB = 256
USERTESTS_BUDGET = 20_000_000_000


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("xv6")
    ap.add_argument("--modes", default="native,trap,full,hw,hw-noept")
    ap.add_argument("--session", default="quick", choices=sorted(SESSIONS))
    ap.add_argument("--max-insns", type=lambda s: int(s.replace("_", ""), 0), default=None,
                    help="budget per run (0: none; default: none, or USERTESTS_BUDGET for a session with "
                         "usertests, whose `preempt` waits forever under trap)")
    ap.add_argument("--no-qemu", action="store_true")
    ap.add_argument("--qemu-seconds", type=float, default=None, metavar="S",
                    help="QEMU's time for this session measured earlier (QEMU is then not run; no console check)")
    ap.add_argument("--console-dir", metavar="DIR", help="write each mode's console to DIR/MODE.txt (QEMU's to DIR/qemu.txt)")
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

    reference, qemu_s = None, args.qemu_seconds
    if args.console_dir:
        Path(args.console_dir).mkdir(parents=True, exist_ok=True)
    if not args.no_qemu and qemu_s is None and qemu_available():
        reference, qemu_s, completed = qemu_xv6_session(kernel, lines)
        print(f"qemu      {'completed' if completed else 'TIMED OUT'}  {qemu_s:8.1f} s  "
              f"({len(reference)} console bytes)", flush=True)
        if args.console_dir:
            (Path(args.console_dir) / "qemu.txt").write_bytes(reference)

    usertests = "usertests" in lines
    if args.max_insns is None:
        # usertests takes 6.8 G instructions under native; under trap its `preempt` test never ends (the iret
        # hole, docs/xv6.md), so a run without a budget would never return
        args.max_insns = USERTESTS_BUDGET if usertests else 0
        if usertests:
            print(f"budget {USERTESTS_BUDGET:,} instructions per run (--max-insns to change it)", flush=True)
    print(f"{'mode':<9} {'outcome':<11} {'status':>6} {'usertests':<10} {'console':<9} {'wall s':>8} {'x qemu':>7} "
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
        passed = b"ALL TESTS PASSED" in res.console
        ok = res.outcome == "input_end" and same != "DIFFERS"
        if usertests:
            ok = ok and passed
        worst = worst or (0 if ok else 1)
        ratio = f"{wall / qemu_s:7.1f}" if qemu_s else "      -"
        mips = res.icount / wall / 1e6 if wall else 0
        ut = ("PASSED" if passed else "NOT PASSED") if usertests else "-"
        print(f"{name:<9} {res.outcome:<11} {res.status:>6} {ut:<10} {same:<9} {wall:8.1f} {ratio} {mips:6.1f}  "
              f"{events_by_kind(res)}", flush=True)
        if args.console_dir:
            (Path(args.console_dir) / f"{name}.txt").write_bytes(res.console)
        if same == "DIFFERS":
            a, b = res.console, reference
            at = next((i for i in range(min(len(a), len(b))) if a[i] != b[i]), min(len(a), len(b)))
            print(f"          first difference at byte {at}: cpuvirt {a[at:at + 60]!r} / qemu {b[at:at + 60]!r}")
        if res.outcome != "input_end":
            print(f"          {res.message}; console tail {res.console[-200:]!r}")
    return worst


def events_by_kind(res, reasons: int = 3) -> str:
    """'trap 58698 (cli 36547, sti 20571, out 955), interrupt 60 (...)': kinds by count, each with
    its most frequent reasons from the run's tally."""
    by_kind: dict[str, list] = {}
    for key, n in res.tally.items():
        kind, _, reason = key.partition(":")
        if reason:
            by_kind.setdefault(kind, []).append((n, reason))
    parts = []
    for kind, n in sorted(res.counts.items(), key=lambda kv: -kv[1]):
        split = by_kind.get(kind, [])
        top = sorted(split, reverse=True)[:reasons]
        # Reasons only where the tally splits the kind (io's has only the debug exit, say).
        detail = f" ({', '.join(f'{r} {c}' for c, r in top)})" if len(split) > 1 and \
            sum(c for c, _ in split) >= n // 2 else ""
        parts.append(f"{kind} {n}{detail}")
    return ", ".join(parts) or "none"


if __name__ == "__main__":
    sys.exit(main())
