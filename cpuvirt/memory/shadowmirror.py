"""Shadow paging's current address space and the traced frames, copied to C (`_shadowmirror.h`).

C paths answer what ShadowPaging.gva_to_gpa would answer from an entry with no side effect: the TLB
fills of modes trap, full and hw --no-ept that hit the shadow (`ShadowFastFill`, `_tlbfill.c`
shadowfill_hook), and the hypervisor's accesses of an event delivery (cpu/_evdeliver.h for trap and full,
cpu/_delivery.c for hw --no-ept). Python stays the owner:
each root's `entries` dict and Mmu.traces.frames are replaced by dicts that tell C of every change, so
the copy never holds an entry Python dropped. Each root gets a serial; C takes a slot only of the
current root's serial, and a root that loses every entry (a trim) gets a new one.
"""

from __future__ import annotations

import ctypes
import importlib
import os
import struct
from abc import ABCMeta, abstractmethod

from cpuvirt.engine.cext import load
from cpuvirt.memory.fastfill import FastFill, _State
from cpuvirt.memory.shadow import KIND as PT_KIND

SHADOW_SLOTS = 2 << 16  # as _shadowmirror.h: 2^16 sets of two


class _Sentry(ctypes.Structure):
    """Mirror of sentry_t."""

    _fields_ = [
        ("page", ctypes.c_uint32),
        ("serial", ctypes.c_uint32),
        ("gpa", ctypes.c_uint32),
        ("rights", ctypes.c_uint16),
        ("dirty", ctypes.c_uint16),
    ]


class _Made(ctypes.Structure):
    """Mirror of smade_t: an entry _tlbfill.c made (a hidden fault filled in C)."""

    _fields_ = [
        ("page", ctypes.c_uint32),
        ("gpa", ctypes.c_uint32),
        ("pde_addr", ctypes.c_int64),
        ("pte_addr", ctypes.c_int64),
        ("rights", ctypes.c_uint16),
        ("dirty", ctypes.c_uint16),
        ("serial", ctypes.c_uint32),
        ("fresh", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
    ]


_MADE = struct.Struct("<IIqqHHIII")  # smade_t's bytes, read at once (a ctypes record per field is slower)
assert _MADE.size == ctypes.sizeof(_Made)


SM_MADE = 1024  # as _shadowmirror.h
SM_SITES = 16  # as _shadowmirror.h: ptemod sites C counts between two folds


class _Site(ctypes.Structure):
    """Mirror of ssite_t."""

    _fields_ = [("eip", ctypes.c_uint32), ("count", ctypes.c_uint32)]


PRESENT_BYTES = 1 << 17  # a bit per linear page


class _Mirror(ctypes.Structure):
    """Mirror of shadowmirror_t (checked against shadowmirror_sizeof at load)."""

    _fields_ = [
        ("key", ctypes.c_uint32),
        ("mode", ctypes.c_uint32),
        ("serial", ctypes.c_uint32),
        ("traced_frames", ctypes.c_uint32),
        ("traced", ctypes.c_void_p),
        ("pt_traced", ctypes.c_void_p),
        ("present", ctypes.c_void_p),
        ("linked", ctypes.c_void_p),
        ("other_traced", ctypes.c_void_p),
        ("room", ctypes.c_uint32),
        ("made", ctypes.c_uint32),
        ("invlpgs_unknown", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
        ("flush_page", ctypes.c_void_p),
        ("cpu", ctypes.c_void_p),
        ("pending", ctypes.c_uint32),
        ("invlpgs_quiet", ctypes.c_uint32),
        ("hidden_quiet", ctypes.c_uint32),
        ("zapped_quiet", ctypes.c_uint32),
        ("sites_room", ctypes.c_uint32),
        ("nsites", ctypes.c_uint32),
        ("sites", _Site * SM_SITES),
        ("unlinks", ctypes.c_uint16 * 256),
        ("made_log", _Made * SM_MADE),
        ("slot", _Sentry * SHADOW_SLOTS),
    ]


class _FillState(ctypes.Structure):
    """Mirror of shadowfill_t: fastfill_t's fields, then the copy and the virtual CRs."""

    _fields_ = _State._fields_ + [
        ("mirror", ctypes.c_void_p),
        ("vcr0", ctypes.c_void_p),
        ("vcr3", ctypes.c_void_p),
        ("vcr4", ctypes.c_void_p),
        ("tc_lo", ctypes.c_uint32),
        ("tc_hi", ctypes.c_uint32),
        ("tc_hpa", ctypes.c_uint64),
        ("tc_on", ctypes.c_void_p),
        ("fill_misses", ctypes.c_uint32),
        ("hidden", ctypes.c_uint64),
        ("quick_cb", ctypes.c_void_p),
        ("quick_exits", ctypes.c_uint64),
        ("quick_c", ctypes.c_void_p),
        ("quick_c_state", ctypes.c_void_p),
    ]


# int quick_cb(uint64_t vaddr, int type, uint32_t error_code): 1 = the #PF exit was taken (hw --no-ept)
SHADOW_QUICK_CB = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_uint64, ctypes.c_int, ctypes.c_uint32)


def _lib():
    lib = load("cpuvirt.memory._tlbfill", {"shadowmirror_sizeof": _Mirror, "shadowfill_sizeof": _FillState})
    if lib is None:
        return None
    lib.shadowmirror_put.restype = None
    lib.shadowmirror_put.argtypes = (ctypes.c_void_p, ctypes.c_void_p) + (ctypes.c_uint32,) * 5
    lib.shadowmirror_drop.restype = None
    lib.shadowmirror_drop.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint32, ctypes.c_uint32)
    for name in ("shadowmirror_traced", "shadowmirror_pt_traced"):
        getattr(lib, name).restype = None
        getattr(lib, name).argtypes = (ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32)
    return lib


class _MirroredEntries(dict):
    """A shadow root's entries (memory/shadow.py _Root.entries) with every change copied to C, and a bit per
    linear page it holds (`present`: an entry the copy's slots may have lost to another page's)."""

    __slots__ = ("_mirror", "_root", "present", "present_address")

    def __init__(self, mirror: "ShadowMirror", root, old: dict):
        super().__init__(old)
        self._mirror, self._root = mirror, root
        self.present = (ctypes.c_uint8 * PRESENT_BYTES)()
        self.present_address = ctypes.addressof(self.present)
        for page, e in old.items():
            mirror.put(self, page, e)

    def __setitem__(self, page, e) -> None:
        dict.__setitem__(self, page, e)
        self._mirror.put(self, page, e)

    def __delitem__(self, page) -> None:
        dict.__delitem__(self, page)
        self._mirror.drop(self, page)

    def pop(self, page, *default):
        e = dict.pop(self, page, *default)
        self._mirror.drop(self, page)
        return e

    def clear(self) -> None:
        dict.clear(self)
        ctypes.memset(self.present, 0, PRESENT_BYTES)
        self._mirror.renumber(self._root)


class _KeysInC(dict, metaclass=ABCMeta):
    """A dict whose keys the C copy keeps bits for: each key gained or lost is told to `_tell` (value None:
    lost), whatever dict operation did it."""

    __slots__ = ("_lib", "_pm")

    def __init__(self, lib, pm, old: dict):
        super().__init__()
        self._lib, self._pm = lib, pm
        for key, value in old.items():
            self[key] = value

    @abstractmethod
    def _tell(self, key, value) -> None:
        """Tell the C copy that `key` is held with `value` now (None: no longer held)."""

    def __setitem__(self, key, value) -> None:
        dict.__setitem__(self, key, value)
        self._tell(key, value)

    def __delitem__(self, key) -> None:
        dict.__delitem__(self, key)
        self._tell(key, None)

    def pop(self, key, *default):
        had = key in self
        value = dict.pop(self, key, *default)
        if had:
            self._tell(key, None)
        return value

    def clear(self) -> None:
        for key in list(self):
            del self[key]


class _TracedFrames(_KeysInC):
    """Mmu.traces.frames (guest frame -> owners) with a bit per traced RAM frame in the copy, and one per frame
    traced by an owner other than shadow paging (memory/traces.py sets a frame again when its owners change)."""

    __slots__ = ()

    def _tell(self, page, owners) -> None:
        # 0: untraced, 1: traced by shadow paging alone, 2: (also) by another owner (_tlbfill.c shadowmirror_traced)
        on = 0 if owners is None else 1 if len(owners) == 1 and PT_KIND in owners else 2
        self._lib.shadowmirror_traced(self._pm, page, on)


class _LinkedAddresses(_KeysInC):
    """ShadowPaging.rmap (guest PDE/PTE address -> the entries derived from it) with a bit per address it
    holds in the copy (`linked`): the words a store zaps entries for (full's adaptive stores, bt/_callout.c;
    trap's ptemods, modes/_trapfast.c)."""

    __slots__ = ("_bits", "_words")

    def __init__(self, lib, pm, bits, old: dict):
        self._bits = bits
        self._words = len(bits) * 8  # the words of RAM the bitmap covers (beyond: nothing kept, C says yes)
        super().__init__(lib, pm, old)

    def _tell(self, addr, keys) -> None:
        # the bit _shadowmirror.h sm_linked reads, set here without a C call (the shadow's fold makes two a #PF)
        k = addr >> 2
        if k >= self._words:
            return
        if keys is None:
            self._bits[k >> 3] &= ~(1 << (k & 7)) & 0xFF
        else:
            self._bits[k >> 3] |= 1 << (k & 7)

    def clear(self) -> None:
        dict.clear(self)
        ctypes.memset(self._bits, 0, ctypes.sizeof(self._bits))


class _PageTableFrames(set):
    """ShadowPaging.traced (the frames it traces as page tables) with a bit per RAM frame in the copy."""

    __slots__ = ("_set_bit",)

    def __init__(self, set_bit, old: set):
        super().__init__()
        self._set_bit = set_bit
        for frame in old:
            self.add(frame)

    def add(self, frame) -> None:
        set.add(self, frame)
        self._set_bit(frame, 1)

    def discard(self, frame) -> None:
        set.discard(self, frame)
        self._set_bit(frame, 0)

    def clear(self) -> None:
        for frame in list(self):
            self.discard(frame)


class ShadowMirror:
    """ShadowPaging.mirror: the C copy (module docstring). `of(shadow)` makes it once per ShadowPaging."""

    def __init__(self, lib, shadow):
        self._lib, self._shadow = lib, shadow
        m = self.state = _Mirror()
        self.address = ctypes.addressof(m)
        self._pm = ctypes.c_void_p(self.address)
        p2m = shadow.mmu.p2m
        frames = (p2m.ram_bytes + 0xFFF) >> 12
        self._traced = (ctypes.c_uint8 * ((frames + 7) // 8 or 1))()
        self._pt_traced = (ctypes.c_uint8 * ((frames + 7) // 8 or 1))()
        m.traced, m.traced_frames = ctypes.addressof(self._traced), frames
        m.pt_traced = ctypes.addressof(self._pt_traced)
        self._other_traced = (ctypes.c_uint8 * ((frames + 7) // 8 or 1))()
        m.other_traced = ctypes.addressof(self._other_traced)
        if shadow.page_flush is not None:  # C's zaps and invlpgs flush the pages Python's would (sm_flush_pages)
            m.flush_page, m.cpu = shadow.page_flush.function, shadow.page_flush.cpu
        self._linked = None  # a bit per 4-byte word of RAM, once a C path asks (track_links)
        self._serial = 0
        self._fold_c = importlib.import_module("cpuvirt.memory._tlbfill").fold

    @classmethod
    def of(cls, shadow) -> "ShadowMirror | None":
        """The mirror of `shadow`, made and attached on the first call; None without the extension."""
        if shadow.mirror is not None:
            return shadow.mirror
        lib = _lib()
        if lib is None:
            return None
        mirror = shadow.mirror = cls(lib, shadow)
        for root in shadow.roots.values():
            mirror.adopt(root)
        mirror.current(shadow)
        traces = shadow.mmu.traces
        traces.frames = _TracedFrames(lib, mirror._pm, traces.frames)
        pm = mirror._pm
        shadow.traced = _PageTableFrames(lambda frame, on: lib.shadowmirror_pt_traced(pm, frame, on), shadow.traced)
        return mirror

    def track_links(self) -> None:
        """Keep `linked` (which guest PDE/PTE words some shadow entry derives from) for a C path that stores
        into page tables (full's adaptive stores, trap's and hw --no-ept's ptemods); until then C's walks set no
        bits, and ShadowPaging.rmap stays a plain dict (each change costs a bit set)."""
        if self._linked is not None:
            return
        shadow = self._shadow
        frames = self.state.traced_frames
        self._linked = (ctypes.c_uint8 * (frames * 128 or 1))()
        shadow.rmap = _LinkedAddresses(self._lib, self._pm, self._linked, shadow.rmap)
        self.state.linked = ctypes.addressof(self._linked)

    def _next(self) -> int:
        self._serial = self._serial % 0xFFFFFFFF + 1
        return self._serial

    def adopt(self, root) -> None:
        root.serial = self._next()
        root.entries = _MirroredEntries(self, root, root.entries)

    def renumber(self, root) -> None:
        """Every entry of `root` went (a trim): a new serial leaves C's copies behind."""
        root.serial = self._next()
        if root is self._shadow._cur:
            self.state.serial = root.serial

    def current(self, shadow) -> None:
        m = self.state
        cur = shadow._cur
        m.key = 1 if shadow._cur_key is None else shadow._cur_key & 0xFFFFF000
        m.mode = 0xFFFFFFFF if shadow._mode is None else shadow._mode
        m.serial = 0 if cur is None else cur.serial
        m.present = None if cur is None else cur.entries.present_address
        self.make_room(shadow)

    def make_room(self, shadow) -> None:
        """How many new entries C may make in the current root before ShadowPaging would trim it (one fewer:
        Python itself may make one before it next takes C's)."""
        cur = shadow._cur
        self.state.room = 0 if cur is None else max(0, shadow.max_root_entries() - len(cur.entries) - 1)

    def put(self, entries: _MirroredEntries, page: int, e: tuple) -> None:
        serial, bitmap = entries._root.serial, entries.present_address
        if e[0] >> 32:  # (not a frame C can map: the slot goes, the page stays Python's)
            self._lib.shadowmirror_drop(self._pm, bitmap, (page >> 12) & 0xFFFFF, serial)
            entries.present[page >> 15] |= 1 << ((page >> 12) & 7)
            return
        self._lib.shadowmirror_put(self._pm, bitmap, page >> 12, serial, e[0], e[1], 1 if e[2] else 0)

    def drop(self, entries: _MirroredEntries, page: int) -> None:
        self._lib.shadowmirror_drop(self._pm, entries.present_address, (page >> 12) & 0xFFFFF, entries._root.serial)

    def take(self) -> tuple[int, tuple[int, int, int], list[tuple[int, int]]]:
        """What _tlbfill.c and the other C paths left since the last call (ShadowPaging._fold takes it now; C
        leaves nothing more until the next run of the engine): how many records they logged (`fold`, `record`),
        what they only counted (invlpgs of pages without an entry; entries made and zapped again, as hidden
        faults and zapped entries: _shadowmirror.h sm_cancel_made), and the ptemods they counted by site,
        (eip, count) in first-seen order."""
        m = self.state
        n, k = m.made, m.nsites
        quiet = (m.invlpgs_quiet, m.hidden_quiet, m.zapped_quiet)
        sites = [(s.eip, s.count) for s in m.sites[:k]] if k else []
        m.made = m.invlpgs_unknown = m.invlpgs_quiet = m.hidden_quiet = m.zapped_quiet = m.nsites = m.pending = 0
        ctypes.memset(self.address + _Mirror.unlinks.offset, 0, ctypes.sizeof(m.unlinks))
        return n, quiet, sites

    def sites_room(self, shadow) -> None:
        """How many new sites C may count (sm_ptemod_done) before ShadowPaging._count_ptemod would clear
        traced_writes (at MAX_ROOT_ENTRIES sites): beyond, each of its ptemods is a record, taken in order."""
        self.state.sites_room = max(0, shadow.max_root_entries() - len(shadow.traced_writes) - 1)

    def fold(self, start: int, n: int, serial: int, shadow, root) -> tuple[int, int, int, int, int]:
        """_tlbfill.c fold: records start..n-1 into the current root's tables, up to the first one Python must
        take: (its index, and the hidden faults, invlpgs, ptemods and zapped entries of those taken)."""
        return self._fold_c(
            self.address,
            start,
            n,
            serial,
            shadow._cur_key,
            root.entries,
            shadow.rmap,
            shadow.frame_refs,
            shadow.traced,
            shadow.unsync,
            shadow.traced_writes,
            shadow.roots,
            root,
        )

    def record(self, i: int, serial: int) -> tuple[int, tuple]:
        """Record i of the log, an entry, as (page, shadow.py entry tuple); AssertionError if it is another root's."""
        page, gpa, pde_addr, pte_addr, rights, dirty, owner, _fresh, _ = _MADE.unpack_from(
            ctypes.string_at(self.address + _Mirror.made_log.offset + i * _MADE.size, _MADE.size)
        )
        if owner != serial:
            raise AssertionError("an entry C made for another root than the current one")
        return page << 12, (gpa, rights, bool(dirty), pde_addr, pte_addr)


class ShadowFastFill(FastFill):
    """Modes trap, full and hw --no-ept: the TLB fills that hit the shadow, in C (shadowfill_hook).
    Installed before Mmu.fill's hook (Unicorn asks the fill hooks in the order they were added) and off
    until `follow` tells it where the CRs the shadow is keyed by are: trap's and full's virtual CRs are
    where the mode's C path keeps them (trap's TrapFast table, full's callout table), so a vCPU without
    that path keeps every fill in Python; hw --no-ept's are the engine's."""

    STATE: type[ctypes.Structure] = _FillState
    HOOK, ENABLED = "shadowfill_hook", 0
    QUICK_CB = SHADOW_QUICK_CB  # hw --no-ept: a miss whose walk C found would only fill the shadow (set_quick_exit)

    mirror: ShadowMirror | None = None  # the copy shadowfill_hook reads, kept alive with the hook

    @classmethod
    def install(cls, mmu, *args) -> "ShadowFastFill | None":
        """None when switched off (CPUVIRT_SHADOW_FILL_C=0) or not built."""
        if os.environ.get("CPUVIRT_SHADOW_FILL_C", "1") == "0" or _lib() is None:
            return None
        return super().install(mmu, *args)

    def follow(self, shadow, crs: tuple[int, int, int] | None, hv_start: int) -> bool:
        """Answer from `shadow`'s copy, reading the virtual CR0, CR3, CR4 at the addresses `crs`
        (uint32 each; None: the engine's own CRs, which are the guest's under hw --no-ept); linear
        addresses from `hv_start` up stay Python's. False without the copy."""
        mirror = ShadowMirror.of(shadow)
        if mirror is None:
            return False
        self.mirror = mirror
        st = self._state
        st.mirror = mirror.address
        st.vcr0, st.vcr3, st.vcr4 = crs or (None, None, None)
        st.hv_start = hv_start
        shadow.counters.fast = self
        self.shadow = shadow
        st.enabled = 1
        return True

    def serve_tc(self, lo: int, hi: int, hpa: int, on: int) -> None:
        """full: fetches at CPL 1 from the TC window [lo, hi) map the TC's frames at host-physical `hpa` while
        the uint32 at address `on` is nonzero (FullVcpu's fill does the same, and counts nothing)."""
        st = self._state
        st.tc_lo, st.tc_hi, st.tc_hpa, st.tc_on = lo, hi, hpa, on

    def hits(self) -> int:
        """Shadow hits answered in C (ShadowCounters adds them to its own)."""
        return self._state.fills - self._state.hidden

    # CPUVIRT_SHADOW_MISS_C=0 leaves every shadow miss to Python (ShadowPaging._resolve)
    fill_misses = os.environ.get("CPUVIRT_SHADOW_MISS_C", "1") != "0"

    _misses = False

    def take_misses(self, shadow) -> None:
        """trap and full: fill the shadow's misses in C too, when the walk needs nothing but the accessed and
        dirty bits (_tlbfill.c shadow_miss_fill); ShadowPaging takes the entries into its tables before it next
        looks at them (_fold). Not while hidden faults are traced (`verbose`: `update` follows it)."""
        self._misses = True
        self.update(shadow)

    def update(self, shadow) -> None:
        self._state.fill_misses = int(self._misses and self.fill_misses and not shadow.verbose)

    def fold(self) -> None:
        """The entries C made, into the shadow's tables (before its counters are read)."""
        self.shadow._fold()
