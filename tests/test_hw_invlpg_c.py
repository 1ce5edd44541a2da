"""hw without EPT makes the INVLPG exit of shadow paging in C (modes/hw/_fastexit.c invlpg_exit): the page
leaves the C copy of the shadow's current root and the log tells Python's table (ShadowPaging.invlpg, as
handle_invlpg does it), the engine runs the invlpg, and VmxCpu.fold_fast_exits later counts the exits and
writes the last one's fields when it was the last exit C made. With VmxCpu.shadow_invlpg_c off
(CPUVIRT_HW_INVLPG_C=0) every run must leave the same console, counts, exit counts by reason, memory and
shadow counters and virtual time, and every VM exit Python makes must find the same exit-information
fields in the VMCS as the Python run's (the last exit's, C's folded first)."""

from __future__ import annotations

import pytest

from cpuvirt.nanobench import build
from tests.runs import hw_shadow_run, same_exits


@pytest.mark.parametrize("guest", ["nanobench", "true_pf", "ptemod_c", "paging", "usermode", "trap_deliver"])
def test_invlpg_exits_in_c_leave_what_python_leaves(guest, test_guest, monkeypatch, tmp_path):
    if guest == "nanobench":
        path = tmp_path / "nb.bin"
        path.write_bytes(build(200, False))
    elif guest in ("paging", "usermode"):
        path = guest
    else:
        path = test_guest(guest)
    c, c_reasons, c_shadow, c_cpu, c_seen = hw_shadow_run(path, "shadow_invlpg_c", True, monkeypatch)
    py, py_reasons, py_shadow, py_cpu, py_seen = hw_shadow_run(path, "shadow_invlpg_c", False, monkeypatch)
    c_made, py_made = c_cpu.fast_exits.invlpg_exits_made, py_cpu.fast_exits.invlpg_exits_made
    assert c["outcome"] == "exit", c["message"]
    assert py_made == 0
    assert c == py and c_reasons == py_reasons and c_shadow == py_shadow
    same_exits(c_seen, py_seen)
    if guest == "nanobench":  # an invlpg in each ptemod and pgfault iteration
        assert c_made >= 2 * 200 - 2, c_made
        assert len(c_seen) <= len(py_seen) - c_made
    if guest == "true_pf":  # 39 invlpgs a round (the handler's and the loop's)
        assert c_made >= 39 * 40, c_made
