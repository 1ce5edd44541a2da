"""trap delivers the common events through the guest's IDT in C (modes/_trapfast.c deliver_event): `int n`,
#DE, and #GP from ring 3, from the guest kernel or from ring 3, and the #PF of a refused fill (from the run
loop: TrapVcpu.deliver); and it passes the common iretd site in C
(trapfast_iret_hook: Vcpu.far_site has nothing to do). The C paths must leave exactly what the Python
paths (CPUVIRT_TRAP_DELIVERY_C=0 and CPUVIRT_TRAP_IRET_C=0, or CPUVIRT_TRAP_FAST=0) leave wherever it can be seen: the
console, the event counts and the cost model's reasons (in the same order), virtual time, the memory
counters (walks, walk references, fills, faults) and the shadow-paging counters, the registers at every
event Python handles, and the trace. The guest (tests/guests/trap_deliver.S) holds the hostile cases: an
IDT entry not present, a gate DPL below the caller's CPL, an IDT limit below the vector, the TSS's and
the IDT's pages dropped from the shadow, frames across a page, on a page whose PTE has D clear, on one
the shadow has no entry for, on a read-only page while CR0.WP is clear, over a traced page table's
PTEs, and the IDT's page remapped between events, and iretd at ring 3 with VM and with RF in the image.
The nanobench image is compared the same way."""

from __future__ import annotations

import dataclasses

import pytest

from cpuvirt.nanobench import build
from cpuvirt.runner import run_guest
from tests.runs import run_record
from tests.test_trap_fast import _run, _same_events

LOOPS = 200


@pytest.fixture(scope="module")
def image(test_guest):
    return test_guest("trap_deliver")


def _compare(c, py) -> None:
    """Everything a reader sees, event by event: each event Python handled in the C run, as the vCPU was
    then, was the same in the Python run, in the same order; and the same end."""
    c_res, c_seen, c_end, _ = c
    py_res, py_seen, py_end, _ = py
    assert run_record(c_res) == run_record(py_res)  # console, counts, icount, virtual time, memory counters, tally
    assert c_end == py_end  # registers, counts, reasons, CRs, shadow-paging counters
    _same_events(c_seen, py_seen)


def test_c_deliveries_leave_what_python_leaves_event_by_event(image, monkeypatch):
    c = _run(image, monkeypatch, True)
    monkeypatch.setenv("CPUVIRT_TRAP_DELIVERY_C", "0")
    monkeypatch.setenv("CPUVIRT_TRAP_IRET_C", "0")
    py = _run(image, monkeypatch, True)  # the C traps on, the deliveries and iret sites Python's
    c_cpu, py_cpu = c[3], py[3]
    assert c_cpu.fast is not None and py_cpu.fast is not None
    assert py_cpu.fast.delivered == py_cpu.fast.irets == 0
    assert c_cpu.fast.irets >= LOOPS * 12, c_cpu.fast.irets  # the handlers' iretd, in the kernel and to ring 3
    # per loop at least: 9 system calls, the ring-3 #DE, #GP and #PF, the kernel's #DE, #PF and int 0x81
    # (the kernel's #PF from the run loop: TrapVcpu.deliver)
    delivered = c_cpu.fast.delivered
    assert delivered >= LOOPS * 15 - 10, delivered
    assert len(c[1]) <= len(py[1]) - (LOOPS * 13 - 10)
    assert b"FAIL" not in c[0].console and b"PASS trap's event deliveries" in c[0].console
    _compare(c, py)


def test_the_reference_path_is_the_same(image, monkeypatch):
    """CPUVIRT_TRAP_FAST=0 (no C at all) leaves what the C deliveries leave, save what the C traps
    count (the iretd and mov sreg they answer) outside the compared events."""
    c_res, _, c_end, c_cpu = _run(image, monkeypatch, True)
    py_res, _, py_end, py_cpu = _run(image, monkeypatch, False)
    assert py_cpu.fast is None and c_cpu.fast.delivered > 0
    assert run_record(c_res) == run_record(py_res)
    assert c_end == py_end


def test_the_console_is_native_s(image):
    """Every check of the guest holds under trap with the C path as on the bare machine (the checksums
    of what the handlers saw in their frames included)."""
    native = run_guest(str(image), "native", 32, 50_000_000)
    trap = run_guest(str(image), "trap", 32, 50_000_000)
    assert native.status == 0 and b"PASS trap's event deliveries" in native.console
    assert trap.console == native.console


def test_the_nanobench_image_is_the_same_both_ways(tmp_path, monkeypatch):
    path = tmp_path / "nanobench.bin"
    path.write_bytes(build(200, False))
    out = {}
    for env in ("1", "0"):
        monkeypatch.setenv("CPUVIRT_TRAP_DELIVERY_C", env)
        monkeypatch.setenv("CPUVIRT_TRAP_IRET_C", env)
        cpus: list = []
        res = run_guest(str(path), "trap", 32, 0, on_start=cpus.append)
        hv = cpus[-1]
        out[env] = (res, hv.shadow.counters.as_dict(), tuple(hv.vcpu.reasons.items()), hv.vcpu.fast.delivered)
    (c_res, c_shadow, c_reasons, c_n), (py_res, py_shadow, py_reasons, py_n) = out["1"], out["0"]
    assert c_res.status == 0 and py_n == 0
    assert c_n >= 2 * 200 - 2, c_n  # every system call and #DE but each kind's first
    c_d, py_d = dataclasses.asdict(c_res), dataclasses.asdict(py_res)
    del c_d["wall_s"], py_d["wall_s"]
    assert c_d == py_d and c_shadow == py_shadow and c_reasons == py_reasons
