"""Native mode's common TLB fills in C (_tlbfill.c): the Python fill (Mmu.fill) stays the complete one.

The C hook is registered before Mmu.fill and answers only side-effect-free hits of the guest walk
(entries present, A/D already set, rights allow the access, a RAM frame, not a fetch); for anything else
it declines and Unicorn calls Mmu.fill with the same request. A fetch is answered in C only from a
(linear page, frame) pair that Mmu.fill has granted a fetch before (`code_frame`), and only while it is
the page's last pairing Mmu.fill saw (`forget_pair`), so that a page's remapping always reaches
Mmu.fill (the clock drops its counts of the code there, Mmu.on_code_remap, and the intercepts note the
pair, Mmu.on_code_frame). Its fills and walks are added to the
MMU's counters. Optional: without the built extension every fill is Python's, with the same results.
"""

from __future__ import annotations

import ctypes
import os
import weakref
from functools import lru_cache
from typing import Self

from unicorn import UC_HOOK_TLB_FILL
from unicorn.unicorn_py3 import unicorn as _ucmod
from unicorn.x86_const import UC_X86_REG_CR0, UC_X86_REG_CR3, UC_X86_REG_CR4, UC_X86_REG_SS

from cpuvirt.engine import regs as R
from cpuvirt.engine.cext import add_c_hook, first_fill_hook, load
from cpuvirt.engine.internals import engine_cpu_state, engine_env, register_offsets
from cpuvirt.memory.p2m import P2m
from cpuvirt.xen import GDT_WINDOW_FRAMES, HYPERVISOR_VIRT_START


class _State(ctypes.Structure):
    """Mirror of fastfill_t (checked against fastfill_sizeof at load)."""

    _fields_ = [
        ("ram", ctypes.c_void_p),
        ("ram_bytes", ctypes.c_uint64),
        ("ram_hpa", ctypes.c_uint64),
        ("code", ctypes.c_void_p),
        ("fetched", ctypes.c_void_p),
        ("reg_read", ctypes.c_void_p),
        ("cr0", ctypes.c_int32),
        ("cr3", ctypes.c_int32),
        ("cr4", ctypes.c_int32),
        ("ss", ctypes.c_int32),
        ("enabled", ctypes.c_uint32),
        ("hv_start", ctypes.c_uint32),
        ("fills", ctypes.c_uint64),
        ("walks", ctypes.c_uint64),
        ("walk_refs", ctypes.c_uint64),
        ("mmio", ctypes.c_void_p),
    ]


MMIO_RANGES = 16  # as _tlbfill.c


class _MmioRange(ctypes.Structure):
    _fields_ = [("lo", ctypes.c_uint64), ("hi", ctypes.c_uint64), ("hpa", ctypes.c_uint64)]


class MmioRanges(ctypes.Structure):
    """Mirror of mmio_ranges_t: the p2m's device ranges, which the C fills map as Mmu.fill does (a device's
    registers: read, write as the guest's entry allows, never execute). More ranges than fit: n says so, and
    every device page stays Mmu.fill's."""

    _fields_ = [("n", ctypes.c_uint32), ("pad", ctypes.c_uint32), ("r", _MmioRange * MMIO_RANGES)]

    def follow(self, p2m) -> None:
        """Equal to p2m.mmio from now on."""

        def copy() -> None:
            ranges = p2m.mmio
            self.n = len(ranges)
            for i, (lo, hi, hpa) in enumerate(ranges[:MMIO_RANGES]):
                self.r[i].lo, self.r[i].hi, self.r[i].hpa = lo, hi, hpa

        copy()
        p2m.on_change.append(copy)


@lru_cache(maxsize=1)
def _lib():
    lib = load(
        "cpuvirt.memory._tlbfill",
        {
            "fastfill_sizeof": _State,
            "eptfill_sizeof": _EptState,
            "directfill_sizeof": _DirectState,
            "mmio_ranges_sizeof": MmioRanges,
        },
    )
    if lib is not None:
        lib.fill_engine_register.argtypes = (ctypes.c_void_p,) * 3 + (ctypes.c_uint32,) * 4 + (ctypes.c_int,)
        lib.fill_engine_register.restype = ctypes.c_int
        lib.fill_engine_unregister.argtypes, lib.fill_engine_unregister.restype = (ctypes.c_void_p,), None
        lib.fill_lazy_kept.restype = lib.fill_lazy_made.restype = ctypes.c_uint64
        lib.fill_engine_registers.argtypes = (ctypes.c_void_p, ctypes.c_void_p)
        lib.fill_engine_registers.restype = ctypes.c_int
    return lib


def _register_engine(uc, first: bool) -> bool:
    """Tell _tlbfill.c where the engine's paging registers are (its fills read them there, not through
    uc_reg_read) and, when its first fill hook is this fast fill, let its fills keep their state restore
    until a path needs it ("The engine's state, restored only when a fill needs it"; off:
    CPUVIRT_LAZY_RESTORE=0); until the engine is gone. True when the fills keep their restore."""
    lib, cpu, env, at = _lib(), engine_cpu_state(uc), engine_env(uc), register_offsets()
    if lib is None:
        return False
    lazy = first and cpu is not None and os.environ.get("CPUVIRT_LAZY_RESTORE", "1") != "0"
    if env is None or not at:
        env, at = None, {R.CR0: 0, R.CR3: 0, R.CR4: 0, R.SS: 0}  # (the fills read through the API)
    done = lib.fill_engine_register(
        uc._uch, ctypes.c_void_p(cpu), ctypes.c_void_p(env), at[R.CR0], at[R.CR3], at[R.CR4], at[R.SS], lazy
    )
    if done:
        weakref.finalize(uc, lib.fill_engine_unregister, uc._uch.value)
    return bool(done & 2)


def lazy_restores() -> tuple[int, int]:
    """(kept, made) over the process: the fills' state restores skipped, and those made afterwards
    because a path after the fast fill needed them."""
    lib = _lib()
    return (lib.fill_lazy_kept(), lib.fill_lazy_made()) if lib is not None else (0, 0)


class FastFill:
    """Install with `FastFill.install(mmu)` before Mmu.fill is hooked (Unicorn asks the fill hooks in
    the order they were added); None if the extension is not built."""

    STATE: type[ctypes.Structure] = _State
    HOOK, ENABLED = "fastfill_hook", 1
    MMIO = True  # the p2m's device pages answered in C too (not over EPT's or direct paging's frames)

    def __init__(self, lib, mmu):
        self.mmu = mmu
        ram = mmu.ram
        self.code = (ctypes.c_uint8 * max(1, ram.size >> 12))()  # lazy W^X, one byte per RAM frame
        self.fetched = (ctypes.c_uint32 * max(1, ram.size >> 12))()  # linear page | 1 last fetched from it
        st = self._state = self.STATE()
        st.ram = ctypes.addressof(ctypes.c_char.from_buffer(ram.buf))
        st.ram_bytes = mmu.p2m.ram_bytes
        st.ram_hpa = mmu.p2m.ram_hpa
        st.code = ctypes.addressof(self.code)
        st.fetched = ctypes.addressof(self.fetched)
        st.reg_read = ctypes.cast(_ucmod.uclib.uc_reg_read, ctypes.c_void_p).value
        st.cr0, st.cr3, st.cr4, st.ss = UC_X86_REG_CR0, UC_X86_REG_CR3, UC_X86_REG_CR4, UC_X86_REG_SS
        st.enabled = self.ENABLED
        self.mmio = None
        if self.MMIO and type(mmu.p2m) is P2m:
            self.mmio = MmioRanges()
            self.mmio.follow(mmu.p2m)
            st.mmio = ctypes.addressof(self.mmio)
        self.setup(st)
        first = first_fill_hook(mmu.uc)
        self._hook = add_c_hook(
            mmu.uc._uch,
            UC_HOOK_TLB_FILL,
            getattr(lib, self.HOOK),
            ctypes.cast(ctypes.pointer(st), ctypes.c_void_p),
            what=f"install the C TLB fill {self.HOOK}",
        )
        # the engine registered with _tlbfill.c: its paging registers, and (the first fill hook) the restore
        self.lazy = _register_engine(mmu.uc, first)

    def setup(self, state) -> None:
        """What a subclass's state holds beyond the guest walk's."""

    @classmethod
    def install(cls, mmu, *args) -> "Self | None":
        lib = _lib()
        if lib is None or mmu.ram.hpa != mmu.p2m.ram_hpa or mmu.p2m.ram_bytes > mmu.ram.size:
            return None
        fast = cls(lib, mmu, *args)
        for hpa in mmu.code_frames:
            fast.code_frame(hpa)
        mmu.counters.fast = fast
        return fast

    QUICK_CB: type | None = None  # the C type of the state's quick_cb, where it has one (the subclasses')

    def set_quick_exit(self, callback) -> None:
        """Where the fill would refuse an access for an exit the vCPU can take without stopping the engine
        (EptFastFill: a lazy-EPT violation; ShadowFastFill: hw --no-ept's hidden #PF), C asks `callback` (its
        arguments: QUICK_CB's); 1: it took the exit and C makes the fill, 0: declined as before. None: off."""
        assert self.QUICK_CB is not None
        if callback is None:
            self._state.quick_cb, self._quick_cb = None, None
            return
        self._quick_cb = self.QUICK_CB(callback)  # alive as long as it is set
        self._state.quick_cb = ctypes.cast(self._quick_cb, ctypes.c_void_p).value

    @property
    def quick_exits(self) -> int:
        """The exits the callback took."""
        return self._state.quick_exits

    def code_frame(self, hpa: int, page: int | None = None) -> None:
        """Mmu.fill granted execute to this host frame (for a fetch from linear `page`, after the
        intercepts noted that pair): the C path grants execute, and answers fetches from `page`."""
        frame = (hpa - self._state.ram_hpa) >> 12
        if 0 <= frame < len(self.code):
            self.code[frame] = 1
            if page is not None:
                self.fetched[frame] = (page & 0xFFFFF000) | 1

    def forget_pair(self, hpa: int, page: int) -> None:
        """Linear `page` maps another frame than `hpa` now (Mmu._code_remapped): fetches through the old
        pairing are Mmu.fill's again, so that a page's remapping is always seen there."""
        frame = (hpa - self._state.ram_hpa) >> 12
        if 0 <= frame < len(self.fetched) and self.fetched[frame] == (page & 0xFFFFF000) | 1:
            self.fetched[frame] = 0

    def forget_pairs(self) -> None:
        """Every fetch pairing is Mmu.fill's again (Mmu.code_pages was emptied)."""
        ctypes.memset(self.fetched, 0, ctypes.sizeof(self.fetched))

    def counts(self) -> tuple[int, int, int]:
        st = self._state
        return st.fills, st.walks, st.walk_refs


class _DirectState(ctypes.Structure):
    """Mirror of directfill_t (checked against directfill_sizeof at load)."""

    _fields_ = _State._fields_ + [("window", ctypes.c_uint32 * (2 * GDT_WINDOW_FRAMES))]  # GDT, then LDT


class DirectFastFill(FastFill):
    """para's common TLB fills in C: the same walk over direct paging's tables (memory/direct.py), whose
    entries hold machine addresses, and reads of the hypervisor's window from HYPERVISOR_VIRT_START up
    (the GDT and LDT frames, as DirectPaging shows them: `window`); writes and fetches there and everything
    the walk would change or refuse stay DirectPaging's, through Mmu.fill. The C walk knows no
    write-traced frames (the shared-info frame while an event waits behind the upcall mask), so it steps
    aside while any frame is traced."""

    STATE = _DirectState
    HOOK = "directfill_hook"
    MMIO = False

    def window(self, gdt_frames: list[int], ldt_frames: list[int]) -> None:
        """DirectPaging shows these machine frames in its window now (set_gdt, set_ldt)."""
        st = self._state
        pages = [0] * len(st.window)
        for first, frames in ((0, gdt_frames), (GDT_WINDOW_FRAMES, ldt_frames)):
            for i, mfn in enumerate(frames[:GDT_WINDOW_FRAMES]):
                offset = (mfn << 12) - st.ram_hpa
                if 0 <= offset < st.ram_bytes:
                    pages[first + i] = (offset >> 12) + 1
        st.window[:] = pages

    def setup(self, state) -> None:
        state.hv_start = HYPERVISOR_VIRT_START
        traces = self.mmu.traces
        traces.on_change = lambda: setattr(state, "enabled", int(not traces.frames))
        traces.on_change()


class _EptState(ctypes.Structure):
    """Mirror of eptfill_t (checked against eptfill_sizeof at load)."""

    _fields_ = _State._fields_ + [
        ("hv", ctypes.c_void_p),
        ("hv_hpa", ctypes.c_uint64),
        ("hv_size", ctypes.c_uint64),
        ("pml4", ctypes.c_uint64),
        ("quick_cb", ctypes.c_void_p),
        ("quick_exits", ctypes.c_uint64),
        ("c_armed", ctypes.c_uint32),
        ("eip_reg", ctypes.c_uint32),
        ("fx_armed", ctypes.c_void_p),
        ("quiet_fn", ctypes.c_void_p),
        ("quiet_state", ctypes.c_void_p),
        ("fx_cpuid", ctypes.c_void_p),
        ("clk_deadline", ctypes.c_void_p),
        ("clk_stopped", ctypes.c_void_p),
        ("clk_discard", ctypes.c_void_p),
        ("clk_stop_next", ctypes.c_void_p),
        ("clk_check_if", ctypes.c_void_p),
        ("armed_deadline", ctypes.c_uint64),
        ("epoch", ctypes.c_uint64),
        ("armed_epoch", ctypes.c_uint64),
        ("c_limit", ctypes.c_uint64),
        ("peek", ctypes.c_void_p),
        ("peek_state", ctypes.c_void_p),
        ("gpr", ctypes.c_int32 * 8),
        ("c_exits", ctypes.c_uint64),
        ("c_total", ctypes.c_uint64),
        ("last_cpuid", ctypes.c_uint64),
        ("last_eip", ctypes.c_uint32),
        ("last_vaddr", ctypes.c_uint32),
        ("last_type", ctypes.c_uint32),
        ("last_gpa", ctypes.c_uint32),
        ("last_regs", ctypes.c_uint32 * 8),
        ("last_code", ctypes.c_uint8 * 16),
        ("covers", ctypes.c_void_p),
        ("books", ctypes.c_void_p),
        ("ept_writes", ctypes.c_uint64),
        ("cache_writes", ctypes.c_uint64),
        ("cache_pml4", ctypes.c_uint64),
        ("cache_page", ctypes.c_uint64 * 512),
        ("cache_off", ctypes.c_uint64 * 512),
    ]


# int quick_cb(uint64_t vaddr, int type, uint64_t gpa, uint32_t unused): 1 = the exit was taken, page mapped
EPT_QUICK_CB = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_uint64, ctypes.c_int, ctypes.c_uint64, ctypes.c_uint32)


class EptFastFill(FastFill):
    """hw mode's common TLB fills under EPT in C (eptfill_hook in _tlbfill.c): the guest walk with each
    guest-physical reference translated through EPT, answering only what changes nothing (no A/D
    update, EPT entries read/write/execute, RAM only); Mmu.fill (EptWalk) does everything else. Off
    until `enable()`: before VMLAUNCH the guest's memory is not behind EPT yet."""

    STATE = _EptState
    HOOK, ENABLED = "eptfill_hook", 0
    MMIO = False
    QUICK_CB = EPT_QUICK_CB  # called when the final page of a fill has no EPT entry and lies in guest RAM

    def __init__(self, lib, mmu, ept):
        self.ept = ept
        super().__init__(lib, mmu)

    def setup(self, state) -> None:
        region = self.ept.region
        state.hv = ctypes.addressof(ctypes.c_char.from_buffer(region.buf))
        state.hv_hpa, state.hv_size, state.pml4 = region.hpa, region.size, self.ept.pml4
        # Ept._map counts its writes here: the C walk's cache of translations empties at each (_tlbfill.c)
        self.ept.writes = ctypes.c_uint64.from_address(ctypes.addressof(state) + _EptState.ept_writes.offset)

    @classmethod
    def install(cls, mmu, ept=None) -> "Self | None":
        return None if ept is None else super().install(mmu, ept)

    def enable(self) -> None:
        self._state.enabled = 1

    @property
    def state(self):
        """The C state (modes/hw/vmx.py arms the EPT-violation exit taken in C with it and folds its record)."""
        return self._state
