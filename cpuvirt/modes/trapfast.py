"""Mode `trap`'s common traps answered in C (modes/_trapfast.c; docs/deprivileging.md, "The common traps
in C"): cli, sti, clts, mov from CR0/CR4, and mov to CR0/CR4 that changes only WP or PGE.

`TrapFast.install(vcpu, shadow)` puts the C INTR hook in front of the vCPU's Python one and moves
what it needs into its table: the virtual CR0, CR3 and CR4 (`TrapVirtualCpu`), the hypervisor's own
TLB's generation (cpu/hvtlb.py), a copy of Machine.block_insns (this table is its BlockMirror), and
whether shadow paging would need anything on a WP/PGE toggle (`arm`, after each event Python handles,
and ShadowPaging.on_dirty as it happens). Events counted in C are folded into Vcpu.counts and
Vcpu.reasons when those are read. The C path is off while a trace is written (TrapVcpu.trace), and
with CPUVIRT_TRAP_FAST=0; either way the console, trace, counters and virtual time are the Python
path's (tests/test_trap_fast.py).
"""

from __future__ import annotations

import ctypes
import os

from unicorn import UC_HOOK_INTR
from unicorn.unicorn_py3 import unicorn as _ucmod

from cpuvirt.cpu import evseg
from cpuvirt.cpu.evseg import EvHvTlb, EvLoaded, EvSeg, EvVirtualCpu
from cpuvirt.cpu.fastdelivery import _cpu_field, _read_process
from cpuvirt.cpu.quirks import context_layout
from cpuvirt.cpu.virtualcpu import in_table
from cpuvirt.engine import regs as R
from cpuvirt.engine.cext import add_c_hook, load
from cpuvirt.x86.cpuid import CR4_RESERVED

BLOCK_SLOTS, BLOCK_MAX_INSNS = 4096, 58
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
)


class _Block(ctypes.Structure):
    """Mirror of block_t."""

    _fields_ = [
        ("end", ctypes.c_uint64),
        ("address", ctypes.c_uint32),
        ("first", ctypes.c_uint32),
        ("n", ctypes.c_uint16),
        ("offset", ctypes.c_uint16 * BLOCK_MAX_INSNS),
        ("ambiguous", ctypes.c_uint16),
        ("pad", ctypes.c_uint16 * 2),
    ]


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
        ("pad2", ctypes.c_uint8 * 7),
        ("answered", ctypes.c_uint64),
        ("to_python", ctypes.c_uint64),
        ("misses", ctypes.c_uint64),
        ("ev", EvSeg),
        ("block", _Block * BLOCK_SLOTS),
    ]


def enabled_by_environment() -> bool:
    """CPUVIRT_TRAP_FAST=0 keeps every trap in Python (the reference path)."""
    return os.environ.get("CPUVIRT_TRAP_FAST", "1") != "0"


def _lib():
    lib = load("cpuvirt.modes._trapfast", {"trapfast_sizeof": _State})
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
    return lib


def _engine_env(uc) -> int | None:
    """The address of QEMU's CPUX86State of this engine (what uc_context_save copies), checked: its
    first field is EAX as uc_reg_read reads it. None when libunicorn is not of the expected shape."""
    found = _cpu_field()
    if found is None:
        return None
    cpu_off, env_off = found
    cpu = _read_process(uc._uch.value + cpu_off, 8)
    env = cpu and _read_process(int.from_bytes(cpu, "little") + env_off, 8)
    if not env:
        return None
    address = int.from_bytes(env, "little")
    eax = uc.reg_read(R.EAX)
    try:
        for probe in (0x5A17C0DE, 0x0BADF00D):
            uc.reg_write(R.EAX, probe)
            seen = _read_process(address, 4)
            if seen is None or int.from_bytes(seen, "little") != probe:
                return None
    finally:
        uc.reg_write(R.EAX, eax)
    return address


def _context_header(uc, env: int) -> int | None:
    """Where the copy of CPUX86State starts in a saved context (quirks.ContextLayout's offsets count
    from the context itself): the offset at which the context's bytes equal the live state's, with
    EAX and ECX (its first fields) holding probe values so that the match is unique."""
    eax, ecx = uc.reg_read(R.EAX), uc.reg_read(R.ECX)
    try:
        uc.reg_write(R.EAX, 0x5A17C0DE)
        uc.reg_write(R.ECX, 0x0BADF00D)
        ctx = uc.context_save()
        base = ctypes.cast(ctx.context, ctypes.c_void_p).value
        live = _read_process(env, 64)
        blob = _read_process(base, 256 + 64) if base else None
    finally:
        uc.reg_write(R.EAX, eax)
        uc.reg_write(R.ECX, ecx)
    if live is None or blob is None or blob.count(live) != 1:
        return None
    at = blob.find(live)
    return at if at <= 256 else None


class TrapVirtualCpu(EvVirtualCpu):
    """A VirtualCpu whose CR0, CR2, CR3, CR4, IOPL and GDTR are the C table's (every other field as
    VirtualCpu's)."""

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
        layout = context_layout()
        st.off_old_exception = layout.old_exception - header
        st.off_is_int = layout.exception_is_int - header
        st.r_eip, st.r_eflags, st.r_cs, st.r_esp = R.EIP, R.EFLAGS, R.CS, R.ESP
        self._keep: list = []  # alive as long as the table
        evseg.setup(st.ev, vcpu, env, header, layout.hflags, self._keep.append)
        st.r_gpr[:] = R.GPR_ORDER
        st.cr4_reserved = CR4_RESERVED
        clock = vcpu.clock._state
        kind, base = type(clock), ctypes.addressof(clock)
        st.clock_now = base + kind.now.offset
        st.clock_last_block = base + kind.last_block.offset
        st.clock_watch_if = base + kind.watch_if.offset
        st.clock_check_if = base + kind.check_if.offset
        st.enabled = 1 if vcpu.trace is None else 0

    @classmethod
    def install(cls, vcpu, shadow) -> "TrapFast | None":
        """Give a TrapVcpu (hooks installed, shadow paging its strategy) its C path; None when the
        extension is not built or the engine is not of the expected shape."""
        lib = _lib()
        mmu = vcpu.mmu
        p2m, ram = mmu.p2m, mmu.ram
        if lib is None or p2m.ram_hpa < ram.hpa or p2m.ram_hpa + p2m.ram_bytes > ram.hpa + ram.size:
            return None
        env = _engine_env(vcpu.uc)
        header = None if env is None else _context_header(vcpu.uc, env)
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
        vcpu.machine.block_insns.attach(self)  # the copy of Machine.block_insns
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

    # -- switches ---------------------------------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        return bool(self._state.enabled)

    @enabled.setter
    def enabled(self, on: bool) -> None:
        self._state.enabled = 1 if on else 0

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

    def fold(self) -> None:
        """Add the traps counted in C to Vcpu.counts and Vcpu.reasons, and count from zero."""
        st = self._state
        if not st.pending:
            return
        st.pending = 0
        counts, reasons = self.vcpu._counts, self.vcpu._reasons
        for k, key in enumerate(REASONS):
            n = st.count[k]
            if n:
                st.count[k] = 0
                counts[key[0]] += n
                reasons[key] += n

    @property
    def answered(self) -> int:
        """Traps answered in C so far."""
        return self._state.answered

    @property
    def to_python(self) -> int:
        """Engine events the C hook handed to Python."""
        return self._state.to_python

    # -- BlockMirror (machine/blocks.py) ------------------------------------------------------------------
    def put(self, address: int, addrs: tuple[int, ...], end: int) -> None:
        words = (ctypes.c_uint32 * len(addrs))(*(a & 0xFFFFFFFF for a in addrs))
        self._lib.trapfast_blocks_put(self._pstate, address & 0xFFFFFFFF, words, len(addrs), end)

    def drop(self, address: int) -> None:
        self._lib.trapfast_blocks_drop(self._pstate, address & 0xFFFFFFFF)

    def clear(self) -> None:
        self._lib.trapfast_blocks_clear(self._pstate)
