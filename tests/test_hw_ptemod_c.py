"""hw without EPT makes the #PF exit of a ptemod in the TLB fill (modes/hw/_fastexit.c fastexit_pf_hook): the
guest kernel's store into one of its page tables, which the shadow maps read-only, is emulated (the store,
its flags, EIP past it, the zap of the shadow entries derived from the word) with the exit's bookkeeping,
and VmxCpu.fold_fast_exits later counts the exits and writes the last one's fields when it was the last
exit C made. With VmxCpu.shadow_ptemod_c off (CPUVIRT_HW_PTEMOD_C=0) every run must leave the same console,
counts, exit counts by reason, memory and shadow counters and virtual time, and every VM exit Python makes
must find the same exit-information fields in the VMCS as the Python run's."""

from __future__ import annotations

import pytest

from cpuvirt.nanobench import build
from tests.runs import hw_shadow_run, same_exits, switches_with


def _guest(guest, test_guest, tmp_path):
    if guest == "nanobench":
        path = tmp_path / "nb.bin"
        path.write_bytes(build(200, False))
        return path
    return guest if guest in ("paging", "usermode") else test_guest(guest)


@pytest.mark.parametrize("guest", ["nanobench", "ptemod_c", "true_pf", "paging", "usermode", "trap_deliver"])
def test_ptemod_exits_in_c_leave_what_python_leaves(guest, test_guest, monkeypatch, tmp_path):
    path = _guest(guest, test_guest, tmp_path)
    c, c_reasons, c_shadow, c_cpu, c_seen = hw_shadow_run(path, "shadow_ptemod_c", True, monkeypatch)
    py, py_reasons, py_shadow, py_cpu, py_seen = hw_shadow_run(path, "shadow_ptemod_c", False, monkeypatch)
    assert c["outcome"] == "exit", c["message"]
    assert py_cpu._pf_exits is None
    assert c == py and c_reasons == py_reasons and c_shadow == py_shadow
    same_exits(c_seen, py_seen)
    made = c_cpu._pf_exits.ptemods
    assert len(c_seen) == len(py_seen) - made
    if guest == "nanobench":  # ptemod: one store an iteration; pgfault: the loop's and the handler's
        assert made >= 3 * 200 - 3, made
    if guest == "ptemod_c":
        assert made >= 100, made
        assert c_cpu._pf_exits.state.zap_total > 0  # stores into words shadow entries derive from


def test_the_switch():
    code = "from cpuvirt.modes.hw.vmx import VmxCpu; print(VmxCpu.shadow_ptemod_c)"
    assert switches_with(code, ("CPUVIRT_HW_PTEMOD_C",)) == ["True"]
    assert switches_with(code, ("CPUVIRT_HW_PTEMOD_C",), CPUVIRT_HW_PTEMOD_C="0") == ["False"]
