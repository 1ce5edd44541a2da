"""cpu/_truefault.h, the C that trap's and full's TLB-fill hooks use to find a true #PF (its walk) and its
CR2 (the instruction's one memory operand), against the Python models they replace: memory/walk.py, and
x86/faultaddr.py's capstone decode. Property tests on random page-table entries and random instructions of
the forms the C decodes; the C may decline a case (return 0 where Python faults: a 4 MiB page with reserved
bits), but never answer differently."""

from __future__ import annotations

import ctypes
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cpuvirt.engine import regs as R
from cpuvirt.memory.types import Access
from cpuvirt.memory.walk import Fault, walk
from cpuvirt.modes.trapfast import _lib
from cpuvirt.x86.faultaddr import _operand_addresses

LIB = _lib()
pytestmark = pytest.mark.skipif(LIB is None, reason="the C extensions are not built")

RAM = 0x4000
PD, PT = 0x1000, 0x2000
CR0_PG, CR0_WP, CR4_PSE = 0x80000000, 0x10000, 0x10
FLAG_BITS = 0x1 | 0x2 | 0x4 | 0x20 | 0x40 | 0x80  # P, RW, US, A, D, PS


def _c_walk(ram: bytearray, cr0: int, cr4: int, gva: int, write: bool, user: bool):
    buf = (ctypes.c_uint8 * len(ram)).from_buffer(ram)
    ec, refs, pde_a = ctypes.c_uint32(), ctypes.c_uint32(), ctypes.c_int64()
    fn = LIB.trapfast_tf_walk
    fn.restype = ctypes.c_int
    fn.argtypes = (ctypes.c_void_p, ctypes.c_uint64, *(ctypes.c_uint32,) * 4, ctypes.c_int, ctypes.c_int,
                   ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p)
    r = fn(ctypes.addressof(buf), len(ram), cr0, PD, cr4, gva, int(write), int(user),
           ctypes.addressof(ec), ctypes.addressof(refs), ctypes.addressof(pde_a))
    del buf
    return r, ec.value, refs.value, pde_a.value


@settings(max_examples=400, deadline=None)
@given(
    pde_flags=st.integers(0, FLAG_BITS),
    pde_high=st.integers(0, 0x3FF),  # bits 12-21 of a 4 MiB PDE (reserved and PSE-36 bits among them)
    pte_flags=st.integers(0, FLAG_BITS & ~0x80),
    write=st.booleans(),
    user=st.booleans(),
    wp=st.booleans(),
    pse=st.booleans(),
    pti=st.integers(0, 1023),
    off=st.integers(0, 0xFFF),
)
def test_the_walk_is_memory_walk_py_s(pde_flags, pde_high, pte_flags, write, user, wp, pse, pti, off):
    ram = bytearray(RAM)
    large = pde_flags & 0x80 and pse
    pde = (pde_flags | (pde_high << 12)) if large else (PT | pde_flags)
    struct.pack_into("<I", ram, PD, pde)
    struct.pack_into("<I", ram, PT + 4 * pti, 0x3000 | pte_flags)
    cr0, cr4 = CR0_PG | (CR0_WP if wp else 0), CR4_PSE if pse else 0
    gva = (pti << 12) | off
    writes: list[int] = []

    def read32(gpa: int) -> int:
        return struct.unpack_from("<I", ram, gpa)[0]

    def write32(gpa: int, value: int) -> None:
        writes.append(gpa)

    py = walk(gva, Access.WRITE if write else Access.READ, user, cr0, PD, cr4, read32, write32)
    r, ec, refs, pde_a = _c_walk(ram, cr0, cr4, gva, write, user)
    if type(py) is Fault:
        if r == 0:  # declined: a 4 MiB page with reserved or PSE-36 bits, Python's to fault
            assert large and pde & 0x003FE000, (hex(pde), py)
            return
        assert r == 1 and ec == py.error_code and refs == py.refs, (hex(pde), py, ec, refs)
        assert (pde_a >= 0) == (PD in writes) and (pde_a < 0 or pde_a == PD)  # the PDE's A bit, set by the walk
    else:
        assert r == 0, (hex(pde), py, ec)


class _Regs:
    def __init__(self, values: dict[int, int]):
        self.values = values

    def read(self, reg: int) -> int:
        return self.values[reg]


# (opcode bytes, whether an immediate of the operand size follows: 0, 1 or 4 bytes, the reg field forced)
FORMS = [(bytes([b]), 0, None) for b in range(0x40) if b & 7 < 4] + [
    (bytes([b]), 0, None) for b in range(0x84, 0x8C)
] + [
    (b"\x80", 1, None), (b"\x81", 4, None), (b"\x83", 1, None), (b"\xc6", 1, 0), (b"\xc7", 4, 0),
    (b"\xfe", 0, 0), (b"\xfe", 0, 1), (b"\xff", 0, 0), (b"\xff", 0, 1),
    (b"\xf6", 1, 0), (b"\xf7", 4, 0), (b"\xf7", 0, 2), (b"\xf7", 0, 3),
    (b"\x0f\xb6", 0, None), (b"\x0f\xb7", 0, None), (b"\x0f\xbe", 0, None), (b"\x0f\xbf", 0, None),
]


@settings(max_examples=600, deadline=None)
@given(
    form=st.sampled_from(FORMS),
    modrm=st.integers(0, 255),
    tail=st.binary(min_size=14, max_size=14),
    gpr=st.lists(st.integers(0, 0xFFFFFFFF), min_size=8, max_size=8),
)
def test_the_operand_is_faultaddr_py_s(form, modrm, tail, gpr):
    opcode, imm, reg = form
    if reg is not None:
        modrm = (modrm & 0xC7) | (reg << 3)
    code = (opcode + bytes([modrm]) + tail)[:15]
    ea = ctypes.c_uint32()
    fn = LIB.trapfast_tf_operand
    fn.restype = ctypes.c_int
    fn.argtypes = (ctypes.c_char_p, ctypes.c_void_p, ctypes.c_void_p)
    regs = (ctypes.c_uint32 * 8)(*gpr)
    r = fn(code, ctypes.addressof(regs), ctypes.addressof(ea))
    py = _operand_addresses(code, 0x1000, _Regs(dict(zip(R.GPR_ORDER, gpr))))  # type: ignore[arg-type]
    if modrm >> 6 == 3:  # a register operand: no memory operand to find
        assert r == 0 and py == []
        return
    assert r == 1 and len(py) == 1 and py[0][0] == ea.value, (code.hex(), py, hex(ea.value))


def test_moffs_forms(tail=b"\x78\x56\x34\x12" + bytes(10)):
    for op in (0xA0, 0xA1, 0xA2, 0xA3):
        code = bytes([op]) + tail
        ea = ctypes.c_uint32()
        regs = (ctypes.c_uint32 * 8)()
        assert LIB.trapfast_tf_operand(code, ctypes.addressof(regs), ctypes.addressof(ea)) == 1
        py = _operand_addresses(code, 0x1000, _Regs(dict.fromkeys(R.GPR_ORDER, 0)))  # type: ignore[arg-type]
        assert py and py[0][0] == ea.value == 0x12345678


@pytest.mark.parametrize("code", [b"\x66\x8b\x03", b"\xff\x33", b"\xa4", b"\x8d\x03", b"\xf3\xab", b"\x64\x8b\x03"])
def test_other_instructions_are_declined(code):
    """An operand-size or segment prefix, push from memory, movs, lea (no access), rep stos: Python's."""
    ea = ctypes.c_uint32()
    regs = (ctypes.c_uint32 * 8)()
    assert LIB.trapfast_tf_operand(code + bytes(15 - len(code)), ctypes.addressof(regs), ctypes.addressof(ea)) == 0
