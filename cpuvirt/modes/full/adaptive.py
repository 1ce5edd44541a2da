"""Adaptive binary translation (Adams & Agesen 2006, section 4): a guest-kernel store that keeps
faulting on a write-traced page (a guest page table under shadow paging) is translated again as a
callout that does the store through the shadow pager, with no fault at all.

The way back: a site whose callouts keep storing to frames nobody traces is translated natively again.
xv6's `mappages` is such a site: it writes the PTEs of the live page tables (traced) and, in every
`setupkvm`, the 57,000 PTEs of a new process's kernel map into fresh, untraced frames; as a callout
each of those stores cost a hook call and an emulation, and a fork-heavy run was made of little else.
Each return to native doubles the run of untraced stores the next return needs, up to 4096 (a site
that alternates pays callouts for at most that many untraced stores per round, not for a whole
`setupkvm`).
A mixin of FullVcpu (vcpu.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cpuvirt.bt.coherence import invalidate
from cpuvirt.bt.fastcallout import ADAPTIVE
from cpuvirt.engine import regs as R
from cpuvirt.memory.mmu import GuestPageFault
from cpuvirt.memory.types import Access
from cpuvirt.x86.emulate import store_site, stores
from cpuvirt.x86.vectors import Vector

if TYPE_CHECKING:  # a mixin of FullVcpu (vcpu.py): mypy reads it against the deprivileging vCPU
    from cpuvirt.bt.runtime import BtRuntime
    from cpuvirt.bt.tcache import TCache
    from cpuvirt.cpu.deprivilege import DeprivilegedVcpu as _VcpuBase
else:
    _VcpuBase = object

ADAPTIVE_THRESHOLD = 4  # traced-page faults at one guest store before it becomes a callout
NATIVE_AGAIN_AFTER = 64  # consecutive untraced stores by a callout before it is native again
NATIVE_AGAIN_MAX = 4096  # the doubling stops here: at most this many callouts per native run


class AdaptiveStores(_VcpuBase):
    """Making a store site adaptive, and doing its store when its callout runs."""

    # FullVcpu's state this mixin uses (vcpu.py sets each up)
    rt: BtRuntime
    tc: TCache
    traced_stores: dict[int, int]
    code_store_faults: dict[int, int]
    adaptive_stores: int
    _untraced_run: dict[int, int]
    _native_after: dict[int, int]
    _fast_kinds: int  # callouts.py: the kinds the C callout hook serves (1 << kind)

    def _make_adaptive(self, geip: int) -> None:
        """Adaptive BT: a store that keeps faulting on a traced page (a page table, or data beside
        translated code) becomes a callout that does the store through the shadow paging (no fault at
        all)."""
        tr = self.rt.translator
        if geip in tr.adaptive or not hasattr(self.mmu.strategy, "guest_store"):
            return
        if not stores(self.mmu.fetch_bytes(geip, 15) or b"", geip):
            return  # not a store the callout can do: it keeps faulting
        tr.adaptive.add(geip)
        self.tc.counters.adaptive += 1
        self._untraced_run[geip] = 0
        self._retranslate(geip)

    def _make_native(self, geip: int) -> None:
        """The site's recent stores all went to untraced frames: translate it as a plain store again,
        and ask for twice as many before the next time."""
        self.rt.translator.adaptive.discard(geip)
        self.tc.counters.unadapted += 1
        del self._untraced_run[geip]
        self._native_after[geip] = min(2 * self._native_after.get(geip, NATIVE_AGAIN_AFTER), NATIVE_AGAIN_MAX)
        self.traced_stores[geip] = 0
        self.code_store_faults.pop(geip, None)
        self._retranslate(geip)

    def _retranslate(self, geip: int) -> None:
        for b in list(self.tc.blocks.values()):
            if any(i.geip == geip and i.size for i in b.insns):
                invalidate(self.tc, b)

    def _adaptive_store(self, geip: int) -> None:
        """The store of an adaptive callout, done through shadow paging's guest_store (whose write tells
        the frame's owners: shadow paging zaps, coherence.py drops the translations it changed)."""
        from cpuvirt.x86.emulate import arith_store, emulate_store

        mmu = self.mmu
        traced = False
        done: list = []

        def read(gva, size):
            return int.from_bytes(mmu.read_linear(gva, size, False), "little")

        def write(gva, size, value):
            nonlocal traced
            frames = mmu.traces.frames
            for a in {gva, (gva + size - 1) & 0xFFFFFFFF}:
                hpa = mmu.gva_to_hpa(a, Access.WRITE, False)  # a #PF here is the store's own
                if hpa is not None and frames.get((hpa - mmu.p2m.ram_hpa) & 0xFFFFF000):
                    traced = True  # a page table, or a frame with translated code
            mmu.strategy.guest_store(gva, size, value)
            done.append((gva, size, value))

        code = mmu.fetch_bytes(geip, 15)
        try:
            length = arith_store(code, geip, self.regs, read, write)
            if length is None:
                length, gva, size, value, what = emulate_store(code, geip, self.regs, read, write)
            else:
                (gva, size, value), what = done[0], "emulated a read-modify-write"
        except GuestPageFault as pf:
            self.virtual_cpu.cr2 = pf.gva
            self.record_page_fault(pf.gva, 1, pf.error_code, geip)  # 1: a write
            self.deliver(Vector.PF, geip, pf.error_code)
            return
        self.adaptive_stores += 1
        if geip in self._untraced_run:
            fast = self.rt.fast
            kept = fast.store_run(self.rt.slot) if fast is not None else None
            if kept is not None:  # the C hook served the site's stores since: its run is the site's
                self._untraced_run[geip] = kept
            run = 0 if traced else self._untraced_run[geip] + 1
            self._untraced_run[geip] = run
            if run >= self._native_after.get(geip, NATIVE_AGAIN_AFTER):
                self._make_native(geip)
            elif self.rt.fast is not None and self.trace is None and self._fast_kinds & (1 << ADAPTIVE):
                # from now on the C hook stores where it can (bt/_callout.c adaptive_store), going on at
                # the next instruction's translation; every other store of the site comes back here
                form = store_site(code, geip)
                if form is not None:
                    rt = self.rt
                    rt.link_as, rt.link_geip = ADAPTIVE, (geip + length) & 0xFFFFFFFF
                    rt.link_store = (form, run, self._native_after.get(geip, NATIVE_AGAIN_AFTER))
        self.record(
            self.event_kind,
            "store",
            None,
            geip,
            {"address": f"{gva:#x}", "size": size, "value": f"{value:#x}", "adaptive": True},
            f"adaptive: {what} through the shadow page tables, no fault",
        )
        self.regs.write(R.EIP, (geip + length) & 0xFFFFFFFF)
