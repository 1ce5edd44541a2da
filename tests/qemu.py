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


def assert_same_console_as_qemu(image_path: Path | str, devices, qemu_extra, cmdline: str = "",
                                timeout: float = 30) -> bytes:
    """Run the image under cpuvirt with `devices` and under QEMU with `qemu_extra` (its -device/-netdev
    arguments) and the same kernel command line; both must exit 0 with the same console, returned."""
    from cpuvirt.runner import run_guest
    ours = run_guest(str(image_path), cmdline=cmdline, devices=devices)
    extra = list(qemu_extra) + (["-append", cmdline] if cmdline else [])
    theirs, status = run_under_qemu(image_path, timeout=timeout, extra=extra)
    assert ours.status == 0 and status == 1, theirs.decode(errors="replace")[-400:]
    assert ours.console == theirs
    return ours.console


XV6_QEMU_ARGS = ["-nographic", "-no-reboot", "-m", "512", "-smp", "1"]
"""xv6 needs QEMU's default machine (no -nodefaults): with no i8042 its keyboard status port reads
0xFF and its console loops on phantom key presses. SeaBIOS then prints on COM1 before xv6 does."""
XV6_FIRST_LINE = b"xv6...\n"


def qemu_xv6_session(kernel: Path | str, lines: list[str], prompt: bytes = b"$ ",
                     timeout: float = 900) -> tuple[bytes, float, bool]:
    """Boot an xv6 kernelmemfs under QEMU and type each line once the console ends with `prompt`,
    as cpuvirt's `--input-prompt` does; stop when the prompt follows the last line.

    Returns (console from xv6's first line on, wall seconds from the first prompt to the end,
    whether the session completed before `timeout`).
    """
    import os
    import select
    import time
    p = subprocess.Popen([QEMU, *XV6_QEMU_ARGS, "-kernel", str(kernel)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    out = bytearray()
    pending = list(lines)
    t0 = time.monotonic()
    first_prompt = None
    completed = False
    try:
        os.set_blocking(p.stdout.fileno(), False)
        while time.monotonic() - t0 < timeout:
            ready, _, _ = select.select([p.stdout], [], [], 0.5)
            if ready:
                chunk = p.stdout.read()
                if not chunk:
                    break
                out += chunk
            if out.endswith(prompt) and XV6_FIRST_LINE in out:
                if first_prompt is None:
                    first_prompt = time.monotonic()
                if not pending:
                    completed = True
                    break
                p.stdin.write(pending.pop(0).encode() + b"\n")
                p.stdin.flush()
                out += b"\0"            # a marker: the prompt just seen is answered
    finally:
        p.kill()
        p.wait()
    console = bytes(out).replace(b"\0", b"")
    start = console.find(XV6_FIRST_LINE)
    wall = time.monotonic() - (first_prompt or t0)
    return (console[start:] if start >= 0 else console), wall, completed
