"""Guest register access straight through libunicorn.

The Python wrapper's reg_read/reg_write cost about 1.8 us each; calling uc_reg_read/uc_reg_write
through ctypes without argument conversion (`bare`) about 0.5 us. Exit paths are mostly register
traffic, so every handler reads through this class and only what it needs.
"""

from __future__ import annotations

import ctypes
from functools import lru_cache

from unicorn import x86_const as X
from unicorn.unicorn_py3 import unicorn as _ucmod

_uclib = _ucmod.uclib


@lru_cache(maxsize=None)
def _bare_lib() -> ctypes.CDLL:
    return ctypes.CDLL(_uclib._name)  # the same library, loaded once more: functions without argtypes


def bare(name: str):
    """libunicorn's function `name` without the binding's argtypes: ctypes then passes each argument as
    it is (a c_void_p handle, a small int, a byref buffer: pass nothing else) instead of converting it
    through argtypes, which makes a register read about 4x cheaper (2.0 us -> 0.55 us, measured)."""
    fn = getattr(_bare_lib(), name)
    fn.restype = ctypes.c_int
    return fn


EAX, ECX, EDX, EBX = X.UC_X86_REG_EAX, X.UC_X86_REG_ECX, X.UC_X86_REG_EDX, X.UC_X86_REG_EBX
ESP, EBP, ESI, EDI = X.UC_X86_REG_ESP, X.UC_X86_REG_EBP, X.UC_X86_REG_ESI, X.UC_X86_REG_EDI
EIP, EFLAGS = X.UC_X86_REG_EIP, X.UC_X86_REG_EFLAGS
CS, SS, DS, ES, FS, GS = (
    X.UC_X86_REG_CS,
    X.UC_X86_REG_SS,
    X.UC_X86_REG_DS,
    X.UC_X86_REG_ES,
    X.UC_X86_REG_FS,
    X.UC_X86_REG_GS,
)
CR0, CR2, CR3, CR4 = X.UC_X86_REG_CR0, X.UC_X86_REG_CR2, X.UC_X86_REG_CR3, X.UC_X86_REG_CR4
GDTR, IDTR, LDTR, TR = X.UC_X86_REG_GDTR, X.UC_X86_REG_IDTR, X.UC_X86_REG_LDTR, X.UC_X86_REG_TR
DR7 = X.UC_X86_REG_DR7

# The eight general registers in ModRM / exit-qualification order (SDM Vol. 3C table 28-3).
GPR_ORDER = (EAX, ECX, EDX, EBX, ESP, EBP, ESI, EDI)
GPR_NAMES = ("eax", "ecx", "edx", "ebx", "esp", "ebp", "esi", "edi")
_LOADS_DESCRIPTOR = frozenset((ES, CS, SS, DS, FS, GS))  # writes that make the engine read the GDT or LDT
_EFLAGS_VM = 1 << 17  # for cpl(); the flag bits are named in cpuvirt/x86/flags.py, a floor above


class _Mmr(ctypes.Structure):
    """uc_x86_mmr: a descriptor-table register as libunicorn passes it."""

    _fields_ = [
        ("selector", ctypes.c_uint16),
        ("base", ctypes.c_uint64),
        ("limit", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
    ]


class Regs:
    """Fast scalar register access for one Uc; table registers (GDTR, TR...) go through the wrapper."""

    __slots__ = (
        "uc",
        "_h",
        "_buf",
        "_pbuf",
        "_wbuf",
        "_pwbuf",
        "_rr",
        "_rw",
        "_mmr",
        "_pmmr",
        "loading_descriptor",
    )

    def __init__(self, uc):
        self.uc = uc
        self._h = uc._uch
        self._buf = ctypes.c_uint64()
        self._pbuf = ctypes.byref(self._buf)
        # Writes need a buffer of their own: a segment-register write makes the engine read the
        # descriptor through the TLB-fill hook, which reads registers, and the engine re-reads the
        # selector from the caller's buffer after that.
        self._wbuf = ctypes.c_uint64()
        self._pwbuf = ctypes.byref(self._wbuf)
        self._mmr = _Mmr()
        # see write; a C word, which the C fill hooks read too (hw's #PF exits in C: modes/hw/_fastexit.c)
        self.loading_descriptor = ctypes.c_uint32()
        self._pmmr = ctypes.byref(self._mmr)
        self._rr = bare("uc_reg_read")  # called with (c_void_p, int, byref) only
        self._rw = bare("uc_reg_write")

    def read(self, reg: int) -> int:
        self._buf.value = 0  # segment registers fill only 16 bits of the buffer
        self._rr(self._h, reg, self._pbuf)
        return self._buf.value

    def write(self, reg: int, value: int) -> None:
        self._wbuf.value = value & 0xFFFFFFFF
        if reg in _LOADS_DESCRIPTOR:
            # The engine reads (and may mark accessed) the descriptor through its TLB, from inside this
            # call: a TLB fill refused now would make it raise a fault by longjmp, out through the
            # Python frames that called us (a host crash). A fill strategy that refuses to make the
            # guest exit (hw's shadow paging) serves the hypervisor's load instead while this is set.
            self.loading_descriptor.value = 1
            try:
                failed = self._rw(self._h, reg, self._pwbuf)
            finally:
                self.loading_descriptor.value = 0
        else:
            failed = self._rw(self._h, reg, self._pwbuf)
        if failed:
            # Segment loads can fail (the engine checks the descriptor); surface that as an error.
            raise RuntimeError(f"engine refused register write {reg}={value:#x}")

    def cpl(self) -> int:
        """The current privilege level: CS.RPL, except in virtual-8086 mode, where it is 3 whatever
        CS holds (a real-mode style segment value there; SDM 20.2.1)."""
        cpl = self.read(CS) & 3
        if cpl != 3 and self.read(EFLAGS) & _EFLAGS_VM:
            return 3
        return cpl

    def table(self, reg: int) -> tuple[int, int, int, int]:
        """(selector, base, limit, flags) of GDTR, IDTR, LDTR or TR."""
        m = self._mmr
        self._rr(self._h, reg, self._pmmr)
        return m.selector, m.base, m.limit, m.flags

    def set_table(self, reg: int, value: tuple[int, int, int, int]) -> None:
        self.uc.reg_write(reg, value)


class Batch:
    """A fixed set of registers read or written in one libunicorn call (uc_reg_read_batch /
    uc_reg_write_batch): one ctypes crossing instead of one per register on hot exit paths."""

    __slots__ = ("_bufs", "_h", "_ids", "_n", "_ptrs")

    def __init__(self, uc, regs: tuple[int, ...]):
        self._h = uc._uch
        self._n = len(regs)
        self._ids = (ctypes.c_int * self._n)(*regs)
        self._bufs = [ctypes.c_uint64() for _ in regs]
        self._ptrs = (ctypes.c_void_p * self._n)(*(ctypes.addressof(b) for b in self._bufs))

    def read(self) -> list[int]:
        for b in self._bufs:
            b.value = 0
        if _uclib.uc_reg_read_batch(self._h, self._ids, self._ptrs, self._n):
            raise RuntimeError("engine refused a batched register read")
        return [b.value for b in self._bufs]

    def write(self, *values: int) -> None:
        for b, v in zip(self._bufs, values):
            b.value = v & 0xFFFFFFFF
        if _uclib.uc_reg_write_batch(self._h, self._ids, self._ptrs, self._n):
            raise RuntimeError("engine refused a batched register write")
