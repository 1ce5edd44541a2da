"""kvm-unit-tests' `sieve` (paging and allocation throughput) under QEMU TCG and cpuvirt's modes, in one run.

x86/sieve.flat sieves 1 MB statically, 1 MB mapped, then three times 100 MB of freshly allocated virtual
memory (128 MiB of RAM): about 7.8 G instructions and, under native, 177 M TLB fills. It measures the
TLB-miss path: the engine's TLB refills constantly, so each fill must not cost a Python call.

    python bench/sieve.py /work/kut/src [--modes native,trap,full,hw,hw-noept] [--no-qemu]

Each run is one process (`python -m cpuvirt run ... --max-insns 0 --summary`); cpuvirt's time is the run
loop's (RunResult.wall_s, start-up excluded), QEMU's the whole process (its start-up is ~0.1 s here). The
runs are made one after another in this one invocation, and every ratio is to QEMU's time in it. A
mode that does not finish within --timeout seconds is reported as such.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODES = ("native", "trap", "full", "hw")


def run_qemu(flat: Path, timeout: float) -> tuple[float | None, str]:
    cmd = ["qemu-system-i386", "-nodefaults", "-display", "none", "-serial", "stdio", "-no-reboot", "-m", "128",
           "-device", "isa-debug-exit,iobase=0xf4,iosize=0x4", "-device", "pc-testdev", "-kernel", str(flat)]
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout, check=False)
    except FileNotFoundError:
        return None, "qemu-system-i386 not installed"
    except subprocess.TimeoutExpired:
        return None, f"did not finish in {timeout:.0f} s"
    wall = time.perf_counter() - t0
    ok = p.returncode == 1 and b"FAIL" not in p.stdout  # isa-debug-exit: (0 << 1) | 1
    return (wall, "") if ok else (None, f"status {p.returncode}")


def run_mode(flat: Path, mode: str, timeout: float) -> tuple[float | None, str]:
    with tempfile.TemporaryDirectory() as d:
        summary = Path(d) / "s.json"
        cmd = [sys.executable, "-m", "cpuvirt", "run", str(flat), "--mode", mode.split("-")[0], "--mem", "128",
               "--max-insns", "0", "-q", "--summary", str(summary)] + (["--no-ept"] if mode == "hw-noept" else [])
        try:
            p = subprocess.run(cmd, cwd=REPO, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            return None, f"did not finish in {timeout:.0f} s"
        if p.returncode != 0 or not summary.exists():
            return None, f"status {p.returncode}: {p.stderr.decode(errors='replace').strip()[-200:]}"
        s = json.loads(summary.read_text())
        if b"FAIL" in p.stdout:
            return None, "FAIL on the console"
        mmu = s["mmu"]
        return s["wall_s"], f"{s['icount'] / 1e9:.2f} G instructions, {mmu['fills'] / 1e6:.1f} M TLB fills"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("build", type=Path, help="a kvm-unit-tests tree built with ./configure --arch=i386")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--no-qemu", action="store_true")
    ap.add_argument("--timeout", type=float, default=900.0)
    a = ap.parse_args(argv)
    flat = a.build / "x86" / "sieve.flat"
    if not flat.exists():
        print(f"sieve: no {flat} (build kvm-unit-tests with ./configure --arch=i386 && make)", file=sys.stderr)
        return 2
    qemu = None
    if not a.no_qemu:
        qemu, why = run_qemu(flat, a.timeout)
        print(f"{'QEMU TCG':10s} {qemu:8.1f} s" if qemu is not None else f"{'QEMU TCG':10s} {why}", flush=True)
    for mode in a.modes.split(","):
        wall, why = run_mode(flat, mode, a.timeout)
        if wall is None:
            print(f"{mode:10s} {why}", flush=True)
            continue
        ratio = f"  {wall / qemu:5.2f}x QEMU" if qemu else ""
        print(f"{mode:10s} {wall:8.1f} s{ratio}  ({why})", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
