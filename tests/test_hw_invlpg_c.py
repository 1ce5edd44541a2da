"""hw without EPT makes the INVLPG exit of shadow paging in C (modes/hw/_fastexit.c invlpg_exit): the page
leaves the C copy of the shadow's current root and the log tells Python's table (ShadowPaging.invlpg, as
handle_invlpg does it), the engine runs the invlpg, and VmxCpu.fold_fast_exits later counts the exits and
writes the last one's fields when it was the last exit C made. With VmxCpu.shadow_invlpg_c off
(CPUVIRT_HW_INVLPG_C=0) every run must leave the same console, counts, exit counts by reason, memory and
shadow counters and virtual time, and every VM exit Python makes must find the same exit-information
fields in the VMCS as the Python run's (the last exit's, C's folded first)."""

from __future__ import annotations

import dataclasses

import pytest

from cpuvirt.modes.hw.vmcs import Field as F
from cpuvirt.modes.hw.vmx import VmxCpu
from cpuvirt.nanobench import build
from cpuvirt.runner import run_guest

FIELDS = (
    F.VM_EXIT_REASON,
    F.EXIT_QUALIFICATION,
    F.VM_EXIT_INSTRUCTION_LEN,
    F.VM_EXIT_INTR_INFO,
    F.VMX_INSTRUCTION_INFO,
    F.GUEST_RIP,
    F.GUEST_CR3,
)


def _run(path, c_path: bool, monkeypatch):
    """The run's record, and at every VM exit Python makes (C's folded first) the exit-information fields
    the VMCS holds then, with the exit's reason, RIP and virtual time."""
    seen: list[tuple] = []
    original = VmxCpu.vm_exit

    def vm_exit(self, reason, rip, **kw):
        self.fold_fast_exits()
        seen.append((int(reason), rip, self.clock.now, tuple(self.vmcs._values.get(f) for f in FIELDS)))
        return original(self, reason, rip, **kw)

    monkeypatch.setattr(VmxCpu, "vm_exit", vm_exit)
    monkeypatch.setattr(VmxCpu, "shadow_invlpg_c", c_path)
    cpus: list = []
    res = run_guest(str(path), "hw", 32, 50_000_000, mode_options={"ept": False}, on_start=cpus.append)
    monkeypatch.undo()
    vcpu = cpus[-1].vcpu
    d = dataclasses.asdict(res)
    del d["wall_s"]
    d["exit_stats"] = [tuple(row[:-1]) for row in d["exit_stats"]]  # less host microseconds per exit
    made = vcpu.fast_exits.invlpg_exits_made if vcpu.fast_exits is not None else 0
    return d, tuple(vcpu.reasons.items()), cpus[-1].shadow.counters.as_dict(), seen, made


def _same_exits(c_seen, py_seen) -> None:
    """Each exit Python made in the C run was made in the Python run too, in order, finding the same fields."""
    index: dict = {}
    for k, record in enumerate(py_seen):
        index.setdefault(record[:3], []).append(k)
    last = -1
    for record in c_seen:
        candidates = [k for k in index.get(record[:3], []) if k > last]
        assert candidates, record[:3]
        last = candidates[0]
        assert record == py_seen[last], (record, py_seen[last])


@pytest.mark.parametrize("guest", ["nanobench", "true_pf", "ptemod_c", "paging", "usermode", "trap_deliver"])
def test_invlpg_exits_in_c_leave_what_python_leaves(guest, test_guest, monkeypatch, tmp_path):
    if guest == "nanobench":
        path = tmp_path / "nb.bin"
        path.write_bytes(build(200, False))
    elif guest in ("paging", "usermode"):
        path = guest
    else:
        path = test_guest(guest)
    c, c_reasons, c_shadow, c_seen, c_made = _run(path, True, monkeypatch)
    py, py_reasons, py_shadow, py_seen, py_made = _run(path, False, monkeypatch)
    assert c["outcome"] == "exit", c["message"]
    assert py_made == 0
    assert c == py and c_reasons == py_reasons and c_shadow == py_shadow
    _same_exits(c_seen, py_seen)
    if guest == "nanobench":  # an invlpg in each ptemod and pgfault iteration
        assert c_made >= 2 * 200 - 2, c_made
        assert len(c_seen) <= len(py_seen) - c_made
    if guest == "true_pf":  # 39 invlpgs a round (the handler's and the loop's)
        assert c_made >= 39 * 40, c_made
