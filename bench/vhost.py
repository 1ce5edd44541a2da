"""The three virtio-net backends side by side: what one frame costs under each (docs/virtio.md,
"Three backends"; docs/performance.md, "Paravirtual I/O, part 2").

netdemo `bench` (its 304 frames through the rings, peer=user) minus `bench noframes` (initialisation
only), per frame, for backend=userspace|vhost|vhost-user in each mode asked for. Columns: guest exits
of the mode's own kind (native: I/O hook calls; hw: VM exits...) plus delivered interrupts; kicks
(notify writes); interrupts the device raised; host time (the run loop's wall time, best of
--repeat, after gc.collect()), and frames per second of host time. For vhost-user the host time
includes the round trip to the backend process for every kick (the acknowledged in-band kick).
usage: python bench/vhost.py [--repeat R] [--modes native,hw]
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
EXIT_KINDS = {"native": ("io",), "trap": ("trap",), "full": ("callout",), "hw": ("vmexit",)}
BACKENDS = ("userspace", "vhost", "vhost-user")


def run(mode: str, backend: str, cmdline: str, repeat: int):
    best = None
    for _ in range(repeat):
        gc.collect()
        r = run_guest("netdemo", mode, cmdline=cmdline, max_insns=0,
                      devices=[DeviceSpec("virtio-net", peer="user", backend=backend)])
        if r.outcome != "exit" or r.status != 0:
            raise SystemExit(f"netdemo {mode} {backend} '{cmdline}': {r.outcome} {r.status} {r.message}")
        if best is None or r.wall_s < best.wall_s:
            best = r
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--modes", default="native,hw")
    args = ap.parse_args()
    print(f"{FRAMES} frames; per frame, initialisation subtracted; host time best of {args.repeat}")
    print(f"{'mode':<7} {'backend':<11} {'exits':>7} {'kicks':>7} {'irqs':>7} {'host us':>9} {'frames/s':>9}")
    for mode in args.modes.split(","):
        for backend in BACKENDS:
            base = run(mode, backend, "bench noframes", args.repeat)
            r = run(mode, backend, "bench", args.repeat)
            ex = lambda x: sum(x.counts.get(k, 0) for k in EXIT_KINDS[mode] + ("interrupt",))
            d, d0 = r.devices[0], base.devices[0]
            us = (r.wall_s - base.wall_s) / FRAMES * 1e6
            print(f"{mode:<7} {backend:<11} {(ex(r) - ex(base)) / FRAMES:>7.3f} "
                  f"{(d['notifications'] - d0['notifications']) / FRAMES:>7.3f} "
                  f"{(d['interrupts'] - d0['interrupts']) / FRAMES:>7.3f} {us:>9.1f} "
                  f"{1e6 / us if us > 0 else float('inf'):>9.0f}", flush=True)


if __name__ == "__main__":
    main()
