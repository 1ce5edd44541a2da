"""Direct paging (Xen PV): the guest's own page tables, holding machine frames, are the real ones.

The guest reads its tables directly (mapped read-only) and changes them only through validated
updates. Safety comes from frame types with reference counts (Xen's PGT_* types): a frame is an L1
table, an L2 table, a GDT frame, the hypercall page, or "writable" (mapped read/write somewhere), and
changes type only when its count is 0. So a page table can never be mapped writable, and every entry
reachable from the current base has been validated (its frame is the guest's own).

The TLB-fill hook walks these tables with the shared walk (walk.py), whose "guest-physical" reads
are here machine addresses. Linear addresses from HYPERVISOR_VIRT_START up are the hypervisor's:
they show the current GDT frames read-only (the engine reads descriptors through the TLB).
"""

from __future__ import annotations

import ctypes
import struct
from array import array
from typing import Callable

from cpuvirt.memory.types import PFEC_P, PFEC_U, PFEC_W, PTE_P, PTE_PS, PTE_RW, Access
from cpuvirt.memory.walk import Fault, walk
from cpuvirt.x86.flags import CR0_PG, CR0_WP, CR4_PSE
from cpuvirt.xen import EINVAL, EPERM, GDT_WINDOW_FRAMES, HYPERVISOR_VIRT_START

HV_L2_SLOT = HYPERVISOR_VIRT_START >> 22  # 1008: L2 slots from here are the hypervisor's

# Frame types (Xen's PGT_none, PGT_writable_page, PGT_l1/l2_page_table, PGT_seg_desc_page) and the
# hypercall page, which is never writable.
NONE, WRITABLE, L1, L2, GDT, HYPERCALL = range(6)
TYPE_NAMES = ("none", "writable", "L1", "L2", "GDT", "hypercall")

_CR0 = CR0_PG | CR0_WP | 0x11
_CR4 = CR4_PSE
_WRITE, _FETCH = int(Access.WRITE), int(Access.FETCH)


class Refused(Exception):
    """A page-table update or type change refused: errno (positive) and why, for the trace."""

    def __init__(self, errno: int, why: str):
        super().__init__(why)
        self.errno, self.why = errno, why


# Page flushes collected in one hypercall beyond which one whole flush is made instead (as Linux's
# tlb_single_page_flush_ceiling): a batch of INVLPG requests costs the host at most this many page flushes.
FLUSH_PAGE_CEILING = 33


class DirectPaging:
    """The Mmu strategy of mode para, and the frame-type bookkeeping its hypercalls use."""

    def __init__(self, mmu, nr_pages: int, ram_hpa: int):
        self.mmu = mmu
        self.ram = mmu.ram
        self.nr_pages = nr_pages
        self.base_mfn = ram_hpa >> 12
        self.end_mfn = self.base_mfn + nr_pages
        self.type = bytearray(nr_pages)
        self.count = array("I", bytes(4 * nr_pages))  # 32-bit slots: para's C path updates them too
        self.pinned = bytearray(nr_pages)
        self._base = ctypes.c_uint32(0)  # machine address of the current L2 (0: none yet); para's C reads it
        self.gdt_frames: list[int] = []  # mfns shown at HYPERVISOR_VIRT_START
        self.ldt_frames: list[int] = []  # mfns shown at LDT_VIRT_START
        # callback(gdt_frames, ldt_frames): the C fill's copy of the window (DirectFastFill.window)
        self.on_window: Callable[[list[int], list[int]], None] | None = None
        self.on_flush: Callable[[], None] | None = None  # drop the engine's TLB
        self.on_flush_page: Callable[[int], None] | None = None  # drop one page of it (None: flush it all)
        self.tlb_dirty = False  # flush before the guest runs again
        self.stale_pages: set[int] = set()  # or only these pages (INVLPG), when nothing else asks for more
        self.walk_counter = mmu.counters
        self.work = 0  # entries validated or released since the hypercall began

    @property
    def base(self) -> int:
        """Machine address of the current L2 (0: none yet): MMUEXT_NEW_BASEPTR's, in C's reach too."""
        return self._base.value

    @base.setter
    def base(self, value: int) -> None:
        self._base.value = value

    # -- the strategy (Mmu.fill asks these) ------------------------------------------------------
    def gva_to_gpa(self, gva, access, user, side_effects=True):
        """Linear -> machine address (and whether writes are allowed), or (None, #PF error code)."""
        if gva >= HYPERVISOR_VIRT_START:
            i = (gva - HYPERVISOR_VIRT_START) >> 12
            frames = self.gdt_frames if i < GDT_WINDOW_FRAMES else self.ldt_frames
            i = i if i < GDT_WINDOW_FRAMES else i - GDT_WINDOW_FRAMES
            if i < len(frames) and access != _WRITE and access != _FETCH:
                return (frames[i] << 12) | (gva & 0xFFF), False
            code = PFEC_P if i < len(frames) else 0
            return None, code | (PFEC_W if access == _WRITE else 0) | (PFEC_U if user else 0)
        t = walk(gva, access, user, _CR0, self.base, _CR4, self._read, self._write if side_effects else None)
        if side_effects:  # a look without side effects (disassembly for a trace) is not the guest's
            c = self.walk_counter
            c.walks += 1
            c.walk_refs += t.refs
        if type(t) is Fault:
            return None, t.error_code
        mfn = t.gpa >> 12
        if not self.base_mfn <= mfn < self.end_mfn:  # never: entries are validated; checked anyway
            return None, PFEC_P | (PFEC_W if access == _WRITE else 0) | (PFEC_U if user else 0)
        return t.gpa, (t.writable and (t.dirty or access == _WRITE))

    def gpa_to_hpa(self, ma: int, access: int):
        return ma if self.base_mfn <= ma >> 12 < self.end_mfn else None

    def _read(self, ma: int) -> int:
        if self.base_mfn <= ma >> 12 < self.end_mfn:
            return self.ram.read32(ma)
        return 0

    def _write(self, ma: int, value: int) -> None:
        if self.base_mfn <= ma >> 12 < self.end_mfn:
            self.ram.write32(ma, value)

    # -- frames ------------------------------------------------------------------------------------
    def owned(self, mfn: int) -> bool:
        return self.base_mfn <= mfn < self.end_mfn

    def pfn(self, mfn: int) -> int:
        if not self.base_mfn <= mfn < self.end_mfn:
            raise Refused(
                EPERM, f"mfn {mfn:#x} is not the guest's (its frames are {self.base_mfn:#x}..{self.end_mfn - 1:#x})"
            )
        return mfn - self.base_mfn

    def entries(self, mfn: int) -> tuple[int, ...]:
        off = (mfn << 12) - self.ram.hpa
        return struct.unpack_from("<1024I", self.ram.buf, off)

    def dma_refusal(self, gpa: int, size: int) -> str | None:
        """Why a device may not write guest-physical gpa .. gpa + size - 1, or None: only frames of
        no type or writable type may be written behind the hypervisor's back (Mmu.dma_guard)."""
        for p in range(gpa >> 12, min((gpa + max(size, 1) - 1) >> 12, self.nr_pages - 1) + 1):
            if self.count[p] and self.type[p] not in (NONE, WRITABLE):
                return f"frame {p:#x} is a typed {TYPE_NAMES[self.type[p]]} frame of direct paging"
        return None

    def type_of(self, mfn: int) -> str:
        p = mfn - self.base_mfn
        return TYPE_NAMES[self.type[p]] if self.count[p] else "none"

    def get_type(self, mfn: int, want: int) -> None:
        """Take one reference of type `want` on a frame, validating a table on its first use."""
        p = self.pfn(mfn)
        have, n = self.type[p], self.count[p]
        if n and have == want:
            self.count[p] = n + 1
            return
        if n:
            raise Refused(
                EINVAL, f"mfn {mfn:#x} is {TYPE_NAMES[have]} ({n} references), cannot become {TYPE_NAMES[want]}"
            )
        self.type[p], self.count[p] = want, 1  # before validating: a table that maps itself fails
        try:
            if want == L1:
                self._validate(mfn, self.get_l1e, self.put_l1e)
            elif want == L2:
                self._validate(mfn, self.get_l2e, self.put_l2e, HV_L2_SLOT)
        except Refused:
            self.type[p], self.count[p] = NONE, 0
            raise

    def put_type(self, mfn: int) -> None:
        p = mfn - self.base_mfn
        n = self.count[p] - 1
        if n < 0:
            raise AssertionError(f"type count of mfn {mfn:#x} below zero")
        self.count[p] = n
        if self.type[p] == WRITABLE or (n == 0 and self.type[p] != NONE):
            # A protection goes away: a writable mapping (the engine's TLB may still hold it, and
            # the frame may become a page table), or the last use of a page-table or descriptor
            # frame (the frame may become writable while the engine still holds translations
            # through it: the GDT/LDT window's, or those walked through a table). The engine's
            # TLB is flushed before the guest runs again (flush_tlb, at the end of the hypercall).
            self.tlb_dirty = True
        if n == 0:
            t = self.type[p]
            self.type[p] = NONE
            if t in (L1, L2):
                self.work += 1024
            if t == L1:
                for e in self.entries(mfn):
                    self.put_l1e(e)
            elif t == L2:
                for e in self.entries(mfn)[:HV_L2_SLOT]:
                    self.put_l2e(e)

    def _validate(self, mfn: int, get, put, limit: int = 1024) -> None:
        ents = self.entries(mfn)
        self.work += 1024
        done = []
        try:
            for i, e in enumerate(ents):
                if i >= limit:
                    if e & PTE_P:
                        raise Refused(EINVAL, f"L2 slot {i} (va {i << 22:#x}) is the hypervisor's")
                    continue
                get(e)
                done.append(e)
        except Refused as r:
            for e in done:
                put(e)
            raise Refused(
                r.errno,
                f"validating mfn {mfn:#x} as {'L1' if get == self.get_l1e else 'L2'}: entry {len(done)}: {r.why}",
            ) from None

    # -- entries -------------------------------------------------------------------------------------
    def get_l1e(self, e: int) -> None:
        if not e & PTE_P:
            return
        mfn = e >> 12
        if e & PTE_RW:
            self.get_type(mfn, WRITABLE)
        else:
            self.pfn(mfn)

    def put_l1e(self, e: int) -> None:
        if e & PTE_P and e & PTE_RW:
            self.put_type(e >> 12)

    def get_l2e(self, e: int) -> None:
        if not e & PTE_P:
            return
        if e & PTE_PS:
            first = (e >> 12) & ~0x3FF
            self.work += 1024
            if e & (0xFF << 13):
                raise Refused(EINVAL, "4 MiB page above 4 GiB (PSE-36 bits set)")
            if e & PTE_RW:
                done = []
                try:
                    for mfn in range(first, first + 1024):
                        self.get_type(mfn, WRITABLE)
                        done.append(mfn)
                except Refused:
                    for mfn in done:
                        self.put_type(mfn)
                    raise
            else:
                self.pfn(first)
                self.pfn(first + 1023)
            return
        self.get_type(e >> 12, L1)

    def put_l2e(self, e: int) -> None:
        if not e & PTE_P:
            return
        if e & PTE_PS:
            if e & PTE_RW:
                first = (e >> 12) & ~0x3FF
                self.work += 1024
                for mfn in range(first, first + 1024):
                    self.put_type(mfn)
            return
        self.put_type(e >> 12)

    # -- the updates the hypercalls make -------------------------------------------------------
    def update_entry(self, ptr: int, val: int, linear: int | None = None) -> str:
        """mmu_update MMU_NORMAL_PT_UPDATE: write `val` at machine address `ptr` if allowed.
        Returns what kind of write it was (for the trace); raises Refused. `linear`: update_va_mapping's
        address, the one the entry maps in the current tables."""
        mfn = ptr >> 12
        p = self.pfn(mfn)
        index = (ptr & 0xFFF) >> 2
        ma = ptr & ~3
        t = self.type[p] if self.count[p] else NONE
        old = self.ram.read32(ma)
        if t == L1:
            self.get_l1e(val)
            self.ram.write32(ma, val)
            dirty = self.tlb_dirty
            self.put_l1e(old)
            if linear is not None and self.count[p] == 1 and self.tlb_dirty and not dirty:
                # The old entry's writable mapping is in the engine's TLB at most at `linear`: the table is
                # linked once (one L2 slot, the current one's), so no other linear page reaches the entry.
                # That page goes, not the whole TLB (a whole flush costs a refill of every page in use).
                self.tlb_dirty = False
                self.flush_page(linear)
            kind = "L1 entry"
        elif t == L2:
            if index >= HV_L2_SLOT and val & PTE_P:
                raise Refused(EINVAL, f"L2 slot {index} (va {index << 22:#x}) is the hypervisor's")
            self.get_l2e(val)
            self.ram.write32(ma, val)
            self.put_l2e(old)
            kind = "L2 entry"
        elif t in (NONE, WRITABLE):
            self.ram.write32(ma, val)
            kind = "plain write (not a page table)"
        else:
            raise Refused(EINVAL, f"mfn {mfn:#x} is {TYPE_NAMES[t]}: not writable through mmu_update")
        return kind

    def l1_entry_for(self, va: int) -> int:
        """Machine address of the L1 entry mapping `va` in the current tables (update_va_mapping)."""
        if va >= HYPERVISOR_VIRT_START:
            raise Refused(EINVAL, f"va {va:#x} is in the hypervisor's area")
        pde = self.ram.read32(self.base + ((va >> 22) << 2))
        if not pde & PTE_P:
            raise Refused(EINVAL, f"va {va:#x}: its L2 entry is not present")
        if pde & PTE_PS:
            raise Refused(EINVAL, f"va {va:#x} is mapped by a 4 MiB page")
        return (pde & 0xFFFFF000) | ((va >> 10) & 0xFFC)

    def pin(self, mfn: int, want: int) -> None:
        p = self.pfn(mfn)
        if self.pinned[p]:
            raise Refused(EINVAL, f"mfn {mfn:#x} is already pinned")
        self.get_type(mfn, want)
        self.pinned[p] = 1

    def unpin(self, mfn: int) -> None:
        p = self.pfn(mfn)
        if not self.pinned[p]:
            raise Refused(EINVAL, f"mfn {mfn:#x} is not pinned")
        self.pinned[p] = 0
        self.put_type(mfn)

    def new_baseptr(self, mfn: int) -> None:
        self.get_type(mfn, L2)
        old = self.base
        self.base = mfn << 12
        if old:
            self.put_type(old >> 12)
        self.flush()

    def set_gdt(self, mfns: list[int]) -> None:
        self.gdt_frames = self._set_desc_frames(mfns, self.gdt_frames)
        self._window_changed()

    def set_ldt(self, mfns: list[int]) -> None:
        self.ldt_frames = self._set_desc_frames(mfns, self.ldt_frames)
        self._window_changed()

    def _window_changed(self) -> None:
        if self.on_window is not None:
            self.on_window(self.gdt_frames, self.ldt_frames)

    def _set_desc_frames(self, mfns: list[int], old: list[int]) -> list[int]:
        """Type the new descriptor-table frames (Xen's PGT_seg_desc_page), then release the old.
        The window shows other frames from now on: the engine's TLB entries for it are dropped
        (put_type marks the TLB dirty as the old frames lose their type)."""
        self.tlb_dirty = True
        done = []
        try:
            for mfn in mfns:
                self.get_type(mfn, GDT)
                done.append(mfn)
        except Refused:
            for mfn in done:
                self.put_type(mfn)
            raise
        for mfn in old:
            self.put_type(mfn)
        return list(mfns)

    def flush(self) -> None:
        """The guest asked for a flush (INVLPG, TLB_FLUSH, UVMF_*) or switched tables: at the end
        of the hypercall (one flush per batch)."""
        self.tlb_dirty = True

    def flush_page(self, linear: int) -> None:
        """The guest asked for one page to go (UVMF_INVLPG, MMUEXT_INVLPG_LOCAL): at the end of the
        hypercall, unless something in it needs the whole TLB flushed."""
        if self.on_flush_page is None or len(self.stale_pages) >= FLUSH_PAGE_CEILING:
            self.tlb_dirty = True
        else:
            self.stale_pages.add(linear & ~0xFFF)

    @property
    def flush_due(self) -> bool:
        return self.tlb_dirty or bool(self.stale_pages)

    def flush_tlb(self) -> None:
        pages, self.stale_pages = self.stale_pages, set()
        if self.tlb_dirty:
            self.tlb_dirty = False
            if self.on_flush is not None:
                self.on_flush()
        elif pages and self.on_flush_page is not None:
            for page in sorted(pages):
                self.on_flush_page(page)
