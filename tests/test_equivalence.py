"""Every bundled guest, in every mode that exists, gives QEMU's console output byte for byte.

QEMU (`qemu-system-i386 -kernel`, DESIGN.md section 2) is the reference implementation of the guest
ABI; these tests run only where it is installed.
"""
import subprocess

import pytest

from cpuvirt.runner import run_guest
from cpuvirt.toolchain.build import build_guest, guest_source_dir, list_guests
from tests.conftest import requires_qemu
from tests.guest_args import in_guest_dir, qemu_args, run_kwargs

GUESTS = [g.name for g in list_guests()]
QEMU = ["qemu-system-i386", "-nodefaults", "-nographic", "-monitor", "none", "-serial", "stdio", "-no-reboot",
        "-m", "32", "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04", "-fw_cfg", "name=etc/sercon-port,string=0"]


def qemu_console(image_path, extra=(), cwd=None) -> tuple[bytes, int]:
    p = subprocess.run(QEMU + ["-kernel", str(image_path), *extra], capture_output=True, timeout=60,
                       stdin=subprocess.DEVNULL, cwd=cwd)
    return p.stdout, p.returncode


@pytest.mark.parametrize("guest", GUESTS)
def test_native_passes(guest):
    with in_guest_dir():            # module paths in tests/guest_args.py are relative to it
        res = run_guest(guest, **run_kwargs(guest))
    assert res.outcome == "exit" and res.status == 0, (res.outcome, res.message, res.console[-300:])
    assert b"FAIL" not in res.console


@requires_qemu
@pytest.mark.parametrize("guest", GUESTS)
def test_native_console_equals_qemu(guest, tmp_path):
    image = tmp_path / f"{guest}.bin"
    image.write_bytes(build_guest(guest))
    with in_guest_dir():
        ours = run_guest(str(image), **run_kwargs(guest))
    theirs, qemu_status = qemu_console(image, qemu_args(guest), cwd=guest_source_dir())
    assert qemu_status == (ours.status << 1) | 1          # isa-debug-exit: QEMU exits with (v << 1) | 1
    assert ours.console == theirs


# Deprivileging modes against native: the same console on every guest, except what the x86 holes
# predict for naive trap-and-emulate (docs/deprivileging.md): `holes` (tests/test_trap.py asserts its
# exact lines) and one check of `usermode`, which reads SS with `mov ax, ss` in its ring-0 handler
# (the kernel's stack segment has RPL 1 under ring compression, and the read does not trap).
HOLE_EXPECTED = {
    ("trap", "usermode"): ("PASS the ring-0 stack segment came from TSS.SS0\n",
                           "FAIL the ring-0 stack segment came from TSS.SS0: expected 0x00000010, got 0x00000011\n"),
}


@pytest.mark.parametrize("mode", ["trap", "full"])
@pytest.mark.parametrize("guest", GUESTS)
def test_mode_console_equals_native(guest, mode):
    if (mode, guest) == ("trap", "holes"):
        pytest.skip("holes FAILs under trap by design (tests/test_trap.py asserts its lines)")
    with in_guest_dir():
        native = run_guest(guest, **run_kwargs(guest))
        res = run_guest(guest, mode, **run_kwargs(guest))
    want, status = native.console, native.status
    if (mode, guest) in HOLE_EXPECTED:
        passed, failed = HOLE_EXPECTED[mode, guest]
        assert passed.encode() in want
        want, status = want.replace(passed.encode(), failed.encode()), 1
    assert res.console == want
    assert (res.outcome, res.status) == (native.outcome, status)
