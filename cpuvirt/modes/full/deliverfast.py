"""Mode `full`: the common events delivered through the guest's IDT in C (bt/_callout.c `full_intr_hook`,
with cpu/_evdeliver.h: the code mode `trap` delivers the same events with).

Under full, an `int 0x80` from ring 3 or a #DE in the kernel costs one Python exit: Vcpu.hook_intr ->
FullVcpu.on_engine_event -> RingCompressedDelivery, then enter_kernel's look-up of the handler's
translation. The C hook in front of the vCPU's INTR hook delivers, as trap's does, `int n` from ring 3
(not int3/into), #DE from ring 3 or from translated kernel code, and #GP from ring 3, each of a kind
Python has delivered once, when every access the delivery makes would be served with no side effect
(the IDT and TSS through the C copy of the shadow root, the descriptors through the hypervisor TLB's
copy, a frame in no traced frame), and enters the handler's translation when it exists (a C copy of
TCache.blocks: guest EIP -> TC address, and of each translated instruction's start -> its guest EIP,
kept by `TcMirror` as the cache gains, loses and flushes blocks) and the real CS, SS and the virtual
IOPL after the transfer are the snapshot's (modes/full/coherence.py `_vsnap`). Anything else: the
Python hook, unchanged.

What C delivered is folded into Vcpu.counts / Vcpu.reasons and the TC's look-ups when those are read
(Callouts.sync_counts). Off: CPUVIRT_FULL_DELIVERY_C=0, or CPUVIRT_FULL_EVENTS_C=0 (all of full's
event C), or while a trace is written.
"""

from __future__ import annotations

import ctypes
import os

from unicorn import UC_HOOK_INTR

from cpuvirt.bt.fastcallout import _lib
from cpuvirt.bt.tcache import Block, TCache
from cpuvirt.cpu.evdeliver import BlockCopyKeeper, fold_event_counts, note_delivered
from cpuvirt.cpu.quirks import context_layout
from cpuvirt.cpu.truefault import TfCounts, TrueFaultHook
from cpuvirt.engine.cext import add_c_hook
from cpuvirt.engine.internals import context_header, engine_env
from cpuvirt.memory.shadowmirror import ShadowMirror


def delivery_by_environment() -> bool:
    """CPUVIRT_FULL_DELIVERY_C=0 keeps every event delivery of full in Python (CPUVIRT_FULL_EVENTS_C=0 too)."""
    return os.environ.get("CPUVIRT_FULL_DELIVERY_C", "1") != "0" and os.environ.get("CPUVIRT_FULL_EVENTS_C", "1") != "0"


def _signatures(lib) -> None:
    p, u32 = ctypes.c_void_p, ctypes.c_uint32
    for name, args in (
        ("full_tc_entry", (p, u32, u32)),
        ("full_tc_drop", (p, u32)),
        ("full_tc_start", (p, u32, u32)),
        ("full_tc_clear", (p,)),
        ("full_blocks_drop", (p, u32)),
        ("full_blocks_clear", (p,)),
    ):
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = None, args
    lib.full_deliver_fault.restype = ctypes.c_int
    lib.full_deliver_fault.argtypes = (p, p, u32, u32, u32)
    lib.full_blocks_put.restype = ctypes.c_int
    lib.full_blocks_put.argtypes = (p, u32, ctypes.POINTER(u32), u32, ctypes.c_uint64)


class TcMirror:
    """What C knows of the translation cache (TCache.mirror): each block's guest EIP -> TC address while
    it is TCache.blocks' live entry, and each of its instructions' starts (TCache.guest_eip's answer
    there, dead blocks included, until the cache is flushed)."""

    def __init__(self, lib, table_address: int):
        self._lib, self._t = lib, ctypes.c_void_p(table_address)

    def put(self, block: Block) -> None:
        lib, t = self._lib, self._t
        lib.full_tc_entry(t, block.geip & 0xFFFFFFFF, block.tc)
        for tc, ins in block.starts.items():
            lib.full_tc_start(t, tc, ins.geip & 0xFFFFFFFF)

    def drop(self, block: Block) -> None:
        self._lib.full_tc_drop(self._t, block.geip & 0xFFFFFFFF)

    def clear(self) -> None:
        self._lib.full_tc_clear(self._t)


class FullDelivery:
    """The C INTR hook of mode full and the Python side of its part of the callout table (module
    docstring)."""

    def __init__(self, lib, vcpu, table, shadow):
        self._lib = lib
        self.vcpu = vcpu
        self.table = table
        self.dl = dl = table.dl
        self._pt = ctypes.c_void_p(ctypes.addressof(table))
        self._soft_seen: list[int] = []
        self._fault_seen: list[int] = []
        self._folded = 0  # deliveries whose TC look-up was counted
        env = engine_env(vcpu.uc)
        header = None if env is None else context_header(vcpu.uc, env)
        mirror = ShadowMirror.of(shadow)
        p2m = vcpu.mmu.p2m
        # a device's registers inside RAM's range would make Mmu._locate's MMIO check matter
        in_ram = any(lo < p2m.ram_bytes for lo, _hi, _hpa in getattr(p2m, "mmio", ()))
        self.possible = bool(
            header is not None
            and mirror is not None
            and not in_ram
            and table.events_on
            and table.watch_if
            and delivery_by_environment()
        )
        if not self.possible:
            return
        assert header is not None and mirror is not None
        layout = context_layout()
        dl.off_old_exception = layout.old_exception - header
        dl.off_is_int = layout.exception_is_int - header
        dl.off_error_code = layout.error_code - header
        dl.mirror = mirror.address
        mirror.track_links()  # the callout hook's adaptive stores (bt/_callout.c) look at `linked`
        clock = vcpu.clock._state
        kind, base = type(clock), ctypes.addressof(clock)
        dl.clock_now = base + kind.left.offset
        dl.clock_last_block = vcpu.clock.last_block_address
        tc: TCache = vcpu.tc
        dl.tc_lo, dl.tc_hi = tc.code_base, tc.end
        # the copies C reads, kept equal to Python's tables from now on
        self.tc_mirror = TcMirror(lib, ctypes.addressof(table))
        for b in tc.order:
            for t, ins in b.starts.items():
                lib.full_tc_start(self._pt, t, ins.geip & 0xFFFFFFFF)
        for b in tc.blocks.values():
            lib.full_tc_entry(self._pt, b.geip & 0xFFFFFFFF, b.tc)
        tc.mirror = self.tc_mirror
        self.blocks = BlockCopyKeeper.keep(vcpu.machine.block_insns, lib, "full_blocks", self._pt, dl.block)
        # the C INTR hook in front of the Python one, which it calls for everything else
        self._python_intr = vcpu.hooks.intr_function(vcpu.hook_intr)
        dl.python_intr = ctypes.cast(self._python_intr, ctypes.c_void_p).value
        vcpu.hooks.remove(vcpu._intr_hook)
        uc = vcpu.uc
        handle = add_c_hook(uc._uch, UC_HOOK_INTR, lib.full_intr_hook, self._pt, what="install full's C INTR hook")
        vcpu._intr_hook = handle
        uc._callbacks[handle] = self  # its state lives as long as the engine may call it
        self.enabled = vcpu.trace is None

    @classmethod
    def install(cls, vcpu, shadow) -> "FullDelivery | None":
        """Give a FullVcpu (hooks installed, its C callout table's events attached, shadow paging its
        strategy) its C delivery; None when there is no C callout table."""
        fast = vcpu.rt.fast
        lib = _lib()
        if fast is None or lib is None:
            return None
        _signatures(lib)
        return cls(lib, vcpu, fast.table, shadow)

    # -- switches ---------------------------------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        return bool(self.dl.on)

    @enabled.setter
    def enabled(self, on: bool) -> None:
        """A trace line needs Python: while one is written, every event takes the Python path."""
        self.dl.on = 1 if on and self.possible else 0

    # -- after Python delivered an event ----------------------------------------------------------------
    def seen(self, intno: int, soft: bool) -> None:
        """Python delivered this event (FullVcpu.on_engine_event): once its Vcpu.reasons key is in
        place, C may deliver the same kind and count it there (the summary prints keys in that order)."""
        note_delivered(self.dl, self._soft_seen, self._fault_seen, self.vcpu._reasons, intno, soft)

    def fold(self) -> None:
        """Add the deliveries counted in C to Vcpu.counts, Vcpu.reasons and the TC's look-ups (one each:
        enter_kernel's), and count from zero."""
        dl = self.dl
        self.vcpu.tc.counters.lookups += dl.delivered - self._folded
        self._folded = dl.delivered
        if self.faults is not None:
            self.faults.fold(self.vcpu._counts, self.vcpu._reasons)
        if not dl.pending:
            return
        dl.pending = 0
        fold_event_counts(dl, self._soft_seen, self._fault_seen, self.vcpu._counts, self.vcpu._reasons)

    faults: "FullFaults | None" = None  # the true #PFs delivered from the TLB fill (FullFaults.attach)

    def deliver_page_fault(self, return_eip: int, error_code: int) -> bool:
        """A #PF from a refused fill (DeprivilegedVcpu.page_fault: recorded, counted, CR2 set) delivered in C
        when it can; False: nothing changed, Python delivers it."""
        return bool(
            self._lib.full_deliver_fault(
                self._pt, self.vcpu.uc._uch, 14, return_eip & 0xFFFFFFFF, error_code & 0xFFFFFFFF
            )
        )

    @property
    def delivered(self) -> int:
        """Events delivered through the guest's IDT in C so far."""
        return self.dl.delivered

    @property
    def to_python(self) -> int:
        """Engine events the C hook handed to Python."""
        return self.dl.to_python


def faults_by_environment() -> bool:
    """CPUVIRT_FULL_PF_C=0 keeps every true #PF of full Python's (so do the switches of its C delivery)."""
    return os.environ.get("CPUVIRT_FULL_PF_C", "1") != "0" and delivery_by_environment()


class _FullPf(ctypes.Structure):
    """Mirror of fullpf_t (bt/_callout.c; checked against fullpf_sizeof)."""

    _fields_ = [
        ("t", ctypes.c_void_p),
        ("cpu_offset", ctypes.c_uint64),
        ("loop_exit", ctypes.c_void_p),
        ("hv_start", ctypes.c_void_p),
        ("tc_host", ctypes.c_void_p),
        ("tc_window", ctypes.c_uint32),
        ("tc_size", ctypes.c_uint32),
        ("on", ctypes.c_uint32),
        ("seen", ctypes.c_uint32),
        ("pf", TfCounts),
        ("pending", ctypes.c_uint64),
    ]


class FullFaults(TrueFaultHook):
    """The common true #PF under full, delivered from the TLB fill without the engine's stop (bt/_callout.c
    full_pf_hook; docs/binary-translation.md). The fill hook must come after the shadow's C fill and before
    Mmu.fill's, so it is added when the mode is built (`install`) and does nothing until `attach` gives it the
    callout table, the shadow fill's window start and the engine's CPUState."""

    STATE = _FullPf

    def __init__(self, lib, uc):
        super().__init__(uc, lib.full_pf_hook, "install full's C #PF hook")

    @classmethod
    def install(cls, uc) -> "FullFaults | None":
        lib = _lib()
        if lib is None or not faults_by_environment():
            return None
        lib.fullpf_sizeof.restype = ctypes.c_size_t
        if lib.fullpf_sizeof() != ctypes.sizeof(_FullPf):
            raise RuntimeError("cpuvirt's C callout hook does not match deliverfast.py: run `pip install -e .` again")
        return cls(lib, uc)

    def attach(self, vcpu, delivery: "FullDelivery | None", fill, shadow) -> None:
        """Deliver from now on, when the C delivery can (`delivery`), with the shadow's C fill (`fill`)."""
        from cpuvirt.cpu.fastdelivery import _engine_cpu

        found = _engine_cpu(vcpu.uc)
        if found is None or delivery is None or not delivery.possible or fill is None:
            return
        st = self.state
        st.cpu_offset, st.loop_exit = found
        fstate = fill._state
        st.hv_start = ctypes.addressof(fstate) + type(fstate).hv_start.offset
        hv = vcpu.hv_mem
        st.tc_host = hv.host_address + (vcpu.tc_hpa - hv.hpa)
        tc: TCache = vcpu.tc  # (its linear window, TC_WINDOW, and size)
        st.tc_window, st.tc_size = tc.base, tc.end - tc.base
        st.t = ctypes.addressof(delivery.table)
        self._keep = (delivery, fill)  # what C points at, alive as long as the hook
        self.count_in(vcpu.mmu, shadow)
        delivery.faults = self
        st.on = 1

    def note(self, reasons) -> None:
        """Python delivered a #PF: once its Vcpu.reasons key is in place, C may deliver them and count them."""
        if not self.state.seen and ("page_fault", "#PF") in reasons:
            self.state.seen = 1

    def fold(self, counts, reasons) -> None:
        """Add the #PF events delivered in C to Vcpu.counts and Vcpu.reasons, and count from zero."""
        st = self.state
        if st.pending:
            counts["page_fault"] += st.pending
            reasons["page_fault", "#PF"] += st.pending
            st.pending = 0
