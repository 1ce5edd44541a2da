"""trap answers cli, sti, clts, mov from CR0/CR4 and WP/PGE-only CR0/CR4 writes in C (modes/trapfast.py,
_trapfast.c). The C path must leave exactly what the Python path (CPUVIRT_TRAP_FAST=0) leaves wherever it
can be seen: the console, the event counts and the cost model's reasons (in the same order), virtual
time, the memory and shadow-paging counters, the registers at every event Python handles, and the
trace; the guest (tests/guests/trap_fast.S) holds the hostile cases: cli/sti at ring 3, CR writes that
touch other bits or reserved ones, CR0.WP set after a write it allowed, timer interrupts waiting at sti,
and trapping instructions rewritten in place after they ran."""

from __future__ import annotations

import json

import pytest

from cpuvirt.engine import regs as R
from cpuvirt.modes import trap
from cpuvirt.runner import run_guest
from tests.runs import run_record

GPRS = (R.EAX, R.EBX, R.ECX, R.EDX, R.ESI, R.EDI, R.EBP, R.ESP, R.EIP, R.EFLAGS)


def _run(image, monkeypatch, c_path: bool, trace_path=None, switches=("CPUVIRT_TRAP_FAST",)):
    """Run the guest, the C paths named by `switches` on (c_path) or off; record, at every engine event
    Python handles, the registers, virtual time and the counters a reader sees then, in order."""
    seen: list[tuple] = []
    cpus = []
    original = trap.TrapVcpu.on_engine_event

    def on_engine_event(self, intno, error_code, soft, eip):
        seen.append(
            (
                intno,
                eip,
                tuple(self.regs.read(r) for r in GPRS),
                self.clock.now,
                self.clock.instructions,
                tuple(self.counts.items()),
                tuple(self.reasons.items()),
                self.virtual_cpu.crs(),
            )
        )
        return original(self, intno, error_code, soft, eip)

    monkeypatch.setattr(trap.TrapVcpu, "on_engine_event", on_engine_event)
    for name in switches:
        monkeypatch.setenv(name, "1" if c_path else "0")
    res = run_guest(str(image), "trap", 32, 20_000_000, trace_path=trace_path, on_start=lambda hv: cpus.append(hv))
    monkeypatch.undo()
    hv = cpus[-1]
    vcpu = hv.vcpu
    assert res.outcome == "exit" and res.status == 0, (res.message, res.console)
    end = (
        tuple(vcpu.regs.read(r) for r in GPRS),
        tuple(vcpu.counts.items()),
        tuple(vcpu.reasons.items()),
        vcpu.virtual_cpu.crs(),
        hv.shadow.counters.as_dict(),
    )
    return res, seen, end, vcpu


def _same_events(c_seen, py_seen) -> None:
    """Every event Python handled in the C run, as a reader saw the vCPU then, was the same in the Python
    run, in the same order: the C answers in between changed nothing else."""
    py_index: dict = {}
    for k, record in enumerate(py_seen):
        py_index.setdefault(record[:2] + record[3:5], []).append(k)
    last = -1
    for record in c_seen:
        candidates = [k for k in py_index.get(record[:2] + record[3:5], []) if k > last]
        assert candidates, record[:2]
        last = candidates[0]
        assert record == py_seen[last], record[:2]


@pytest.fixture(scope="module")
def image(test_guest):
    return test_guest("trap_fast")


def test_c_traps_leave_what_python_leaves_event_by_event(image, monkeypatch):
    c_res, c_seen, c_end, c_cpu = _run(image, monkeypatch, True)
    py_res, py_seen, py_end, py_cpu = _run(image, monkeypatch, False)
    assert py_cpu.fast is None and c_cpu.fast is not None
    # the hot loop's 1,500 x (cli, sti, clts, 4 CR reads, 4 WP/PGE writes), less each kind's first
    assert c_cpu.fast.answered >= 1500 * 11 - 50, c_cpu.fast.answered
    assert len(c_seen) <= len(py_seen) - (1500 * 11 - 50)
    # each WP/PGE toggle answered in C flushed the hypervisor's own TLB, as write_cr does (a stale entry
    # would map the same frame: no counter shows it, so the flush count is checked itself)
    assert c_cpu.fast._state.ev.rtlb_gen >= 4 * 1500 - 10
    assert b"FAIL" not in c_res.console and b"PASS trap's common traps" in c_res.console
    assert run_record(c_res) == run_record(py_res)  # console, counts, icount, virtual time, memory counters, tally
    assert c_end == py_end
    _same_events(c_seen, py_seen)


def test_a_trace_keeps_the_python_path_and_the_same_trace(image, monkeypatch, tmp_path):
    a, b = tmp_path / "c.jsonl", tmp_path / "py.jsonl"
    c_res, c_seen, c_end, c_cpu = _run(image, monkeypatch, True, trace_path=str(a))
    py_res, py_seen, py_end, _ = _run(image, monkeypatch, False, trace_path=str(b))
    assert c_cpu.fast is not None and c_cpu.fast.answered == 0  # traced: every trap is Python's

    def lines(path):
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        rows[-1].pop("wall_s", None)
        return rows

    assert lines(a) == lines(b)
    assert c_seen == py_seen and c_end == py_end and run_record(c_res) == run_record(py_res)


def test_switching_the_trace_on_and_off_switches_the_c_path(image, monkeypatch):
    cpus = []
    res = run_guest(str(image), "trap", 32, 20_000_000, on_start=lambda hv: cpus.append(hv.vcpu))
    vcpu = cpus[-1]
    assert res.status == 0 and vcpu.fast.enabled
    vcpu.trace = object()
    assert not vcpu.fast.enabled
    vcpu.trace = None
    assert vcpu.fast.enabled


def test_rewritten_sites_are_decoded_again(image, monkeypatch):
    """The patched site runs cli, sti, mov eax, cr0, clts, then nops: C reads the bytes at every trap,
    so each version's effect is in the checksum (the console's last hex line), the same as Python's."""
    c_res, *_ = _run(image, monkeypatch, True)
    py_res, *_ = _run(image, monkeypatch, False)
    native = run_guest(str(image), "native", 32, 20_000_000)
    assert c_res.console.splitlines()[-2] == py_res.console.splitlines()[-2] == native.console.splitlines()[-2]
    assert c_res.console == native.console
