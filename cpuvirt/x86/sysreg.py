"""The operands of the instructions that move system registers, decoded typed (capstone's detail mode).

MOV to/from CRn and DRn (SDM Vol. 2B "MOV—Move to/from Control Registers", "...Debug Registers"),
SMSW and LMSW (Vol. 2B): which control or debug register, which general register and in which
direction, or whether the operand is in memory. The VMX processor (modes/hw/nonroot.py) needs them
for its exit decisions and exit qualifications (SDM Vol. 3C 27.2.1, table 27-3).

General registers are given by their number in the instruction encoding (EAX 0, ECX 1, EDX 2, EBX 3,
ESP 4, EBP 5, ESI 6, EDI 7: engine/regs.py GPR_ORDER), the number the exit qualification carries.
Decoding is 32-bit: for these instructions the 16-bit decoding names the same registers (MOV CRn always
moves 32 bits; SMSW/LMSW r16 and r32 are the same register) and the same register-or-memory form.
"""

from __future__ import annotations

from typing import NamedTuple

from capstone import CS_ARCH_X86, CS_MODE_32, Cs
from capstone import x86_const as C

from cpuvirt import limits

_cs = Cs(CS_ARCH_X86, CS_MODE_32)
_cs.detail = True

# capstone register id -> encoding number, for the 32- and 16-bit general registers
_GPR_NUMBER = {
    r: n
    for n, regs in enumerate(
        (
            (C.X86_REG_EAX, C.X86_REG_AX),
            (C.X86_REG_ECX, C.X86_REG_CX),
            (C.X86_REG_EDX, C.X86_REG_DX),
            (C.X86_REG_EBX, C.X86_REG_BX),
            (C.X86_REG_ESP, C.X86_REG_SP),
            (C.X86_REG_EBP, C.X86_REG_BP),
            (C.X86_REG_ESI, C.X86_REG_SI),
            (C.X86_REG_EDI, C.X86_REG_DI),
        )
    )
    for r in regs
}
_CR_NUMBER = {getattr(C, f"X86_REG_CR{n}"): n for n in range(16)}
_DR_NUMBER = {getattr(C, f"X86_REG_DR{n}"): n for n in range(16)}


class MovSystemRegister(NamedTuple):
    """MOV to or from CRn/DRn: `debug` (DRn, else CRn), `number` (n), `to_system` (MOV to CRn/DRn:
    the general register is the source), `gpr` (the general register's number, None if it is not one)."""

    debug: bool
    number: int
    to_system: bool
    gpr: int | None


_mov_forms: dict[bytes, MovSystemRegister | None] = {}
_msw_forms: dict[bytes, tuple[bool, int | None]] = {}


def _operands(code: bytes) -> list:
    insn = next(_cs.disasm(code, 0, 1), None)
    return list(insn.operands) if insn is not None else []


def mov_system_register(code: bytes) -> MovSystemRegister | None:
    """The operands of `mov crN/drN, r32` or `mov r32, crN/drN` at the start of `code`; None when
    it is neither (a decoding that names no CR or DR)."""
    if code in _mov_forms:
        return _mov_forms[code]
    form = None
    ops = _operands(code)
    if len(ops) == 2 and ops[0].type == C.X86_OP_REG and ops[1].type == C.X86_OP_REG:
        dst, src = ops[0].reg, ops[1].reg
        for reg, other, to_system in ((dst, src, True), (src, dst, False)):
            if reg in _CR_NUMBER or reg in _DR_NUMBER:
                debug = reg in _DR_NUMBER
                form = MovSystemRegister(
                    debug, (_DR_NUMBER if debug else _CR_NUMBER)[reg], to_system, _GPR_NUMBER.get(other)
                )
                break
    limits.put(_mov_forms, code, form)
    return form


def msw_operand(code: bytes) -> tuple[bool, int | None]:
    """The operand of SMSW or LMSW at the start of `code`: (True, None) for a memory operand,
    (False, n) for general register n, (False, None) for neither (no operand decoded)."""
    form = _msw_forms.get(code)
    if form is None:
        ops = _operands(code)
        if ops and ops[0].type == C.X86_OP_MEM:
            form = (True, None)
        elif ops and ops[0].type == C.X86_OP_REG:
            form = (False, _GPR_NUMBER.get(ops[0].reg))
        else:
            form = (False, None)
        limits.put(_msw_forms, code, form)
    return form
