"""`cpuvirt run kernel.elf`: an ELF32 Multiboot kernel built with gcc -m32, as tutorials build them."""
import shutil
import subprocess
from pathlib import Path

import pytest

from cpuvirt.runner import run_guest
from tests.conftest import requires_qemu
from tests.test_equivalence import qemu_console

SRC = Path(__file__).parent / "ckernel"


@pytest.fixture(scope="module")
def c_kernel(tmp_path_factory):
    if shutil.which("gcc") is None:
        pytest.skip("no gcc")
    out = tmp_path_factory.mktemp("ckernel") / "kernel.elf"
    cmd = ["gcc", "-m32", "-ffreestanding", "-fno-pie", "-no-pie", "-nostdlib", "-O2", "-fno-stack-protector",
           "-T", str(SRC / "link.ld"), "-Wl,--build-id=none", "-o", str(out), str(SRC / "boot.S"), str(SRC / "kernel.c")]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode:
        pytest.skip(f"gcc -m32 cannot build here (install gcc-multilib): {p.stderr.strip()[:200]}")
    return out


def test_c_elf_kernel_runs(c_kernel):
    res = run_guest(str(c_kernel))
    assert res.outcome == "exit" and res.status == 0, res.message
    assert b"booted by Multiboot" in res.console
    assert b"PASS mem_lower" in res.console
    assert b"fib(20) = 6765\nprimes below 10000: 1229\n" in res.console


@requires_qemu
def test_c_elf_kernel_equals_qemu(c_kernel):
    theirs, status = qemu_console(c_kernel)
    assert run_guest(str(c_kernel)).console == theirs and status == 1
