"""Paravirtual vs emulated I/O: exits and host time per frame, netdemo's frames through virtio-net
versus the same bytes through COM1, in every CPU mode (docs/performance.md, "Paravirtual I/O").

netdemo (guests/netdemo.S) with `--device virtio-net,peer=user` is run three ways per mode:
  - `bench`:          its 304 frames (ARP, ping, a 1514-byte chain, an indirect frame, a burst of 300)
                      through the virtio rings; nothing printed after initialisation;
  - `bench com1`:     the same frames' bytes written to COM1 instead, polled, a byte at a time;
  - `bench noframes`: initialisation only, the baseline subtracted from both.
Per frame = (run - baseline) / 304. "Exits" are the interventions of the mode's own kind (native:
I/O hook calls; trap: traps; full: callouts; hw: VM exits; para: hypercalls and granted port I/O),
plus delivered interrupts. Host time is the run loop's wall time, best of --repeat runs, each after a
gc.collect() (otherwise the collection of earlier runs' machines lands inside a later run's timing).
usage: python bench/virtio.py [--repeat R] [--modes native,trap,full,hw,para]
"""
from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cpuvirt.runner import run_guest  # noqa: E402
from cpuvirt.virtio.setup import DeviceSpec  # noqa: E402

FRAMES = 304
EXIT_KINDS = {"native": ("io",), "trap": ("trap",), "full": ("callout",), "hw": ("vmexit",),
              "para": ("hypercall", "io")}
NIC = [DeviceSpec("virtio-net", peer="user")]


def run(mode: str, cmdline: str, repeat: int):
    best = None
    for _ in range(repeat):
        gc.collect()            # the previous runs' machines are freed now, not inside this one's timing
        r = run_guest("netdemo", mode, cmdline=cmdline, devices=NIC, max_insns=0)
        if r.outcome != "exit" or r.status != 0:
            raise SystemExit(f"netdemo {mode} '{cmdline}': {r.outcome} {r.status} {r.message}")
        if best is None or r.wall_s < best.wall_s:
            best = r
    return best


def exits(mode: str, r) -> int:
    return sum(r.counts.get(k, 0) for k in EXIT_KINDS[mode] + ("interrupt",))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--modes", default="native,trap,full,hw,para")
    args = ap.parse_args()
    print(f"{FRAMES} frames, {19854 / FRAMES:.1f} bytes each on average; per frame, baseline subtracted; "
          f"best of {args.repeat}")
    print(f"{'mode':<7} {'virtio exits':>13} {'COM1 exits':>11} {'ratio':>7}   {'virtio us':>10} {'COM1 us':>9} {'ratio':>7}")
    for mode in args.modes.split(","):
        base = run(mode, "bench noframes", args.repeat)
        ring = run(mode, "bench", args.repeat)
        serial = run(mode, "bench com1", args.repeat)
        e_ring = (exits(mode, ring) - exits(mode, base)) / FRAMES
        e_serial = (exits(mode, serial) - exits(mode, base)) / FRAMES
        t_ring = (ring.wall_s - base.wall_s) / FRAMES * 1e6
        t_serial = (serial.wall_s - base.wall_s) / FRAMES * 1e6
        print(f"{mode:<7} {e_ring:>13.3f} {e_serial:>11.1f} {e_serial / e_ring if e_ring else float('inf'):>6.0f}x"
              f"   {t_ring:>10.1f} {t_serial:>9.1f} {t_serial / t_ring if t_ring > 0 else float('inf'):>6.1f}x",
              flush=True)


if __name__ == "__main__":
    main()
