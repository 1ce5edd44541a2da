"""#GP(0) for legacy-SSE instructions whose m128 operand is not 16-byte aligned (cpu/ssealign.py).

Unicorn 2.1.3 checks no SSE alignment: before cpu/ssealign.py tests/guests/sse_align.S got no #GP
at all (13 of its 15 checks failed in every mode). The check runs in C on every execution of every
such site (the Python side sees only a misaligned operand), under full on the translation cache's
copy of the instruction.
"""
from __future__ import annotations

import subprocess

import pytest

from cpuvirt.cpu.ssealign import is_aligned_sse, misaligned_operand, operand_form
from cpuvirt.runner import run_guest
from cpuvirt.toolchain.assemble import new_keystone
from tests.conftest import requires_qemu

MODES = ("native", "hw", "trap", "full")


@pytest.fixture(scope="module")
def sse_align(test_guest):
    return str(test_guest("sse_align"))


@pytest.mark.parametrize("mode", MODES)
def test_misaligned_m128_operand_raises_gp(sse_align, mode):
    seen = {}
    r = run_guest(sse_align, mode, max_insns=5_000_000, on_start=lambda hv: seen.setdefault("hv", hv))
    console = r.console.decode()
    assert "FAIL" not in console and console.count("PASS") == 19, console
    assert (r.outcome, r.status) == ("exit", 0), r.message
    sse = seen["hv"].vcpu.intercepts.sse
    # the aligned executions (1000 of them in one loop) were passed in C, never by Python
    assert sse is not None and sse.passed >= 1000, (sse.checks, sse.passed)
    assert sse.checks - sse.passed <= 12, (sse.checks, sse.passed)


def _decode(asm: str):
    from capstone import CS_ARCH_X86, CS_MODE_32, Cs
    code = bytes(new_keystone().asm(asm)[0])
    insn = next(Cs(CS_ARCH_X86, CS_MODE_32).disasm_lite(code, 0, 1))
    return code, insn[2], insn[3]


@pytest.mark.parametrize("asm, aligned", [
    ("movaps xmm0, xmmword ptr [eax]", True), ("movaps xmmword ptr [eax], xmm1", True),
    ("movapd xmm0, xmmword ptr [eax]", True), ("movdqa xmm0, xmmword ptr [eax]", True),
    ("movdqa xmmword ptr [eax], xmm0", True), ("movntps xmmword ptr [eax], xmm0", True),
    ("movntdq xmmword ptr [eax], xmm0", True), ("addps xmm0, xmmword ptr [eax]", True),
    ("pxor xmm0, xmmword ptr [eax]", True), ("pshufd xmm0, xmmword ptr [eax], 1", True),
    ("cvtps2dq xmm0, xmmword ptr [eax]", True), ("unpcklps xmm0, xmmword ptr [eax]", True),
    ("movups xmm0, xmmword ptr [eax]", False), ("movupd xmm0, xmmword ptr [eax]", False),
    ("movdqu xmm0, xmmword ptr [eax]", False), ("lddqu xmm0, xmmword ptr [eax]", False),
    ("movss xmm0, dword ptr [eax]", False), ("addss xmm0, dword ptr [eax]", False),
    ("movsd xmm0, qword ptr [eax]", False), ("cvtps2pd xmm0, qword ptr [eax]", False),
    ("movlps xmm0, qword ptr [eax]", False), ("movaps xmm0, xmm1", False), ("addps xmm0, xmm1", False),
])
def test_which_instructions_require_alignment(asm, aligned):
    """SDM Vol. 2A 2.4: m128 operands of legacy SSE must be aligned but for the unaligned moves;
    scalar and 64-bit-operand forms, and register operands, have no requirement."""
    code, mnem, ops = _decode(asm)
    assert is_aligned_sse(mnem, ops) == aligned
    assert (operand_form(code) is not None) == aligned


class _Regs:
    def __init__(self, **values):
        from cpuvirt.engine import regs as R
        self.v = {getattr(R, k.upper()): v for k, v in values.items()}

    def read(self, reg):
        return self.v.get(reg, 0)


def test_linear_address_counts_segment_base_and_sib():
    from cpuvirt.engine import regs as R
    code, _, _ = _decode("pxor xmm0, xmmword ptr fs:[ebx + ecx*4 + 16]")
    bases = {R.FS: 8}
    assert misaligned_operand(code, True, _Regs(ebx=0x1000, ecx=2), bases.get) is None      # 0x1000+8+16+8
    assert misaligned_operand(code, True, _Regs(ebx=0x1000, ecx=1), bases.get) == 0x101C
    code, _, _ = _decode("movaps xmm0, xmmword ptr [ebp - 8]")                             # SS by default
    assert misaligned_operand(code, True, _Regs(ebp=0x2008), {R.SS: 0, R.DS: 8}.get) is None
    assert misaligned_operand(code, True, _Regs(ebp=0x2008), {R.SS: 8, R.DS: 0}.get) == 0x2008


def test_16_bit_addressing():
    """Real-address mode: [bx + si] wraps at 64 KiB, the segment base is selector * 16."""
    from cpuvirt.engine import regs as R
    code = bytes.fromhex("0f2800")          # movaps xmm0, [bx + si] in 16-bit code
    assert misaligned_operand(code, False, _Regs(ebx=0xFFF8, esi=0x10), {R.DS: 0x10}.get) == 0x18
    assert misaligned_operand(code, False, _Regs(ebx=0xFFF0, esi=0x10), {R.DS: 0x10}.get) is None


@requires_qemu
def test_qemu_prints_the_same(sse_align):
    """QEMU 7.2 TCG raises these #GPs: the guest's lines are the reference's."""
    p = subprocess.run(["qemu-system-i386", "-nodefaults", "-nographic", "-monitor", "none", "-serial", "stdio",
                        "-no-reboot", "-m", "32", "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
                        "-fw_cfg", "name=etc/sercon-port,string=0", "-kernel", sse_align],
                       stdin=subprocess.DEVNULL, capture_output=True, timeout=60, check=False)
    ours = run_guest(sse_align, "native", max_insns=5_000_000).console
    assert p.returncode == 1 and p.stdout == ours
