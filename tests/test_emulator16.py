"""The instruction emulator on 16-bit code (cpu/emulator.py), against two independent models:
- Unicorn executing the same instruction in real-address mode (UC_MODE_16) with segments whose bases
  are not 0: registers, flags and memory must come out the same (operand and address sizes, the
  0x66/0x67 prefixes, default segments and overrides, 16-bit wrap-around, string instructions);
- the SDM's table of 16-bit ModR/M addressing (Vol. 2A, table 2-1), written out here, for the
  effective address and segment of every mod/rm combination."""
from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st
from unicorn import UC_ARCH_X86, UC_MODE_16, Uc

from cpuvirt.cpu.emulator import Context, decode, emulate
from cpuvirt.engine import regs as R
from cpuvirt.toolchain.assemble import new_keystone
from cpuvirt.x86.flags import EFLAGS_DF

CODE = 0x1000
MEM = 0x20000                    # every segment base + 16-bit offset lands in mapped memory
ALL = 0x8D5
SEGS = {R.DS: 0x200, R.ES: 0x340, R.SS: 0x480, R.FS: 0x5C0, R.GS: 0x700, R.CS: 0}
GPRS = (R.EAX, R.ECX, R.EDX, R.EBX, R.ESP, R.EBP, R.ESI, R.EDI)

FORMS = [
    ("mov ax, word ptr [bx + si + 4]", ALL), ("mov word ptr [bp + di - 2], cx", ALL), ("mov byte ptr [bx], 0x7f", ALL),
    ("mov eax, dword ptr [bx + 8]", ALL), ("mov dword ptr [si], edx", ALL), ("mov cl, byte ptr [bp]", ALL),
    ("mov word ptr [0x1234], ax", ALL), ("mov ax, word ptr [di + 0x7ffe]", ALL),
    ("mov dword ptr [ebx + esi*2 + 4], ecx", ALL), ("mov ax, word ptr [ebp + 2]", ALL),
    ("mov cx, word ptr fs:[si]", ALL), ("mov word ptr gs:[bx + di], dx", ALL), ("mov al, byte ptr es:[bp + 1]", ALL),
    ("mov dx, word ptr ss:[bx]", ALL), ("mov word ptr cs:[si + 0x40], ax", ALL),
    ("movzx ax, byte ptr [bx + 1]", ALL), ("movzx eax, word ptr [bp + si]", ALL), ("movsx cx, byte ptr [di]", ALL),
    *((f"{op} word ptr [bx + 2], ax", ALL) for op in ("add", "or", "adc", "sbb", "and", "sub", "xor", "cmp", "test")),
    *((f"{op} byte ptr es:[di], 0x81", ALL) for op in ("add", "or", "sub", "cmp")),
    ("add dword ptr [bp + si], eax", ALL), ("cmp word ptr [si], -3", ALL), ("inc word ptr [bx]", ALL),
    ("dec byte ptr [bp + 3]", ALL), ("neg word ptr [di]", ALL), ("not dword ptr [bx + si]", ALL),
    ("xchg word ptr [bp + 2], dx", ALL), ("xadd word ptr [bx], cx", ALL), ("cmpxchg word ptr [si], dx", ALL),
    ("bts word ptr [bx], 3", 0x1), ("bt word ptr [di], cx", 0x1),
    ("movsb", ALL), ("movsw", ALL), ("rep movsb", ALL), ("rep stosw", ALL), ("stosb", ALL), ("lodsw", ALL),
    ("cmpsb", ALL), ("repe cmpsb", ALL), ("repne scasw", ALL), ("rep movsb byte ptr es:[di], byte ptr fs:[si]", ALL),
]


class RamMemory:
    def __init__(self, uc):
        self.uc = uc

    def read(self, gva, size):
        return int.from_bytes(self.uc.mem_read(gva, size), "little")

    def write(self, gva, size, value):
        self.uc.mem_write(gva, value.to_bytes(size, "little"))

    def probe(self, gva, size):
        pass


def _machine(code, regs, mem):
    uc = Uc(UC_ARCH_X86, UC_MODE_16)
    uc.mem_map(0, MEM)
    uc.mem_write(0x2000, mem)
    uc.mem_write(CODE, code)
    for reg, sel in SEGS.items():
        if reg != R.CS:
            uc.reg_write(reg, sel)
    for reg, v in regs.items():
        uc.reg_write(reg, v)
    return uc


def _state(uc):
    return [uc.reg_read(r) for r in GPRS], bytes(uc.mem_read(0, MEM))


@settings(max_examples=300, deadline=None)
@given(form=st.sampled_from(FORMS), words=st.lists(st.integers(0, 0xFFFF), min_size=6, max_size=6),
       high=st.integers(0, 0xFFFF), count=st.integers(0, 9), flags=st.integers(0, ALL), df=st.booleans(),
       mem=st.binary(min_size=0x800, max_size=0x800))
def test_every_16bit_form_matches_unicorn_in_real_mode(form, words, high, count, flags, df, mem):
    text, defined = form
    code = bytes(new_keystone().asm(".code16; " + text, CODE)[0])
    ax, bx, si, di, bp, dx = words
    hi = high << 16            # upper halves: ignored by 16-bit addressing, kept by 16-bit writes
    regs = {R.EAX: hi | ax, R.EBX: hi | bx, R.ESI: hi | si, R.EDI: hi | di, R.EBP: hi | bp, R.EDX: hi | dx,
            R.ECX: hi | (count if text.split()[0] in ("rep", "repe", "repne") else words[0] & 0x1F),
            R.ESP: 0x7000, R.EFLAGS: 0x2 | (flags & ALL) | (EFLAGS_DF if df else 0)}
    if "e" in text.split("[")[-1].split("]")[0]:
        regs.update({R.EBX: bx, R.ESI: si & 0x3FFF, R.EBP: bp})   # 32-bit addressing: stay in memory
    ref, emu = _machine(code, regs, mem), _machine(code, regs, mem)
    ref.emu_start(CODE, CODE + len(code))
    ctx = Context(R.Regs(emu), RamMemory(emu), segs=lambda reg: emu.reg_read(reg) << 4)
    length, done, _ = emulate(code, CODE, ctx, code16=True)
    assert done and length == len(code), text
    assert _state(emu) == _state(ref), text
    assert emu.reg_read(R.EFLAGS) & defined == ref.reg_read(R.EFLAGS) & defined, text


# SDM Vol. 2A table 2-1: 16-bit addressing forms with the ModR/M byte (rm -> registers summed, and
# whether the default segment is SS: the forms with BP)
_RM16 = {0: (("bx", "si"), False), 1: (("bx", "di"), False), 2: (("bp", "si"), True), 3: (("bp", "di"), True),
         4: (("si",), False), 5: (("di",), False), 6: (("bp",), True), 7: (("bx",), False)}
_R16 = {"bx": R.EBX, "si": R.ESI, "di": R.EDI, "bp": R.EBP}


def _model(mod, rm, disp, values):
    """(offset, segment register) of mov ax, [modrm] in 16-bit code, from the SDM's table."""
    if mod == 0 and rm == 6:
        return disp & 0xFFFF, R.DS                       # disp16 alone
    regs, stack = _RM16[rm]
    off = sum(values[_R16[r]] & 0xFFFF for r in regs)
    off += 0 if mod == 0 else (disp if mod == 2 else (disp & 0xFF) - ((disp & 0x80) << 1))
    return off & 0xFFFF, R.SS if stack else R.DS


class _Regs:
    def __init__(self, values):
        self.values = values

    def read(self, reg):
        return self.values[reg]


@settings(max_examples=500, deadline=None)
@given(mod=st.integers(0, 2), rm=st.integers(0, 7), disp=st.integers(0, 0xFFFF),
       values=st.fixed_dictionaries({r: st.integers(0, 0xFFFFFFFF) for r in (R.EBX, R.ESI, R.EDI, R.EBP)}),
       override=st.sampled_from((None, 0x26, 0x2E, 0x36, 0x3E, 0x64, 0x65)))
def test_16bit_effective_addresses_follow_the_sdm_table(mod, rm, disp, values, override):
    modrm = mod << 6 | rm                                 # reg field 0: mov ax, r/m16 (8B /r)
    tail = b""
    if mod == 1:
        tail = bytes((disp & 0xFF,))
    elif mod == 2 or (mod == 0 and rm == 6):
        tail = struct.pack("<H", disp)
    code = (bytes((override,)) if override else b"") + bytes((0x8B, modrm)) + tail
    form = decode(code, 0x500 + len(code) * 16 + mod * 8 + rm, code16=True, flat=False)
    mem = next(o for o in form.ops if o.kind == "mem")
    offset, seg = _model(mod, rm, disp, values)
    if override is not None:
        seg = {0x26: R.ES, 0x2E: R.CS, 0x36: R.SS, 0x3E: R.DS, 0x64: R.FS, 0x65: R.GS}[override]
    bases = {R.DS: 0x10000, R.SS: 0x20000, R.ES: 0x30000, R.CS: 0x40000, R.FS: 0x50000, R.GS: 0x60000}
    ctx = Context(_Regs(values), None, segs=bases.__getitem__)
    assert form.length == len(code)
    assert ctx.ea(mem) == bases[seg] + offset
