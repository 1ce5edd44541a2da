"""Native mode's common event deliveries in C (_delivery.c); EventDelivery stays the complete path.

The C function delivers a protected-mode event through a present 32-bit interrupt or trap gate, at
the same privilege or into ring 0 from an outer ring, when nothing on the way faults and every byte is
guest RAM; for anything else it changes nothing and EventDelivery delivers in Python, with the same
result either way (tests/test_fast_delivery.py). Its page walks are added to the MMU's counters.
Optional: without the built extension every delivery is Python's.
"""
from __future__ import annotations

import ctypes
import importlib.util

from unicorn.unicorn_py3 import unicorn as _ucmod

from cpuvirt.engine import regs as R

_REGS = (R.EAX, R.ESP, R.EIP, R.EFLAGS, R.CS, R.SS, R.CR0, R.CR3, R.CR4, R.GDTR, R.IDTR, R.TR)
DELIVERED, ENGINE_REFUSED = 1, -1
F_ERROR_CODE, F_SOFT, F_EXTERNAL = 1, 2, 4


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
    ]


def _lib():
    spec = importlib.util.find_spec("cpuvirt.cpu._delivery")
    if spec is None or spec.origin is None:
        return None
    lib = ctypes.CDLL(spec.origin)
    lib.delivery_sizeof.restype = ctypes.c_size_t
    if lib.delivery_sizeof() != ctypes.sizeof(_State):
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
        st.reg[:] = _REGS
        st.enabled = 1
        self._pstate = ctypes.cast(ctypes.pointer(st), ctypes.c_void_p)
        self._fn = lib.delivery_fast
        self._peek = lib.delivery_peek
        self._buf = ctypes.create_string_buffer(32)
        self._uch = mmu.uc._uch

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
