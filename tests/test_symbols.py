"""Addresses in source terms: bundled guests through the assembler's line map, ELF kernels through
their symbol table and (built with -g) DWARF line info; symbols accepted where addresses are."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cpuvirt.trace.symbols import for_guest, for_image

SRC = Path(__file__).parent / "ckernel"


def cpuvirt(*args):
    return subprocess.run([sys.executable, "-m", "cpuvirt", *map(str, args)], capture_output=True, timeout=300)


def test_bundled_guest_symbols_and_lines():
    s = for_guest("hello")
    main = s.resolve("main")
    assert s.name(main) == "main" and s.name(main + 5) == "main+0x5"
    assert s.line(main).endswith("hello.S:13")
    assert s.resolve("main+0x5") == main + 5 and s.resolve("0x100000") == 0x100000


def test_trace_show_symbolizes_when_the_image_matches(tmp_path):
    t = tmp_path / "t.jsonl"
    assert cpuvirt("run", "paging", "--mode", "hw", "--trace", t, "-q").returncode == 0
    out = cpuvirt("trace", "show", t).stdout.decode()
    assert "symbols and lines from paging" in out
    assert any("out dx, al" in l and "@ serial_init+0x8 guests/include/serial.inc:" in l for l in out.splitlines())
    other = tmp_path / "other.bin"
    other.write_bytes(b"\x7fELF" + b"\0" * 60)
    bad = cpuvirt("trace", "show", t, "--image", other)
    assert bad.returncode == 2 and b"sha256 differs" in bad.stderr


def test_bt_and_vmcs_accept_and_show_symbols():
    p = cpuvirt("bt", "hello", "--at", "main")
    assert p.returncode == 0, p.stderr
    assert f"guest {for_guest('hello').resolve('main'):#010x}" in p.stdout.decode()
    assert "[main guests/hello.S:13]" in p.stdout.decode()              # the block's symbol and line
    assert b"unknown symbol" in cpuvirt("bt", "hello", "--at", "no_such_label").stderr
    v = cpuvirt("vmcs", "paging", "--dump-vmcs-on", "CR_ACCESS")
    assert v.returncode == 0 and b"(main+0x66 guests/paging.S:71)" in v.stdout.splitlines()[0]
    r = cpuvirt("vmcs", "paging", "--at-rip", "main+0x66")                 # the exit at a symbol
    assert r.returncode == 0 and r.stdout.splitlines()[0] == v.stdout.splitlines()[0]
    d = cpuvirt("run", "paging", "--mode", "hw", "--dump-vmcs-on", "main+0x66", "-q")
    assert d.returncode == 0 and d.stderr.splitlines()[0] == v.stdout.splitlines()[0]


@pytest.fixture(scope="module")
def c_kernel_g(tmp_path_factory):
    if shutil.which("gcc") is None:
        pytest.skip("no gcc")
    out = tmp_path_factory.mktemp("ckg") / "kernel.elf"
    cmd = ["gcc", "-m32", "-g", "-ffreestanding", "-fno-pie", "-no-pie", "-nostdlib", "-O2", "-fno-stack-protector",
           "-T", str(SRC / "link.ld"), "-Wl,--build-id=none", "-o", str(out), str(SRC / "boot.S"), str(SRC / "kernel.c")]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode:
        pytest.skip(f"gcc -m32 cannot build here: {p.stderr.strip()[:200]}")
    return out


def test_elf_kernel_built_with_g_has_symbols_and_lines(c_kernel_g, tmp_path):
    s = for_image(c_kernel_g.read_bytes(), str(c_kernel_g))
    assert s.has_lines
    t = tmp_path / "t.jsonl"
    assert cpuvirt("run", c_kernel_g, "--mode", "hw", "--trace", t, "-q").returncode == 0
    out = cpuvirt("trace", "show", t, "--image", c_kernel_g).stdout.decode()
    io = [l for l in out.splitlines() if "IO_INSTRUCTION" in l]
    assert io and all(" @ " in l for l in io)
    assert any(".c:" in l or ".S:" in l for l in io)            # DWARF file:line
