"""Mode `trap`'s common traps answered in C (modes/_trapfast.c; docs/deprivileging.md, "The common traps
in C" and "Event delivery and iretd sites in C"): cli, sti, clts, mov from CR0/CR4, mov to CR0/CR4 that
changes only WP or PGE, segment loads, iretd to the kernel's ring, mov from CR2; the common deliveries
through the guest's IDT (`int n`, #DE, ring-3 #GP, and the #PF of a refused fill offered by the run loop:
TrapVcpu.deliver), over the C copy of the current shadow root and of the traced frames
(memory/shadowmirror.py); and the common iretd site (`install_iret_sites`). CPUVIRT_TRAP_DELIVERY_C=0 and
CPUVIRT_TRAP_IRET_C=0 turn those two off.

`TrapFast.install(vcpu, shadow)` puts the C INTR hook in front of the vCPU's Python one and moves
what it needs into its table: the virtual CR0, CR3 and CR4 (`TrapVirtualCpu`), the hypervisor's own
TLB's generation (cpu/hvtlb.py), a copy of Machine.block_insns (kept by cpu/evdeliver.BlockCopyKeeper), and
whether shadow paging would need anything on a WP/PGE toggle (`arm`, after each event Python handles,
and ShadowPaging.on_dirty as it happens). Events counted in C are folded into Vcpu.counts and
Vcpu.reasons when those are read. The C path is off while a trace is written (TrapVcpu.trace), and
with CPUVIRT_TRAP_FAST=0; either way the console, trace, counters and virtual time are the Python
path's (tests/test_trap_fast.py).
"""

from __future__ import annotations

import ctypes
import os

from unicorn import UC_CTL_IO_WRITE, UC_CTL_TLB_FLUSH, UC_HOOK_CODE, UC_HOOK_INTR
from unicorn.unicorn_py3 import unicorn as _ucmod

from cpuvirt.cpu import evseg
from cpuvirt.cpu.evdeliver import BLOCK_SLOTS, BlockCopyKeeper, fold_event_counts, note_delivered
from cpuvirt.cpu.evdeliver import BlockCopy as _Block
from cpuvirt.cpu.evseg import EvHvTlb, EvLoaded, EvSeg, EvVirtualCpu
from cpuvirt.cpu.quirks import context_layout
from cpuvirt.cpu.truefault import TfCounts, TrueFaultHook
from cpuvirt.cpu.virtualcpu import in_table
from cpuvirt.engine import regs as R
from cpuvirt.engine.cext import add_c_hook, load
from cpuvirt.engine.internals import context_header, engine_env
from cpuvirt.memory.shadowmirror import ShadowMirror
from cpuvirt.x86.cpuid import CR4_RESERVED

# The (kind, reason) keys of Vcpu.reasons of the kinds _trapfast.c answers, in its enum's order.
REASONS = (
    ("trap", "cli"),
    ("trap", "sti"),
    ("trap", "clts"),
    ("trap", "mov cr0"),
    ("trap", "mov cr4"),
    ("trap", "mov sreg"),
    ("trap", "pop"),
    ("trap", "mov cr2"),
    ("trap", "iretd"),
    ("trap", "mov cr3"),
    ("trap", "invlpg"),
    ("page_fault", "ptemod"),  # a store into a traced page table, emulated by the C fill hook (TrapStores)
    ("page_fault", "#PF"),  # a true guest #PF, delivered by the same hook (TrapStores)
)


class _State(ctypes.Structure):
    """Mirror of trapfast_t (checked against trapfast_sizeof at load)."""

    _fields_ = [
        ("reg_read", ctypes.c_void_p),
        ("reg_write", ctypes.c_void_p),
        ("python_intr", ctypes.c_void_p),
        ("off_old_exception", ctypes.c_uint32),
        ("off_is_int", ctypes.c_uint32),
        ("r_eip", ctypes.c_int32),
        ("r_eflags", ctypes.c_int32),
        ("r_cs", ctypes.c_int32),
        ("r_esp", ctypes.c_int32),
        ("r_gpr", ctypes.c_int32 * 8),
        ("enabled", ctypes.c_uint32),
        ("crs", ctypes.c_uint32 * 3),
        ("cr4_reserved", ctypes.c_uint32),
        ("shadow_ok", ctypes.c_uint32),
        ("wp_granted", ctypes.c_uint32),
        ("clock_now", ctypes.c_void_p),
        ("clock_last_block", ctypes.c_void_p),
        ("clock_watch_if", ctypes.c_void_p),
        ("clock_check_if", ctypes.c_void_p),
        ("pending", ctypes.c_uint64),
        ("count", ctypes.c_uint64 * len(REASONS)),
        ("seen", ctypes.c_uint8 * len(REASONS)),
        ("pad2", ctypes.c_uint8 * 6),
        ("answered", ctypes.c_uint64),
        ("to_python", ctypes.c_uint64),
        ("misses", ctypes.c_uint64),
        ("ev", EvSeg),
        ("block", _Block * BLOCK_SLOTS),
        ("deliver_on", ctypes.c_uint32),
        ("off_error_code", ctypes.c_uint32),
        ("idt_base", ctypes.c_uint32),
        ("idt_limit", ctypes.c_uint32),
        ("tr_base", ctypes.c_uint32),
        ("tr_limit", ctypes.c_uint32),
        ("mirror", ctypes.c_void_p),
        ("delivered", ctypes.c_uint64),
        ("dpending", ctypes.c_uint64),
        ("soft_count", ctypes.c_uint64 * 256),
        ("fault_count", ctypes.c_uint64 * 32),
        ("soft_seen", ctypes.c_uint8 * 256),
        ("fault_seen", ctypes.c_uint8 * 32),
        ("r_ss", ctypes.c_int32),
        ("iret_on", ctypes.c_uint32),
        ("irets", ctypes.c_uint64),
        ("uc_ctl", ctypes.c_void_p),
        ("tlb_flush_ctl", ctypes.c_int32),
        ("invlpg_on", ctypes.c_uint32),
        ("cr3_reloads", ctypes.c_uint64),
    ]


def enabled_by_environment() -> bool:
    """CPUVIRT_TRAP_FAST=0 keeps every trap in Python (the reference path)."""
    return os.environ.get("CPUVIRT_TRAP_FAST", "1") != "0"


class _IretSite(ctypes.Structure):
    """Mirror of iret_site_t."""

    _fields_ = [
        ("s", ctypes.c_void_p),
        ("python", ctypes.c_void_p),
        ("passed", ctypes.c_uint64),
    ]


class _Store(ctypes.Structure):
    """Mirror of trapstore_t."""

    _fields_ = [
        ("s", ctypes.c_void_p),
        ("cpu_offset", ctypes.c_uint64),
        ("loop_exit", ctypes.c_void_p),
        ("fills", ctypes.c_void_p),
        ("on", ctypes.c_uint32),
        ("pf_on", ctypes.c_uint32),
        ("stores", ctypes.c_uint64),
        ("zaps", ctypes.c_uint64),
        ("hv_start", ctypes.c_void_p),
        ("pf", TfCounts),
    ]


def iret_by_environment() -> bool:
    """CPUVIRT_TRAP_IRET_C=0 keeps every iret site's look in Python."""
    return os.environ.get("CPUVIRT_TRAP_IRET_C", "1") != "0"


def delivery_by_environment() -> bool:
    """CPUVIRT_TRAP_DELIVERY_C=0 keeps every event delivery in Python (the C traps stay)."""
    return os.environ.get("CPUVIRT_TRAP_DELIVERY_C", "1") != "0"


def _lib():
    lib = load(
        "cpuvirt.modes._trapfast",
        {"trapfast_sizeof": _State, "trapfast_iret_site_sizeof": _IretSite, "trapstore_sizeof": _Store},
    )
    if lib is None:
        return None
    lib.trapfast_blocks_put.restype = ctypes.c_int
    lib.trapfast_blocks_put.argtypes = (
        ctypes.c_void_p,
        ctypes.c_uint32,
        ctypes.POINTER(ctypes.c_uint32),
        ctypes.c_uint32,
        ctypes.c_uint64,
    )
    lib.trapfast_blocks_drop.restype = None
    lib.trapfast_blocks_drop.argtypes = (ctypes.c_void_p, ctypes.c_uint32)
    lib.trapfast_blocks_clear.restype = None
    lib.trapfast_blocks_clear.argtypes = (ctypes.c_void_p,)
    lib.trapfast_deliver_fault.restype = ctypes.c_int
    lib.trapfast_deliver_fault.argtypes = (ctypes.c_void_p, ctypes.c_void_p) + (ctypes.c_uint32,) * 3
    return lib


class TrapVirtualCpu(EvVirtualCpu):
    """A VirtualCpu whose CR0, CR2, CR3, CR4, IOPL, GDTR and IDTR are the C table's, and TR's base and
    limit copied there (every other field as VirtualCpu's)."""

    __slots__ = ()
    cr0 = in_table("crs", 0)  # type: ignore[assignment]
    cr3 = in_table("crs", 1)  # type: ignore[assignment]
    cr4 = in_table("crs", 2)  # type: ignore[assignment]


TrapHvTlb, TrapLoaded = EvHvTlb, EvLoaded  # the names trap's tests and notes use


class TrapFast:
    """The C INTR hook of mode trap and the Python side of its table (module docstring)."""

    def __init__(self, lib, vcpu, shadow, env: int, header: int):
        self._lib = lib
        self.vcpu = vcpu
        self.shadow = shadow
        st = self._state = _State()
        self._pstate = ctypes.c_void_p(ctypes.addressof(st))
        st.reg_read = ctypes.cast(_ucmod.uclib.uc_reg_read, ctypes.c_void_p).value
        st.reg_write = ctypes.cast(_ucmod.uclib.uc_reg_write, ctypes.c_void_p).value
        if os.environ.get("CPUVIRT_TRAP_CR3_C", "1") != "0":  # a CR3 reload of the current root in C
            st.uc_ctl = ctypes.cast(_ucmod.uclib.uc_ctl, ctypes.c_void_p).value
            st.tlb_flush_ctl = (UC_CTL_IO_WRITE << 30) | UC_CTL_TLB_FLUSH  # no argument
        layout = context_layout()
        st.off_old_exception = layout.old_exception - header
        st.off_is_int = layout.exception_is_int - header
        st.r_eip, st.r_eflags, st.r_cs, st.r_esp = R.EIP, R.EFLAGS, R.CS, R.ESP
        self._keep: list = []  # alive as long as the table
        evseg.setup(st.ev, vcpu, env, header, layout.hflags, self._keep.append)
        st.r_gpr[:] = R.GPR_ORDER
        st.cr4_reserved = CR4_RESERVED
        mmu = vcpu.mmu
        clock = vcpu.clock._state
        kind, base = type(clock), ctypes.addressof(clock)
        st.clock_now = base + kind.left.offset
        st.clock_last_block = vcpu.clock.last_block_address
        st.clock_watch_if = base + kind.watch_if.offset
        st.clock_check_if = base + kind.check_if.offset
        st.enabled = 1 if vcpu.trace is None else 0
        # event delivery: the error code's place, the copies of the shadow root and of the traced frames
        st.off_error_code = layout.error_code - header
        st.r_ss = R.SS
        p2m = mmu.p2m
        mirror = ShadowMirror.of(shadow)
        st.mirror = 0 if mirror is None else mirror.address
        # a device's registers inside RAM's range would make Mmu._locate's MMIO check matter (P2m.add_mmio
        # refuses one; checked again here): the deliveries would be Python's
        in_ram = any(lo < p2m.ram_bytes for lo, _hi, _hpa in getattr(p2m, "mmio", ()))
        st.deliver_on = 1 if delivery_by_environment() and not in_ram and mirror is not None else 0
        self._soft_seen: list[int] = []
        st.iret_on = 1 if iret_by_environment() else 0
        st.invlpg_on = 0 if os.environ.get("CPUVIRT_INVLPG_C", "1") == "0" else 1  # invlpg of the guest kernel
        self._iret_sites: dict[int, _IretSite] = {}
        self._fault_seen: list[int] = []

    stores: "TrapStores | None" = None  # the ptemods done in the TLB fill (TrapStores.attach)

    @classmethod
    def install(cls, vcpu, shadow) -> "TrapFast | None":
        """Give a TrapVcpu (hooks installed, shadow paging its strategy) its C path; None when the
        extension is not built or the engine is not of the expected shape."""
        lib = _lib()
        mmu = vcpu.mmu
        p2m, ram = mmu.p2m, mmu.ram
        if lib is None or p2m.ram_hpa < ram.hpa or p2m.ram_hpa + p2m.ram_bytes > ram.hpa + ram.size:
            return None
        env = engine_env(vcpu.uc)
        header = None if env is None else context_header(vcpu.uc, env)
        if env is None or header is None:
            return None
        fast = cls(lib, vcpu, shadow, env, header)
        fast._attach()
        return fast

    def _attach(self) -> None:
        vcpu, st = self.vcpu, self._state
        # The virtual CR0/CR3/CR4 move into the table; the walks' CR source follows them.
        vcpu.virtual_cpu = TrapVirtualCpu(st, vcpu.virtual_cpu)
        if vcpu.mmu.crs_source is not None:
            vcpu.mmu.crs_source = vcpu.virtual_cpu.crs
        p2m = vcpu.mmu.p2m
        vcpu._rtlb = EvHvTlb(st.ev, p2m.ram_hpa, p2m.ram_bytes)
        vcpu._loaded = EvLoaded(st.ev, vcpu._loaded)
        evseg.mirror_nmi_blocking(st.ev, vcpu)  # an iret that ends NMI blocking is Python's
        # the copy of Machine.block_insns
        self.blocks = BlockCopyKeeper.keep(
            vcpu.machine.block_insns, self._lib, "trapfast_blocks", self._pstate, st.block
        )
        self.shadow.on_dirty = self._shadow_dirty
        self.arm()
        vcpu.fold_counts = self.fold
        # The C INTR hook in front of the Python one, which it calls for everything else.
        self._python_intr = vcpu.hooks.intr_function(vcpu.hook_intr)
        st.python_intr = ctypes.cast(self._python_intr, ctypes.c_void_p).value
        vcpu.hooks.remove(vcpu._intr_hook)
        uc = vcpu.uc
        handle = add_c_hook(
            uc._uch, UC_HOOK_INTR, self._lib.trapfast_intr_hook, self._pstate, what="install trap's C INTR hook"
        )
        vcpu._intr_hook = handle
        uc._callbacks[handle] = self  # its state lives as long as the engine may call it

    def crs_addresses(self) -> tuple[int, int, int]:
        """Where the virtual CR0, CR3 and CR4 are (uint32 each): for the shadow's C fill."""
        base, off = ctypes.addressof(self._state), _State.crs.offset
        return base + off, base + off + 4, base + off + 8

    # -- switches ---------------------------------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        return bool(self._state.enabled)

    @enabled.setter
    def enabled(self, on: bool) -> None:
        self._state.enabled = 1 if on else 0

    # -- iret sites (Vcpu.far_site's common case: nothing to do) -----------------------------------------
    def install_iret_sites(self) -> None:
        """Put the C hook in front of every iretd site the vCPU's intercepts hook from now on (after
        any C site hook they had: the I/O gate's)."""
        ic = self.vcpu.intercepts
        if ic is None:
            return
        before = ic.fast_site

        def site(address: int, size: int, mnem: str, ops: str, code: bytes, python_hook) -> bool:
            if before is not None and before(address, size, mnem, ops, code, python_hook):
                return True
            if mnem != "iretd" or size != 1:
                return False
            self._iret_site(address, python_hook)
            return True

        ic.fast_site = site

    def _iret_site(self, address: int, python_hook) -> None:
        site = _IretSite()
        site.s = ctypes.addressof(self._state)
        site.python = ctypes.cast(python_hook, ctypes.c_void_p).value
        uc = self.vcpu.uc
        handle = add_c_hook(
            uc._uch,
            UC_HOOK_CODE,
            self._lib.trapfast_iret_hook,
            ctypes.addressof(site),
            address,
            address,
            what=f"hook the iretd at {address:#x}",
        )
        self._iret_sites[handle] = site  # alive as long as the engine may call it
        uc._callbacks[handle] = self

    @property
    def irets(self) -> int:
        """iretd sites passed in C (nothing for Python to do there)."""
        return self._state.irets

    # -- after Python handled an event: what the next C answer may assume -------------------------------
    def arm(self) -> None:
        """Shadow paging's state as of now: may a WP/PGE toggle leave the engine's TLB alone?"""
        s, st = self.shadow, self._state
        st.shadow_ok = 0 if s.unsync or s._engine_stale else 1
        st.wp_granted = 1 if s._wp_granted else 0

    def _shadow_dirty(self, wp: bool) -> None:
        """ShadowPaging.on_dirty: an engine TLB flush became necessary (wp: only when WP is set)."""
        if wp:
            self._state.wp_granted = 1
        else:
            self._state.shadow_ok = 0

    def after_python(self, reasons) -> None:
        """Python handled an engine event (TrapVcpu.on_engine_event): re-arm, and let C count each kind
        once Python has put its counter keys in place (the summary prints them in that order)."""
        self.arm()
        seen = self._state.seen
        for k, key in enumerate(REASONS):
            if not seen[k] and key in reasons:
                seen[k] = 1

    def seen_delivery(self, intno: int, soft: bool) -> None:
        """Python delivered this event (TrapVcpu.on_engine_event): once its Vcpu.reasons key is in
        place, C may deliver the same kind and count it there."""
        note_delivered(self._state, self._soft_seen, self._fault_seen, self.vcpu._reasons, intno, soft)

    def fold(self) -> None:
        """Add the traps and deliveries counted in C to Vcpu.counts and Vcpu.reasons, and count from
        zero."""
        st = self._state
        counts, reasons = self.vcpu._counts, self.vcpu._reasons
        if st.cr3_reloads:
            self.shadow.count_reloads(st.cr3_reloads)
            st.cr3_reloads = 0
        if st.pending:
            st.pending = 0
            for k, key in enumerate(REASONS):
                n = st.count[k]
                if n:
                    st.count[k] = 0
                    counts[key[0]] += n
                    reasons[key] += n
        if st.dpending:
            st.dpending = 0
            fold_event_counts(st, self._soft_seen, self._fault_seen, counts, reasons)

    def deliver_page_fault(self, return_eip: int, error_code: int) -> bool:
        """A #PF from a refused fill (DeprivilegedVcpu.page_fault, recorded and CR2 set) delivered in C
        when deliver_event can; False: nothing changed, Python delivers it."""
        return bool(
            self._lib.trapfast_deliver_fault(
                self._pstate, self.vcpu.uc._uch, 14, return_eip & 0xFFFFFFFF, error_code & 0xFFFFFFFF
            )
        )

    @property
    def delivered(self) -> int:
        """Events delivered through the guest's IDT in C so far."""
        return self._state.delivered

    @property
    def answered(self) -> int:
        """Traps answered in C so far."""
        return self._state.answered

    @property
    def to_python(self) -> int:
        """Engine events the C hook handed to Python."""
        return self._state.to_python


class TrapStores(TrueFaultHook):
    """The guest kernel's common stores into its page tables (ptemods), emulated in the TLB fill without
    stopping the engine, and the common true #PF, delivered there (_trapfast.c trapfast_fill_hook). The
    fill hook must come before the shadow's and Mmu.fill's, so it is added before the vCPU's hooks
    (`install`) and does nothing until `attach` gives it the trap table, the shadow fill's counters and
    the engine's CPUState. CPUVIRT_TRAP_PTEMOD_C=0 leaves every ptemod to Python
    (ShadowPaging._on_write), CPUVIRT_TRAP_PF_C=0 every true #PF (Mmu.fill, the run loop)."""

    STATE = _Store

    def __init__(self, lib, uc, ptemods: bool, faults: bool):
        super().__init__(uc, lib.trapfast_fill_hook, "install trap's C ptemod and #PF hook")
        self._lib = lib
        self._switches = (ptemods, faults)

    @classmethod
    def install(cls, uc) -> "TrapStores | None":
        lib = _lib()
        ptemods = os.environ.get("CPUVIRT_TRAP_PTEMOD_C", "1") != "0"
        faults = os.environ.get("CPUVIRT_TRAP_PF_C", "1") != "0"
        if lib is None or not (ptemods or faults):
            return None
        return cls(lib, uc, ptemods, faults)

    def attach(self, fast: "TrapFast", fill, shadow) -> None:
        """Serve stores from now on: `fast` the trap table, `fill` the shadow's C fill (ShadowFastFill, whose
        counts are Mmu.fill's and the shadow's hits), when the engine's CPUState is known."""
        from cpuvirt.cpu.fastdelivery import _engine_cpu

        found = _engine_cpu(fast.vcpu.uc)
        mirror = ShadowMirror.of(shadow)
        if found is None or mirror is None or fill is None:
            return
        ptemods, faults = self._switches
        if ptemods:
            mirror.track_links()  # which words of a page table a shadow entry derives from
        st = self.state
        st.cpu_offset, st.loop_exit = found
        fstate = fill._state
        st.fills = ctypes.addressof(fstate) + type(fstate).fills.offset
        st.hv_start = ctypes.addressof(fstate) + type(fstate).hv_start.offset
        st.s = ctypes.addressof(fast._state)
        self._keep = (fast, fill)  # what C points at, alive as long as the hook
        fast.stores = self
        self.count_in(fast.vcpu.mmu, shadow)
        st.on, st.pf_on = int(ptemods), int(faults)

    @property
    def stores(self) -> int:
        """ptemods done in C so far."""
        return self.state.stores
