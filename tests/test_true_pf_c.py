"""trap and full deliver the common true #PF from a TLB-fill hook (modes/_trapfast.c true_fault, bt/_callout.c
full_pf_hook): a load or store whose walk of the guest's tables faults, on a page the shadow holds no entry
for, with CR2 the instruction's memory operand (under full: its translation's, in the kernel). Everything a
reader sees must be what the Python path (CPUVIRT_TRAP_PF_C=0, CPUVIRT_FULL_PF_C=0: Mmu.fill refuses, the run
loop delivers) leaves: the console, counts and reasons, virtual time, the MMU's and the shadow's counters, the
virtual CRs, and the vCPU at every engine event (trap) or callout (full) Python handles. The guests:
tests/guests/true_pf.S (every form C takes, from ring 0 and ring 3, not-present and protection faults, a PDE
not present, a PDE whose A bit the faulting walk sets; and the forms it leaves to Python) and the nanobench
image (pgfault)."""

from __future__ import annotations

import pytest

from cpuvirt.runner import run_guest
from tests.runs import run_record
from tests.test_full_events import _run as _full_run
from tests.test_full_events import _same
from tests.test_trap_fast import _run, _same_events

SWITCHES = ("CPUVIRT_TRAP_PF_C",)
ROUNDS = 40  # true_pf.S
C_FORMS = 16  # its faults per round that C takes (of 20)


def _faults(vcpu) -> int:
    stores = vcpu.fast.stores
    return stores.faults if stores is not None else 0


def test_true_faults_in_c_leave_what_python_leaves(test_guest, monkeypatch):
    image = test_guest("true_pf")
    c_res, c_seen, c_end, c_cpu = _run(image, monkeypatch, True, switches=SWITCHES)
    py_res, py_seen, py_end, py_cpu = _run(image, monkeypatch, False, switches=SWITCHES)
    assert b"FAIL" not in c_res.console and b"PASS true page faults" in c_res.console
    assert _faults(py_cpu) == 0
    # every form C takes, each round (the run's first #PF is Python's: it puts the counters' keys in place)
    assert _faults(c_cpu) == C_FORMS * ROUNDS - 1, _faults(c_cpu)
    assert c_cpu.counts["page_fault"] == py_cpu.counts["page_fault"]
    assert c_end[4]["true_faults"] == py_end[4]["true_faults"] >= 20 * ROUNDS
    assert run_record(c_res) == run_record(py_res)  # console, counts, icount, virtual time, MMU counters
    assert c_end == py_end
    _same_events(c_seen, py_seen)
    native = run_guest(str(image), "native", 32, 20_000_000)
    assert c_res.console == native.console  # CR2, error codes, faulting EIPs and PDE.A, summed


def test_nanobench_pgfault_in_c(nanobench_image, monkeypatch):
    image = nanobench_image(300)
    c_res, c_seen, c_end, c_cpu = _run(image, monkeypatch, True, switches=SWITCHES)
    py_res, py_seen, py_end, py_cpu = _run(image, monkeypatch, False, switches=SWITCHES)
    assert _faults(c_cpu) >= 300 - 1 and _faults(py_cpu) == 0
    assert run_record(c_res) == run_record(py_res)
    assert c_end == py_end
    _same_events(c_seen, py_seen)


def test_a_trace_keeps_them_python_s(test_guest, monkeypatch, tmp_path):
    path = tmp_path / "t.jsonl"
    _res, _seen, _end, cpu = _run(test_guest("true_pf"), monkeypatch, True, trace_path=str(path), switches=SWITCHES)
    assert _faults(cpu) == 0
    assert path.read_text().count('"fault":"true"') >= 20 * ROUNDS


@pytest.mark.parametrize("ptemods,faults", [("1", "0"), ("0", "1")])
def test_each_switch_turns_off_its_own_path(test_guest, monkeypatch, ptemods, faults):
    monkeypatch.setenv("CPUVIRT_TRAP_PTEMOD_C", ptemods)
    monkeypatch.setenv("CPUVIRT_TRAP_PF_C", faults)
    cpus: list = []
    res = run_guest(str(test_guest("true_pf")), "trap", 32, 20_000_000, on_start=cpus.append)
    assert res.status == 0
    stores = cpus[-1].vcpu.fast.stores
    assert (stores.state.stores > 0) == (ptemods == "1")
    assert (stores.faults > 0) == (faults == "1")


FULL_SWITCHES = ("CPUVIRT_FULL_PF_C",)


def _full_faults(vcpu) -> int:
    return vcpu.pf_fast.faults if vcpu.pf_fast is not None else 0


def test_full_true_faults_in_c_leave_what_python_leaves(test_guest, monkeypatch):
    image = test_guest("true_pf")
    c_run = _full_run(image, monkeypatch, True, switches=FULL_SWITCHES)
    py_run = _full_run(image, monkeypatch, False, switches=FULL_SWITCHES)
    assert b"FAIL" not in c_run[0].console and b"PASS true page faults" in c_run[0].console
    assert _full_faults(py_run[3]) == 0
    # the kernel's forms run from their translations, the ring-3 loads in place
    assert _full_faults(c_run[3]) == C_FORMS * ROUNDS - 1, _full_faults(c_run[3])
    true = [run[3].mmu.strategy.counters.as_dict()["true_faults"] for run in (c_run, py_run)]
    assert true[0] == true[1] >= 20 * ROUNDS
    _same(c_run, py_run)
    native = run_guest(str(image), "native", 32, 20_000_000)
    assert c_run[0].console == native.console


def test_full_nanobench_pgfault_in_c(nanobench_image, monkeypatch):
    image = nanobench_image(300)
    c_run = _full_run(image, monkeypatch, True, switches=FULL_SWITCHES)
    py_run = _full_run(image, monkeypatch, False, switches=FULL_SWITCHES)
    assert _full_faults(c_run[3]) >= 300 - 1 and _full_faults(py_run[3]) == 0
    _same(c_run, py_run)


def test_full_trace_keeps_them_python_s(test_guest, monkeypatch, tmp_path):
    path = tmp_path / "t.jsonl"
    run = _full_run(test_guest("true_pf"), monkeypatch, True, trace_path=str(path), switches=FULL_SWITCHES)
    assert _full_faults(run[3]) == 0
    assert path.read_text().count('"fault":"true"') >= 20 * ROUNDS
