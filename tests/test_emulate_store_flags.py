"""x86/emulate.py's emulate_store against the engine running the same instruction (an independent model:
QEMU's own flag computation): `and/or/xor [m], reg` and `[m], imm` of every size leave the same memory and
the same EFLAGS, AF included (undefined by the SDM for logic operations; the engine clears it, and a store
trap, full or hw emulates must show the guest what native shows: trapdeliv's guest had to work around it)."""
import random

from unicorn import UC_ARCH_X86, UC_MODE_32, Uc

from cpuvirt.engine import regs as R
from cpuvirt.x86.emulate import emulate_store

CODE, DATA = 0x1000, 0x2000
# (encoding without the ModRM's register, operand size): [ebx] as the memory operand
FORMS = [
    (b"\x20\x03", 1), (b"\x08\x03", 1), (b"\x30\x03", 1),              # and/or/xor [ebx], al
    (b"\x66\x21\x03", 2), (b"\x66\x09\x03", 2), (b"\x66\x31\x03", 2),  # ... [ebx], ax
    (b"\x21\x03", 4), (b"\x09\x03", 4), (b"\x31\x03", 4),              # ... [ebx], eax
    (b"\x83\x23\x5a", 4), (b"\x83\x0b\xa5", 4), (b"\x81\x33\x78\x56\x34\x12", 4),  # and/or/xor [ebx], imm
]


def _engine(seed_flags: int, eax: int, mem: int, code: bytes):
    uc = Uc(UC_ARCH_X86, UC_MODE_32)
    uc.mem_map(0, 0x10000)
    uc.mem_write(CODE, code)
    uc.mem_write(DATA, mem.to_bytes(4, "little"))
    uc.reg_write(R.EAX, eax)
    uc.reg_write(R.EBX, DATA)
    uc.reg_write(R.EFLAGS, seed_flags)
    return uc


def test_logic_stores_leave_the_flags_and_memory_the_engine_leaves():
    rng = random.Random(7)
    checked = 0
    for code, size in FORMS:
        for _ in range(40):
            flags = 0x2 | rng.choice((0, 0x10)) | rng.getrandbits(1) | rng.getrandbits(1) << 11 | rng.getrandbits(1) << 7
            eax, mem = rng.getrandbits(32), rng.getrandbits(32)
            native = _engine(flags, eax, mem, code)
            native.emu_start(CODE, CODE + len(code), count=1)
            emulated = _engine(flags, eax, mem, code)
            regs = R.Regs(emulated)

            def read(gva, n, uc=emulated):
                return int.from_bytes(uc.mem_read(gva, n), "little")

            def write(gva, n, value, uc=emulated):
                uc.mem_write(gva, value.to_bytes(n, "little"))

            length, gva, n, _value, _text = emulate_store(code, CODE, regs, read, write)
            assert (length, gva, n) == (len(code), DATA, size)
            assert emulated.mem_read(DATA, 4) == native.mem_read(DATA, 4), code.hex()
            got, want = regs.read(R.EFLAGS) & 0x8D5, native.reg_read(R.EFLAGS) & 0x8D5   # CF PF AF ZF SF OF
            assert got == want, (code.hex(), hex(flags), hex(eax), hex(mem), hex(got), hex(want))
            checked += 1
    assert checked == 40 * len(FORMS)
