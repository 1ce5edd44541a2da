"""Shadow paging: the guest's page tables cached as GVA -> GPA/HPA entries the hypervisor keeps coherent.

A memory-translation strategy (DESIGN.md 4; Adams & Agesen 2006; KVM's shadow MMU without EPT). Fills
are answered from a shadow table per guest address space (keyed by the guest's CR3, 8 roots, LRU),
built lazily: a fill that misses walks the guest's tables (walk.py, A/D bits as the hardware sets them)
and inserts the entry, a *hidden* fault the guest never sees; a walk that faults is a *true* fault,
delivered to the guest with its own CR2 and error code. Every guest page-table page a shadow entry was
derived from (its PD and PT frame) is write-traced (memory/traces.py): a guest store to one is
emulated here, the entries derived from the written PDE/PTE are zapped, and the instruction is
skipped (a `ptemod`). Stores that cannot be emulated fall back to zap-and-untrace: the frame is left
unsynchronised, as KVM's unsync pages are, until the next CR3 write or invlpg, which the guest must
issue anyway for a changed PTE to take effect on real hardware.

The shadow tables are Python structures (a dict per root: GVA page -> entry, plus a reverse map from
each guest PDE/PTE address to the entries derived from it); they model the shadow page tables, live
only in the hypervisor, and no guest address reaches them. The engine's TLB, filled from them, plays
the part of the hardware TLB over the shadow tables.

With `exit_on_miss` (hw --no-ept) the fill does not walk: a shadow miss refuses the fill with a
`ShadowMiss`, which the simulated processor turns into a #PF VM exit; the root-mode handler then calls
`page_fault`, which walks, fills the shadow (hidden) or reports a true fault to inject, as KVM's
kvm_mmu_page_fault does.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass, field, fields
from typing import Callable

from unicorn import UC_CTL_IO_WRITE, UC_CTL_TLB_FLUSH

from cpuvirt.engine import regs as R
from cpuvirt.engine.internals import PageFlush
from cpuvirt.memory.mmu import GUEST, GuestPageFault, RefusedFill  # GUEST: a guest access fills the shadow
from cpuvirt.memory.types import GPA, GVA, HPA, PFEC_P, PFEC_U, PFEC_W, PTE_RW, PTE_US, Access
from cpuvirt.memory.walk import Fault, walk
from cpuvirt.x86.flags import CR0_PG, CR0_WP, CR4_PSE, CR4_SMEP

PAGE_MASK = 0xFFFFF000
KIND = "pt"  # the trace kind of guest page-table frames
MAX_ROOT_ENTRIES = 1 << 16  # shadow entries per address space (256 MiB mapped); then it starts again
# CR0 and CR4 bits a shadow entry depends on: a change drops all. CR0.WP and CR4.SMEP are looked at
# on each lookup (an entry keeps the guest's raw U/S and R/W), and CR4.PGE only decides which TLB
# entries survive a CR3 write, which the shadow, coherent by write tracing, does not need: toggling
# them (kvm-unit-tests' vmexit does, millions of times) keeps every shadow table.
_MODE0 = CR0_PG
_MODE4 = CR4_PSE
_WRITE, _FETCH = int(Access.WRITE), int(Access.FETCH)
FLUSH_PAGES = 16  # a zap of more current-root pages flushes the engine's whole TLB (_shadowmirror.h SM_ZAP_MAX)


class GuestStoreFault(GuestPageFault):
    """guest_store was refused by the guest's own mapping: deliver this #PF (gva, error_code)."""


class ShadowMiss:
    """A fill the shadow cannot answer (hw --no-ept): the hardware #PF a shadow page table gives."""

    __slots__ = ("gva", "access", "error_code", "unbacked_fetch")

    def __init__(self, gva: int, access: int, error_code: int):
        self.gva, self.access, self.error_code, self.unbacked_fetch = gva, access, error_code, False


@dataclass(slots=True)
class ShadowCounters:
    """What the shadow did, by event (stats and traces read them by name, in this order)."""

    hidden_faults: int = 0
    true_faults: int = 0
    shadow_hits: int = 0
    ptemods: int = 0
    ptemod_fallbacks: int = 0
    guest_stores: int = 0
    cr3_switches: int = 0
    root_hits: int = 0
    root_misses: int = 0
    root_evictions: int = 0
    root_trims: int = 0
    invlpgs: int = 0
    flushes: int = 0
    zapped: int = 0
    traced_frames: int = 0
    # C's fills from the shadow (memory/shadowmirror.py ShadowFastFill): hits too, counted there
    fast: object = field(default=None, repr=False, compare=False)
    # other C paths that find true faults (modes/trapfast.py TrapStores, `faults`): theirs too
    walkers: list = field(default_factory=list, repr=False, compare=False)

    def as_dict(self) -> dict[str, int]:
        if self.fast is not None:
            self.fast.fold()  # type: ignore[attr-defined]  # (the hidden faults C filled)
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("fast", "walkers")}
        if self.fast is not None:
            d["shadow_hits"] += self.fast.hits()  # type: ignore[attr-defined]
        d["true_faults"] += sum(w.faults for w in self.walkers)
        return d


def link(key: int, page: int) -> int:
    """A reverse-map member: the root's key (its CR3's page) and the linear page, as one int."""
    return key << 32 | page


class _Root:
    """The shadow page table of one guest address space: GVA page -> entry.

    An entry is (gpa_page, rights, dirty, pde_addr, pte_addr): rights = U/S and R/W combined over
    the path, dirty = the leaf's D bit when it was walked, and the guest-physical addresses of the
    PDE and PTE it derives from (pte_addr -1 for a 4 MiB page).
    """

    __slots__ = ("cr3", "entries", "serial")

    def __init__(self, cr3: int):
        self.cr3 = cr3
        self.entries: dict[int, tuple] = {}
        self.serial = 0  # its number in a `mirror` (below), which may replace `entries` by a copying dict


class ShadowPaging:
    """The strategy; see the module docstring and docs/shadow-paging.md (API)."""

    def __init__(self, mmu, max_roots: int = 8, exit_on_miss: bool = False, verbose: bool = False):
        self.mmu = mmu
        self.uc = mmu.uc
        self.max_roots = max_roots
        self.exit_on_miss = exit_on_miss
        self._verbose = verbose  # record hidden faults as trace events (off: they would flood)
        self.roots: OrderedDict[int, _Root] = OrderedDict()
        # guest PDE/PTE address -> {link(root cr3, gva page): None}: dicts of ints, which the garbage collector
        # leaves untracked (sets of tuples it traversed at every full collection: 0.5 s of xv6 usertests)
        self.rmap: dict[int, dict[int, None]] = {}
        self.frame_refs: Counter = Counter()  # guest frame -> shadow entries derived from entries in it
        self.traced: set[int] = set()  # frames this strategy traces
        self.unsync: set[int] = set()  # frames untraced by the fallback until the next CR3 write/invlpg
        self.traced_writes: Counter = Counter()  # guest EIP -> traced writes (ptemods) it made
        self.counters = ShadowCounters()
        self.vcpu = None
        self._engine_stale = False  # the engine's TLB may hold entries the shadow dropped (a trim)
        # QEMU's tlb_flush_page: a zap or an invlpg drops those pages from the engine's TLB (None: all of it)
        self.page_flush = PageFlush.of(mmu.uc)
        self._wp_granted = False  # a supervisor write to a read-only page was let through (CR0.WP=0)
        self.on_dirty = None  # on_dirty(wp): one of the two flags above (wp) or `unsync` was set
        self._mode = None
        self._cur_key: int | None = None
        self._cur: _Root | None = None
        # A C copy of the current root (modes/trapfast.py ShadowMirror): adopt(root) as a root is made,
        # current(self) whenever _cur, _cur_key or _mode changes.
        self.mirror = None
        # hw --no-ept: quick_miss(gva, access, user, error code) may take a miss's #PF exit without a stop
        # (modes/hw/vmx.py VmxCpu.quick_shadow_miss): True when it has filled the shadow, as the exit would.
        self.quick_miss: Callable[[int, int, bool, int], bool] | None = None
        mmu.strategy = self

    @property
    def verbose(self) -> bool:
        return self._verbose

    @verbose.setter
    def verbose(self, on: bool) -> None:
        self._verbose = on
        if self.counters.fast is not None:
            self.counters.fast.update(self)  # type: ignore[attr-defined]  # (C fills no miss it would not record)

    def max_root_entries(self) -> int:
        return MAX_ROOT_ENTRIES

    def _fold(self) -> None:
        """Take the entries _tlbfill.c made for hidden faults (shadow_miss_fill) into the current root's tables,
        as _resolve would have made them: C made them only where nothing else would happen (no new traced frame,
        no trim, no WP grant), for the root current then, which is current still (every way to another root,
        and every reader of these tables, folds first). The same log holds, in order with the entries, the
        invlpgs C served (full's callout hook, trap's INTR hook: each is what invlpg does to the tables), the
        ptemods C paths emulated beyond the sites counted apart, and their zaps. The loop is C's
        (memory/_tlbfill.c fold); what C only counted (invlpgs of pages without an entry, entries made and zapped
        again before now, ptemods by site) comes with the log (ShadowMirror.take)."""
        mirror = self.mirror
        if mirror is None or not mirror.state.pending:
            return
        root, key = self._cur, self._cur_key
        assert root is not None and key is not None
        (n, (invlpgs, hidden, zapped), sites), i, c = mirror.take(), 0, self.counters
        c.invlpgs += invlpgs  # invlpgs of pages without an entry, entries made and zapped again: counts only
        c.hidden_faults += hidden
        c.zapped += zapped
        for eip, count in sites:  # ptemods counted by site, before the log's (their first uses came first)
            self._count_ptemod(eip, done=True, n=count)
            self.mmu.traces.writes += count
        while True:
            # the common records in C (memory/_tlbfill.c fold), up to one that needs Python (_fold_record)
            i, hidden, invlpgs, ptemods, zapped = mirror.fold(i, n, root.serial, self, root)
            c.hidden_faults += hidden
            c.invlpgs += invlpgs
            c.ptemods += ptemods
            c.zapped += zapped
            self.mmu.traces.writes += ptemods
            if i >= n:
                break
            self._fold_record(key, root, *mirror.record(i, root.serial))
            i += 1
        mirror.make_room(self)
        mirror.sites_room(self)

    def _fold_record(self, key: int, root: _Root, page: int, e: tuple) -> None:
        """The one record _fold's C loop stops at: an entry C made whose link would trace a frame (never, while the
        C paths make entries only through frames the shadow traces; taken as _resolve takes one for the day one
        does). The loop takes every invlpg, ptemod and zap record itself."""
        assert e[4] >= -1, e  # an entry (pte_addr -1: a 4 MiB page)
        old = root.entries.get(page)
        if old is not None:
            self._unlink(key, page, old)
        dict.__setitem__(root.entries, page, e)  # (the copy holds it already)
        self._link(e[3], key, page)
        if e[4] >= 0:
            self._link(e[4], key, page)
        self.counters.hidden_faults += 1

    def attach(self, vcpu) -> None:
        """Trace events (page_fault: ptemod, hidden faults when verbose) go through vcpu.record."""
        self.vcpu = vcpu

    # -- the strategy interface ------------------------------------------------------------------------
    def gpa_to_hpa(self, gpa: GPA, access: int) -> HPA | None:
        return self.mmu.p2m.gpa_to_hpa(gpa)

    def gva_to_gpa(self, gva: GVA, access, user, side_effects=True):
        if self.mirror is not None and self.mirror.state.pending:
            self._fold()
        m = self.mmu
        cr0, cr3, cr4 = m.crs or m.load_crs()
        if not cr0 & CR0_PG:
            return gva, True
        mode = (cr0 & _MODE0) | (cr4 & _MODE4)
        if mode != self._mode:
            if self._mode is not None:
                self._drop_all()
            self._mode = mode
            if self.mirror is not None:
                self.mirror.current(self)
        key = cr3 & PAGE_MASK
        cur = self._cur
        root = cur if key == self._cur_key and cur is not None else self._select(key)
        e = root.entries.get(gva & PAGE_MASK)
        code = 0
        if e is not None:
            rights, dirty = e[1], e[2]
            if user:
                writable = rights & PTE_RW
                allowed = rights & PTE_US and (access != _WRITE or writable)
            else:
                writable = rights & PTE_RW or not cr0 & CR0_WP
                allowed = (access != _WRITE or writable) and not (
                    access == _FETCH and cr4 & CR4_SMEP and rights & PTE_US
                )
                if writable and dirty and not rights & PTE_RW and not self._wp_granted:
                    self._granted()  # the engine's entry will let ring 1 write a read-only page
            if allowed and (dirty or access != _WRITE):
                if side_effects == GUEST:
                    self.counters.shadow_hits += 1
                    if self.mirror is not None:
                        # the C fill declined a hit; most often its copy's set lost the entry to another
                        # page's (27,574 times in xv6's usertests under full): the copy gets it back
                        self.mirror.put(root.entries, gva & PAGE_MASK, e)
                return e[0] | (gva & 0xFFF), bool(writable and dirty)
            code = PFEC_P
        if side_effects != GUEST:
            # The hypervisor's own access (event delivery, disassembly): a walk, no shadow fill.
            t = walk(gva, access, user, cr0, cr3, cr4, m.read_gpa32, m.write_gpa32 if side_effects else None)
            m.counters.walks += 1
            m.counters.walk_refs += t.refs
            if type(t) is Fault:
                return None, t.error_code
            return t.gpa, (t.writable and (t.dirty or access == _WRITE))
        if self.exit_on_miss and not m.regs.loading_descriptor.value:  # (a hypervisor's segment load: served)
            if user:
                code |= PFEC_U
            if access == _WRITE:
                code |= PFEC_W
            if self.quick_miss is not None and self.quick_miss(gva, access, user, code):
                return self.gva_to_gpa(gva, access, user, side_effects)  # the engine's retry: a shadow hit
            raise RefusedFill(ShadowMiss(gva, access, code))
        return self._resolve(gva, access, user, cr0, cr3, cr4)

    # -- filling --------------------------------------------------------------------------------------------
    def page_fault(self, gva: GVA, access: int, user: bool) -> tuple[str, int | None]:
        """A #PF the shadow raised (hw --no-ept): walk the guest's tables, as kvm_mmu_page_fault does.

        Returns ("hidden", gpa) when the shadow was filled (resume the guest), ("true", error code)
        for a fault to inject, ("traced", gpa) for a write the guest may make to a write-protected
        page-table page (emulate it: mmu.traces.dispatch)."""
        self._fold()
        cr0, cr3, cr4 = self.mmu.crs or self.mmu.load_crs()
        if not cr0 & CR0_PG:
            return "hidden", gva
        gpa, ok = self._resolve(gva, access, user, cr0, cr3, cr4)
        if gpa is None:
            self.mmu.counters.faults += 1  # as Mmu.fill counts the true faults it finds itself
            return "true", ok
        if access == _WRITE and (gpa & PAGE_MASK) in self.mmu.traces.frames:
            self.counters.hidden_faults -= 1  # the walk was part of a ptemod, not a hidden fault
            return "traced", gpa
        return "hidden", gpa

    def quiet_fill(self, gva: GVA, access: Access, user: bool) -> bool:
        """Would page_fault(gva, access, user) fill the shadow ("hidden") and do nothing else: no true fault,
        no traced write, and none of _resolve's side effects beyond the entry and the walk's accessed and
        dirty bits (a newly traced frame, which flushes the engine's TLB; a trimmed address space; a write
        let through by CR0.WP = 0)? Asked with no side effect: a walk that sets no A or D bit."""
        m = self.mmu
        cr0, cr3, cr4 = m.crs or m.load_crs()
        if not cr0 & CR0_PG:
            return False
        t = walk(gva, access, user, cr0, cr3, cr4, m.read_gpa32, None)
        if type(t) is Fault or (access == _WRITE and (t.gpa & PAGE_MASK) in m.traces.frames):
            return False
        key = cr3 & PAGE_MASK
        root = self._cur if key == self._cur_key else None
        if root is None or (len(root.entries) >= MAX_ROOT_ENTRIES and (gva & PAGE_MASK) not in root.entries):
            return False
        pde = m.read_gpa32(key | ((gva >> 20) & 0xFFC))
        frames = (key,) if t.large else (key, pde & PAGE_MASK)
        if any(f not in self.traced and f not in self.unsync for f in frames):
            return False
        rights = pde if t.large else pde & m.read_gpa32((pde & PAGE_MASK) | ((gva >> 10) & 0xFFC))
        granted = not user and t.writable and not rights & PTE_RW and not self._wp_granted
        return not (granted and (t.dirty or access == _WRITE))

    def _resolve(self, gva, access, user, cr0, cr3, cr4):
        m = self.mmu
        t = walk(gva, access, user, cr0, cr3, cr4, m.read_gpa32, m.write_gpa32)
        mc = m.counters
        mc.walks += 1
        mc.walk_refs += t.refs
        c = self.counters
        if type(t) is Fault:
            c.true_faults += 1
            return None, t.error_code
        key = cr3 & PAGE_MASK
        cur = self._cur
        root = cur if key == self._cur_key and cur is not None else self._select(key)
        pde_addr = key | ((gva >> 20) & 0xFFC)
        pde = m.read_gpa32(pde_addr)
        if t.large:
            pte_addr, rights = -1, pde
        else:
            pte_addr = (pde & PAGE_MASK) | ((gva >> 10) & 0xFFC)
            rights = pde & m.read_gpa32(pte_addr)
        page = gva & PAGE_MASK
        if page in root.entries:
            self._unlink(key, page, root.entries.pop(page))
        elif len(root.entries) >= MAX_ROOT_ENTRIES:
            # Bounded host memory (docs/security.md): a space that has shadowed this many pages
            # starts again, as a CR3 reload would. The engine's TLB entries made from the dropped
            # entries stay until the guest's own invlpg / CR3 write, as on hardware: they map
            # frames of guest RAM only, and a frame traced later flushes them (memory/traces.py).
            for old_page, e in root.entries.items():
                self._unlink(key, old_page, e)
            root.entries.clear()
            c.root_trims += 1
            self._engine_stale = True
            if self.on_dirty is not None:
                self.on_dirty(False)
        if not user and t.writable and (t.dirty or access == _WRITE) and not rights & PTE_RW and not self._wp_granted:
            self._granted()
        root.entries[page] = (t.page_gpa, rights & (PTE_US | PTE_RW), t.dirty, pde_addr, pte_addr)
        self._link(pde_addr, key, page)
        if pte_addr >= 0:
            self._link(pte_addr, key, page)
        if self.mirror is not None:
            self.mirror.make_room(self)
        c.hidden_faults += 1
        if self.verbose and self.vcpu is not None:
            self.vcpu.record(
                "page_fault",
                "#PF",
                14,
                self.mmu.regs.read(R.EIP),
                {
                    "fault": "hidden",
                    "cr2": f"{gva:#x}",
                    "access": ("read", "write", "fetch")[access],
                    "gpa": f"{t.gpa:#x}",
                },
                "shadow entry filled; the guest never sees this fault",
            )
        return t.gpa, (t.writable and (t.dirty or access == _WRITE))

    def _link(self, addr: int, key: int, page: int) -> None:
        s = self.rmap.get(addr)
        if s is None:
            s = self.rmap[addr] = {}
        s[link(key, page)] = None
        frame = addr & PAGE_MASK
        self.frame_refs[frame] += 1
        if frame not in self.traced and frame not in self.unsync:
            self.traced.add(frame)
            self.counters.traced_frames = len(self.traced)
            self.mmu.traces.trace_frame(frame, KIND, self._on_write)

    def _unlink(self, key: int, page: int, e: tuple) -> None:
        for addr in (e[3], e[4]):
            if addr < 0:
                continue
            s = self.rmap.get(addr)
            if s is not None:
                s.pop(link(key, page), None)
                if not s:
                    del self.rmap[addr]
            frame = addr & PAGE_MASK
            n = self.frame_refs[frame] - 1
            if n > 0:
                self.frame_refs[frame] = n
            else:
                self.frame_refs.pop(frame, None)

    # -- address spaces -----------------------------------------------------------------------------------
    def _select(self, key: int) -> _Root:
        root = self.roots.get(key)
        c = self.counters
        if root is None:
            c.root_misses += 1
            root = self.roots[key] = _Root(key)
            if self.mirror is not None:
                self.mirror.adopt(root)
            while len(self.roots) > self.max_roots:
                # The evicted space's frames stay traced until a write finds nothing derived from them.
                old_key, old = self.roots.popitem(last=False)
                for page, e in old.entries.items():
                    self._unlink(old_key, page, e)
                c.root_evictions += 1
        else:
            c.root_hits += 1
            self.roots.move_to_end(key)
        self._cur_key, self._cur = key, root
        if self.mirror is not None:
            self.mirror.current(self)
        return root

    def on_cr3_write(self, cr3: int, flush_engine: bool = True) -> None:
        """The guest loaded CR3: select (or start) that address space's shadow and flush the engine
        TLB (flush_engine=False when the engine loads the real CR3 itself, which flushes it)."""
        self._fold()
        self.counters.cr3_switches += 1
        self._resync()
        key = cr3 & PAGE_MASK
        if key == self._cur_key:
            self.counters.root_hits += 1
        else:
            self._select(key)
        if flush_engine:
            self._flush_engine()
        else:
            self._engine_stale = False  # (the engine's own CR3 load flushes its TLB)

    def count_reloads(self, n: int) -> None:
        """n CR3 writes that selected the current root again, made by a mode's C path (trap's INTR hook,
        full's callout hook): what on_cr3_write counts for each (a switch, a root hit)."""
        self.counters.cr3_switches += n
        self.counters.root_hits += n

    def invlpg(self, gva: GVA, flush_engine: bool = True) -> None:
        """The guest invalidated one page: drop its shadow entry in the current address space (and
        the engine's TLB, unless the engine executes the invlpg itself: flush_engine=False)."""
        self._fold()
        self.counters.invlpgs += 1
        if self._cur is not None and self._cur_key is not None:
            page = gva & PAGE_MASK
            e = self._cur.entries.pop(page, None)
            if e is not None:
                self._unlink(self._cur_key, page, e)
        if flush_engine:
            self._flush_pages([gva & PAGE_MASK])

    def _granted(self) -> None:
        self._wp_granted = True
        if self.on_dirty is not None:
            self.on_dirty(True)

    def tlb_flush(self, wp_set: bool = False) -> bool:
        """A TLB flush that changes no mapping rule (CR4.PGE or SMEP toggled, CR0.WP changed): the
        shadow tables are kept coherent with the guest's by write tracing, so only what derives from
        frames left unsynchronised goes (as on a CR3 write). Returns whether the engine's TLB must
        be flushed too (the caller does it): when it may hold entries the shadow no longer has
        (unsynchronised frames, a trimmed space), or, when WP is being set, entries that let ring-1
        (guest supervisor) code write a read-only page because WP was clear."""
        self._fold()
        need = bool(self.unsync) or self._engine_stale or (wp_set and self._wp_granted)
        self._resync()
        if need:
            self._engine_stale = self._wp_granted = False
        return need

    def flush(self) -> None:
        """Drop every shadow entry of every address space (and the engine's TLB)."""
        self._fold()
        self.counters.flushes += 1
        self._drop_all()
        self._flush_engine()

    def _drop_all(self) -> None:
        self.roots.clear()
        self.rmap.clear()
        self.frame_refs.clear()
        self.mmu.traces.untrace_all(KIND)
        self.traced.clear()
        self.counters.traced_frames = 0
        self.unsync.clear()
        self._cur_key = self._cur = None
        if self.mirror is not None:
            self.mirror.current(self)

    def _resync(self) -> None:
        """Unsynchronised frames (the fallback left them untraced): zap what derives from them; the
        next walk through them traces them again."""
        for frame in self.unsync:
            self._zap_range(frame, 0x1000)
        self.unsync.clear()

    def _flush_engine(self) -> None:
        self.uc.ctl(UC_CTL_TLB_FLUSH, UC_CTL_IO_WRITE)
        # Nothing a trim dropped is left in the engine's TLB: a WP or PGE toggle need not flush it again, and
        # the C paths (full's callouts, trap's hook) may make zaps and toggles again once re-armed
        self._engine_stale = False

    def _flush_pages(self, pages: list[int]) -> None:
        """The engine's TLB after a zap or an invlpg in the current root: those linear pages (the C paths flush the
        same, _shadowmirror.h sm_flush_pages), or all of it without the page flush or beyond FLUSH_PAGES. Other
        roots' entries are not in it (a CR3 write flushes it all); entries a trim dropped stay until the guest's
        own invlpg of their page or CR3 write, as on hardware (see _resolve). A whole flush, as every zap and
        invlpg made before, made the engine refill every page in use: about 2 us each in nanobench's loops."""
        if not pages:
            return
        if self.page_flush is None or len(pages) > FLUSH_PAGES:
            self._flush_engine()
            return
        for page in pages:
            self.page_flush(page)

    def _zap_range(self, gpa: int, size: int, copy_done: bool = False, pages: list[int] | None = None) -> int:
        """Drop the shadow entries derived from guest PDEs/PTEs in gpa .. gpa + size - 1. copy_done: a zap C
        made, whose current-root entries have left the C copy already (which may hold entries C made since).
        `pages` gets the current root's linear pages that went (the engine's TLB may hold them)."""
        n = 0
        for addr in range(gpa & ~3, gpa + size, 4):
            keys = self.rmap.get(addr)
            if not keys:
                continue
            for linked in list(keys):
                key, page = linked >> 32, linked & 0xFFFFFFFF
                root = self.roots.get(key)
                if root is None:
                    e = None
                elif copy_done and root is self._cur:
                    e = dict.pop(root.entries, page, None)
                else:
                    e = root.entries.pop(page, None)
                if e is not None:
                    self._unlink(key, page, e)
                    n += 1
                    if pages is not None and root is self._cur:
                        pages.append(page)
            self.rmap.pop(addr, None)
        self.counters.zapped += n
        return n

    # -- traced writes (ptemod) -----------------------------------------------------------------------
    def _on_write(self, tw) -> bool:
        self._fold()
        if tw.done:  # written already (by an emulation, or by the hypervisor)
            pages: list[int] = []
            if self._zap_range(tw.gpa, tw.size or 4, pages=pages):
                self._flush_pages(pages)
            return False
        eip = tw.eip
        self._count_ptemod(eip, done=False)
        m = self.mmu
        regs = m.regs
        user = (regs.read(R.SS) & 3) == 3
        from cpuvirt.status import Unsupported
        from cpuvirt.x86.emulate import emulate_store

        def read(gva, size):
            return int.from_bytes(m.read_linear(gva, size, user), "little")

        def write(gva, size, value):
            m.write_linear(gva, value.to_bytes(size, "little"), user)  # zaps through traces.hv_wrote

        try:
            length, gva, size, value, what = emulate_store(m.fetch_bytes(eip, 15), eip, regs, read, write)
        except (Unsupported, GuestPageFault) as why:
            self._fallback(tw, str(why))
            return False
        frame = tw.gpa & PAGE_MASK
        if not self.frame_refs.get(frame) and frame in self.traced:
            # No shadow entry derives from this frame any more: it is not a page table we cache.
            self.traced.discard(frame)
            self.counters.traced_frames = len(self.traced)
            m.traces.untrace_frame(frame, KIND)
        # The store's own hv_wrote zapped (and flushed the engine TLB for) what derived from it.
        regs.write(R.EIP, (eip + length) & 0xFFFFFFFF)
        self.counters.ptemods += 1
        if self.vcpu is not None and not self.exit_on_miss:
            self.vcpu.record(
                "page_fault",
                "ptemod",
                14,
                eip,
                {
                    "fault": "hidden",
                    "gva": f"{gva:#x}",
                    "gpa": f"{tw.gpa & PAGE_MASK | gva & 0xFFF:#x}",
                    "size": size,
                    "value": f"{value:#x}",
                },
                f"{what} into a traced page-table page; shadow entries updated",
            )
        return True

    def _count_ptemod(self, eip: int, done: bool = True, n: int = 1) -> None:
        """`n` traced writes at `eip` (the per-site statistics); done: emulated, so ptemods too. A new site
        changes how many more C may count itself before the statistics would be cleared (sites_room)."""
        if len(self.traced_writes) >= MAX_ROOT_ENTRIES and eip not in self.traced_writes:
            self.traced_writes.clear()  # statistics only: bounded like the rest
        new = eip not in self.traced_writes
        self.traced_writes[eip] += n
        if done:
            self.counters.ptemods += n
        if new and self.mirror is not None:
            self.mirror.sites_room(self)

    def _fallback(self, tw, why: str) -> None:
        """Zap-and-untrace: the store re-executes natively; the frame stays unsynchronised until the
        next CR3 write or invlpg (the guest must issue one for its change to count)."""
        frame = tw.gpa & PAGE_MASK
        self._zap_range(frame, 0x1000)
        self.traced.discard(frame)
        self.counters.traced_frames = len(self.traced)
        self.mmu.traces.untrace_frame(frame, KIND)
        self.unsync.add(frame)
        if self.on_dirty is not None:
            self.on_dirty(False)
        self.counters.ptemod_fallbacks += 1
        self._flush_engine()
        if self.vcpu is not None:
            self.vcpu.record(
                "page_fault",
                "ptemod",
                14,
                tw.eip,
                {"fault": "hidden", "gva": f"{tw.gva:#x}", "fallback": why},
                "cannot emulate: zapped the frame's shadow entries and untraced it; the store re-executes",
            )

    def guest_store(self, gva: GVA, size: int, value: int, user: bool = False) -> None:
        """A guest store done by the hypervisor (the translator's callout): the guest's rights, A/D
        bits, and coherent shadows; raises GuestStoreFault for the caller to deliver."""
        try:
            self.mmu.write_linear(gva, (value & ((1 << 8 * size) - 1)).to_bytes(size, "little"), user)
        except GuestPageFault as pf:
            raise GuestStoreFault(pf.gva, pf.error_code) from None
        self.counters.guest_stores += 1

    # -- inspection -----------------------------------------------------------------------------------------
    def dump(self) -> str:
        self._fold()
        lines = []
        for key, root in self.roots.items():
            mark = " (current)" if key == self._cur_key else ""
            lines.append(f"root CR3={key:#010x}{mark}: {len(root.entries)} entries")
            for page in sorted(root.entries):
                gpa, rights, dirty, pde_addr, pte_addr = root.entries[page]
                hpa = self.mmu.p2m.gpa_to_hpa(gpa)
                r = ("U" if rights & PTE_US else "S") + ("W" if rights & PTE_RW else "R") + ("D" if dirty else "-")
                src = f"PDE@{pde_addr:#x}" + (f" PTE@{pte_addr:#x}" if pte_addr >= 0 else " (4 MiB)")
                lines.append(f"  {page:#010x} -> GPA {gpa:#010x} HPA {hpa if hpa is None else hex(hpa)} {r} {src}")
        lines.append(f"traced frames: {', '.join(f'{f:#x}' for f in sorted(self.traced)) or 'none'}")
        if self.unsync:
            lines.append(f"unsynchronised frames: {', '.join(f'{f:#x}' for f in sorted(self.unsync))}")
        return "\n".join(lines)
