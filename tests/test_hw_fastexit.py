"""hw answers CPUID exits, and the guest-owned CR0/CR4 writes, CR3 loads, rdtsc, pause, invlpg and CR2/CR3
reads that make no exit, in C (modes/hw/fastexit.py, _fastexit.c). The C path must leave exactly what the Python path leaves wherever it can be seen: the guest's registers and
console, the exit counters and event counts, virtual time, and the VMCS exit-information fields at every
exit Python handles (exit by exit), with and without a trace."""

from __future__ import annotations

import pytest

from cpuvirt.engine import regs as R
from cpuvirt.modes.hw import vmx
from cpuvirt.modes.hw.exits import ExitReason
from cpuvirt.modes.hw.fastexit import FastExits
from cpuvirt.modes.hw.vmcs import Field as F
from cpuvirt.runner import run_guest

EXIT_FIELDS = (
    F.VM_EXIT_REASON,
    F.EXIT_QUALIFICATION,
    F.VM_EXIT_INSTRUCTION_LEN,
    F.VM_EXIT_INTR_INFO,
    F.VM_EXIT_INTR_ERROR_CODE,
    F.VMX_INSTRUCTION_INFO,
    F.GUEST_PHYSICAL_ADDRESS,
    F.GUEST_LINEAR_ADDRESS,
    F.TPR_THRESHOLD,
)
GPRS = (R.EAX, R.EBX, R.ECX, R.EDX, R.ESI, R.EDI, R.EBP, R.ESP, R.EIP, R.CR0, R.CR4)


def _run(image, monkeypatch, c_path: bool, trace_path=None, controls=()):
    """Run the guest; record, at the start of every exit Python handles, what a reader sees then (the
    previous exit's fields, the counters, the registers, virtual time), keyed by the exit's number."""
    seen: dict[int, tuple] = {}
    cpus = []
    original = vmx.VmxCpu.vm_exit

    def vm_exit(self, reason, rip, **kw):
        self.fold_fast_exits()
        v = self.vmcs._values
        seen[self.exits] = (
            int(reason),
            rip,
            tuple(v[f] for f in EXIT_FIELDS),
            v[F.GUEST_RIP],
            self.counts["vmexit"],
            tuple(sorted((int(r), n) for r, n in self.stats.items())),
            tuple(self.regs.read(r) for r in GPRS),
            self.clock.now,
            self.clock.instructions,
        )
        return original(self, reason, rip, **kw)

    monkeypatch.setattr(vmx.VmxCpu, "vm_exit", vm_exit)
    if not c_path:
        monkeypatch.setattr(FastExits, "install", classmethod(lambda cls, vcpu: None))
    res = run_guest(
        str(image),
        "hw",
        32,
        20_000_000,
        trace_path=trace_path,
        on_start=lambda hv: cpus.append(hv.vcpu),
        mode_options={"vmx": list(controls)},
    )
    monkeypatch.undo()
    cpu = cpus[-1]
    assert res.outcome == "exit" and res.status == 0, res.message
    end = (
        tuple(cpu.vmcs._values[f] for f in EXIT_FIELDS),
        cpu.vmcs._values[F.GUEST_RIP],
        cpu.exits,
        tuple(sorted((int(r), n) for r, n in cpu.stats.items())),
        tuple(cpu.regs.read(r) for r in GPRS),
    )
    return res, seen, end, cpu


@pytest.fixture(scope="module")
def image(test_guest):
    return test_guest("hw_fastexit")


def test_c_exits_leave_what_python_leaves_exit_by_exit(image, monkeypatch):
    c_res, c_seen, c_end, c_cpu = _run(image, monkeypatch, True)
    py_res, py_seen, py_end, py_cpu = _run(image, monkeypatch, False)
    cpuid_in_c, cr_in_c = c_cpu.fast_exits.counts()
    assert py_cpu.fast_exits is None
    # the loop's 3,000 cpuid: all but the first of each block in C; its 12,000 guest-owned CR0/CR4 writes
    # and 3,000 CR3 loads too
    assert cpuid_in_c >= 2900 and cr_in_c >= 14_000, (cpuid_in_c, cr_in_c)
    assert min(c_cpu.fast_exits.more_counts()) >= 2900  # rdtsc and pause (the checksum holds the TSCs)
    assert c_cpu.fast_exits.reads_passed >= 3 * 2900  # invlpg, mov from CR2 and from CR3
    assert len(c_seen) < len(py_seen) - 2900
    assert c_res.console == py_res.console
    assert b"PASS" in c_res.console
    assert (c_res.icount, c_res.vtime, c_res.counts) == (py_res.icount, py_res.vtime, py_res.counts)
    assert dict((r[0], r[2]) for r in c_res.exit_stats)["CPUID"] >= 3000
    assert [row[:4] for row in c_res.exit_stats] == [row[:4] for row in py_res.exit_stats]
    assert c_res.tally == py_res.tally
    assert c_end == py_end
    # every exit Python handled in the C run, as a reader saw the VMCS and the vCPU at that moment
    for number, record in c_seen.items():
        assert record == py_seen[number], number


def test_a_trace_keeps_the_python_path_and_the_same_trace(image, monkeypatch, tmp_path):
    a, b = tmp_path / "c.jsonl", tmp_path / "py.jsonl"
    c_res, c_seen, c_end, c_cpu = _run(image, monkeypatch, True, trace_path=str(a))
    py_res, py_seen, py_end, _ = _run(image, monkeypatch, False, trace_path=str(b))
    assert c_cpu.fast_exits.counts() == (0, 0) and c_cpu.fast_exits.more_counts() == (0, 0)  # traced: Python
    assert a.read_bytes() == b.read_bytes()
    assert c_seen == py_seen and c_end == py_end and c_res.console == py_res.console


def test_a_replaced_cpuid_handler_is_called_for_every_exit(image, monkeypatch):
    """A lab's own handler sees every CPUID exit: the C path answers only as the default handler would."""
    calls = []
    cpus = []

    def start(hv):
        hyp = hv.vcpu.hypervisor
        default = hyp.handlers[ExitReason.CPUID]

        def mine(x):
            calls.append(x.rip)
            default(x)

        hyp.handlers[ExitReason.CPUID] = mine
        cpus.append(hv.vcpu)

    res = run_guest(str(image), "hw", 32, 20_000_000, on_start=start)
    assert res.outcome == "exit" and res.status == 0
    assert len(calls) >= 3000
    assert cpus[-1].fast_exits.counts()[0] == 0


def test_cr3_load_exiting_keeps_every_cr3_load_an_exit(image, monkeypatch):
    res = run_guest(str(image), "hw", 32, 20_000_000, mode_options={"vmx": ["cr3_load_exiting=1"]})
    assert res.outcome == "exit" and res.status == 0, res.message
    rows = {r[0]: r[2] for r in res.exit_stats}
    assert rows["CR_ACCESS"] >= 3000 + 2 * 47  # every loop's CR3 load, and the CR0.MP writes


@pytest.mark.parametrize(
    "option, reason",
    [
        ("rdtsc_exiting=1", "RDTSC"),
        ("pause_exiting=1", "PAUSE"),
        ("invlpg_exiting=1", "INVLPG"),
        ("cr3_store_exiting=1", "CR_ACCESS"),
        ("tsc_offset=0x10000000", None),
    ],
)
def test_controls_the_c_path_copies_still_decide(image, monkeypatch, option, reason):
    """With the control on, every rdtsc / pause / invlpg / CR3 read exits (Python's); a TSC offset reaches
    the guest's TSCs."""
    c_res, *_ = _run(image, monkeypatch, True, controls=[option])
    py_res, *_ = _run(image, monkeypatch, False, controls=[option])
    assert c_res.console == py_res.console and c_res.exit_stats[0][:3] == py_res.exit_stats[0][:3]
    rows = {r[0]: r[2] for r in c_res.exit_stats}
    if reason is not None:
        assert rows[reason] >= 3000
    else:
        plain, *_ = _run(image, monkeypatch, True)
        assert plain.console.splitlines()[-2] != c_res.console.splitlines()[-2]  # the final checksum


def test_the_vmcs_after_a_c_exit_shows_that_exit(image, monkeypatch):
    """Folded lazily, the exit-information fields are those of the last CPUID exit, at its RIP."""
    _, _, _, cpu = _run(image, monkeypatch, True)
    values = cpu.vmcs._values
    assert cpu.fast_exits.counts()[0] > 0
    # the guest's last exits are the UART's (its final line): what C left was folded before them
    assert values[F.VM_EXIT_REASON] == int(ExitReason.IO_INSTRUCTION)
    before = (cpu.exits, cpu.stats[ExitReason.CPUID], cpu.counts["vmexit"])
    cpu.fast_exits._state.cpuid_exits = 2  # C exits not yet folded: the next reader sees them
    cpu.fast_exits._state.last_rip = 0x1234
    rows = {name: n for name, _, n, _, _ in cpu.summary_stats()}
    assert (cpu.exits, cpu.stats[ExitReason.CPUID], cpu.counts["vmexit"]) == tuple(n + 2 for n in before)
    assert rows["CPUID"] == before[1] + 2
    assert values[F.VM_EXIT_REASON] == int(ExitReason.CPUID)
    assert (values[F.VM_EXIT_INSTRUCTION_LEN], values[F.EXIT_QUALIFICATION], values[F.GUEST_RIP]) == (2, 0, 0x1234)
    assert cpu.fast_exits.take_cpuid_exits()[0] == 0
