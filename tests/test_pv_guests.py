"""The paravirtualized builds of the bundled guests (guests/include/pvops.inc, docs/pv-abi.md).

Each PV build assembles, is a different image from the native one, executes no privileged instruction
in its kernel, and under `--mode para` prints exactly what the native build prints natively, except
the lines tests/pv_console.py lists (with the reason for each): checks about the 8259/8254 that the
PV build of `interrupts` performs on their paravirtual counterparts (and netdemo's device-interrupt lines).
"""
from __future__ import annotations

import subprocess
import sys

import capstone
import pytest

from cpuvirt.runner import run_guest
from cpuvirt.toolchain.build import assemble_guest, build_guest, list_guests
from tests.pv_console import DIFFERENCES, expected_pv_console

PV_GUESTS = ["hello", "exceptions", "holes", "usermode", "paging", "nanobench", "interrupts"]
NO_PV = ["apic"]                        # its checks need the local APIC: see guests/README.md

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
    assert para.console.decode() == expected_pv_console(name, native.console).decode(), para.message
    assert (para.outcome, para.status) == ("exit", 0), para.message
    assert para.vga == native.vga


def test_only_interrupts_has_documented_console_differences():
    """The exception list stays as small as it is: every other PV build prints the native bytes
    (netdemo's two lines about device interrupts aside: tests/pv_console.py)."""
    assert set(DIFFERENCES) == {"interrupts", "netdemo"}
    for name in PV_GUESTS:
        if name not in DIFFERENCES:
            assert expected_pv_console(name, b"PASS x\n") == b"PASS x\n"


def test_pv_interrupts_differs_exactly_where_documented():
    """Each documented line really differs, every other line is the native one, in its place."""
    native = run_guest("interrupts", "native").console.decode().splitlines()
    para = run_guest("interrupts", "para").console.decode().splitlines()
    replaced = {n for n, _, _ in DIFFERENCES["interrupts"]}
    added = [line for _, pv, _ in DIFFERENCES["interrupts"] for line in pv]
    assert replaced <= set(native) and not (replaced & set(para))
    assert set(added) <= set(para) and not (set(added) & set(native))
    assert [line for line in native if line not in replaced] == [line for line in para if line not in added]
    assert all(line.startswith("PASS ") for line in para)


def _para_trace(name, tmp_path):
    import json

    trace = tmp_path / "t.jsonl"
    res = run_guest(name, "para", trace_path=str(trace))
    return res, [json.loads(line) for line in trace.read_text().splitlines()]


def test_pv_interrupts_uses_the_timer_event_channel(tmp_path):
    """The PV timer path in the trace: bind_virq, six set_timer_op (the first deadline, four re-arms
    by the handler, the masked-port one), five blocks, six VIRQ_TIMER firings and six upcalls (five
    out of the block hypercall, one out of EVTCHNOP_unmask); no port I/O at all."""
    res, events = _para_trace("interrupts", tmp_path)
    assert (res.outcome, res.status) == ("exit", 0), res.message
    calls = [e for e in events if e.get("kind") == "hypercall"]
    by = lambda r: [e for e in calls if e["reason"] == r]                           # noqa: E731
    assert len(by("set_callbacks")) == 1 and by("set_callbacks")[0]["detail"]["result"] == 0
    evtchn = [(e["detail"]["cmd"], e["detail"]["result"]) for e in by("event_channel_op")]
    assert evtchn == [("bind_virq", 0), ("unmask", 0)]
    port = by("event_channel_op")[0]["detail"]["port"]
    timers = by("set_timer_op")
    assert len(timers) == 6 and all(e["detail"]["result"] == 0 for e in timers)
    # 100 Hz: the handler re-arms each deadline 10 ms after the previous one
    deadlines = [e["detail"]["timeout"] for e in timers[:5]]
    assert [b - a for a, b in zip(deadlines, deadlines[1:])] == [10_000_000] * 4
    assert [e["detail"]["cmd"] for e in by("sched_op")] == ["block"] * 5 + ["shutdown"]
    fired = [e for e in events if e.get("kind") == "event_channel"]
    assert len(fired) == 6 and all(e["reason"] == "VIRQ_TIMER" and e["detail"]["port"] == port
                                    for e in fired)
    # the sixth fires while the port is masked in evtchn_mask: it only latches
    assert [e["detail"]["port_masked"] for e in fired] == [0] * 5 + [1]
    assert fired[5]["action"] == "port set pending, masked: latched, no upcall"
    upcalls = [e for e in events if e.get("kind") == "upcall"]
    assert len(upcalls) == 6
    slot = int(by("sched_op")[0]["eip"], 16) - 5            # the slot's int 0x82 is at +5, ret at +7
    assert [int(e["eip"], 16) for e in upcalls[:5]] == [slot + 7] * 5
    unmask_slot = int(by("event_channel_op")[1]["eip"], 16) - 5
    assert int(upcalls[5]["eip"], 16) == unmask_slot + 7
    assert not [e for e in events if e.get("kind") in ("io", "interrupt")], "no PIC, PIT or port I/O"


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
