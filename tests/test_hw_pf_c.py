"""hw without EPT makes the common #PF exits of shadow paging in the TLB fill (modes/hw/_fastexit.c
fastexit_pf_hook): a ptemod's (the guest kernel's store into one of its page tables, which the shadow maps
read-only: the store, its flags, EIP past it, the zap of the shadow entries derived from the word) and a true
fault's (the walk's PDE.A, CR2, the #PF injected and delivered through the guest's IDT), each with the exit's
bookkeeping; and records the exit of a hidden fault whose fill memory/_tlbfill.c makes (fastexit_hidden_exit,
where VmxCpu.quick_shadow_exit recorded it in Python). VmxCpu.fold_fast_exits later counts the exits and writes
the last one's fields when it was the last exit C made, and the last injection's. With VmxCpu.shadow_ptemod_c,
shadow_true_pf_c or shadow_hidden_pf_c off (CPUVIRT_HW_PTEMOD_C=0, CPUVIRT_HW_PF_C=0,
CPUVIRT_HW_HIDDEN_PF_C=0) every run must leave the same console, counts, exit counts by
reason, memory and shadow counters and virtual time, and every VM exit Python makes must find the same
exit-information and entry-injection fields in the VMCS as the Python run's."""

from __future__ import annotations

import pytest

from cpuvirt.nanobench import build
from tests.conftest import requires_qemu
from tests.qemu import assert_same_console_as_qemu
from tests.runs import hw_shadow_run, same_exits, switches_with

GUESTS = ["nanobench", "ptemod_c", "true_pf", "paging", "usermode", "trap_deliver", "ptemod_cross", "ring0_pf"]


def _guest(guest, test_guest, tmp_path):
    if guest == "nanobench":
        path = tmp_path / "nb.bin"
        path.write_bytes(build(200, False))
        return path
    return guest if guest in ("paging", "usermode") else test_guest(guest)


def _compare(path, switch, monkeypatch):
    c, c_reasons, c_shadow, c_cpu, c_seen = hw_shadow_run(path, switch, True, monkeypatch)
    py, py_reasons, py_shadow, py_cpu, py_seen = hw_shadow_run(path, switch, False, monkeypatch)
    assert c["outcome"] == "exit", c["message"]
    assert b"FAIL" not in c["console"]
    assert c == py and c_reasons == py_reasons and c_shadow == py_shadow
    assert c_cpu.quick_shadow_exits == py_cpu.quick_shadow_exits
    same_exits(c_seen, py_seen)
    exits = [sum(1 for record in seen if record[0] >= 0) for seen in (c_seen, py_seen)]
    return c_cpu._pf_exits, py_cpu._pf_exits, exits[1] - exits[0]


@pytest.mark.parametrize("guest", GUESTS)
def test_ptemod_exits_in_c_leave_what_python_leaves(guest, test_guest, monkeypatch, tmp_path):
    c, py, fewer = _compare(_guest(guest, test_guest, tmp_path), "shadow_ptemod_c", monkeypatch)
    assert py.ptemods == 0 and fewer == c.ptemods
    if guest == "nanobench":  # ptemod: one store an iteration; pgfault: the loop's and the handler's
        assert c.ptemods >= 3 * 200 - 3, c.ptemods
    if guest == "ptemod_c":
        assert c.ptemods >= 100, c.ptemods
        assert c.state.zap_total > 0  # stores into words shadow entries derive from


@pytest.mark.parametrize("guest", GUESTS)
def test_true_pf_exits_in_c_leave_what_python_leaves(guest, test_guest, monkeypatch, tmp_path):
    c, py, fewer = _compare(_guest(guest, test_guest, tmp_path), "shadow_true_pf_c", monkeypatch)
    assert py.true_faults == 0 and fewer == c.true_faults
    if guest == "nanobench":  # pgfault: one an iteration
        assert c.true_faults >= 200 - 1, c.true_faults
    if guest == "true_pf":  # of the 16 forms C takes a round (40 rounds), from ring 0 and 3, those whose page
        # the shadow holds no entry for (a protection fault through an entry has P in the shadow's error code:
        # Python's); 625 when this was written
        assert c.true_faults >= 15 * 40, c.true_faults
    if guest == "ring0_pf":  # every round's: a code descriptor never marked accessed, and CS is never loaded;
        # the second 64 with IF = 0, an interrupt pending and interrupt-window exiting on
        assert c.true_faults >= 2 * 64 - 1, c.true_faults  # (the first is Python's, as in every guest)


@pytest.mark.parametrize("guest", GUESTS)
def test_hidden_pf_exits_recorded_in_c_leave_what_python_leaves(guest, test_guest, monkeypatch, tmp_path):
    c, py, fewer = _compare(_guest(guest, test_guest, tmp_path), "shadow_hidden_pf_c", monkeypatch)
    assert py.hidden_faults == 0 and fewer == 0  # (quick exits either way: Python's made no stop either)
    if guest == "nanobench":  # pgfault: the retried load's, one an iteration
        assert c.hidden_faults >= 200 - 1, c.hidden_faults
    if guest == "ring0_pf":  # the same, in both halves (see test_true_pf_exits_in_c...)
        assert c.hidden_faults >= 2 * 64 - 1, c.hidden_faults


def test_the_switches():
    code = (
        "from cpuvirt.modes.hw.vmx import VmxCpu as V; "
        "print(V.shadow_ptemod_c, V.shadow_true_pf_c, V.shadow_hidden_pf_c)"
    )
    names = ("CPUVIRT_HW_PTEMOD_C", "CPUVIRT_HW_PF_C", "CPUVIRT_HW_HIDDEN_PF_C")
    assert switches_with(code, names) == ["True", "True", "True"]
    assert switches_with(code, names, CPUVIRT_HW_PTEMOD_C="0") == ["False", "True", "True"]
    assert switches_with(code, names, CPUVIRT_HW_PF_C="0") == ["True", "False", "True"]
    assert switches_with(code, names, CPUVIRT_HW_HIDDEN_PF_C="0") == ["True", "True", "False"]


@requires_qemu
def test_ring0_pf_console_is_qemus(test_guest):
    assert b"PASS ring-0 page faults" in assert_same_console_as_qemu(test_guest("ring0_pf"), [], [])
