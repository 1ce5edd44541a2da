"""trap answers the guest kernel's segment loads (mov/pop of DS ES FS GS, modes/_trapfast.c) in C. The C
path must leave exactly what the Python path (CPUVIRT_TRAP_FAST=0) leaves wherever it can be seen: the
console, the event counts and the cost model's reasons (in the same order), virtual time, the memory
and shadow-paging counters, the registers at every event Python handles, and the trace. The guest
(tests/guests/trap_events.S) holds the hostile cases: selectors beyond the GDT limit, a non-present
descriptor, an execute-only code segment, RPL 3 over DPL 0, a clear accessed bit, a null DS and SS, a
descriptor rewritten in place (and rewritten back when only Python can load it), a shorter GDT, a
ring-3 load of a kernel selector; and the event handlers' own loads (system calls from ring 3, #DE
and #PF in the kernel)."""

from __future__ import annotations

import json

import pytest

from cpuvirt.runner import run_guest
from tests.runs import run_record
from tests.test_trap_fast import _run, _same_events

LOOPS = 320


@pytest.fixture(scope="module")
def image(test_guest):
    return test_guest("trap_events")


def test_c_segment_loads_leave_what_python_leaves_event_by_event(image, monkeypatch):
    c_res, c_seen, c_end, c_cpu = _run(image, monkeypatch, True)
    py_res, py_seen, py_end, py_cpu = _run(image, monkeypatch, False)
    assert py_cpu.fast is None and c_cpu.fast is not None
    # per loop at least: 9 system calls x 4 loads, #DE and #PF x 8 loads, 10 loads of the common case
    answered = c_cpu.fast.answered
    assert answered >= LOOPS * 60, answered
    assert len(c_seen) <= len(py_seen) - LOOPS * 60
    assert b"FAIL" not in c_res.console and b"PASS trap's segment loads" in c_res.console
    assert run_record(c_res) == run_record(py_res)  # console, counts, icount, virtual time, memory counters, tally
    assert c_end == py_end
    _same_events(c_seen, py_seen)


def test_the_console_is_native_s(image):
    """Every check of the guest holds under trap with the C path as on the bare machine (the
    checksums of what the loads made visible through the segments included)."""
    native = run_guest(str(image), "native", 32, 20_000_000)
    trap = run_guest(str(image), "trap", 32, 20_000_000)
    assert native.status == 0 and b"PASS trap's segment loads" in native.console
    assert trap.console == native.console


def test_a_trace_keeps_the_python_path_and_the_same_trace(image, monkeypatch, tmp_path):
    a, b = tmp_path / "c.jsonl", tmp_path / "py.jsonl"
    c_res, c_seen, c_end, c_cpu = _run(image, monkeypatch, True, trace_path=str(a))
    py_res, py_seen, py_end, _ = _run(image, monkeypatch, False, trace_path=str(b))
    assert c_cpu.fast is not None and c_cpu.fast.answered == 0

    def lines(path):
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        rows[-1].pop("wall_s", None)
        return rows

    assert lines(a) == lines(b)
    assert c_seen == py_seen and c_end == py_end and run_record(c_res) == run_record(py_res)
