"""Cost of a local APIC access under hw with and without APIC virtualization, beside native's.

Per access = (time of the guest loop with the access - time of the same loop without it) / N, as in
bench/events.py, on bench/guests/events.S:
  - APIC ID read (xv6's lapicid(), on every spinlock): EVENT=7 (`mov eax, [0xFEE00020]`) vs EVENT=0,
    under native (the device's MMIO callback), hw's default preset (APIC-register virtualization: the
    read is served from the virtual-APIC page, no exit), hw with `apic_register_virtualization=0`
    (an APIC_ACCESS exit) and hw with `virtualize_apic_accesses=0` (an EPT_VIOLATION exit and the
    instruction emulated: hw before APIC virtualization);
  - the timer's current count (TMCCT, never virtualized): EVENT=8, hw default: an APIC_ACCESS exit;
  - an EOI write: EVENT=9, hw default: a virtualized write, then an APIC_WRITE exit.
The unit, measured in the same run: a bare Unicorn hook call (events.py's raw-Unicorn OUT-hook loop).
usage: python bench/apicv.py [--n N] [--slow-n N] [--repeat R]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
import rawuc  # noqa: E402
from events import bare_out_hook, per_event  # noqa: E402


def run(path: str, mode: str, vmx=None):
    from cpuvirt.runner import run_guest
    r = run_guest(path, mode=mode, max_insns=0, mode_options={"vmx": vmx} if mode == "hw" else None)
    if r.outcome != "exit" or r.status != 0:
        raise RuntimeError(f"{path} ({mode} {vmx}): {r.outcome} {r.status} {r.message} {r.console!r}")
    return r


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200_000, help="accesses for the cases with no exit")
    ap.add_argument("--slow-n", type=int, default=5_000, help="accesses for the cases that exit")
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args(argv)

    hook_n = 200_000
    raw = {e: C.build("events", EVENT=e, N=hook_n) for e in (0, 1)}
    hook_us, _, _ = per_event(lambda img: rawuc.run(img, bare_out_hook)[1], raw[1], raw[0], hook_n, a.repeat)

    cases = [  # (label, EVENT, N, mode, vmx, the exit each access makes)
        ("ID read, native (MMIO callback)", 7, a.n, "native", None, None),
        ("ID read, hw default (register virtualization)", 7, a.n, "hw", [], None),
        ("ID read, hw apic_register_virtualization=0", 7, a.slow_n, "hw", ["apic_register_virtualization=0"],
         "APIC_ACCESS"),
        ("ID read, hw virtualize_apic_accesses=0 (before)", 7, a.slow_n, "hw", ["virtualize_apic_accesses=0"],
         "EPT_VIOLATION"),
        ("TMCCT read, hw default", 8, a.slow_n, "hw", [], "APIC_ACCESS"),
        ("EOI write, hw default", 9, a.slow_n, "hw", [], "APIC_WRITE"),
    ]
    C.header(f"local APIC accesses; unit: a bare Unicorn hook call ({hook_us:.2f} us in this run)")
    out = {"hook_us": hook_us}
    for label, event, n, mode, vmx, reason in cases:
        with_p = C.write_temp(C.build("events", EVENT=event, N=n), f"apicv-{event}-{n}")
        base_p = C.write_temp(C.build("events", EVENT=0, N=n), f"apicv-0-{n}")
        last = {}

        def timed(path, mode=mode, vmx=vmx, last=last):
            r = run(path, mode, vmx)
            last[path] = r
            return r.wall_s

        us, t_with, t_without = per_event(timed, with_p, base_p, n, a.repeat)
        exits = {row[0]: row[2] for row in last[with_p].exit_stats}
        if reason is not None and exits.get(reason, 0) < n:
            raise RuntimeError(f"{label}: expected {n} {reason} exits, got {exits}")
        if reason is None and mode == "hw" and sum(exits.values()) > 100:
            raise RuntimeError(f"{label}: expected no exit per access, got {exits}")
        print(f"{label:<50} {us:9.2f} us  {us / hook_us:8.1f}x  ({t_with:.3f} s - {t_without:.3f} s, N={n}"
              f"{', ' + reason + ' per access' if reason else ''})")
        out[label] = us
    return out


if __name__ == "__main__":
    main()
