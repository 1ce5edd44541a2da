"""hw --no-ept's quick shadow #PF exit (VmxCpu.quick_shadow_miss, asked by ShadowPaging.gva_to_gpa from the TLB
fill when the shadow has no entry that allows an access and the guest's own tables do) leaves what the full exit
leaves (the refused fill, on_refused_fill -> _exception_exit -> vm_exit -> handle_exception_nmi ->
shadow_page_fault -> vm_entry, then the engine's retry).

Each guest runs under `--no-ept` with the quick path and without it (VmxCpu.quick_shadow_pf, the
CPUVIRT_NO_QUICK_SHADOW_PF switch; the walk and fill made by memory/_tlbfill.c, which asks
VmxCpu.quick_shadow_exit, or with CPUVIRT_QUICK_SHADOW_PF_C=0 all in Python) through test_hw_quick_ept's harness, and everything a reader can see must be
the same: the console, instructions, virtual time, event, exit, MMU and shadow counters, and at every port access
the VMCS exit-information fields, GUEST_RIP, the counters and the clock. A fill that would trace a new guest
page-table frame (which flushes the engine's TLB), trim an address space or let ring 1 write a read-only page
takes the full exit: the counters of TLB fills would differ otherwise (paging shows it).
"""

from __future__ import annotations

import pytest

from cpuvirt.modes.hw import vmx
from cpuvirt.modes.hw.exits import ExitReason
from tests.runs import check_off_switches
from tests.test_hw_quick_ept import _run, _same, replace_handler

NO_EPT = ("enable_ept=0",)


def _shadow_run(image, monkeypatch, quick: bool, in_c: bool = True, **kw):
    monkeypatch.setattr(vmx.VmxCpu, "quick_shadow_pf", quick)
    monkeypatch.setattr(vmx.VmxCpu, "quick_shadow_pf_c", in_c)
    res, seen, cpu = _run(image, monkeypatch, True, controls=NO_EPT, **kw)  # (_run undoes the patch)
    assert cpu.shadow is not None
    return res, seen, cpu


def _compare(image, monkeypatch, refills: int = 0, in_c: bool = True, **kw):
    quick = _shadow_run(image, monkeypatch, True, in_c, **kw)
    slow = _shadow_run(image, monkeypatch, False, **kw)
    _same(quick, slow, refills)
    q, s = quick[2], slow[2]
    assert s.quick_shadow_exits == 0
    return q, s


# guest -> (the least number of quick exits expected, TLB refills the full path may add: test_hw_quick_ept);
# the others run with paging off (no shadow fill: nothing to take) or fault on purpose (exceptions, apic)
GUESTS = {"hello": (0, 0), "paging": (15, 0), "interrupts": (0, 0), "exceptions": (0, 0), "usermode": (4, 0),
          "smc": (0, 0), "apic": (0, 0), "holes": (0, 0), "hostile": (10_000, 4)}


@pytest.mark.parametrize("guest", list(GUESTS))
def test_bundled_guests_without_ept(guest, monkeypatch):
    least, refills = GUESTS[guest]
    q, _ = _compare(guest, monkeypatch, refills, ok=False)
    assert q.quick_shadow_exits >= least
    # the first fill through each new page-table frame, and the true faults, take the full exit
    assert q.quick_shadow_exits < q.stats[ExitReason.EXCEPTION_NMI] or not q.stats[ExitReason.EXCEPTION_NMI]


def test_stores_of_every_form_on_fresh_pages(test_guest, monkeypatch):
    """hw_quick_ept.S's stores (displacement, SIB, straddling two fresh pages, rep stosd over a boundary, movsd,
    lock cmpxchg), loads and fetches on fresh pages, under shadow paging: CR2 (the exit qualification) is the
    exact address each time."""
    q, _ = _compare(test_guest("hw_quick_ept"), monkeypatch)
    assert q.quick_shadow_exits >= 90  # (97 of 2026-12-05)
    assert q.mmu.counters.fast.quick_exits >= 90  # walked and filled in C (all 97: the first fill through each
    # new page table, which C declines, is declined by quiet_fill too: a newly traced frame flushes the TLB)


def test_the_quick_exit_in_python_only(test_guest, monkeypatch):
    """CPUVIRT_QUICK_SHADOW_PF_C=0: every quick exit through ShadowPaging.gva_to_gpa's quick_miss, the same again."""
    q, _ = _compare(test_guest("hw_quick_ept"), monkeypatch, in_c=False)
    assert q.quick_shadow_exits >= 90 and q.mmu.counters.fast.quick_exits == 0


def test_a_replaced_exception_handler_sees_every_exit(test_guest, monkeypatch):
    calls: list = []
    start = replace_handler(ExitReason.EXCEPTION_NMI, calls)
    _, _, cpu = _shadow_run(test_guest("hw_quick_ept"), monkeypatch, True, start=start)
    assert len(calls) == cpu.stats[ExitReason.EXCEPTION_NMI] > 90 and cpu.quick_shadow_exits == 0


def test_a_trace_is_the_same_and_takes_the_full_exit(monkeypatch, tmp_path):
    a, b = tmp_path / "quick.jsonl", tmp_path / "slow.jsonl"
    q, _ = _compare("paging", monkeypatch, trace_path=None)
    assert q.quick_shadow_exits > 0
    quick = _shadow_run("paging", monkeypatch, True, trace_path=str(a))
    slow = _shadow_run("paging", monkeypatch, False, trace_path=str(b))
    _same(quick, slow)
    assert a.read_bytes() == b.read_bytes() and b'"EXCEPTION_NMI"' in a.read_bytes()
    assert quick[2].quick_shadow_exits == 0


@pytest.mark.parametrize("variable", ["CPUVIRT_NO_QUICK_SHADOW_PF", "CPUVIRT_QUICK_SHADOW_PF_C"])
def test_the_environment_switches_turn_it_off(variable):
    code = "from cpuvirt.modes.hw.vmx import VmxCpu; print(VmxCpu.quick_shadow_pf, VmxCpu.quick_shadow_pf_c)"
    check_off_switches(code, ("CPUVIRT_NO_QUICK_SHADOW_PF", "CPUVIRT_QUICK_SHADOW_PF_C"), variable)
