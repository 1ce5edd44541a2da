"""Adaptive binary translation (Adams & Agesen 2006, section 4): a guest-kernel store that keeps
faulting on a write-traced page (a guest page table under shadow paging) is translated again as a
callout that does the store through the shadow pager, with no fault at all.
A mixin of FullVcpu (vcpu.py).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from cpuvirt.bt.coherence import invalidate
from cpuvirt.engine import regs as R
from cpuvirt.memory.mmu import GuestPageFault
from cpuvirt.x86.vectors import Vector

if TYPE_CHECKING:       # a mixin of FullVcpu (vcpu.py): mypy reads it against the deprivileging vCPU
    from cpuvirt.bt.runtime import BtRuntime
    from cpuvirt.bt.tcache import TCache
    from cpuvirt.cpu.deprivilege import DeprivilegedVcpu as _VcpuBase
else:
    _VcpuBase = object

ADAPTIVE_THRESHOLD = 4            # traced-page faults at one guest store before it becomes a callout


class AdaptiveStores(_VcpuBase):
    """Making a store site adaptive, and doing its store when its callout runs."""

    # FullVcpu's state this mixin uses (vcpu.py sets each up)
    rt: BtRuntime
    tc: TCache
    traced_stores: dict[int, int]
    adaptive_stores: int

    def _make_adaptive(self, geip: int) -> None:
        """Adaptive BT: a store that keeps faulting on a traced page becomes a callout that does the
        store through the shadow paging (no fault at all)."""
        from cpuvirt.status import Unsupported
        from cpuvirt.x86.emulate import _store_form
        tr = self.rt.translator
        if geip in tr.adaptive or not hasattr(self.mmu.strategy, "guest_store"):
            return
        try:
            _store_form(self.mmu.fetch_bytes(geip, 15), geip)
        except Unsupported:
            return                       # not a store the callout can do: it keeps faulting
        tr.adaptive.add(geip)
        self.tc.counters.adaptive += 1
        for b in list(self.tc.blocks.values()):
            if any(i.geip == geip and i.size for i in b.insns):
                invalidate(self.tc, b)


    def _adaptive_store(self, geip: int) -> None:
        """The store of an adaptive callout, done through shadow paging's guest_store."""
        from cpuvirt.x86.emulate import emulate_store
        mmu = self.mmu

        def read(gva, size):
            return int.from_bytes(mmu.read_linear(gva, size, False), "little")

        def write(gva, size, value):
            mmu.strategy.guest_store(gva, size, value)

        try:
            length, gva, size, value, what = emulate_store(mmu.fetch_bytes(geip, 15), geip, self.regs, read, write)
        except GuestPageFault as pf:
            self.v.cr2 = pf.gva
            self.record("page_fault", "#PF", 14, geip, {"cr2": f"{pf.gva:#x}", "error_code": pf.error_code,
                                                        "access": "write", "fault": "true"},
                        "delivered #PF through the guest IDT")
            self.deliver(Vector.PF, geip, pf.error_code)
            return
        self.adaptive_stores += 1
        self.record(self.event_kind, "store", None, geip, {"address": f"{gva:#x}", "size": size,
                                                           "value": f"{value:#x}", "adaptive": True},
                    f"adaptive: {what} through the shadow page tables, no fault")
        self.regs.write(R.EIP, (geip + length) & 0xFFFFFFFF)

