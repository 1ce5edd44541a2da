"""RF after an iretd in protected mode (Vcpu.iret_image_rf, native's C iret hook, the deprivileged iret).

The engine keeps RF = 1 from an iretd whose EFLAGS image sets it to the end of its next translation
block, and a `pushfd` there stores RF = 1, where the SDM has PUSHF store RF cleared. Before the fix
tests/guests/iret_rf.S failed its five checks in every mode (real-address and V86 mode were fixed
before; protected mode was not). RF's other effect, letting the instruction at the return address
run past its instruction breakpoint, must survive (native and hw, where the engine honours DR7).
"""
from __future__ import annotations

import subprocess

import pytest

from cpuvirt.runner import run_guest
from tests.conftest import requires_qemu

MODES = ("native", "hw", "trap", "full")
QEMU = ["qemu-system-i386", "-nodefaults", "-nographic", "-monitor", "none", "-serial", "stdio", "-no-reboot",
        "-m", "32", "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04", "-fw_cfg", "name=etc/sercon-port,string=0",
        "-kernel"]


def _build(tmp_path, **defines) -> str:
    from cpuvirt.toolchain.build import include_dir
    from cpuvirt.toolchain.image import build_image
    from cpuvirt.toolchain.preprocess import preprocess
    from tests.conftest import TEST_GUESTS
    pre = preprocess(TEST_GUESTS / "iret_rf.S", {k: "1" for k in defines}, [include_dir()])
    path = tmp_path / f"iret_rf-{'-'.join(defines) or 'plain'}.bin"
    path.write_bytes(build_image(pre.lines)[0])
    return str(path)


def _passes(r, n: int) -> None:
    console = r.console.decode()
    assert "FAIL" not in console and console.count("PASS") == n, console
    assert (r.outcome, r.status) == ("exit", 0), r.message


@pytest.mark.parametrize("mode", MODES)
def test_pushfd_after_iretd_with_rf_stores_rf_clear(tmp_path, mode):
    _passes(run_guest(_build(tmp_path), mode, max_insns=5_000_000), 5)


def test_para_iret_hypercall_too(tmp_path):
    r = run_guest(_build(tmp_path, PARAVIRT=1), "para", max_insns=5_000_000)
    console = r.console.decode()
    assert "FAIL" not in console and console.count("PASS") == 5, console


@pytest.mark.parametrize("mode", ("native", "hw"))
def test_rf_still_suppresses_an_instruction_breakpoint(tmp_path, mode):
    """A #DB handler returning with RF = 1 to a breakpointed instruction: it runs once (were RF
    cleared there, the breakpoint would fire again forever)."""
    _passes(run_guest(_build(tmp_path, DEBUG_BP=1), mode, max_insns=5_000_000), 7)


@requires_qemu
@pytest.mark.parametrize("defines", ({}, {"DEBUG_BP": 1}))
def test_qemu_prints_the_same(tmp_path, defines):
    image = _build(tmp_path, **defines)
    p = subprocess.run(QEMU + [image], stdin=subprocess.DEVNULL, capture_output=True, timeout=60, check=False)
    assert p.returncode == 1 and p.stdout == run_guest(image, "native", max_insns=5_000_000).console
