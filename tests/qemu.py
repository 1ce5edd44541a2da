"""Run a Multiboot image under QEMU, the reference implementation of cpuvirt's machine (DESIGN.md 2)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

QEMU = "qemu-system-i386"
QEMU_ARGS = [
    "-nodefaults", "-nographic", "-monitor", "none", "-serial", "stdio", "-no-reboot", "-m", "32",
    "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
    "-fw_cfg", "name=etc/sercon-port,string=0",  # keeps SeaBIOS off COM1 (QEMU warns on stderr)
]
TIMEOUT_STATUS = 124  # what coreutils' timeout returns


def qemu_available() -> bool:
    return shutil.which(QEMU) is not None


def qemu_command(image_path: Path | str, extra=()) -> list[str]:
    return [QEMU, *QEMU_ARGS, *extra, "-kernel", str(image_path)]


def run_under_qemu(image_path: Path | str, timeout: float = 20, extra=()) -> tuple[bytes, int]:
    """Boot image_path; return (the guest's COM1 output, QEMU's exit status).

    A debug-exit write of v gives status (v << 1) | 1, so a guest reporting success (0) gives 1.
    When the guest has not exited after `timeout` seconds QEMU is killed and the status is 124,
    as with coreutils' timeout; the output written until then is returned.
    """
    try:
        p = subprocess.run(
            qemu_command(image_path, extra), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, timeout=timeout, check=False,
        )
    except subprocess.TimeoutExpired as e:
        return (e.stdout or b""), TIMEOUT_STATUS
    return p.stdout, p.returncode
