"""The interrupt shadow (SDM 6.8.3): after sti, the next instruction runs before a pending interrupt.

A pending external interrupt waits while IF = 0; the vCPU polls every POLL_INSNS instructions. With
the right number of nops before sti, the poll stop lands right after sti: the interrupt must still wait
for `mov [FLAG], 1`, so the handler sees the flag set. The right number is found with the shadow
switched off (then, and only then, the handler sees the flag clear), so the test cannot pass vacuously.
"""
import struct

import pytest

from cpuvirt.cpu import regs as R
from cpuvirt.cpu.vcpu import POLL_INSNS
from cpuvirt.machine.machine import Machine
from cpuvirt.modes import get_mode

CODE, IDT, HANDLER, FLAG, SEEN = 0x100000, 0x8000, 0x9000, 0x5000, 0x5004


def run(mode: str, monkeypatch=None, shadow=True, nops: int = POLL_INSNS - 1):
    m = Machine(4)
    hv = get_mode(mode)(m)
    m.debug_exit.on_exit = lambda value: hv.vcpu.finish("exit", value)
    if not shadow:
        monkeypatch.setattr(type(hv.vcpu.faults), "interrupt_shadow", lambda self: False)
    # IDT: every vector 0x08..0x0F (the PIC's BIOS vectors) to HANDLER, 32-bit interrupt gates
    idt = bytearray(256 * 8)
    for v in range(256):
        struct.pack_into("<HHBBH", idt, v * 8, HANDLER & 0xFFFF, 0x08, 0, 0x8E, HANDLER >> 16)
    m.write_gpa(IDT, bytes(idt))
    # handler: record FLAG, then stop the machine through isa-debug-exit
    m.write_gpa(HANDLER, bytes.fromhex("a1") + FLAG.to_bytes(4, "little") + bytes.fromhex("a3")
                + SEEN.to_bytes(4, "little") + bytes.fromhex("b000e6f4f4"))
    # code: nops, sti, mov dword [FLAG], 1, jmp $
    body = b"\x90" * nops + b"\xfb" + bytes.fromhex("c705") + FLAG.to_bytes(4, "little") \
        + (1).to_bytes(4, "little") + b"\xeb\xfe"
    m.write_gpa(CODE, body)
    m.set_flat_protected_mode(0x500)
    m.uc.reg_write(R.IDTR, (0, IDT, 256 * 8 - 1, 0))
    m.regs.write(R.ESP, 0x7000)
    hv.boot()
    m.pic.raise_irq(1)                    # IRQ 1 (unmasked by SeaBIOS's IMR): pending from the start
    out = hv.run(CODE)
    return out, struct.unpack("<I", m.read_gpa(SEEN, 4))[0]


@pytest.fixture(scope="module")
def nops_to_land_after_sti():
    mp = pytest.MonkeyPatch()
    try:
        for nops in range(POLL_INSNS - 4, POLL_INSNS + 2):
            out, seen = run("native", mp, shadow=False, nops=nops)
            if out.kind == "exit" and seen == 0:
                return nops
    finally:
        mp.undo()
    pytest.fail("no nop count puts the poll stop right after sti")


@pytest.mark.parametrize("mode", ["native", "hw"])
def test_interrupt_waits_for_the_instruction_after_sti(mode, nops_to_land_after_sti):
    out, seen = run(mode, nops=nops_to_land_after_sti)
    assert out.kind == "exit", out.message
    assert seen == 1
