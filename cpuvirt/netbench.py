"""`cpuvirt net-bench`: what one frame costs under each virtio-net backend and CPU mode.

The workload is netdemo's `bench` (nothing printed after initialisation) with a loopback peer: a
burst of N single-descriptor frames, one kick per frame, each coming straight back into a posted
receive buffer; a frame is that round trip (one transmit, one receive). Every figure is the
difference between that run and `bench noframes` (initialisation only), divided by the frames:

- exits: the mode's own exit events (native: I/O hook calls; trap: traps; full: callouts; hw: VM
  exits; para: I/O and hypercalls) plus delivered interrupts;
- copies: frames copied out of or into guest RAM by the data path (for vhost-user, as the backend
  process reports them, in the cache-line runs);
- kicks and interrupts: notify writes that reached the device, interrupts it raised; suppressed:
  interrupts EVENT_IDX (or NO_INTERRUPT) told the device to skip;
- host time: the run loop's wall time (best of --repeat), and frames per second of it;
- cache lines: ring lines moved between the driver's CPU and the backend's (virtio/cacheline.py),
  measured in a second pair of runs with the model on (its hooks would distort the time).

A second table gives, per ring variant (DPDK's fixed available-ring mapping, EVENT_IDX on or off), the
kicks, interrupts, suppressions and cache-line transfers (native; the guest's ring accesses are the
same in every mode).
"""

from __future__ import annotations

import gc
import json
import sys
from dataclasses import asdict, dataclass

from cpuvirt.errors import CpuvirtError

EXIT_KINDS = {
    "native": ("io",),
    "trap": ("trap",),
    "full": ("callout",),
    "para": ("io", "hypercall"),
    "hw": ("vmexit",),
}
BACKENDS = ("userspace", "vhost", "vhost-user")
DEFAULT_MODES = ("native", "trap", "full", "hw")
VARIANTS = (
    ("split ring, EVENT_IDX", "single"),
    ("fixed avail mapping, EVENT_IDX", "fixed"),
    ("split ring, no EVENT_IDX", "single noevent"),
    ("fixed avail mapping, no EVENT_IDX", "fixed noevent"),
)


@dataclass
class Row:
    mode: str
    backend: str
    frames: int
    exits: float
    copies: float | None
    kicks: float | None
    interrupts: float | None
    suppressed: float | None
    host_us: float | None  # None: the difference was lost in the noise (too few frames)
    frames_per_s: float | None
    cachelines: float | None
    note: str = ""


@dataclass
class LineRow:
    variant: str
    backend: str
    frames: int
    kicks: float
    interrupts: float
    suppressed: float
    to_driver: float
    to_device: float
    total: float


class Progress:
    """A one-line bar on stderr, redrawn after each run."""

    def __init__(self, total: int, stream=sys.stderr):
        self.total, self.done, self.stream = total, 0, stream

    def step(self, what: str) -> None:
        self.done += 1
        width = 30
        filled = width * self.done // self.total
        self.stream.write(f"\rnet-bench [{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} {what:<44}")
        self.stream.flush()

    def close(self) -> None:
        self.stream.write("\r" + " " * 100 + "\r")  # the bar goes away; the table stays
        self.stream.flush()


_IMAGES: dict = {}


def _image(pv: bool) -> str:
    """netdemo assembled once per process (and build): a file every run reads."""
    if pv not in _IMAGES:
        import atexit
        import os
        import tempfile

        from cpuvirt.toolchain.build import build_guest

        fd, path = tempfile.mkstemp(prefix="netdemo-", suffix=".pv.bin" if pv else ".bin")
        with os.fdopen(fd, "wb") as f:
            f.write(build_guest("netdemo", pv))
        atexit.register(os.unlink, path)
        _IMAGES[pv] = path
    return _IMAGES[pv]


def _run(mode: str, backend: str, cmdline: str, cachelines: bool = False):
    from cpuvirt.runner import run_guest
    from cpuvirt.virtio.setup import DeviceSpec

    gc.collect()
    r = run_guest(
        _image(mode == "para"),
        mode,
        cmdline=cmdline,
        max_insns=0,
        devices=[DeviceSpec("virtio-net", peer="loopback", backend=backend, cachelines=cachelines)],
    )
    if r.outcome != "exit" or r.status != 0:
        raise CpuvirtError(
            f"net-bench: netdemo '{cmdline}' under {mode}, backend {backend}: {r.outcome} "
            f"(status {r.status}) {r.message}"
        )
    return r


def _exits(r, mode: str) -> int:
    return sum(r.counts.get(k, 0) for k in EXIT_KINDS[mode] + ("interrupt",))


def measure(modes, backends, frames: int, repeat: int, cachelines: bool, progress: Progress | None):
    rows, lines = [], []
    burst = f"bench single burst={frames}"

    def step(what):
        if progress is not None:
            progress.step(what)

    for mode in modes:
        _run(mode, "userspace", "bench noframes")  # warm-up: the first run in a process pays extra
        step(f"{mode} (warm-up)")
        for backend in backends:
            if mode == "para" and backend == "vhost-user":
                rows.append(
                    Row(
                        mode,
                        backend,
                        0,
                        0,
                        None,
                        0,
                        0,
                        None,
                        0,
                        0,
                        None,
                        "refused: the backend process would write frames direct paging typed",
                    )
                )
                for _ in range(2 * repeat + (2 if cachelines else 0)):
                    step(f"{mode} {backend}")
                continue
            best = base = None
            for _ in range(repeat):
                r = _run(mode, backend, burst)
                step(f"{mode} {backend}")
                b = _run(mode, backend, "bench noframes")
                step(f"{mode} {backend} (baseline)")
                if best is None or r.wall_s < best.wall_s:
                    best = r
                if base is None or b.wall_s < base.wall_s:
                    base = b
            assert best is not None and base is not None  # repeat >= 1
            d, d0 = best.devices[0], base.devices[0]
            n = d["tx_frames"] - d0["tx_frames"]
            if n <= 0:
                raise CpuvirtError(f"net-bench: no frame went through under {mode}, backend {backend}")
            per = lambda key, d=d, d0=d0, n=n: (d[key] - d0[key]) / n if key in d else None  # noqa: E731
            us = (best.wall_s - base.wall_s) / n * 1e6
            if us <= 0:  # lost in the noise: too few frames for host time
                us = float("nan")
            line = copies = suppressed = None
            copies, suppressed = per("copies"), per("interrupts_suppressed")
            if cachelines:
                c = _run(mode, backend, burst, cachelines=True)
                step(f"{mode} {backend} (cache lines)")
                c0 = _run(mode, backend, "bench noframes", cachelines=True)
                step(f"{mode} {backend} (cache lines, baseline)")
                line = _lines(c, c0)[2]
                cd, cd0 = c.devices[0], c0.devices[0]
                if copies is None and "copies" in cd:  # vhost-user: the backend process reports
                    copies = (cd["copies"] - cd0["copies"]) / n
                    suppressed = (cd["interrupts_suppressed"] - cd0["interrupts_suppressed"]) / n
            rows.append(
                Row(
                    mode,
                    backend,
                    n,
                    (_exits(best, mode) - _exits(base, mode)) / n,
                    copies,
                    per("notifications"),
                    per("interrupts"),
                    suppressed,
                    None if us != us else us,
                    None if us != us else 1e6 / us,
                    line,
                )
            )
    if cachelines:
        for backend in backends:
            for name, options in VARIANTS:
                c = _run("native", backend, f"bench {options} burst={frames}", cachelines=True)
                step(f"cache lines: {options}")
                c0 = _run("native", backend, f"bench noframes {options}", cachelines=True)
                step(f"cache lines: {options} (baseline)")
                n, to_driver, total, to_device = _lines(c, c0, split=True)
                d, d0 = c.devices[0], c0.devices[0]
                per = lambda key, d=d, d0=d0, n=n: (d[key] - d0[key]) / n  # noqa: E731
                lines.append(
                    LineRow(
                        name,
                        backend,
                        n,
                        per("notifications"),
                        per("interrupts"),
                        per("interrupts_suppressed"),
                        to_driver,
                        to_device,
                        total,
                    )
                )
    return rows, lines


def _lines(c, c0, split: bool = False):
    d, d0 = c.devices[0], c0.devices[0]
    n = d["tx_frames"] - d0["tx_frames"]
    to_driver = (d["cachelines_to_driver"] - d0["cachelines_to_driver"]) / n
    to_device = (d["cachelines_to_device"] - d0["cachelines_to_device"]) / n
    return (n, to_driver, to_driver + to_device, to_device) if split else (n, to_driver, to_driver + to_device)


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(rows, lines, frames: int) -> str:
    out = [
        f"netdemo: ARP, ping and a burst of {frames} frames, one kick each, echoed by a loopback peer; "
        "per frame, initialisation subtracted",
        f"{'mode':<7} {'backend':<11} {'exits':>6} {'copies':>6} {'kicks':>6} {'irqs':>6} {'suppr':>6} "
        f"{'host us':>8} {'frames/s':>9} {'lines':>6}",
    ]
    for r in rows:
        if r.note:
            out.append(f"{r.mode:<7} {r.backend:<11} {r.note}")
            continue
        out.append(
            f"{r.mode:<7} {r.backend:<11} {r.exits:>6.2f} {_fmt(r.copies, '6.2f'):>6} {r.kicks:>6.2f} "
            f"{r.interrupts:>6.2f} {_fmt(r.suppressed, '6.2f'):>6} {_fmt(r.host_us, '8.1f'):>8} "
            f"{_fmt(r.frames_per_s, '9.0f'):>9} "
            f"{_fmt(r.cachelines, '6.2f'):>6}"
        )
    out.append(
        "vhost-user: copies, suppressions and the backend's ring lines as its process reports them "
        "(measured in the cache-line runs; '-' with --no-cachelines)"
    )
    if lines:
        out += [
            "",
            "ring variants, per frame (native): kicks, interrupts, EVENT_IDX suppressions, and cache-line "
            "transfers (64-byte ring lines between the driver's and the backend's CPU)",
            f"{'ring':<36} {'backend':<11} {'kicks':>6} {'irqs':>6} {'suppr':>6} {'to driver':>9} "
            f"{'to device':>9} {'lines':>6}",
        ]
        for x in lines:
            out.append(
                f"{x.variant:<36} {x.backend:<11} {x.kicks:>6.2f} {x.interrupts:>6.2f} {x.suppressed:>6.2f} "
                f"{x.to_driver:>9.2f} {x.to_device:>9.2f} {x.total:>6.2f}"
            )
    return "\n".join(out)


def main(modes: str, backends: str, frames: int, repeat: int, as_json: bool, cachelines: bool) -> int:
    from cpuvirt.modes import MODES

    mode_list = [m for m in modes.split(",") if m]
    backend_list = [b for b in backends.split(",") if b]
    for m in mode_list:
        if m not in EXIT_KINDS or m not in MODES:
            raise CpuvirtError(f"net-bench --modes: unknown mode {m!r} (known: {', '.join(EXIT_KINDS)})")
    for b in backend_list:
        if b not in BACKENDS:
            raise CpuvirtError(f"net-bench --backends: unknown backend {b!r} (known: {', '.join(BACKENDS)})")
    if not mode_list or not backend_list:
        raise CpuvirtError("net-bench: give at least one mode and one backend")
    if not 1 <= frames <= 100000:
        raise CpuvirtError("net-bench --frames: between 1 and 100000")
    if not 1 <= repeat <= 20:
        raise CpuvirtError("net-bench --repeat: between 1 and 20")
    total = len(mode_list) * (1 + len(backend_list) * (2 * repeat + (2 if cachelines else 0)))
    total += 2 * len(VARIANTS) * len(backend_list) if cachelines else 0
    progress = Progress(total)
    try:
        rows, lines = measure(mode_list, backend_list, frames, repeat, cachelines, progress)
    finally:
        progress.close()
    if as_json:
        print(
            json.dumps(
                {
                    "workload": "netdemo bench single, loopback peer, one kick per frame",
                    "frames": frames,
                    "repeat": repeat,
                    "rows": [asdict(r) for r in rows],
                    "cachelines": [asdict(x) for x in lines],
                },
                indent=1,
            )
        )
    else:
        print(table(rows, lines, frames))
    return 0
