"""A C kernel with interrupts off, as a new user writes one: cpuvirt (every mode that runs it) vs bare
Unicorn vs QEMU TCG, in one run.

bench/guests/ckernel/ (gcc -m32 -O2, .bss sharing .text's last page) does ROUNDS x (CRC-32 over 4 KiB
by table, a 2 KiB byte sieve, fib(16), an insertion sort of 96 words), about 112 000 instructions a
round, with IF = 0 from entry to exit: the PIT the firmware left running raises IRQ 0 after 55 ms of
virtual time, and it stays pending for the rest of the run (the interrupt-window case of issue 12).
Times: cpuvirt RunResult.wall_s (the run loop), bare Unicorn's emu_start (bench/rawuc.py, same lazy-
execute fill), QEMU time(ROUNDS) - time(ROUNDS=0) (start-up excluded); best of R, interleaved.
usage: python bench/ckernel.py [--rounds N] [--repeat R] [--modes native,trap,full,hw]
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
import rawuc  # noqa: E402

SRC = C.GUEST_DIR / "ckernel"


def build(rounds: int) -> str | None:
    """The kernel as an ELF file (None if gcc -m32 is missing)."""
    if shutil.which("gcc") is None:
        return None
    out = Path(tempfile.gettempdir()) / f"cpuvirt-ckernel-{rounds}.elf"
    cmd = ["gcc", "-m32", "-ffreestanding", "-fno-pie", "-no-pie", "-nostdlib", "-O2", "-fno-stack-protector",
           f"-DROUNDS={rounds}", "-T", str(SRC / "link.ld"), "-Wl,--build-id=none", "-Wl,--no-warn-rwx-segments",
           "-o", str(out), str(SRC / "boot.S"), str(SRC / "kernel.c")]
    p = subprocess.run(cmd, capture_output=True, text=True)
    return None if p.returncode else str(out)


def run_mode(path: str, mode: str):
    from cpuvirt.runner import run_guest
    r = run_guest(path, mode=mode, max_insns=0)
    if r.outcome != "exit" or r.status != 0:
        raise RuntimeError(f"{path} under {mode}: {r.outcome} {r.status} {r.message} {r.console!r}")
    return r


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2700, help="rounds (~112 000 instructions each)")
    ap.add_argument("--repeat", type=int, default=3, help="best of this many runs per configuration")
    ap.add_argument("--modes", default="native,trap,full,hw")
    a = ap.parse_args(argv)
    path, path0 = build(a.rounds), build(0)
    if path is None:
        print("== ckernel: skipped (gcc -m32 cannot build here; install gcc-multilib)")
        return {}
    modes = a.modes.split(",")
    image = Path(path).read_bytes()
    best: dict[str, object] = {}
    raw_s = None
    for _ in range(a.repeat):
        for mode in modes:
            r = run_mode(path, mode)
            if mode not in best or r.wall_s < best[mode].wall_s:
                best[mode] = r
        console, s = rawuc.run(image)
        raw_s = s if raw_s is None else min(raw_s, s)
    nat = best[modes[0]]
    if console != nat.console:
        raise RuntimeError(f"raw unicorn console {console!r} != cpuvirt {nat.console!r}")
    q = None
    if C.qemu_available():
        qn, qout = C.qemu_time(path, a.repeat)
        q0, _ = C.qemu_time(path0, a.repeat)
        if qout.strip() != nat.console.strip():
            raise RuntimeError(f"QEMU console {qout!r} != cpuvirt {nat.console!r}")
        q = qn - q0
    insns = nat.icount
    C.header(f"ckernel: {nat.console.decode().strip()}  ({insns / 1e6:.1f} M instructions, IF = 0 throughout)")
    print(f"{modes[0]} / raw unicorn speed : {raw_s / nat.wall_s:.2f}   (target >= 0.9)")
    if q:
        print(f"{modes[0]} / QEMU TCG time     : {nat.wall_s / q:.2f}   (target <= 1.0)")
        print(f"raw unicorn / QEMU TCG time : {raw_s / q:.2f}")
    for mode in modes[1:]:
        print(f"{mode} / {modes[0]} speed{' ' * (14 - len(mode))}: {nat.wall_s / best[mode].wall_s:.2f}")
    for mode in modes:
        r = best[mode]
        print(f"  cpuvirt {mode:<6} : {r.wall_s:.3f} s  {insns / r.wall_s / 1e6:6.0f} MIPS")
    print(f"  raw unicorn    : {raw_s:.3f} s  {insns / raw_s / 1e6:6.0f} MIPS")
    if q:
        print(f"  QEMU TCG       : {q:.3f} s  {insns / q / 1e6:6.0f} MIPS  (start-up subtracted)")
    return {"raw_s": raw_s, "qemu_s": q, **{m: best[m].wall_s for m in modes}}


if __name__ == "__main__":
    main()
