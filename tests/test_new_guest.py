"""`cpuvirt new-guest`: the skeletons build, PASS in every mode they can run in, and boot under QEMU."""
import shutil
import subprocess
import sys

import pytest

from tests.conftest import requires_qemu
from tests.qemu import run_under_qemu

MODES = ["native", "trap", "full", "hw"]


def cpuvirt(*args, cwd):
    return subprocess.run([sys.executable, "-m", "cpuvirt", *map(str, args)], cwd=cwd, capture_output=True,
                          timeout=120)


@pytest.fixture(scope="module")
def asm_guest(tmp_path_factory):
    d = tmp_path_factory.mktemp("asm")
    p = cpuvirt("new-guest", "mine", cwd=d)
    assert p.returncode == 0 and (d / "mine.S").is_file(), p.stderr
    return d


@pytest.mark.parametrize("mode", MODES + ["para"])
def test_assembler_skeleton_passes_in_every_mode(asm_guest, mode):
    p = cpuvirt("run", "mine.S", "--mode", mode, "-q", cwd=asm_guest)
    assert p.returncode == 0, p.stderr
    assert p.stdout.decode().splitlines() == ["PASS 6 * 7 is 42", "PASS a store reads back",
                                              "PASS mine reached the end of main"]


@requires_qemu
def test_assembler_skeleton_boots_under_qemu(asm_guest):
    assert cpuvirt("build", "mine.S", "-o", "mine.bin", cwd=asm_guest).returncode == 0
    out, status = run_under_qemu(asm_guest / "mine.bin")
    assert status == 1 and out == cpuvirt("run", "mine.bin", "-q", cwd=asm_guest).stdout


@pytest.fixture(scope="module")
def c_guest(tmp_path_factory):
    d = tmp_path_factory.mktemp("c")
    p = cpuvirt("new-guest", "cg", "--c", cwd=d)
    assert p.returncode == 0, p.stderr
    if shutil.which("make") is None or shutil.which("gcc") is None:
        pytest.skip("no make/gcc")
    b = subprocess.run(["make", "-s", "-C", str(d / "cg")], capture_output=True, text=True)
    if b.returncode:
        pytest.skip(f"gcc -m32 cannot build here (install gcc-multilib): {b.stderr[:200]}")
    assert "warning" not in b.stderr
    return d / "cg" / "cg.elf"


@pytest.mark.parametrize("mode", MODES)
def test_c_skeleton_passes_in_every_mode(c_guest, mode):
    p = cpuvirt("run", c_guest, "--mode", mode, "-q", cwd=c_guest.parent)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.decode().splitlines()
    assert len(lines) == 3 and all(line.startswith("PASS ") for line in lines)


@requires_qemu
def test_c_skeleton_boots_under_qemu(c_guest):
    out, status = run_under_qemu(c_guest)
    assert status == 1 and out == cpuvirt("run", c_guest, "-q", cwd=c_guest.parent).stdout


def test_new_guest_refuses_bad_names_and_overwrites(tmp_path):
    assert cpuvirt("new-guest", "x", cwd=tmp_path).returncode == 0
    for args in (["x"], ["1bad"], ["a/b"], ["y", "--dir", "/nonexistent"]):
        p = cpuvirt("new-guest", *args, cwd=tmp_path)
        assert p.returncode == 2 and p.stderr.decode().count("\n") == 1, args
