"""The paravirtualized builds of the bundled guests (guests/include/pvops.inc, docs/pv-abi.md).

Each PV build assembles, is a different image from the native one, executes no privileged instruction
in its kernel, and under `--mode para` prints exactly what the native build prints natively.
"""
from __future__ import annotations

import subprocess
import sys

import capstone
import pytest

from cpuvirt.runner import run_guest
from cpuvirt.toolchain.build import assemble_guest, build_guest, list_guests

PV_GUESTS = ["hello", "exceptions", "holes", "usermode", "paging", "nanobench"]
NO_PV = ["interrupts", "apic"]          # their checks need the PIC/PIT/APIC: see guests/README.md

# What a ring-1 kernel may not execute (docs/pv-abi.md 5.1: #GP under para). `in`/`out` are allowed
# only in nanobench, which holds an I/O grant (physdev_op set_iopl) while it runs them.
PRIVILEGED = {"cli", "sti", "hlt", "lgdt", "lidt", "ltr", "lldt", "invlpg", "wrmsr", "rdmsr", "clts",
              "lmsw", "in", "out", "insb", "insd", "outsb", "outsd"}
# Ring-3 code that executes a privileged instruction on purpose, to be killed by #GP.
USER_TRAPS = {("usermode", "cli")}


def _mnemonics(name: str, pv: bool):
    """(capstone instruction, statement) for the kernel's code; in a PV build without the routine
    that only runs when a plain Multiboot loader started it (kernel.inc's pv_bare_metal)."""
    image, asm = assemble_guest(name, pv)
    skip = range(asm.symbols["pv_bare_metal"], asm.symbols["pv_bare_metal_end"]) if pv else range(0)
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_32)
    for s in asm.instructions():
        if s.addr in skip:
            continue
        raw = image[s.addr - asm.base: s.addr - asm.base + s.size]
        for insn in md.disasm(raw, s.addr):
            yield insn, s


def test_the_pv_builds_are_listed_and_only_those():
    has = {g.name: g.has_pv for g in list_guests()}
    for name in PV_GUESTS:
        assert has[name], f"{name} should have a PV build"
    for name in NO_PV:
        assert not has[name], f"{name} should have no PV build"


def test_cpuvirt_guests_marks_the_pv_builds():
    out = subprocess.run([sys.executable, "-m", "cpuvirt", "guests"], capture_output=True, text=True,
                         timeout=60).stdout
    lines = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    for name in PV_GUESTS:
        assert "[pv build]" in lines[name], lines[name]
    for name in NO_PV:
        assert "[pv build]" not in lines[name], lines[name]


@pytest.mark.parametrize("name", PV_GUESTS)
def test_pv_build_differs_from_native(name):
    assert build_guest(name, pv=True) != build_guest(name)


@pytest.mark.parametrize("name", PV_GUESTS)
def test_pv_kernel_has_no_privileged_instruction(name):
    found = []
    for insn, s in _mnemonics(name, True):
        m = insn.mnemonic
        if m == "mov" and "cr" in insn.op_str:
            m = "mov crN"
        if m in PRIVILEGED or m == "mov crN":
            if (name, m) in USER_TRAPS or (name == "nanobench" and m in ("in", "out")):
                continue
            found.append(f"{s.file}:{s.line}: {insn.mnemonic} {insn.op_str}")
    assert not found, "\n".join(found)


def test_the_native_builds_still_use_the_privileged_instructions():
    """The check above can fail: the native kernel has them."""
    mnemonics = {i.mnemonic for i, _ in _mnemonics("hello", False)}
    assert {"cli", "lgdt", "lidt", "ltr", "out", "in"} <= mnemonics


@pytest.mark.parametrize("name", PV_GUESTS)
def test_pv_build_under_para_prints_what_native_prints(name):
    native = run_guest(name, "native")
    para = run_guest(name, "para")
    assert para.console.decode() == native.console.decode(), para.message
    assert (para.outcome, para.status) == ("exit", 0), para.message
    assert para.vga == native.vga


def test_pv_hello_talks_to_the_hypervisor(tmp_path):
    """Its console is console_io and its end is sched_op(SCHEDOP_shutdown), seen in the trace."""
    import json

    trace = tmp_path / "t.jsonl"
    run_guest("hello", "para", trace_path=str(trace))
    events = [json.loads(line) for line in trace.read_text().splitlines()]
    calls = [e["reason"] for e in events if e.get("kind") == "hypercall"]
    assert "console_io" in calls and "set_trap_table" in calls and "set_gdt" in calls
    assert calls[-1] == "sched_op"
    assert not [e for e in events if e.get("kind") == "io"], "a PV kernel does no port I/O"


BARE_METAL = b"FAIL boot: this is a paravirtualized build, run it with cpuvirt --mode para\n"


@pytest.mark.parametrize("mode", ["native", "hw"])
def test_pv_build_started_without_a_hypervisor_says_so(mode, tmp_path):
    image = tmp_path / "hello.pv.bin"
    image.write_bytes(build_guest("hello", pv=True))
    res = run_guest(str(image), mode)
    assert res.console == BARE_METAL
    assert (res.outcome, res.status) == ("exit", 1)


def test_pv_build_under_qemu_says_so(tmp_path):
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
    from qemu import qemu_available, run_under_qemu

    if not qemu_available():
        pytest.skip("qemu-system-i386 is not on PATH")
    image = tmp_path / "hello.pv.bin"
    image.write_bytes(build_guest("hello", pv=True))
    out, status = run_under_qemu(image, timeout=20)
    assert out == BARE_METAL
    assert status == (1 << 1) | 1
