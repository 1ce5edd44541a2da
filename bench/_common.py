"""Shared helpers for the bench scripts: build a bench guest, time things, print a table."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
GUEST_DIR = BENCH_DIR / "guests"
REPO_DIR = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))
# Measure the tree these scripts live in, whatever `pip install -e` currently points at.
sys.path.insert(0, str(REPO_DIR))

QEMU = "qemu-system-i386"
QEMU_ARGS = ["-nodefaults", "-nographic", "-monitor", "none", "-serial", "stdio", "-no-reboot", "-m", "32",
             "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04", "-fw_cfg", "name=etc/sercon-port,string=0"]


def build(name: str, **defines) -> bytes:
    """Assemble bench/guests/NAME.S with the given preprocessor defines into a Multiboot image."""
    from cpuvirt.toolchain.build import include_dir
    from cpuvirt.toolchain.image import build_image
    from cpuvirt.toolchain.preprocess import preprocess
    pre = preprocess(GUEST_DIR / f"{name}.S", {"PV": 0, **defines}, [include_dir()])
    return build_image(pre.lines)[0]


def write_temp(image: bytes, stem: str) -> str:
    d = Path(tempfile.gettempdir()) / f"cpuvirt-bench-{os.getpid()}"
    d.mkdir(exist_ok=True)
    p = d / f"{stem}.bin"
    p.write_bytes(image)
    return str(p)


def cpuvirt_run(path: str):
    """One native run; the RunResult (its wall_s is the run loop only)."""
    from cpuvirt.runner import run_guest
    r = run_guest(path, mode="native", max_insns=0)
    if r.outcome != "exit" or r.status != 0:
        raise RuntimeError(f"{path}: {r.outcome} {r.status} {r.message} {r.console!r}")
    return r


def cpuvirt_best(path: str, repeat: int):
    best = None
    for _ in range(repeat):
        r = cpuvirt_run(path)
        if best is None or r.wall_s < best.wall_s:
            best = r
    return best


def qemu_available() -> bool:
    return shutil.which(QEMU) is not None


def qemu_time(path: str, repeat: int = 3) -> tuple[float, bytes]:
    """Best-of-N wall time of a whole qemu-system-i386 (TCG) process running the image."""
    best, out = None, b""
    for _ in range(repeat):
        t = time.perf_counter()
        p = subprocess.run([QEMU, *QEMU_ARGS, "-kernel", path], capture_output=True, timeout=120)
        s = time.perf_counter() - t
        out = p.stdout
        best = s if best is None else min(best, s)
    return best, out


def header(title: str) -> None:
    print(f"== {title}")
