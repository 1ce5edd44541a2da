"""The firmware's real-mode IVT (machine/ivt.py): the table at 0 and its handlers, run in a real-mode
engine. An IRQ vector acknowledges the right 8259(s) and returns with every register as it was; any
other vector returns at once."""
from __future__ import annotations

import struct

import pytest
from unicorn import UC_ARCH_X86, UC_HOOK_INSN, UC_HOOK_INTR, UC_MODE_16, Uc
from unicorn import x86_const as U

from cpuvirt.machine.ivt import ivt_blobs

STACK_SEG, SP = 0x7000, 0xFFF0
CALLER = 0x0500                      # `int N; hlt` at 0000:0500


def _run(vector):
    uc = Uc(UC_ARCH_X86, UC_MODE_16)
    uc.mem_map(0, 0x100000)
    for gpa, blob in ivt_blobs():
        uc.mem_write(gpa, blob)
    uc.mem_write(CALLER, bytes((0xCD, vector, 0xF4)))
    uc.reg_write(U.UC_X86_REG_SS, STACK_SEG)
    uc.reg_write(U.UC_X86_REG_SP, SP)
    uc.reg_write(U.UC_X86_REG_EAX, 0x12345678)
    outs = []
    uc.hook_add(UC_HOOK_INSN, lambda uc, port, size, value, _: outs.append((port, value)), None, 1, 0,
                U.UC_X86_INS_OUT)

    def intr(uc, intno, _):              # the engine leaves real-mode delivery to its user: do it
        sp = uc.reg_read(U.UC_X86_REG_SP) - 6
        uc.mem_write((STACK_SEG << 4) + sp, struct.pack("<HHH", uc.reg_read(U.UC_X86_REG_IP), 0, 0x2))
        uc.reg_write(U.UC_X86_REG_SP, sp)
        off, seg = struct.unpack("<HH", uc.mem_read(intno * 4, 4))
        uc.reg_write(U.UC_X86_REG_CS, seg)
        uc.reg_write(U.UC_X86_REG_IP, off)
    uc.hook_add(UC_HOOK_INTR, intr)
    uc.emu_start(CALLER, CALLER + 2, count=20)
    return uc, outs


@pytest.mark.parametrize("vector,eois", [(0x08, [(0x20, 0x20)]), (0x0F, [(0x20, 0x20)]),
                                         (0x70, [(0xA0, 0x20), (0x20, 0x20)]), (0x77, [(0xA0, 0x20), (0x20, 0x20)]),
                                         (0x00, []), (0x10, []), (0x42, []), (0xFF, [])])
def test_each_vector_returns_having_acknowledged_its_8259(vector, eois):
    uc, outs = _run(vector)
    assert outs == eois
    assert (uc.reg_read(U.UC_X86_REG_CS), uc.reg_read(U.UC_X86_REG_IP)) == (0, CALLER + 2)   # back after `int`
    assert uc.reg_read(U.UC_X86_REG_SP) == SP and uc.reg_read(U.UC_X86_REG_EAX) == 0x12345678


def test_the_table_points_into_the_bios_segment():
    table = dict(ivt_blobs())[0]
    assert len(table) == 1024
    entries = struct.unpack("<512H", table)
    assert all(seg == 0xF000 for seg in entries[1::2])
