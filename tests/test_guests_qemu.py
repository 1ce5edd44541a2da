"""Every bundled guest passes under QEMU, the reference machine (skipped when QEMU is absent)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from qemu import qemu_available, run_under_qemu  # noqa: E402

from cpuvirt.toolchain import build_guest, list_guests  # noqa: E402

pytestmark = pytest.mark.skipif(not qemu_available(), reason="qemu-system-i386 is not on PATH")

NANOBENCH_OPS = [
    "syscall", "in", "out", "cli_sti", "pushf_popf", "cr3", "call_ret", "pgfault", "divzero",
    "ptemod", "cpuid", "rdtsc",
]

# PV builds need the para hypervisor's ABI (hypercall page, start_info): QEMU cannot boot them.
BUILDS = [(g.name, False) for g in list_guests()]


@pytest.mark.parametrize("name,pv", BUILDS, ids=[f"{n}{'.pv' if pv else ''}" for n, pv in BUILDS])
def test_guest_passes_under_qemu(name, pv, tmp_path):
    image = tmp_path / f"{name}.bin"
    image.write_bytes(build_guest(name, pv))
    from tests.guest_args import RUN_ARGS
    out, status = run_under_qemu(image, timeout=20, extra=RUN_ARGS.get(name, {}).get("qemu", ()))
    text = out.decode("utf-8", "replace")
    assert status != 124, f"{name}: QEMU timed out; output so far:\n{text}"
    lines = text.splitlines()
    assert "FAIL" not in text, text
    if name == "nanobench":
        assert lines == [f"done {op}" for op in NANOBENCH_OPS], text
    else:
        assert any(line.startswith("PASS ") for line in lines), text
    assert status == 1, f"{name}: QEMU exit status {status} (debug-exit value {status >> 1}); output:\n{text}"


def test_hello_output_is_exactly_the_guest_console():
    """stdout carries nothing but the guest's COM1 bytes (no firmware banner)."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        image = Path(d) / "hello.bin"
        image.write_bytes(build_guest("hello"))
        out, status = run_under_qemu(image)
    assert out == (
        b"Hello from a cpuvirt guest: 32-bit protected mode, booted by Multiboot.\n"
        b"PASS hello\n"
    )
    assert status == 1
