"""The Python side of cpu/_evseg.h: the guest kernel's segment loads and iretd done in C, shared by mode
`trap` (modes/trapfast.py) and mode `full` (modes/full/evfast.py).

`EvSeg` mirrors evseg_t, which both C tables embed: the engine's CPUX86State and where its segment
caches and hflags are, guest RAM, a copy of the hypervisor's own TLB (`EvHvTlb`), the virtual GDTR,
CR2 and IOPL, NMI blocking, and SegmentLoadingVcpu._loaded as C writes it (`EvLoaded`).
"""

from __future__ import annotations

import ctypes
from typing import Any

from cpuvirt import limits
from cpuvirt.cpu.hvtlb import HvTlb
from cpuvirt.cpu.segcache import _SEG_INDEX, segs_offset
from cpuvirt.cpu.virtualcpu import SegCache, TableVirtualCpu, VirtualCpu
from cpuvirt.engine import regs as R
from cpuvirt.engine.internals import register_offsets

RTLB_SLOTS = 256
EV_POPS = 16  # as _evseg.h: pages an invlpg served in C may pop before Python looks
_SEG_REG = {0: R.ES, 1: R.CS, 2: R.SS, 3: R.DS, 4: R.FS, 5: R.GS}  # QEMU's segment index -> register


class _Rtlb(ctypes.Structure):
    """Mirror of ev_rtlb_t."""

    _fields_ = [
        ("page", ctypes.c_uint32),
        ("gen", ctypes.c_uint32),
        ("valid", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
        ("gpa", ctypes.c_uint64),
    ]


class EvSeg(ctypes.Structure):
    """Mirror of evseg_t."""

    _fields_ = [
        ("env", ctypes.c_void_p),
        ("ram", ctypes.c_void_p),
        ("ram_bytes", ctypes.c_uint64),
        ("off_hflags", ctypes.c_uint32),
        ("off_segs", ctypes.c_uint32),
        ("segs_ok", ctypes.c_uint32),
        ("rtlb_gen", ctypes.c_uint32),
        ("gdt_base", ctypes.c_uint32),
        ("gdt_limit", ctypes.c_uint32),
        ("loaded_new", ctypes.c_uint32),
        ("loaded_known", ctypes.c_uint32),
        ("loaded", (ctypes.c_uint32 * 3) * 6),
        ("cr2", ctypes.c_uint32),
        ("iopl", ctypes.c_uint32),
        ("nmi_blocked", ctypes.c_uint32),
        ("off_eip", ctypes.c_uint32),
        ("popped_n", ctypes.c_uint32),
        ("popped", ctypes.c_uint32 * EV_POPS),
        ("fill_gen", ctypes.c_uint32),
        ("rtlb_n", ctypes.c_uint32),
        ("rtlb_whole", ctypes.c_uint32),
        ("rtlb_cap", ctypes.c_uint32),
        ("filled_n", ctypes.c_uint32),
        ("filled", ctypes.c_uint32 * EV_POPS),
        ("filled_frame", ctypes.c_uint32 * EV_POPS),
        ("rtlb", _Rtlb * RTLB_SLOTS),
    ]


class EvVirtualCpu(TableVirtualCpu):
    """A TableVirtualCpu whose CR2, IOPL and GDTR are in its table's `ev` (an EvSeg), and IDTR and TR's base
    and limit in the structure its C event delivery reads (`_delivery_fields`); the subclass puts the
    control registers where its C path keeps them."""

    __slots__ = ("_ev", "_tr")

    def __init__(self, table, old: VirtualCpu):
        self._ev = table.ev  # first: the copy of `old`'s fields writes through it
        super().__init__(table, old)

    @property  # type: ignore[override]
    def cr2(self) -> int:
        return self._ev.cr2

    @cr2.setter
    def cr2(self, value: int) -> None:
        self._ev.cr2 = value & 0xFFFFFFFF

    @property  # type: ignore[override]
    def iopl(self) -> int:
        return self._ev.iopl

    @iopl.setter
    def iopl(self, value: int) -> None:
        self._ev.iopl = value & 3

    @property  # type: ignore[override]
    def gdtr(self) -> tuple[int, int]:
        ev = self._ev
        return ev.gdt_base, ev.gdt_limit

    @gdtr.setter
    def gdtr(self, value: tuple[int, int]) -> None:
        ev = self._ev
        ev.gdt_base, ev.gdt_limit = value[0] & 0xFFFFFFFF, value[1] & 0xFFFFFFFF

    def _delivery_fields(self) -> Any:
        """The C structure with idt_base, idt_limit, tr_base, tr_limit (trap's table; full's `dl`)."""
        return self._table

    @property  # type: ignore[override]
    def idtr(self) -> tuple[int, int]:
        d = self._delivery_fields()
        return d.idt_base, d.idt_limit

    @idtr.setter
    def idtr(self, value: tuple[int, int]) -> None:
        d = self._delivery_fields()
        d.idt_base, d.idt_limit = value[0] & 0xFFFFFFFF, value[1] & 0xFFFFFFFF

    @property  # type: ignore[override]
    def tr(self) -> SegCache:
        return self._tr

    @tr.setter
    def tr(self, value: SegCache) -> None:
        self._set_tr(value)

    def _set_tr(self, value: SegCache) -> None:
        """TR is loaded whole (ltr, a task switch): never changed in place."""
        self._tr = value
        d = self._delivery_fields()
        d.tr_base, d.tr_limit = value.base & 0xFFFFFFFF, value.limit & 0xFFFFFFFF


def setup(ev: EvSeg, vcpu, env: int, header: int, hflags: int, keep) -> None:
    """Fill `ev` for a SegmentLoadingVcpu whose engine state is at `env` (`header`: where that state
    starts in a saved context, `hflags`: hflags' offset in a saved context); `keep(obj)` keeps what C
    points at alive as long as the table."""
    ev.env = env
    ev.off_hflags = hflags - header
    ev.off_eip = register_offsets().get(R.EIP, 0)
    segs = segs_offset()
    if segs is not None and vcpu._direct is not None and segs >= header:
        ev.segs_ok, ev.off_segs = 1, segs - header
    mmu = vcpu.mmu
    ram = ctypes.c_char.from_buffer(mmu.ram.buf)
    keep(ram)
    ev.ram = ctypes.addressof(ram) + (mmu.p2m.ram_hpa - mmu.ram.hpa)
    ev.ram_bytes = mmu.p2m.ram_bytes


def mirror_nmi_blocking(ev: EvSeg, vcpu) -> None:
    """Vcpu.nmi_blocked copied into `ev` as it changes (an iret that ends it is Python's)."""
    ev.nmi_blocked = 1 if vcpu.nmi_blocked else 0
    chained = vcpu.on_nmi_blocked

    def on_nmi_blocked(value: bool) -> None:
        ev.nmi_blocked = 1 if value else 0
        if chained is not None:
            chained(value)

    vcpu.on_nmi_blocked = on_nmi_blocked


class EvHvTlb(HvTlb):
    """The hypervisor's own TLB (GuestViewVcpu._rtlb) with a copy of its RAM entries in the C table
    (ev_rtlb_t): the C path reads descriptors and the stack through it, and may put a page into both
    (ev_rtlb_fill) where Python's walk would have put the same one, while it knows the dict holds no page
    the copy does not (`rtlb_whole`, kept here) and has room (`rtlb_n`, `rtlb_cap`)."""

    __slots__ = ("_ram_hpa", "_ram_bytes")

    def __init__(self, table: EvSeg, ram_hpa: int, ram_bytes: int):
        super().__init__(table)
        self._ram_hpa, self._ram_bytes = ram_hpa, ram_bytes
        table.rtlb_cap = limits.CACHE_ENTRIES
        table.fill_gen, table.rtlb_whole, table.rtlb_n, table.filled_n = table.rtlb_gen, 1, 0, 0

    def _fresh(self) -> None:
        super()._fresh()
        st = self._table
        if st.fill_gen != st.rtlb_gen:  # flushed in C, and nothing put since: the dict is empty (above)
            st.fill_gen, st.rtlb_whole, st.filled_n = st.rtlb_gen, 1, 0
        n = st.filled_n
        if n:  # pages C put into the copy (ev_rtlb_fill), in order
            base = self._ram_hpa
            for page, frame in zip(st.filled[:n], st.filled_frame[:n]):
                dict.__setitem__(self, page, base + (frame << 12))
            st.filled_n = 0
        n = st.popped_n
        if n:  # pages an invlpg served in C dropped (ev_rtlb_pop), in order
            for page in st.popped[:n]:
                dict.pop(self, page, None)
            st.popped_n = 0
        st.rtlb_n = len(self)

    def __setitem__(self, page, hpa) -> None:
        self._fresh()
        dict.__setitem__(self, page, hpa)
        st = self._table
        e = st.rtlb[page % RTLB_SLOTS]
        gpa = hpa - self._ram_hpa if hpa is not None else -1
        if 0 <= gpa and gpa + 0x1000 <= self._ram_bytes and not gpa & 0xFFF:
            if e.valid and e.gen == st.rtlb_gen and e.page != page:
                st.rtlb_whole = 0  # the copy loses a page the dict keeps
            e.page, e.gen, e.gpa, e.valid = page, st.rtlb_gen, gpa, 1
        else:
            st.rtlb_whole = 0  # the dict holds a page the copy cannot
            if e.page == page:
                e.valid = 0
        st.rtlb_n = len(self)

    def pop(self, key, *default):
        e = self._table.rtlb[key % RTLB_SLOTS]
        if e.page == key:
            e.valid = 0
        try:
            return super().pop(key, *default)
        finally:
            self._table.rtlb_n = len(self)

    def clear(self) -> None:
        """Every entry goes: C's copies with the generation they were made under."""
        st = self._table
        st.rtlb_gen = (st.rtlb_gen + 1) & 0xFFFFFFFF
        self._gen = st.rtlb_gen
        st.popped_n = st.filled_n = st.rtlb_n = 0
        st.fill_gen, st.rtlb_whole = st.rtlb_gen, 1
        dict.clear(self)


class EvLoaded(dict):
    """SegmentLoadingVcpu._loaded (segment register -> (real selector, lo, hi) as hv_load last wrote
    it) with the loads done in C taken in whenever it is read or changed, and copied to C (an iretd
    answered there needs CS's)."""

    __slots__ = ("_table",)

    def __init__(self, table: EvSeg, old: dict):
        super().__init__()
        self._table = table
        for reg, value in old.items():
            self[reg] = value

    def _take(self) -> None:
        st = self._table
        new = st.loaded_new
        if new:
            st.loaded_new = 0
            for seg, reg in _SEG_REG.items():
                if new >> seg & 1:
                    e = st.loaded[seg]
                    dict.__setitem__(self, reg, (e[0], e[1], e[2]))

    def get(self, key, default=None):
        self._take()
        return dict.get(self, key, default)

    def __getitem__(self, key):
        self._take()
        return dict.__getitem__(self, key)

    def __setitem__(self, key, value) -> None:
        self._take()
        dict.__setitem__(self, key, value)
        seg = _SEG_INDEX.get(key)
        if seg is not None:
            st = self._table
            st.loaded[seg][0], st.loaded[seg][1], st.loaded[seg][2] = (v & 0xFFFFFFFF for v in value)
            st.loaded_known |= 1 << seg

    def __contains__(self, key) -> bool:
        self._take()
        return dict.__contains__(self, key)

    def items(self):  # type: ignore[override]
        self._take()
        return dict.items(self)

    def clear(self) -> None:
        st = self._table
        st.loaded_new = st.loaded_known = 0
        dict.clear(self)
