"""trap and full answer the guest kernel's `mov cr3, r32` in C when it selects the shadow's current root
again (a TLB flush: nanobench's `cr3` loop, kernels flushing their TLB): trap's INTR hook
(modes/_trapfast.c cr3_reload_ok, also `mov r32, cr3`) and full's callout hook (bt/_callout.c cr3_reload, a
reload of the very value it holds): the virtual CR3, the hypervisor's TLB, ShadowPaging.on_cr3_write's
counts and the engine's TLB flush, as EmulatingVcpu.write_cr(3) leaves them. A switch to another root, or
one while a frame is left unsynchronised, stays Python's. With CPUVIRT_TRAP_CR3_C=0 / CPUVIRT_FULL_CR3_C=0
every run must leave the same console, counts, reasons, memory, shadow and TC counters and virtual
time.

hw without EPT (`hw-noept` below): the same reload is a CR_ACCESS VM exit (CR3-load exiting), made whole
in C by modes/hw/_fastexit.c and folded by VmxCpu.fold_fast_exits; with CPUVIRT_HW_CR3_C=0 the run must
also leave the same VM-exit counts by reason and the same VMCS fields at its end."""

from __future__ import annotations

import dataclasses

import pytest

from cpuvirt.modes.hw.vmx import VmxCpu
from cpuvirt.modes.trapfast import _lib
from cpuvirt.nanobench import build
from cpuvirt.runner import run_guest
from tests.conftest import requires_qemu
from tests.qemu import assert_same_console_as_qemu

pytestmark = pytest.mark.skipif(
    _lib() is None, reason="the C extensions are not built (python setup.py build_ext --inplace)"
)


def _both(path, mode, monkeypatch):
    out = {}
    for env in ("1", "0"):
        cpus: list = []
        if mode == "hw-noept":
            monkeypatch.setattr(VmxCpu, "shadow_cr3_c", env == "1")
            res = run_guest(str(path), "hw", 32, 50_000_000, mode_options={"ept": False}, on_start=cpus.append)
        else:
            monkeypatch.setenv(f"CPUVIRT_{mode.upper()}_CR3_C", env)
            res = run_guest(str(path), mode, 32, 50_000_000, on_start=cpus.append)
        hv = cpus[-1]
        d = dataclasses.asdict(res)
        del d["wall_s"]
        if mode == "trap":
            answered = hv.vcpu.fast.answered
        elif mode == "full":
            answered = hv.vcpu.rt.fast._table.served[12]  # MOV_CR3
        else:
            answered = hv.vcpu.fast_exits.cr3_exits_made
            d["exit_stats"] = [tuple(row[:-1]) for row in d["exit_stats"]]  # less host microseconds per exit
            d["vmcs"] = dict(hv.vcpu.vmcs._values)
        out[env] = (d, tuple(hv.vcpu.reasons.items()), answered, hv.shadow.counters.as_dict())
    return out["1"], out["0"]


@pytest.mark.parametrize("mode", ["trap", "full", "hw-noept"])
@pytest.mark.parametrize("guest", ["nanobench", "cr3_switch", "paging", "usermode", "trap_deliver", "trap_events"])
def test_cr3_in_c_leaves_what_python_leaves(guest, mode, test_guest, monkeypatch, tmp_path):
    if guest == "nanobench":
        path = tmp_path / "nb.bin"
        path.write_bytes(build(200, False))
    elif guest.startswith("trap_") or guest == "cr3_switch":
        path = test_guest(guest)
    else:
        path = guest
    (c, c_reasons, c_answered, c_shadow), (py, py_reasons, py_answered, py_shadow) = _both(path, mode, monkeypatch)
    assert c["outcome"] == "exit", c["message"]  # (usermode under trap fails its checks by design: the holes)
    assert c == py and c_reasons == py_reasons and c_shadow == py_shadow
    if guest == "nanobench":  # 200 reloads in its cr3 loop, less the first (full: its first two)
        assert c_answered - py_answered >= 198, (c_answered, py_answered)


@pytest.mark.parametrize("mode", ["trap", "full", "hw-noept"])
def test_a_site_c_served_still_switches_roots_through_python(mode, test_guest, monkeypatch):
    """cr3_switch.S reloads and switches at one `mov cr3` site: C serves the reloads (the site is linked or
    seen), Python every switch, and the guest reads each space's frame (its own checks)."""
    (c, _, c_answered, c_shadow), _ = _both(test_guest("cr3_switch"), mode, monkeypatch)
    assert c["status"] == 0 and b"FAIL" not in c["console"], c["console"]
    assert c_answered >= 990, c_answered  # the 1,000 reloads, less the first few
    assert c_shadow["cr3_switches"] - c_shadow["root_hits"] <= 2, c_shadow  # (only the first roots are new)


@requires_qemu
def test_cr3_switch_console_is_qemus(test_guest):
    """The guest's checks (the frame each space maps, the new PTE seen after each reload) hold on QEMU."""
    console = assert_same_console_as_qemu(test_guest("cr3_switch"), [], [])
    assert console.count(b"PASS") == 5
