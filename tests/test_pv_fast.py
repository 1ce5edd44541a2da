"""para answers its common events in C (modes/para/pvfast.py, _pvfast.c, cpu/_delivery.c over direct
paging): the iretd sites at ring 1 and 3, the bounce of `int n`, faults and the fill path's #PF through
the guest's trap table, HYPERVISOR_iret, and the common cases of update_va_mapping, mmu_update and
mmuext_op. The C path must leave exactly what the Python path
(CPUVIRT_PARA_FAST=0) leaves wherever it can be seen: console, outcome and message, event counts and
the cost model's tally in the same order, virtual time, the MMU's counters, the registers at every event
Python still handles, and the trace. tests/guests/pv_fast.S holds the loops and the hostile cases C must
leave to Python (an odd upcall-mask byte, an int above its entry's DPL, int3, an iretd image with RF, an
event pending behind the mask, a ring-1 stack the frame cannot be written to, update_va_mapping onto a
frame mapped writable twice, of an L1 table, of a frame not the guest's, mmu_update with another
command or of the directory, NEW_BASEPTR of a frame that is not a directory or to one that must be validated again or released, an
unknown mmuext command); the other PV test guests
and nanobench's PV build (system calls from ring 3 onto the stack_switch stack, #PF, #DE) are compared
too, and pv_mmu / pv_hostile hold update_va_mapping's refusals (Python's in both runs)."""

from __future__ import annotations

import json

import pytest

from cpuvirt.engine import regs as R
from cpuvirt.modes.para import vcpu as para_vcpu
from cpuvirt.runner import run_guest
from tests.runs import run_record

GPRS = (R.EAX, R.EBX, R.ECX, R.EDX, R.ESI, R.EDI, R.EBP, R.ESP, R.EIP, R.EFLAGS, R.CS, R.SS)
PV_GUESTS = ("pv_hello", "pv_events", "pv_traps", "pv_mmu", "pv_hostile", "pv_window", "pv_v86", "pv_stale_gdt")


def _run(image, monkeypatch, c_path: bool, trace_path=None, max_insns=50_000_000):
    """Run the guest under para; record, at every event Python handles (a hypercall, a bounce), the
    registers, virtual time and the counters a reader sees then, in order."""
    seen: list[tuple] = []
    cpus = []
    cls = para_vcpu.ParaVcpu
    hypercall, trap = cls.hypercall, cls.trap

    def snapshot(self, what):
        return (
            what,
            tuple(self.regs.read(r) for r in GPRS),
            self.clock.now,
            self.clock.instructions,
            tuple(self.counts.items()),
            tuple(self.reasons.items()),
            bytes(self.events.buf[self.events.off : self.events.off + 12]) if self.events else b"",
        )

    def spy_hypercall(self):
        seen.append(snapshot(self, ("hypercall", self.regs.read(R.EAX))))
        return hypercall(self)

    def spy_trap(self, vector, return_eip, error_code, insn_eip, soft=False):
        seen.append(snapshot(self, ("trap", vector, return_eip, error_code, soft)))
        return trap(self, vector, return_eip, error_code, insn_eip, soft)

    monkeypatch.setattr(cls, "hypercall", spy_hypercall)
    monkeypatch.setattr(cls, "trap", spy_trap)
    monkeypatch.setenv("CPUVIRT_PARA_FAST", "1" if c_path else "0")
    res = run_guest(str(image), "para", 32, max_insns, trace_path=trace_path, on_start=lambda hv: cpus.append(hv))
    monkeypatch.undo()
    vcpu, paging = cpus[-1].vcpu, cpus[-1].paging
    end = (
        tuple(vcpu.regs.read(r) for r in GPRS),
        tuple(vcpu.counts.items()),
        tuple(vcpu.reasons.items()),
        vcpu.mmu.counters.as_dict(),
        # direct paging's frame types and reference counts (update_va_mapping changes them in C)
        bytes(paging.type),
        paging.count.tobytes(),
        bytes(paging.pinned),
    )
    return res, seen, end, vcpu


def _same_python_events(c_seen, py_seen) -> None:
    """Every event Python handled in the C run was, as a reader saw the vCPU then, the same in the
    Python run, in the same order: the events C answered in between changed nothing else."""
    last = -1
    for record in c_seen:
        later = [k for k in range(last + 1, len(py_seen)) if py_seen[k][0] == record[0] and py_seen[k][2] == record[2]]
        assert later, record[0]
        last = later[0]
        assert record == py_seen[last], record[0]


@pytest.fixture(scope="module")
def pv_fast(test_guest):
    return test_guest("pv_fast")


@pytest.fixture(scope="module")
def nanobench_pv(nanobench_image):
    return nanobench_image(200, pv=True)


def test_pv_fast_guest_c_and_python_leave_the_same_state(pv_fast, monkeypatch):
    c_res, c_seen, c_end, c_cpu = _run(pv_fast, monkeypatch, True)
    py_res, py_seen, py_end, py_cpu = _run(pv_fast, monkeypatch, False)
    assert py_cpu.pv_fast is None and c_cpu.pv_fast is not None
    # the guest's checks pass, and it ends in the domain crash of its last, hostile bounce
    assert b"FAIL" not in c_res.console and c_res.console.count(b"PASS") == 40, c_res.console
    assert c_res.outcome == "error" and "ring-1 stack" in c_res.message and "not writable" in c_res.message
    fast = c_cpu.pv_fast
    # the loops went through C: 40 int 0x80 + 40 #DE + 40 #GP + 40 #PF (less each kind's first)
    assert fast.bounced >= 4 * 40 - 8, fast.bounced
    assert fast.irets >= 4 * 40 - 8 and fast.iret_sites >= fast.irets
    assert fast.delivery.faults >= 40 - 2  # the fill path's #PF
    assert fast.uvas >= 20  # update_va_mapping on a frame mapped writable twice, read-only and back
    assert fast.mmu_updates >= 19  # mmu_update of one request: an L1 entry flipped, a plain write
    # mmuext_op TLB_FLUSH_LOCAL, NEW_BASEPTR of the current directory and between two pinned ones
    assert fast.mmuext_ops >= 38
    assert len(c_seen) <= len(py_seen) - 2 * (4 * 40 - 8)
    assert run_record(c_res) == run_record(py_res)  # console, counts, icount, virtual time, MMU counters, tally
    assert c_end == py_end
    _same_python_events(c_seen, py_seen)
    # the hostile cases were Python's in the C run: the #GP of int 0x81 through a DPL-0 entry, and the
    # int 0x80 and #PF while an event was pending behind the mask
    traps = [r[0] for r in c_seen if r[0][0] == "trap"]
    assert any(t[1] == 13 and t[3] == 0x81 * 8 + 2 for t in traps)
    assert any(t[1] == 0x80 for t in traps) and any(t[1] == 14 for t in traps)


@pytest.mark.parametrize("name", PV_GUESTS)
def test_pv_test_guests_same_both_ways(name, test_guest, monkeypatch):
    image = test_guest(name)
    c_res, c_seen, c_end, _ = _run(image, monkeypatch, True)
    py_res, py_seen, py_end, _ = _run(image, monkeypatch, False)
    assert run_record(c_res) == run_record(py_res)
    assert c_end == py_end
    _same_python_events(c_seen, py_seen)


def test_nanobench_pv_build_same_both_ways(nanobench_pv, monkeypatch):
    c_res, c_seen, c_end, c_cpu = _run(nanobench_pv, monkeypatch, True, max_insns=0)
    py_res, py_seen, py_end, _ = _run(nanobench_pv, monkeypatch, False, max_insns=0)
    assert c_res.outcome == "exit" and c_res.status == 0, c_res.message
    fast = c_cpu.pv_fast
    # syscall from ring 3 (onto the stack_switch stack), divzero and pgfault: 3 x 200 bounces; pgfault's
    # and ptemod's update_va_mapping (clear P, flip RW: a writable reference goes, a TLB flush)
    assert fast.bounced >= 3 * 200 - 3 and fast.irets >= 200 and fast.delivery.faults >= 199
    assert fast.uvas >= 2 * 200 and fast.mmu_updates >= 199  # and pgfault's handler's mmu_update
    assert fast.mmuext_ops >= 199  # cr3: NEW_BASEPTR of the pinned current directory
    assert run_record(c_res) == run_record(py_res)
    assert c_end == py_end
    _same_python_events(c_seen, py_seen)


def test_a_trace_is_the_same_and_keeps_the_bounces_in_python(pv_fast, monkeypatch, tmp_path):
    a, b = tmp_path / "c.jsonl", tmp_path / "py.jsonl"
    c_res, c_seen, c_end, c_cpu = _run(pv_fast, monkeypatch, True, trace_path=str(a))
    py_res, py_seen, py_end, _ = _run(pv_fast, monkeypatch, False, trace_path=str(b))
    assert c_cpu.pv_fast is not None and c_cpu.pv_fast.bounced == 0 and c_cpu.pv_fast.irets == 0

    def lines(path):
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        rows[-1].pop("wall_s", None)
        return rows

    assert lines(a) == lines(b)
    assert c_seen == py_seen and c_end == py_end and run_record(c_res) == run_record(py_res)


def test_the_iret_sites_stay_in_c_with_a_trace(pv_fast, monkeypatch, tmp_path):
    """The iretd sites need no trace line: C answers them with a trace too (same trace, above)."""
    _, _, _, c_cpu = _run(pv_fast, monkeypatch, True, trace_path=str(tmp_path / "t.jsonl"))
    assert c_cpu.pv_fast.iret_sites >= 4 * 40
