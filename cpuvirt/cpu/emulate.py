"""Instruction emulation for MMIO: what KVM's x86 emulator does when an access hits a device.

Only the forms device drivers use on registers are emulated: `mov` between a general register (or an
immediate) and memory, and `movzx`/`movsx` loads. The memory operand is the device register at the
guest-physical address the exit reported. Anything else is `Unsupported`, named in the message.
"""
from __future__ import annotations

from capstone import CS_ARCH_X86, CS_MODE_32, Cs
from capstone.x86 import X86_OP_IMM, X86_OP_MEM, X86_OP_REG

from cpuvirt.cpu import regs as R
from cpuvirt.cpu.events import Unsupported

_cs = Cs(CS_ARCH_X86, CS_MODE_32)
_cs.detail = True

# register name -> (full register, bit shift, width in bytes)
_REGS = {}
for full, names in ((R.EAX, ("eax", "ax", "al", "ah")), (R.ECX, ("ecx", "cx", "cl", "ch")),
                    (R.EDX, ("edx", "dx", "dl", "dh")), (R.EBX, ("ebx", "bx", "bl", "bh"))):
    _REGS[names[0]], _REGS[names[1]], _REGS[names[2]], _REGS[names[3]] = (full, 0, 4), (full, 0, 2), (full, 0, 1), (full, 8, 1)
for full, n32, n16 in ((R.ESP, "esp", "sp"), (R.EBP, "ebp", "bp"), (R.ESI, "esi", "si"), (R.EDI, "edi", "di")):
    _REGS[n32], _REGS[n16] = (full, 0, 4), (full, 0, 2)


def _get(regs, name):
    full, shift, width = _REGS[name]
    return (regs.read(full) >> shift) & ((1 << 8 * width) - 1)


def _set(regs, name, value):
    full, shift, width = _REGS[name]
    mask = ((1 << 8 * width) - 1) << shift
    regs.write(full, (regs.read(full) & ~mask) | ((value << shift) & mask))


def emulate_mmio(code: bytes, eip: int, regs, gpa: int, read, write) -> tuple[int, str]:
    """Emulate the instruction at eip against device callbacks; returns (length, what was done)."""
    insn = next(_cs.disasm(code or b"", eip, 1), None)
    if insn is None:
        raise Unsupported(f"cannot decode the MMIO access at {eip:#x}")
    ops = insn.operands
    text = f"{insn.mnemonic} {insn.op_str}"
    if insn.mnemonic == "mov" and len(ops) == 2:
        dst, src = ops
        if dst.type == X86_OP_MEM and src.type in (X86_OP_REG, X86_OP_IMM):
            size = dst.size
            value = _get(regs, insn.reg_name(src.reg)) if src.type == X86_OP_REG else src.imm
            value &= (1 << 8 * size) - 1
            write(gpa, size, value)
            return insn.size, f"emulated `{text}`: wrote {value:#x} ({size} bytes) to the device"
        if dst.type == X86_OP_REG and src.type == X86_OP_MEM:
            value = read(gpa, src.size)
            _set(regs, insn.reg_name(dst.reg), value)
            return insn.size, f"emulated `{text}`: read {value:#x} ({src.size} bytes) from the device"
    if insn.mnemonic in ("movzx", "movsx") and len(ops) == 2 and ops[1].type == X86_OP_MEM:
        size = ops[1].size
        value = read(gpa, size)
        if insn.mnemonic == "movsx" and value >> (8 * size - 1):
            value -= 1 << 8 * size
        _set(regs, insn.reg_name(ops[0].reg), value & 0xFFFFFFFF)
        return insn.size, f"emulated `{text}`: read {value & 0xFFFFFFFF:#x} from the device"
    raise Unsupported(f"MMIO access by `{text}` at {eip:#x}: only mov/movzx/movsx are emulated")
