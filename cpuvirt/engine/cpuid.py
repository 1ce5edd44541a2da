"""CPUID answered in C (_cpuid.c) from a table of the CPU model's leaves, so that a guest's cpuid
costs no Python. The table comes from the caller (the vCPU fills it from x86/cpuid.py through the
machine) and is refilled whenever the model's answers change (the APIC bit follows IA32_APIC_BASE).
"""

from __future__ import annotations

import ctypes

from unicorn import UC_HOOK_INSN
from unicorn.unicorn_py3 import unicorn as _ucmod
from unicorn.x86_const import (
    UC_X86_INS_CPUID,
    UC_X86_REG_EAX,
    UC_X86_REG_EBX,
    UC_X86_REG_ECX,
    UC_X86_REG_EDX,
)

from cpuvirt.engine.cext import add_c_hook, load

MAX_LEAVES = 16


class _Leaf(ctypes.Structure):
    _fields_ = [
        ("leaf", ctypes.c_uint32),
        ("eax", ctypes.c_uint32),
        ("ebx", ctypes.c_uint32),
        ("ecx", ctypes.c_uint32),
        ("edx", ctypes.c_uint32),
    ]


class _Table(ctypes.Structure):
    """Mirror of cpuid_table_t in _cpuid.c (checked against cpuid_table_sizeof at load)."""

    _fields_ = [
        ("reg_read", ctypes.c_void_p),
        ("reg_write", ctypes.c_void_p),
        ("eax_reg", ctypes.c_int32),
        ("ebx_reg", ctypes.c_int32),
        ("ecx_reg", ctypes.c_int32),
        ("edx_reg", ctypes.c_int32),
        ("count", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
        ("answered", ctypes.c_uint64),
        ("fallback", _Leaf),
        ("leaves", _Leaf * MAX_LEAVES),
    ]


def _lib():
    return load("cpuvirt.engine._cpuid", {"cpuid_table_sizeof": _Table})


class CpuidTable:
    """One engine's cpuid hook and the table it answers from; `install` gives None when the extension
    is not built (the vCPU's Python hook answers then, with the same values)."""

    @classmethod
    def install(cls, uc) -> "CpuidTable | None":
        lib = _lib()
        return None if lib is None else cls(uc, lib)

    def __init__(self, uc, lib):
        self.hook_function = lib.cpuid_hook  # also called by full's C callout hook (bt/_callout.c)
        t = self._table = _Table()
        t.reg_read = ctypes.cast(_ucmod.uclib.uc_reg_read, ctypes.c_void_p).value
        t.reg_write = ctypes.cast(_ucmod.uclib.uc_reg_write, ctypes.c_void_p).value
        t.eax_reg, t.ebx_reg, t.ecx_reg, t.edx_reg = UC_X86_REG_EAX, UC_X86_REG_EBX, UC_X86_REG_ECX, UC_X86_REG_EDX
        self._hook = add_c_hook(
            uc._uch,
            UC_HOOK_INSN,
            lib.cpuid_hook,
            ctypes.cast(ctypes.pointer(t), ctypes.c_void_p),
            insn=UC_X86_INS_CPUID,
            what="hook cpuid",
        )

    def load(self, leaves: dict[int, tuple[int, int, int, int]], fallback: tuple[int, int, int, int]) -> None:
        """Answer EAX = leaf with leaves[leaf], any other leaf with `fallback` (ECX is not looked at)."""
        if len(leaves) > MAX_LEAVES:
            raise ValueError(f"a CPUID table holds at most {MAX_LEAVES} leaves")
        t = self._table
        t.count = 0  # no half-written table is ever looked up
        t.fallback = _Leaf(0, *fallback)
        for i, (leaf, regs) in enumerate(sorted(leaves.items())):
            t.leaves[i] = _Leaf(leaf, *regs)
        t.count = len(leaves)

    @property
    def pointer(self) -> ctypes.c_void_p:
        """The table, as the hook's user data."""
        return ctypes.cast(ctypes.pointer(self._table), ctypes.c_void_p)

    @property
    def answered(self) -> int:
        return self._table.answered
