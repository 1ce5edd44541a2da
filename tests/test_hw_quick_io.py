"""hw's quick I/O exit (VmxCpu._quick_io_exit, reached from _fastexit.c's in/out hooks, which decide whether an
access exits) and the I/O gate's CPL-0 pass in C leave what the full IO_INSTRUCTION exit leaves
(VmxCpu._io_exit through vm_exit and vm_entry).

Each guest runs with the quick path and without it (VmxCpu.quick_io, the CPUVIRT_NO_QUICK_IO switch), and
everything a reader can see must be the same byte for byte: the console, instructions, virtual time, event
and exit counters, and, after every port access, the VMCS exit-information fields, GUEST_RIP and the
counters. tests/guests/hw_quick_io.S covers the forms (imm/dx, 1/2/4 bytes, string I/O in the same block,
ports with no device, the port space wrapping at 0xFFFF, the PIT read back); bitmap settings cover the
boundaries (an access at 0x7FFF that exits only for port 0x8000 of bitmap B, one at 0xFFFF only for port 2
after the wrap); nanobench's guest covers the I/O gate armed by ring-3 code.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from cpuvirt.cpu.vcpu import Vcpu
from cpuvirt.modes.hw import vmx
from cpuvirt.modes.hw.exits import ExitReason
from cpuvirt.modes.hw.vmcs import Field as F
from cpuvirt.runner import run_guest

EXIT_FIELDS = (
    F.VM_EXIT_REASON,
    F.EXIT_QUALIFICATION,
    F.VM_EXIT_INSTRUCTION_LEN,
    F.VM_EXIT_INTR_INFO,
    F.VM_EXIT_INTR_ERROR_CODE,
    F.VMX_INSTRUCTION_INFO,
    F.GUEST_RIP,
    F.TPR_THRESHOLD,
)


def _run(image, monkeypatch, quick: bool, controls=(), trace_path=None):
    """The run, and after every port access (exit or not) what a reader sees: the exit fields, the counters,
    the clock, the value the guest gets. After a quick exit handed over by C, the VM entry (if any) is made
    by C after Python returns (VmxCpu.io_entry): the record is taken again after it."""
    seen = []
    cpus = []
    exit_for_io, device_io, io_entry = vmx.VmxCpu._exit_for_io, Vcpu.port_io, vmx.VmxCpu.io_entry

    def snapshot(self):
        self.fold_fast_exits()
        v = self.vmcs._values
        return (
            tuple(v[f] for f in EXIT_FIELDS),
            self.exits, self.counts["vmexit"], self.counts["io"],
            tuple(sorted((int(r), n) for r, n in self.stats.items())),
            self.clock.now, self.clock.instructions,
        )

    def record(self, port, size, is_in, value, result):
        seen.append((port, size, is_in, value, result) + snapshot(self))
        return result

    def exit_io(self, port, size, is_in, value, from_c=0):  # an access that exits (from Python's hook or C's)
        return record(self, port, size, is_in, value, exit_for_io(self, port, size, is_in, value, from_c))

    def entry(self):
        io_entry(self)
        seen[-1] = seen[-1][:5] + snapshot(self)

    def no_exit_io(self, port, size, is_in, value=0):  # one that does not (VmxCpu.port_io -> super())
        return record(self, port, size, is_in, value, device_io(self, port, size, is_in, value))

    monkeypatch.setattr(vmx.VmxCpu, "_exit_for_io", exit_io)
    monkeypatch.setattr(vmx.VmxCpu, "io_entry", entry)
    monkeypatch.setattr(Vcpu, "port_io", no_exit_io)
    monkeypatch.setattr(vmx.VmxCpu, "quick_io", quick)
    res = run_guest(str(image), "hw", trace_path=trace_path, on_start=lambda hv: cpus.append(hv.vcpu),
                    mode_options={"vmx": list(controls)})
    monkeypatch.undo()
    assert res.outcome == "exit" and res.status == 0, (res.message, res.console[-300:])
    return res, seen, cpus[0]


def _same(a, b) -> None:
    (ra, sa, ca), (rb, sb, cb) = a, b
    for field in ("outcome", "status", "console", "icount", "vtime", "counts", "mmu", "tally"):
        assert getattr(ra, field) == getattr(rb, field), field
    assert [row[:4] for row in ra.exit_stats] == [row[:4] for row in rb.exit_stats]  # not the handler's wall time
    assert len(sa) == len(sb)
    for n, (x, y) in enumerate(zip(sa, sb)):
        assert x == y, f"port access {n}: {x} != {y}"
    assert dict(ca.stats) == dict(cb.stats) and ca.exits == cb.exits
    assert list(ca.counts.items()) == list(cb.counts.items())
    assert list(ca.reasons.items()) == list(cb.reasons.items())
    assert {f: ca.vmcs._values[f] for f in EXIT_FIELDS} == {f: cb.vmcs._values[f] for f in EXIT_FIELDS}


@pytest.fixture(scope="module")
def quick_io(test_guest):
    return test_guest("hw_quick_io")


@pytest.fixture(scope="module")
def nanobench(nanobench_image):
    return nanobench_image(300)


# (--vmx settings, the least number of quick exits expected, whether that number is exact (no other port of
# the bitmap is touched), whether the rep outsb to port 0x80 exits: a string I/O exit is always the full one)
CASES = {
    "unconditional I/O exiting": ((), 300 * 15, False, True),
    "bitmap: 0x8000 only (the access at 0x7FFF exits)": (("unconditional_io_exiting=0", "io_bitmap=0x8000"), 600, True, False),
    "bitmap: port 2 only (the access at 0xFFFF exits)": (("unconditional_io_exiting=0", "io_bitmap=0x2"), 600, True, False),
    "bitmap: 0x80, 0x40, 0x3fd": (("unconditional_io_exiting=0", "io_bitmap=0x80,0x40,0x3fd"), 300 * 4, False, True),
    "bitmap: 0x7fff, 0xffff": (("unconditional_io_exiting=0", "io_bitmap=0x7fff,0xffff"), 1200, True, False),
    "bitmaps on, no port set": (("unconditional_io_exiting=0", "use_io_bitmaps=1"), 0, True, False),
    "no I/O exiting at all": (("unconditional_io_exiting=0",), 0, True, False),
    "shadow paging (no EPT)": (("enable_ept=0",), 300 * 15, False, True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_quick_io_exits_leave_what_the_full_exit_leaves(case, quick_io, monkeypatch):
    controls, least, exact, string_exits = CASES[case]
    quick = _run(quick_io, monkeypatch, True, controls)
    slow = _run(quick_io, monkeypatch, False, controls)
    _same(quick, slow)
    assert b"PASS" in quick[0].console
    assert quick[2].quick_io_exits >= least and slow[2].quick_io_exits == 0
    assert quick[2].fast_exits.io_exits_seen >= least and slow[2].fast_exits.io_exits_seen == 0
    io_exits = quick[2].stats[ExitReason.IO_INSTRUCTION]
    if string_exits:
        assert quick[2].quick_io_exits <= io_exits - 300
    else:
        assert quick[2].quick_io_exits == io_exits
    if exact:
        assert io_exits == least


def test_the_io_gate_armed_by_ring_3_passes_ring_0_io_in_c(nanobench, monkeypatch):
    """After nanobench's ring-3 loop every in/out has the I/O-permission hook; at CPL 0 C passes it."""
    quick = _run(nanobench, monkeypatch, True)
    slow = _run(nanobench, monkeypatch, False)
    _same(quick, slow)
    assert quick[2].fast_exits.io_gate_passed >= 2 * 300
    assert slow[2].fast_exits.io_gate_passed == 0
    assert quick[2].quick_io_exits >= 2 * 300


def test_a_replaced_io_handler_sees_every_exit(quick_io, monkeypatch):
    """The quick exit does the default handler's work only: another handler gets every exit."""
    calls = []

    def start(hv):
        handlers = hv.vcpu.hypervisor.handlers
        default = handlers[ExitReason.IO_INSTRUCTION]

        def handle_io(x):
            calls.append(x.rip)
            default(x)

        handlers[ExitReason.IO_INSTRUCTION] = handle_io

    cpus = []
    res = run_guest(str(quick_io), "hw", on_start=lambda hv: (start(hv), cpus.append(hv.vcpu)))
    assert res.outcome == "exit" and res.status == 0
    assert len(calls) == cpus[0].stats[ExitReason.IO_INSTRUCTION] and cpus[0].quick_io_exits == 0


def test_a_trace_is_the_same_and_takes_the_full_exit(quick_io, monkeypatch, tmp_path):
    a, b = tmp_path / "quick.jsonl", tmp_path / "slow.jsonl"
    quick = _run(quick_io, monkeypatch, True, trace_path=str(a))
    slow = _run(quick_io, monkeypatch, False, trace_path=str(b))
    _same(quick, slow)
    assert a.read_bytes() == b.read_bytes()
    assert quick[2].quick_io_exits == 0


def test_the_environment_switch_turns_it_off():
    code = "from cpuvirt.modes.hw.vmx import VmxCpu; print(VmxCpu.quick_io)"
    env = dict(os.environ, CPUVIRT_NO_QUICK_IO="1")
    off = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    env.pop("CPUVIRT_NO_QUICK_IO")
    on = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert (off.stdout.strip(), on.stdout.strip()) == ("False", "True")


@pytest.mark.parametrize("guest", ["ioperm", "v86_io"])
def test_io_from_ring_3_and_v86_is_still_checked(guest, test_guest, monkeypatch):
    """Hostile: in/out at CPL 3 without I/O permission (IOPL, the TSS bitmap), and in virtual-8086 mode,
    must still get #GP from the gate: the C pass is for CPL 0 in protected mode only."""
    image = test_guest(guest)
    quick = _run(image, monkeypatch, True)
    slow = _run(image, monkeypatch, False)
    _same(quick, slow)
    assert b"FAIL" not in quick[0].console and b"PASS" in quick[0].console


def test_a_control_written_by_the_hypervisor_reaches_the_c_hooks(quick_io, monkeypatch):
    """The first I/O exit's handler clears "unconditional I/O exiting" and puts the default handler back:
    no access exits after it, whether C or Python decides."""

    def start(hv):
        handlers = hv.vcpu.hypervisor.handlers
        default = handlers[ExitReason.IO_INSTRUCTION]

        def handle_io(x):
            default(x)
            hv.vcpu.set_ctl("unconditional_io_exiting", False)
            handlers[ExitReason.IO_INSTRUCTION] = default

        handlers[ExitReason.IO_INSTRUCTION] = handle_io

    runs = []
    for quick in (True, False):
        monkeypatch.setattr(vmx.VmxCpu, "quick_io", quick)
        cpus = []
        res = run_guest(str(quick_io), "hw", on_start=lambda hv: (start(hv), cpus.append(hv.vcpu)))
        assert res.outcome == "exit" and res.status == 0
        runs.append((res.console, res.icount, res.vtime, res.counts, dict(cpus[0].stats)))
    assert runs[0] == runs[1]
    assert runs[0][4][ExitReason.IO_INSTRUCTION] == 1


def test_an_access_that_disarms_gets_its_vm_entry(quick_io, monkeypatch):
    """A device access that makes the next VM entry do something (here: the POST port's write disarms the C
    paths, as an APIC change does) gets the entry after a quick exit (VmxCpu.io_entry, called by C), which
    arms again: the following exits are quick ones too, and everything is as without the quick exit."""
    from cpuvirt.machine.post import PostPort

    entries = []
    io_entry = vmx.VmxCpu.io_entry

    def write(self, port, size, value):
        for cpu in cpus:
            cpu.fast_exits.disarm()

    def counted_entry(self):
        entries.append(1)
        io_entry(self)

    cpus = []
    monkeypatch.setattr(PostPort, "write", write)
    monkeypatch.setattr(vmx.VmxCpu, "io_entry", counted_entry)
    runs = []
    for quick in (True, False):
        monkeypatch.setattr(vmx.VmxCpu, "quick_io", quick)
        cpus.clear()
        res = run_guest(str(quick_io), "hw", on_start=lambda hv: cpus.append(hv.vcpu))
        assert res.outcome == "exit" and res.status == 0
        runs.append((res.console, res.icount, res.vtime, res.counts, dict(cpus[0].stats), cpus[0].quick_io_exits))
    assert runs[0][:5] == runs[1][:5]
    assert len(entries) >= 2 * 300 and runs[0][5] >= 300 * 15  # each out to 0x80 (not rep outsb): an entry
