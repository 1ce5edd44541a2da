"""Native mode's common event deliveries in C (_delivery.c); EventDelivery stays the complete path.

The C function delivers a protected-mode event through a present 32-bit interrupt or trap gate, at
the same privilege or into ring 0 from an outer ring, when nothing on the way faults and every byte is
guest RAM; for anything else it changes nothing and EventDelivery delivers in Python, with the same
result either way (tests/test_fast_delivery.py). Its page walks are added to the MMU's counters.
Optional: without the built extension every delivery is Python's.
"""
from __future__ import annotations

import ctypes

from unicorn import UC_HOOK_CODE, UC_HOOK_INTR
from unicorn.unicorn_py3 import unicorn as _ucmod

from cpuvirt.engine import regs as R
from cpuvirt.engine.cext import load
from cpuvirt.engine.hooks import hook_guard
from cpuvirt.x86.cpuid import CR4_RESERVED
from cpuvirt.x86.vectors import HAS_ERROR_CODE, MNEMONIC

_REGS = (R.EAX, R.ESP, R.EIP, R.EFLAGS, R.CS, R.SS, R.CR0, R.CR3, R.CR4, R.GDTR, R.IDTR, R.TR)
DELIVERED, ENGINE_REFUSED = 1, -1
F_ERROR_CODE, F_SOFT, F_EXTERNAL = 1, 2, 4
_SOFT_DONE = ctypes.CFUNCTYPE(None, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_uint32)
_FAULT_DONE = ctypes.CFUNCTYPE(None, ctypes.c_uint32, ctypes.c_uint32)


class _State(ctypes.Structure):
    """Mirror of delivery_t (checked against delivery_sizeof at load)."""

    _fields_ = [
        ("ram", ctypes.c_void_p), ("ram_bytes", ctypes.c_uint64),
        ("reg_read", ctypes.c_void_p), ("reg_write", ctypes.c_void_p),
        ("context_save", ctypes.c_void_p), ("context_restore", ctypes.c_void_p),
        ("context", ctypes.c_void_p), ("context_hflags", ctypes.c_void_p), ("context_ss", ctypes.c_void_p),
        ("reg", ctypes.c_int32 * len(_REGS)), ("enabled", ctypes.c_uint32),
        ("walks", ctypes.c_uint64), ("walk_refs", ctypes.c_uint64),
        ("delivered", ctypes.c_uint64), ("fallbacks", ctypes.c_uint64),
        ("python_intr", ctypes.c_void_p), ("soft_done", ctypes.c_void_p), ("fault_done", ctypes.c_void_p),
        ("context_is_int", ctypes.c_void_p), ("context_old_exception", ctypes.c_void_p),
        ("context_error_code", ctypes.c_void_p), ("has_error_code", ctypes.c_uint32 * 8),
        ("soft_delivered", ctypes.c_uint64), ("faults_delivered", ctypes.c_uint64),
        ("nmi_blocked", ctypes.c_uint32), ("pad", ctypes.c_uint32),
        ("clock_watch_if", ctypes.c_void_p), ("clock_check_if", ctypes.c_void_p), ("irets", ctypes.c_uint64),
    ]


class _IretSite(ctypes.Structure):
    """Mirror of iret_site_t."""

    _fields_ = [("s", ctypes.c_void_p), ("python", ctypes.c_void_p), ("size", ctypes.c_uint32),
                ("wide", ctypes.c_uint32), ("bytes", ctypes.c_uint8 * 16)]


class _Cr4Site(ctypes.Structure):
    """Mirror of cr4_site_t."""

    _fields_ = [("s", ctypes.c_void_p), ("python", ctypes.c_void_p), ("size", ctypes.c_uint32),
                ("src_reg", ctypes.c_int32), ("reserved", ctypes.c_uint32), ("pad", ctypes.c_uint32),
                ("passed", ctypes.c_uint64), ("bytes", ctypes.c_uint8 * 16)]


def _lib():
    lib = load("cpuvirt.cpu._delivery", {"delivery_sizeof": _State, "delivery_iret_site_sizeof": _IretSite,
                                         "delivery_cr4_site_sizeof": _Cr4Site})
    if lib is None:
        return None
    lib.delivery_fast.restype = ctypes.c_int
    lib.delivery_peek.restype = ctypes.c_int
    lib.delivery_peek.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_void_p)
    lib.delivery_fast.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint32, ctypes.c_uint32,
                                  ctypes.c_uint32, ctypes.c_int)
    return lib


class FastDelivery:
    """`FastDelivery.install(delivery)` gives an EventDelivery over a native MMU (the guest's own page
    tables over a flat p2m, the real registers) its C path; None if the extension is not built."""

    def __init__(self, lib, mmu, faults):
        self.mmu = mmu
        st = self._state = _State()
        st.ram = ctypes.addressof(ctypes.c_char.from_buffer(mmu.ram.buf))
        st.ram_bytes = mmu.p2m.ram_bytes
        st.reg_read = ctypes.cast(_ucmod.uclib.uc_reg_read, ctypes.c_void_p).value
        st.reg_write = ctypes.cast(_ucmod.uclib.uc_reg_write, ctypes.c_void_p).value
        st.context_save = ctypes.cast(_ucmod.uclib.uc_context_save, ctypes.c_void_p).value
        st.context_restore = ctypes.cast(_ucmod.uclib.uc_context_restore, ctypes.c_void_p).value
        self._context = mmu.uc.context_save()       # its own: the ring-0 SS load sets CPL through it
        st.context = ctypes.cast(self._context.context, ctypes.c_void_p).value
        st.context_hflags = st.context + faults.layout.hflags
        st.context_ss = st.context + faults.layout.ss_selector
        st.context_is_int = st.context + faults.layout.exception_is_int
        st.context_old_exception = st.context + faults.layout.old_exception
        st.context_error_code = st.context + faults.layout.error_code
        for v in HAS_ERROR_CODE:
            st.has_error_code[v >> 5] |= 1 << (v & 31)
        st.reg[:] = _REGS
        st.enabled = 1
        self._pstate = ctypes.cast(ctypes.pointer(st), ctypes.c_void_p)
        self._fn = lib.delivery_fast
        self._peek = lib.delivery_peek
        self._buf = ctypes.create_string_buffer(32)
        self._uch = mmu.uc._uch
        self._lib = lib
        self._python_intr = None      # set once install_intr has put the C INTR hook in place

    @classmethod
    def install(cls, delivery) -> "FastDelivery | None":
        mmu = delivery.mmu
        lib = _lib()
        if lib is None or mmu.ram.hpa != mmu.p2m.ram_hpa or mmu.p2m.ram_bytes > mmu.ram.size:
            return None
        fast = cls(lib, mmu, delivery.view.vcpu.faults)
        delivery.fast = fast
        mmu.counters.walkers.append(fast)
        mmu.peek = fast.peek
        return fast

    def install_intr(self, vcpu) -> None:
        """Put delivery_intr_hook in front of the vCPU's INTR hook: `int n` and the faults the engine
        raises, through a gate the C path takes, are then delivered without Python but for one call
        that counts them (soft_done, fault_done). Only
        for the native Vcpu's own event handling, and never while tracing (an event's trace line
        needs Python)."""
        if vcpu.trace is not None or self._python_intr is not None:
            return
        st = self._state
        self._python_intr = vcpu.hooks.intr_function(vcpu.hook_intr)
        vcpu.hooks.remove(vcpu._intr_hook)

        @hook_guard()
        def soft_done(owner, vector: int, start: int, eip: int) -> None:
            """What Vcpu.hook_intr does around an `int n` besides the delivery (trace off)."""
            owner.left_block_at(eip)
            owner.counts["interrupt"] += 1
            owner.reasons["interrupt", f"int {vector:#x}"] += 1
            owner.clock.if_may_have_changed()

        @hook_guard()
        def fault_done(owner, vector: int, eip: int) -> None:
            """The same for a fault (Vcpu._deliver_engine_event's other branch)."""
            owner.left_block_at(eip)
            owner.counts["exception"] += 1
            owner.reasons["exception", MNEMONIC.get(vector, f"vector {vector}")] += 1
            owner.clock.if_may_have_changed()
        self._soft_done = _SOFT_DONE(lambda vector, start, eip: soft_done(vcpu, vector, start, eip))
        self._fault_done = _FAULT_DONE(lambda vector, eip: fault_done(vcpu, vector, eip))
        st.python_intr = ctypes.cast(self._python_intr, ctypes.c_void_p).value
        st.soft_done = ctypes.cast(self._soft_done, ctypes.c_void_p).value
        st.fault_done = ctypes.cast(self._fault_done, ctypes.c_void_p).value
        handle = ctypes.c_size_t()
        err = _ucmod.uclib.uc_hook_add(self._uch, ctypes.byref(handle), UC_HOOK_INTR,
                                       ctypes.cast(self._lib.delivery_intr_hook, ctypes.c_void_p), self._pstate,
                                       ctypes.c_uint64(1), ctypes.c_uint64(0))
        if err:
            raise RuntimeError(f"cannot install the C INTR hook (uc error {err})")
        vcpu._intr_hook = handle.value

    def install_sites(self, vcpu) -> None:
        """Put a C hook in front of every iret and mov-to-CR4 site the vCPU's intercepts hook from now
        on (delivery_iret_hook, delivery_cr4_hook): their common case needs nothing from cpuvirt."""
        clock = vcpu.clock._state
        st = self._state
        st.clock_watch_if = ctypes.addressof(clock) + type(clock).watch_if.offset
        st.clock_check_if = ctypes.addressof(clock) + type(clock).check_if.offset
        st.nmi_blocked = int(vcpu.nmi_blocked)
        vcpu.on_nmi_blocked = self._set_nmi_blocked
        self._sites: dict[int, tuple] = {}
        vcpu.intercepts.fast_site = self._site

    def _site(self, address: int, size: int, mnem: str, ops: str, code: bytes, python_hook) -> bool:
        """Hook one intercepted instruction in C if it is of a kind answered there; False if not."""
        if mnem in ("iret", "iretd"):
            self._iret_site(address, size, mnem == "iretd", code, python_hook)
            return True
        dst, _, src = (t.strip() for t in ops.partition(","))
        if mnem == "mov" and dst == "cr4" and src in R.GPR_NAMES:
            self._cr4_site(address, size, R.GPR_ORDER[R.GPR_NAMES.index(src)], code, python_hook)
            return True
        return False

    def _cr4_site(self, address: int, size: int, src_reg: int, code: bytes, python_hook) -> None:
        site = _Cr4Site()
        site.s = ctypes.addressof(self._state)
        site.python = ctypes.cast(python_hook, ctypes.c_void_p).value
        site.size, site.src_reg, site.reserved = size, src_reg, CR4_RESERVED
        site.bytes[:len(code[:16])] = code[:16]
        if len(code) != size:
            site.size = 0                       # bytes unknown: always the Python hook
        self._add_site(address, site, self._lib.delivery_cr4_hook, python_hook)

    def cr4_passed(self) -> int:
        """mov-to-CR4 instructions answered in C (nothing to do)."""
        return sum(site.passed for site, _ in self._sites.values() if isinstance(site, _Cr4Site))

    def _set_nmi_blocked(self, value: bool) -> None:
        self._state.nmi_blocked = int(value)

    def _iret_site(self, address: int, size: int, wide: bool, code: bytes, python_hook) -> None:
        site = _IretSite()
        site.s = ctypes.addressof(self._state)
        site.python = ctypes.cast(python_hook, ctypes.c_void_p).value
        site.size, site.wide = size, int(wide)
        site.bytes[:len(code[:16])] = code[:16]
        if len(code) != size:
            site.size = 0                       # bytes unknown: always the Python hook
        self._add_site(address, site, self._lib.delivery_iret_hook, python_hook)

    def _add_site(self, address: int, site, hook, python_hook) -> None:
        handle = ctypes.c_size_t()
        err = _ucmod.uclib.uc_hook_add(self._uch, ctypes.byref(handle), UC_HOOK_CODE,
                                       ctypes.cast(hook, ctypes.c_void_p), ctypes.c_void_p(ctypes.addressof(site)),
                                       ctypes.c_uint64(address), ctypes.c_uint64(address))
        if err:
            raise RuntimeError(f"cannot hook the intercepted instruction at {address:#x} (uc error {err})")
        self._sites[handle.value] = (site, python_hook)     # alive as long as the engine may call them

    @property
    def irets(self) -> int:
        return self._state.irets

    @property
    def soft_delivered(self) -> int:
        return self._state.soft_delivered

    @property
    def faults_delivered(self) -> int:
        return self._state.faults_delivered

    def peek(self, gva: int, size: int) -> bytes | None:
        """Guest RAM bytes at a linear address with no side effect (Mmu.fetch_bytes), or None when the
        C reader cannot answer (a fault, a device, unbacked memory, more than 32 bytes)."""
        if size <= 32 and self._peek(self._pstate, self._uch, gva & 0xFFFFFFFF, size, self._buf):
            return self._buf.raw[:size]
        return None

    def deliver(self, vector: int, return_eip: int, error_code: int | None, soft: bool, external: bool) -> bool:
        """True when the C path delivered the event; False: nothing changed, deliver it in Python."""
        if self.mmu.traces.frames:
            return False              # a write-traced frame may be written: Mmu.write_linear tells its owners
        flags = (F_SOFT if soft else 0) | (F_EXTERNAL if external else 0)
        if error_code is not None:
            flags |= F_ERROR_CODE
        r = self._fn(self._pstate, self._uch, vector, return_eip & 0xFFFFFFFF, (error_code or 0) & 0xFFFFFFFF, flags)
        if r == ENGINE_REFUSED:
            raise RuntimeError(f"engine refused a register write delivering vector {vector}")
        return r == DELIVERED

    def counts(self) -> tuple[int, int, int]:
        """(fills, walks, walk_refs) for Mmu.counters: the walks of the events it delivered."""
        st = self._state
        return 0, st.walks, st.walk_refs

    @property
    def delivered(self) -> int:
        return self._state.delivered

    @property
    def fallbacks(self) -> int:
        return self._state.fallbacks
