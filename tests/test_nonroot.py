"""hw's processor side (cpuvirt/modes/hw/nonroot.py) and the typed operand decoder it uses
(cpuvirt/x86/sysreg.py): every sensitive instruction the intercept hook hands the processor has its
entry in the table, and the operands of MOV CR/DR, SMSW and LMSW come out of capstone's detail mode
as the exit qualification needs them (SDM Vol. 3C 27.2.1, tables 27-3 and 27-4)."""
from __future__ import annotations

import pytest

from cpuvirt.cpu.vcpu import IO_INSTRUCTIONS
from cpuvirt.modes.hw import exits as E
from cpuvirt.modes.hw.nonroot import INSTRUCTION_EXITS, INSTRUCTION_HANDLERS, SENSITIVE, by_controls
from cpuvirt.x86.sysreg import MovSystemRegister, mov_system_register, msw_operand


def test_every_sensitive_instruction_has_a_handler():
    """The intercept hook watches SENSITIVE; what is not port I/O (the I/O gate's) must be in the table,
    or the processor would let it run as if VMX did not exist."""
    assert SENSITIVE - IO_INSTRUCTIONS == set(INSTRUCTION_HANDLERS)
    assert {m for m, h in INSTRUCTION_HANDLERS.items() if h is by_controls} == set(INSTRUCTION_EXITS)
    for m in (*E.GDTR_IDTR_INSTRUCTIONS, *E.LDTR_TR_INSTRUCTIONS):
        assert INSTRUCTION_HANDLERS[m].__name__ == "descriptor_table"


@pytest.mark.parametrize("code, want", [
    (b"\x0f\x22\xc0", MovSystemRegister(False, 0, True, 0)),     # mov cr0, eax
    (b"\x0f\x22\xe3", MovSystemRegister(False, 4, True, 3)),     # mov cr4, ebx
    (b"\x0f\x20\xd9", MovSystemRegister(False, 3, False, 1)),    # mov ecx, cr3
    (b"\x0f\x20\xd7", MovSystemRegister(False, 2, False, 7)),    # mov edi, cr2
    (b"\x0f\x23\xfe", MovSystemRegister(True, 7, True, 6)),      # mov dr7, esi
    (b"\x0f\x21\xc5", MovSystemRegister(True, 0, False, 5)),     # mov ebp, dr0
])
def test_mov_to_and_from_system_registers(code, want):
    assert mov_system_register(code) == want


def test_not_a_system_register_move():
    assert mov_system_register(b"\x89\xc3") is None             # mov ebx, eax
    assert mov_system_register(b"") is None


@pytest.mark.parametrize("code, want", [
    (b"\x0f\x01\xe0", (False, 0)),          # smsw eax
    (b"\x66\x0f\x01\xe2", (False, 2)),      # smsw dx: the same register as edx
    (b"\x0f\x01\x20", (True, None)),        # smsw word ptr [eax]
    (b"\x0f\x01\xf3", (False, 3)),          # lmsw bx
    (b"\x0f\x01\x33", (True, None)),        # lmsw word ptr [ebx]
])
def test_msw_operand(code, want):
    assert msw_operand(code) == want
