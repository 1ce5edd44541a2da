"""The memory-translation module: Unicorn's TLB-fill hook is its single entry (DESIGN.md section 4).

Unicorn (UC_TLB_VIRTUAL) asks, once per page and access kind until a flush, which host-physical frame
and permissions back a linear address. `Mmu` answers through a *strategy* (the guest walk over a p2m
in native mode; shadow paging, direct paging and EPT in the other modes), so the walk itself is
written once (walk.py). A refused fill is remembered here and becomes a guest #PF (or, in hw mode, a
VM exit) in the run loop.

Execute permission is granted only to frames the guest has fetched from ("lazy W^X"): Unicorn makes
every store to an executable page take a slow path (~10x, UNICORN-NOTES.md "Performance traps").
Stores to a page that has served fetches still go through QEMU's code-page tracking, so
self-modifying code is caught.
"""

from __future__ import annotations

from typing import Callable, Protocol

from unicorn import UC_PROT_EXEC, UC_PROT_READ, UC_PROT_WRITE

from cpuvirt import limits
from cpuvirt.engine import regs as R
from cpuvirt.memory.p2m import UNBACKED_HPA, P2m
from cpuvirt.memory.traces import TracedWrite, Traces
from cpuvirt.memory.types import GPA, GVA, HPA, Access
from cpuvirt.memory.walk import Fault, walk
from cpuvirt.x86.flags import CR0_PG

PAGE = 0x1000
GUEST = 2  # the `side_effects` value of a guest access through the fill hook
PAGE_MASK = ~0xFFF & 0xFFFFFFFF
_RW = UC_PROT_READ | UC_PROT_WRITE


def _pieces(gpa: int, n: int):
    """A device access of n bytes as accesses of 4, 2 or 1 naturally aligned bytes, low address first."""
    end = gpa + n
    while gpa < end:
        size = 4 if not gpa & 3 and end - gpa >= 4 else 2 if not gpa & 1 and end - gpa >= 2 else 1
        yield gpa, size
        gpa += size


def _device_bytes(read, gpa: int, n: int) -> bytes:
    return b"".join(read(a, size).to_bytes(size, "little") for a, size in _pieces(gpa, n))


def _device_write(write, gpa: int, data: bytes) -> None:
    for a, size in _pieces(gpa, len(data)):
        write(a, size, int.from_bytes(data[a - gpa : a - gpa + size], "little"))


class GuestPageFault(Exception):
    """A guest-linear access made by the hypervisor itself (event delivery) faulted."""

    def __init__(self, gva: int, error_code: int):
        super().__init__(f"#PF at {gva:#x} error {error_code:#x}")
        self.gva = gva
        self.error_code = error_code


class NestedFault(Exception):
    """The second dimension (EPT) refused a guest-physical access: in hw mode, a VM exit."""

    def __init__(self, detail, gpa: int, final: bool = False):
        super().__init__(f"nested fault at GPA {gpa:#x}")
        self.detail, self.gpa, self.final = detail, gpa, final
        self.gva: int | None = None
        self.access: int | None = None
        self.error_code = 0
        self.unbacked_fetch = False

    def with_linear(self, gva: int, access: int, gpa: int | None = None, final: bool | None = None):
        self.gva, self.access = gva, access
        if gpa is not None:
            self.gpa = gpa | (gva & 0xFFF) if not gpa & 0xFFF else gpa
        if final is not None:
            self.final = final
        return self


class RefusedFill(Exception):
    """A strategy refuses a fill with something other than a guest #PF (e.g. a shadow miss that
    hw --no-ept turns into a #PF VM exit); `pending` is what the run loop gets."""

    def __init__(self, pending):
        super().__init__("fill refused")
        self.pending = pending


class Refusal(Protocol):
    """What a refused fill leaves for the run loop (`Mmu.pending`): a guest #PF (PendingFault), an EPT
    violation (NestedFault), a store to a traced frame (TracedWrite), a shadow miss (ShadowMiss)."""

    @property
    def gva(self) -> int | None: ...
    @property
    def access(self) -> int | None: ...
    @property
    def error_code(self) -> int: ...
    @property
    def unbacked_fetch(self) -> bool: ...


class DeviceRegisters(Protocol):
    """The MMIO bus as the MMU reaches it (machine/mmio.py's MmioBus): a register access by GPA."""

    def read(self, gpa: int, size: int) -> int: ...
    def write(self, gpa: int, size: int, value: int) -> None: ...


class Strategy(Protocol):
    """A memory-translation strategy (GuestWalk here, shadow.py, nested.py, direct.py): what `Mmu.fill`
    asks on every TLB miss. `gva_to_gpa` gives (gpa, writable) or (None, #PF error code); `gpa_to_hpa`
    gives the host-physical page or None (unbacked), or raises NestedFault."""

    def gva_to_gpa(
        self, gva: GVA, access: int, user: bool, side_effects: bool | int = True
    ) -> tuple[int | None, int]: ...
    def gpa_to_hpa(self, gpa: GPA, access: int) -> int | None: ...


class PendingFault:
    __slots__ = ("gva", "access", "error_code", "unbacked_fetch")

    def __init__(self, gva, access, error_code, unbacked_fetch=False):
        self.gva, self.access, self.error_code, self.unbacked_fetch = gva, access, error_code, unbacked_fetch


class MmuCounters:
    __slots__ = ("fills", "walks", "walk_refs", "faults", "unbacked", "fast", "walkers")
    FIELDS = ("fills", "walks", "walk_refs", "faults", "unbacked")

    def __init__(self):
        self.fills = self.walks = self.walk_refs = self.faults = self.unbacked = 0
        self.fast = None  # a FastFill (memory/fastfill.py): the fills it answered count too
        self.walkers: list = []  # other C paths that walk guest tables (cpu/fastdelivery.py): theirs too

    def as_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.FIELDS}
        for c in ([self.fast] if self.fast is not None else []) + self.walkers:
            fills, walks, refs = c.counts()
            d["fills"] += fills
            d["walks"] += walks
            d["walk_refs"] += refs
            d["faults"] += getattr(c, "faults", 0)
        return d


class GuestWalk:
    """Native strategy: the guest's own page tables over a flat p2m (no hypervisor in between).

    A strategy answers two questions: gva_to_gpa (the guest's walk) and gpa_to_hpa (what backs a
    guest-physical page); other strategies (EPT, shadow and direct paging) answer them differently.
    """

    def __init__(self, mmu: "Mmu"):
        self.mmu = mmu

    def gpa_to_hpa(self, gpa: GPA, access: int) -> HPA | None:
        return self.mmu.p2m.gpa_to_hpa(gpa)

    def gva_to_gpa(self, gva: GVA, access, user, side_effects=True):
        m = self.mmu
        cr0, cr3, cr4 = m.crs or m.load_crs()
        if not cr0 & CR0_PG:
            return gva, True
        t = walk(gva, access, user, cr0, cr3, cr4, m.read_gpa32, m.write_gpa32 if side_effects else None)
        if side_effects:  # a look without side effects (disassembly for a trace) is not the guest's
            c = m.counters
            c.walks += 1
            c.walk_refs += t.refs
        if type(t) is Fault:
            return None, t.error_code
        return t.gpa, (t.writable and (t.dirty or access == Access.WRITE))


class Mmu:
    def __init__(self, uc, regs: R.Regs, p2m: P2m, ram):
        self.uc = uc
        self.ram = ram  # HostRegion behind guest RAM (direct access)
        self.regs = regs
        self.p2m = p2m
        self.strategy: Strategy = GuestWalk(self)
        self.counters = MmuCounters()
        self.code_frames: set[int] = set()  # host frames that have served a fetch (lazy W^X)
        self.pending: Refusal | None = None
        self.unbacked_seen: set[int] = set()  # guest-physical pages reported as unbacked
        self.on_unbacked: Callable[[int], None] | None = None  # callback(gpa) once per page
        # callback(linear page, hpa) on fetch fills (intercepts)
        self.on_code_frame: Callable[[int, int], None] | None = None
        # linear code page -> the host frame it was last fetched from; on_code_remap(page) when that changes
        # (the clock's block counts are keyed by linear address: VirtualClock.drop_page)
        self.code_pages: dict[int, int] = {}
        self.on_code_remap: Callable[[int], None] | None = None
        self.crs: tuple[int, int, int] | None = None  # CR0, CR3, CR4 snapshot, see load_crs
        # callable -> (cr0, cr3, cr4): the guest's virtual CRs
        self.crs_source: Callable[[], tuple[int, int, int]] | None = None
        self.traces = Traces(uc)  # write-traced guest frames (shadow paging, translator)
        # Frames a bus-mastering device may not write, as callback(gpa, size) -> reason or None: set
        # by a strategy whose safety rests on frame types (para's direct paging: page tables, GDT,
        # hypercall page), as Xen's IOMMU mappings leave such frames out.
        self.dma_guard: Callable[[int, int], str | None] | None = None
        # The MMIO bus (machine/mmio.py), when the hypervisor's own linear accesses (event delivery,
        # emulated instructions) must reach device registers as the guest's would.
        self.devices: DeviceRegisters | None = None
        # A C reader of guest RAM through the guest's tables with no side effect (native mode:
        # cpu/fastdelivery.py): fetch_bytes asks it first, callable(gva, size) -> bytes or None.
        self.peek: Callable[[int, int], bytes | None] | None = None

    def load_crs(self) -> tuple[int, int, int]:
        """Read CR0/CR3/CR4 once per hypervisor entry: the guest cannot change them while a hook
        runs, so every walk of one exit shares them. Each entry (hook, stop) sets `crs` to None first."""
        if self.crs_source is not None:
            self.crs = crs = self.crs_source()
            return crs
        r = self.regs
        self.crs = crs = (r.read(R.CR0), r.read(R.CR3), r.read(R.CR4))
        return crs

    # -- guest-physical access for walkers (GPA -> HPA, never outside RAM) --------------------
    def read_gpa32(self, gpa: int) -> int:
        hpa = self.p2m.gpa_to_hpa(GPA(gpa))
        if hpa is None or not self.ram.contains(hpa, 4):
            return 0xFFFFFFFF
        return self.ram.read32(hpa)

    def write_gpa32(self, gpa: int, value: int) -> None:
        hpa = self.p2m.gpa_to_hpa(GPA(gpa))
        if hpa is not None and self.ram.contains(hpa, 4):
            self.ram.write32(hpa, value)

    # -- the TLB-fill hook -----------------------------------------------------------------------
    def fill(self, uc, vaddr, access, entry, _data) -> bool:
        acc = access - 16  # UC_MEM_READ=16, WRITE=17, FETCH=18 -> Access
        self.crs = None
        self.counters.fills += 1
        # CPL from SS, not CS: they agree except mid-way through a ring change done from a hook,
        # where SS is loaded first and the descriptor reads that follow are supervisor accesses.
        user = (self.regs.read(R.SS) & 3) == 3
        try:
            # side_effects=GUEST (2, truthy): a guest access; shadow paging fills its tables only then.
            gpa, ok = self.strategy.gva_to_gpa(vaddr, acc, user, GUEST)
        except NestedFault as nf:  # the 2-D walk faulted on a guest paging structure
            self.pending = nf.with_linear(vaddr, acc)
            return False
        except RefusedFill as rf:
            self.pending = rf.pending
            return False
        if gpa is None:
            self.counters.faults += 1
            self.pending = PendingFault(vaddr, acc, ok)
            return False
        page = GPA(gpa & PAGE_MASK)
        try:
            hpa = self.strategy.gpa_to_hpa(page, acc)
        except NestedFault as nf:  # the final guest-physical address is not mapped
            self.pending = nf.with_linear(vaddr, acc, gpa=gpa, final=True)
            return False
        if hpa is None:
            mmio = self.p2m.mmio_to_hpa(page)
            if mmio is not None and acc != Access.FETCH:
                # A device's registers (the MMIO bus): read, and write if the guest's translation
                # allows it; never execute (a fetch from them ends the run, like unbacked memory).
                entry.paddr = mmio
                entry.perms = _RW if ok else UC_PROT_READ
                return True
            self._note_unbacked(gpa)
            if acc == Access.FETCH:
                self.pending = PendingFault(vaddr, acc, 0, unbacked_fetch=True)
                return False
            entry.paddr = UNBACKED_HPA
            entry.perms = _RW
            return True
        perms = UC_PROT_READ | UC_PROT_WRITE if ok else UC_PROT_READ
        if self.traces.frames and (gpa & PAGE_MASK) in self.traces.frames:
            # A write-traced frame (a guest page table, translated code) is never mapped writable:
            # a store to it comes back here and goes to the trace owners, not to the guest.
            if acc == Access.WRITE:
                self.pending = TracedWrite(vaddr, gpa & PAGE_MASK)
                return False
            perms = UC_PROT_READ
        if acc == Access.FETCH:
            self.code_frames.add(hpa)
            perms |= UC_PROT_EXEC
            if self.code_pages.get(vaddr & PAGE_MASK) != hpa:
                self._code_remapped(vaddr & PAGE_MASK, hpa)
            if self.on_code_frame is not None:
                self.on_code_frame(vaddr & PAGE_MASK, hpa)
            if self.counters.fast is not None:  # after the intercepts: C may answer this pair's fetches now
                self.counters.fast.code_frame(hpa, vaddr & PAGE_MASK)
        elif hpa in self.code_frames:
            perms |= UC_PROT_EXEC
        entry.paddr = hpa
        entry.perms = perms
        return True

    def _code_remapped(self, page: int, hpa: int) -> None:
        """A fetch from linear `page` through frame `hpa`, where the last one went through another frame (or
        none known): the C fills stop answering fetches through the old pairing, and what was counted for
        the page's code is dropped (on_code_remap; also for a page not known, which may have been forgotten).
        A cache with a cap (limits.py): when it is emptied, every pairing the C fills answer goes back to
        Python once, so that none is answered in C without being known here."""
        pages, fast = self.code_pages, self.counters.fast
        if len(pages) >= limits.CACHE_ENTRIES and page not in pages:
            pages.clear()
            if fast is not None:
                fast.forget_pairs()
        old = pages.get(page)
        pages[page] = hpa
        if old is not None and fast is not None:
            fast.forget_pair(old, page)
        if self.on_code_remap is not None:
            self.on_code_remap(page)

    def _note_unbacked(self, gpa: int) -> None:
        self.counters.unbacked += 1
        page = gpa & PAGE_MASK
        if page not in self.unbacked_seen:
            self.unbacked_seen.add(page)
            if self.on_unbacked:
                self.on_unbacked(page)

    def take_pending(self) -> Refusal | None:
        p, self.pending = self.pending, None
        return p

    # -- linear access by the hypervisor (event delivery, disassembly) ----------------------------
    def _gva_to_gpa(self, gva: GVA, access: int, user: bool, side_effects: bool) -> GPA:
        """Guest-physical address of a guest-linear byte as the CPU's own access would find it, or
        raise GuestPageFault."""
        gpa, ok = self.strategy.gva_to_gpa(gva, access, user, side_effects)
        if gpa is None:
            raise GuestPageFault(gva, ok)
        if access == Access.WRITE and not ok and side_effects:
            # A read-only translation: the walk already decided whether this write may go ahead.
            gpa2, ok2 = self.strategy.gva_to_gpa(gva, Access.WRITE, user, side_effects)
            if gpa2 is None:
                raise GuestPageFault(gva, ok2)
        return GPA(gpa)

    def gva_to_hpa(self, gva: GVA, access: int, user: bool, side_effects: bool = True) -> HPA | None:
        """Host-physical address of a guest-linear byte, or raise GuestPageFault; None = unbacked."""
        gpa = self._gva_to_gpa(gva, access, user, side_effects)
        page = self.strategy.gpa_to_hpa(GPA(gpa & PAGE_MASK), access)
        return None if page is None else HPA(page | (gpa & 0xFFF))

    def _locate(self, gva: GVA, access: int, user: bool, side_effects: bool = True) -> tuple[int | None, GPA | None]:
        """What backs a guest-linear byte: (hpa, None) for RAM, (None, gpa) for a device register
        (the MMIO bus in `devices`), (None, None) for unbacked memory; or raise GuestPageFault."""
        gpa = self._gva_to_gpa(gva, access, user, side_effects)
        if self.devices is not None and self.p2m.mmio_to_hpa(GPA(gpa & PAGE_MASK)) is not None:
            return None, gpa
        try:
            page = self.strategy.gpa_to_hpa(GPA(gpa & PAGE_MASK), access)
        except NestedFault:
            if gpa < self.p2m.ram_bytes:
                raise
            return None, None  # unassigned guest-physical memory: EPT has no entry for it
        return (None if page is None else page | (gpa & 0xFFF)), None

    def check_linear(self, gva: GVA, size: int, user: bool = False) -> None:
        """Translate every page of a store about to be made (raise GuestPageFault first, write nothing)."""
        end = gva + size
        while gva < end:
            self._locate(GVA(gva & 0xFFFFFFFF), Access.WRITE, user)
            gva = GVA((gva | 0xFFF) + 1)

    def read_linear(self, gva: GVA, size: int, user: bool = False, side_effects: bool = True) -> bytes:
        """Bytes at a guest-linear address as the CPU would read them: RAM, device registers (each
        a device access, in pieces of at most 4 naturally sized bytes; only with side effects), or
        all-ones. Raises GuestPageFault."""
        out = bytearray()
        while size:
            n = min(size, PAGE - (gva & 0xFFF))
            hpa, gpa = self._locate(gva, Access.READ, user, side_effects)
            if gpa is not None and side_effects and self.devices is not None:
                out += _device_bytes(self.devices.read, gpa, n)
            else:
                out += b"\xff" * n if hpa is None else self.ram.read(hpa, n)
            gva = GVA((gva + n) & 0xFFFFFFFF)
            size -= n
        return bytes(out)

    def write_linear(self, gva: GVA, data: bytes, user: bool = False) -> None:
        # Translate every page first, so that a fault leaves memory untouched (as the CPU's pushes do).
        chunks = []
        off = 0
        while off < len(data):
            n = min(len(data) - off, PAGE - (gva & 0xFFF))
            chunks.append((*self._locate(gva, Access.WRITE, user), off, n))
            gva = GVA((gva + n) & 0xFFFFFFFF)
            off += n
        for hpa, gpa, off, n in chunks:
            if gpa is not None:
                if self.devices is not None:
                    _device_write(self.devices.write, gpa, data[off : off + n])
            elif hpa is not None:
                self.ram.write(hpa, data[off : off + n])
        if self.traces.frames:
            base = self.p2m.ram_hpa
            for hpa, _, off, n in chunks:
                if hpa is not None and ((hpa - base) & PAGE_MASK) in self.traces.frames:
                    self.traces.hv_wrote((gva - len(data) + off) & 0xFFFFFFFF, hpa - base, n)

    def fetch_bytes(self, gva: GVA, size: int) -> bytes | None:
        """Code bytes at a linear address without side effects (disassembly, block counting): not the
        guest's doing, so its walks are not in the counters (a trace must not change the statistics)."""
        if self.peek is not None and self.crs_source is None:
            data = self.peek(gva, size)
            if data is not None:
                return data
        c = self.counters
        walks, refs = c.walks, c.walk_refs
        try:
            return self.read_linear(gva, size, user=False, side_effects=False)
        except (GuestPageFault, NestedFault):
            return None
        finally:
            c.walks, c.walk_refs = walks, refs
