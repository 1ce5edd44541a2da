"""Real-address mode event delivery (cpu/events.py, SDM Vol. 3A 20.1.4): the interrupt vector table,
a three-word frame, IF/TF/AC/RF cleared. kvm-unit-tests' realmode depends on it (`int $0x11`)."""
from __future__ import annotations

import struct

from cpuvirt.cpu.events import EventDelivery
from cpuvirt.engine import regs as R
from cpuvirt.machine.machine import Machine
from cpuvirt.x86.flags import EFLAGS_IF, EFLAGS_TF


def test_an_interrupt_in_real_mode_goes_through_the_ivt():
    m = Machine(4)
    regs = m.regs
    m.uc.reg_write(R.CR0, 0x10)                         # PE = 0: real-address mode
    regs.write(R.SS, 0x100)
    regs.write(R.ESP, 0xABCD2000)                       # only SP counts in real mode
    regs.write(R.CS, 0x200)
    regs.write(R.EFLAGS, 0x2 | EFLAGS_IF | EFLAGS_TF | (1 << 18) | 0x1)
    m.uc.reg_write(R.IDTR, (0, 0, 0x3FF, 0))
    m.write_gpa(0x11 * 4, struct.pack("<HH", 0x0100, 0x1234))
    EventDelivery(m.uc, regs, m.mmu).deliver(0x11, 0x55, soft=True)
    assert (regs.read(R.CS), regs.read(R.EIP)) == (0x1234, 0x100)
    assert regs.read(R.ESP) == 0xABCD1FFA
    assert m.read_gpa(0x1000 + 0x1FFA, 6) == struct.pack("<HHH", 0x55, 0x200, 0x2 | 0x200 | 0x100 | 0x1)
    assert regs.read(R.EFLAGS) & (EFLAGS_IF | EFLAGS_TF | (1 << 18)) == 0 and regs.read(R.EFLAGS) & 1
