"""CPUID is answered in C from the model's table (engine/_cpuid.c) in every mode but hw, whose CPUID
is a VM exit answered in Python. Both must give the guest exactly what x86/cpuid.py defines."""
from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from unicorn import UC_ARCH_X86, UC_MODE_32, Uc
from unicorn import x86_const as X

from cpuvirt.cpu.vcpu import Vcpu
from cpuvirt.engine.cpuid import CpuidTable
from cpuvirt.runner import run_guest
from cpuvirt.x86 import cpuid as C

GUEST = str(Path(__file__).parent / "guests" / "cpuid.S")   # every leaf, then leaf 1 with the APIC off

_CODE = 0x1000
_engine = Uc(UC_ARCH_X86, UC_MODE_32)
_engine.mem_map(_CODE, 0x1000)
_engine.mem_write(_CODE, b"\x0f\xa2\x90")                  # cpuid; nop
_table = CpuidTable.install(_engine)
assert _table is not None, "the C cpuid hook is not built (python setup.py build_ext --inplace)"


@settings(max_examples=300, deadline=None)
@given(leaf=st.one_of(st.integers(0, 3), st.integers(0x80000000, 0x80000006), st.integers(0, 0xFFFFFFFF)),
       subleaf=st.integers(0, 0xFFFFFFFF), apic=st.booleans())
def test_the_c_hook_answers_every_leaf_as_the_model(leaf, subleaf, apic):
    _table.load(*C.table(apic_enabled=apic))
    answered = _table.answered
    _engine.reg_write(X.UC_X86_REG_EAX, leaf)
    _engine.reg_write(X.UC_X86_REG_ECX, subleaf)
    _engine.emu_start(_CODE, _CODE + 2)
    got = tuple(_engine.reg_read(r) for r in (X.UC_X86_REG_EAX, X.UC_X86_REG_EBX, X.UC_X86_REG_ECX,
                                               X.UC_X86_REG_EDX))
    assert got == C.cpuid(leaf, subleaf, apic_enabled=apic)
    assert _table.answered == answered + 1


def test_a_table_larger_than_the_hook_holds_is_refused():
    with pytest.raises(ValueError):
        _table.load({leaf: (0, 0, 0, 0) for leaf in range(17)}, (0, 0, 0, 0))


def _console(mode, monkeypatch=None, in_c=True):
    seen = []
    if monkeypatch is not None:
        monkeypatch.setattr(Vcpu, "cpuid_in_c", in_c)
    res = run_guest(GUEST, mode, 32, 10_000_000, on_start=seen.append)
    assert res.outcome == "exit" and res.status == 0, res.reason
    hv = seen[-1]
    vcpu = hv.vcpu if hasattr(hv, "vcpu") else hv
    table = getattr(vcpu, "cpuid_table", None)
    return res.console, (table.answered if table is not None else 0)


def test_c_and_python_cpuid_give_the_guest_the_same_answers(monkeypatch):
    c_console, c_answered = _console("native")
    py_console, py_answered = _console("native", monkeypatch, in_c=False)
    assert c_answered == 15 and py_answered == 0      # all 15 went through the C hook, then none
    assert c_console == py_console
    lines = c_console.decode().splitlines()
    assert lines[1] == "0x00000001: 0x00000600 0x00000000 0x00000000 0x0000a339"
    assert lines[14] == "0x00000001: 0x00000600 0x00000000 0x00000000 0x0000a139"   # APIC bit gone


def test_without_the_extension_python_answers_the_same(monkeypatch):
    """As when the extension is not built: the vCPU's Python hook answers, with the same values."""
    c_console, _ = _console("native")
    monkeypatch.setattr(CpuidTable, "install", classmethod(lambda cls, uc: None))
    assert _console("native") == (c_console, 0)


@pytest.mark.parametrize("mode", ["trap", "full", "hw"])
def test_every_mode_answers_cpuid_as_native(mode):
    assert _console(mode)[0] == _console("native")[0]
