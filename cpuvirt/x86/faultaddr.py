"""The exact linear address of a page fault, for CR2.

Unicorn tells the TLB-fill hook only the page of a refused access. The CPU reports the exact
linear address (SDM Vol. 3A 4.7), so on that (rare) path the faulting instruction is decoded and
the addresses it touches are computed from its operands and the registers; the one on the faulting
page is the answer. An access that straddles into the faulting page faults at that page's first byte.
"""

from __future__ import annotations

from capstone import CS_ARCH_X86, CS_MODE_32, Cs
from capstone.x86 import X86_OP_MEM, X86_REG_INVALID

from cpuvirt import limits
from cpuvirt.engine import regs as R

_cs = None
_CS_REG: dict[int, int] = {}


def capstone_gprs() -> dict[int, int]:
    """capstone's ids of the eight 32-bit general registers -> the engine's (engine/regs.py), for reading
    a decoded operand's base and index (capstone's constants are loaded on first use)."""
    if not _CS_REG:
        from capstone import x86_const as C

        _CS_REG.update(
            {
                C.X86_REG_EAX: R.EAX,
                C.X86_REG_ECX: R.ECX,
                C.X86_REG_EDX: R.EDX,
                C.X86_REG_EBX: R.EBX,
                C.X86_REG_ESP: R.ESP,
                C.X86_REG_EBP: R.EBP,
                C.X86_REG_ESI: R.ESI,
                C.X86_REG_EDI: R.EDI,
            }
        )
    return _CS_REG


def _decoder():
    global _cs
    if _cs is None:
        _cs = Cs(CS_ARCH_X86, CS_MODE_32)
        _cs.detail = True
        capstone_gprs()
    return _cs


_forms: dict[tuple[int, bytes], list] = {}


def _memory_operands(code: bytes, eip: int) -> list:
    """[(base reg, index reg, scale, disp, size)] of the instruction, decoded once per site."""
    key = (eip, code)
    forms = _forms.get(key)
    if forms is None:
        forms = []
        insn = next(_decoder().disasm(code, eip, 1), None)
        for op in insn.operands if insn is not None else ():
            if op.type == X86_OP_MEM:
                m = op.mem
                forms.append(
                    (
                        _CS_REG.get(m.base) if m.base != X86_REG_INVALID else None,
                        _CS_REG.get(m.index) if m.index != X86_REG_INVALID else None,
                        m.scale,
                        m.disp,
                        op.size or 4,
                    )
                )
        if len(_forms) > 4096:
            _forms.clear()
        limits.put(_forms, key, forms)
    return forms


def _operand_addresses(code: bytes, eip: int, regs: R.Regs) -> list[tuple[int, int]]:
    """[(linear address, size)] of the instruction's explicit memory operands (flat segments)."""
    out = []
    for base, index, scale, disp, size in _memory_operands(code, eip):
        ea = disp
        if base is not None:
            ea += regs.read(base)
        if index is not None:
            ea += regs.read(index) * scale
        out.append((ea & 0xFFFFFFFF, size))
    return out


def fault_address(code: bytes | None, eip: int, page: int, regs: R.Regs) -> int:
    if not code:
        return page
    candidates = _operand_addresses(code, eip, regs)
    esp = regs.read(R.ESP)
    # Implicit accesses: the stack (push/pop/call/ret/iret/pushad, event frames) and string operands.
    candidates += [((esp - d) & 0xFFFFFFFF, 4) for d in (4, 8, 12, 16, 20, 24, 28, 32, 2)]
    candidates += [(esp, 4), (regs.read(R.ESI), 4), (regs.read(R.EDI), 4)]
    for ea, _size in candidates:
        if ea & ~0xFFF & 0xFFFFFFFF == page:
            return ea
    for ea, size in candidates:
        if ea & ~0xFFF & 0xFFFFFFFF != page and ((ea + size - 1) & ~0xFFF & 0xFFFFFFFF) == page:
            return page
    return page


def operand_address(code: bytes | None, eip: int, regs: R.Regs) -> int | None:
    """The linear address of the instruction's first memory operand (flat segments), or None."""
    operands = _operand_addresses(code, eip, regs) if code else []
    return operands[0][0] if operands else None
