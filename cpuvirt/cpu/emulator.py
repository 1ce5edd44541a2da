"""The instruction emulator: one guest instruction carried out by the hypervisor (KVM's emulate.c role).

Used where the hardware stops an instruction half-way and the hypervisor must finish it: an access
to a device register under hw (an EPT violation on an MMIO page) or to unassigned guest-physical
memory. The instruction is decoded once per site with capstone's detail mode; its typed operands
(register, immediate, memory) select an entry of `FORMS`, a table from capstone instruction id to
the function that carries it out. Memory operands go through `mem` (read/write/probe of guest-linear
addresses, which reach RAM, device registers or unbacked memory as the guest's own accesses would,
and raise the guest's #PF); nothing is written before every written operand has been translated.

16-bit code (real mode, virtual-8086 mode, a code segment with D = 0) is decoded as such (capstone's
16-bit mode): its default operand and address sizes are 16 bits and the 0x66/0x67 prefixes select
32. An address is the effective address (base + index * scale + displacement, truncated to the
address size: 16-bit offsets wrap at 64 KiB, SDM Vol. 1 3.7.5) plus the base of its segment: the
override prefix, else SS for a BP/SP base, else DS; string instructions read DS:(E)SI (overridable)
and write ES:(E)DI, and count in CX or ECX by the address size. Segment bases come from `segs`
(the engine's hidden segment caches); without it the segments are flat and FS/GS are refused.

What is emulated (the forms a driver or kvm-unit-tests' `emulator` test uses on device memory):
mov, movzx, movsx, the 16-byte SSE moves (movdqu/movdqa/movups/movaps/movupd/movapd), add/or/adc/
sbb/and/sub/xor/cmp/test, inc/dec/not/neg, xchg, cmpxchg, xadd, bt/bts/btr/btc, bsf/bsr, imul (two
and three operands), shld/shrd, the string instructions movs/stos/lods/cmps/scas/ins/outs with or
without rep (at most REP_CHUNK iterations per call; the rest on re-execution, as KVM does), smsw and
ltr with a memory operand. The flags the SDM defines are exact; of the undefined ones, AF after a
logic operation is cleared as the engine clears it, the others (after bt, bsf/bsr, imul, shld/shrd)
are computed as the table's functions say, not checked against the engine. tests/test_emulator.py
runs every form against Unicorn executing it on RAM, in 32-bit protected mode and in real mode.
Anything else raises `Unsupported` naming the instruction ("by `TEXT` at EIP: why").
"""

from __future__ import annotations

from typing import Callable

from capstone import CS_ARCH_X86, CS_MODE_16, CS_MODE_32, Cs
from capstone import x86_const as C
from capstone.x86 import X86_OP_IMM, X86_OP_MEM, X86_OP_REG
from unicorn import x86_const as U

from cpuvirt import limits
from cpuvirt.engine import regs as R
from cpuvirt.status import Unsupported
from cpuvirt.x86.flags import EFLAGS_DF

REP_CHUNK = 1024  # iterations of a rep string instruction per call
CF, PF, AF, ZF, SF, OF = 0x1, 0x4, 0x10, 0x40, 0x80, 0x800
STATUS = CF | PF | AF | ZF | SF | OF
DF = EFLAGS_DF

_cs = Cs(CS_ARCH_X86, CS_MODE_32)
_cs.detail = True
_cs16 = Cs(CS_ARCH_X86, CS_MODE_16)
_cs16.detail = True

# capstone register -> (Unicorn full register, bit shift, width in bytes)
_REG = {}
for _full, _names in ((R.EAX, "A"), (R.ECX, "C"), (R.EDX, "D"), (R.EBX, "B")):
    _REG[getattr(C, f"X86_REG_E{_names}X")] = (_full, 0, 4)
    _REG[getattr(C, f"X86_REG_{_names}X")] = (_full, 0, 2)
    _REG[getattr(C, f"X86_REG_{_names}L")] = (_full, 0, 1)
    _REG[getattr(C, f"X86_REG_{_names}H")] = (_full, 8, 1)
for _full, _n in ((R.ESP, "SP"), (R.EBP, "BP"), (R.ESI, "SI"), (R.EDI, "DI")):
    _REG[getattr(C, f"X86_REG_E{_n}")] = (_full, 0, 4)
    _REG[getattr(C, f"X86_REG_{_n}")] = (_full, 0, 2)
for _i in range(8):
    _REG[getattr(C, f"X86_REG_XMM{_i}")] = (getattr(U, f"UC_X86_REG_XMM{_i}"), 0, 16)
_SEGMENT_OK = (C.X86_REG_INVALID, C.X86_REG_DS, C.X86_REG_ES, C.X86_REG_SS, C.X86_REG_CS)
_SEG = {
    C.X86_REG_ES: R.ES,
    C.X86_REG_CS: R.CS,
    C.X86_REG_SS: R.SS,
    C.X86_REG_DS: R.DS,
    C.X86_REG_FS: R.FS,
    C.X86_REG_GS: R.GS,
}
_SEG_PREFIX = {0x26: R.ES, 0x2E: R.CS, 0x36: R.SS, 0x3E: R.DS, 0x64: R.FS, 0x65: R.GS}
_STACK_BASES = (C.X86_REG_BP, C.X86_REG_EBP, C.X86_REG_SP, C.X86_REG_ESP)


class EmulatedFault(Exception):
    """The instruction raises an exception in the guest (vector, error code or None)."""

    def __init__(self, vector: int, error_code: int | None = None):
        super().__init__(f"vector {vector} error {error_code}")
        self.vector, self.error_code = vector, error_code


class Op:
    """A typed operand: kind 'reg' (full register, shift), 'imm' (value) or 'mem' (base, index,
    scale, disp; segment register `seg`, address size `asize` in bytes); size in bytes."""

    __slots__ = ("kind", "size", "reg", "shift", "imm", "base", "index", "scale", "disp", "seg", "asize")

    def __init__(self, kind, size, reg=None, shift=0, imm=0, base=None, index=None, scale=1, disp=0, seg=R.DS, asize=4):
        self.kind, self.size, self.reg, self.shift, self.imm = kind, size, reg, shift, imm
        self.base, self.index, self.scale, self.disp = base, index, scale, disp
        self.seg, self.asize = seg, asize


class Form:
    __slots__ = ("fn", "ops", "length", "text", "rep", "mnemonic", "asize", "src_seg", "code16")

    def __init__(self, fn, ops, length, text, rep, mnemonic, asize=4, src_seg=R.DS, code16=False):
        self.fn, self.ops, self.length, self.text, self.rep, self.mnemonic = fn, ops, length, text, rep, mnemonic
        self.asize, self.src_seg = asize, src_seg  # string instructions: address size, DS:(E)SI's segment
        self.code16 = code16  # push/pop: (E)SP's width


class Context:
    """What one emulation works on: registers, guest-linear memory, and the few machine facts some
    forms need (`io` for ins/outs: read(port, size)/write(port, size, value); `cr0()` for smsw,
    the CR0 the guest sees; `segs(register)`, the base of a segment register, None for flat ones)."""

    __slots__ = ("regs", "mem", "io", "cr0", "note", "segs")

    def __init__(self, regs, mem, io=None, cr0=None, segs=None):
        self.regs, self.mem, self.io, self.cr0, self.segs = regs, mem, io, cr0, segs
        self.note = ""  # what a move did, for the trace ("read 0x1 (4 bytes) from the device")

    # -- operands -------------------------------------------------------------------------------
    def seg_base(self, seg: int) -> int:
        return 0 if self.segs is None else self.segs(seg)

    def ea(self, op: Op) -> int:
        """The linear address of a memory operand: segment base + offset (offset wrapped to the
        address size)."""
        a = op.disp
        if op.base is not None:
            a += self.regs.read(op.base)
        if op.index is not None:
            a += self.regs.read(op.index) * op.scale
        a &= 0xFFFF if op.asize == 2 else 0xFFFFFFFF
        return (self.seg_base(op.seg) + a) & 0xFFFFFFFF

    def get(self, op: Op) -> int:
        if op.kind == "reg":
            v = self.regs.uc.reg_read(op.reg) if op.size == 16 else self.regs.read(op.reg)
            return (v >> op.shift) & ((1 << 8 * op.size) - 1)
        if op.kind == "imm":
            return op.imm & ((1 << 8 * op.size) - 1)
        return self.mem.read(self.ea(op), op.size)

    def set(self, op: Op, value: int) -> None:
        value &= (1 << 8 * op.size) - 1
        if op.kind == "mem":
            self.mem.write(self.ea(op), op.size, value)
        elif op.size == 16:
            self.regs.uc.reg_write(op.reg, value)
        elif op.size == 4:
            self.regs.write(op.reg, value)
        else:
            mask = ((1 << 8 * op.size) - 1) << op.shift
            self.regs.write(op.reg, (self.regs.read(op.reg) & ~mask) | (value << op.shift))

    def probe(self, op: Op) -> None:
        """A memory operand about to be written: translate it now (a #PF before any access)."""
        if op.kind == "mem":
            self.mem.probe(self.ea(op), op.size)

    def flags(self, set_bits: int, mask: int = STATUS) -> None:
        r = self.regs
        r.write(R.EFLAGS, (r.read(R.EFLAGS) & ~mask) | (set_bits & mask))


# -- flag arithmetic (SDM Vol. 1 3.4.3; undefined flags as the engine leaves them) -------------------
def _szp(res: int, size: int) -> int:
    f = 0 if bin(res & 0xFF).count("1") & 1 else PF
    if res == 0:
        f |= ZF
    if res >> (8 * size - 1) & 1:
        f |= SF
    return f


def _add_flags(a: int, b: int, carry: int, size: int) -> tuple[int, int]:
    bits = 8 * size
    full = a + b + carry
    res = full & ((1 << bits) - 1)
    f = _szp(res, size) | (CF if full >> bits else 0) | ((a ^ b ^ res) & AF)
    if ((a ^ res) & (b ^ res)) >> (bits - 1) & 1:
        f |= OF
    return res, f


def _sub_flags(a: int, b: int, borrow: int, size: int) -> tuple[int, int]:
    bits = 8 * size
    res = (a - b - borrow) & ((1 << bits) - 1)
    f = _szp(res, size) | (CF if a < b + borrow else 0) | ((a ^ b ^ res) & AF)
    if ((a ^ b) & (a ^ res)) >> (bits - 1) & 1:
        f |= OF
    return res, f


# -- the forms ------------------------------------------------------------------------------------------
_ALIGNED = ("movdqa", "movaps", "movapd")


def _mov(c: Context, f: Form) -> None:
    dst, src = f.ops
    if f.mnemonic in _ALIGNED:
        mem = dst if dst.kind == "mem" else src
        if c.ea(mem) & 15:
            raise EmulatedFault(13, 0)  # a 16-byte aligned move of unaligned memory: #GP(0)
    c.probe(dst)
    value = c.get(src)
    c.set(dst, value)
    if dst.kind == "mem":
        c.note = f"wrote {value:#x} ({dst.size} bytes) to the device"
    elif src.kind == "mem":
        c.note = f"read {value:#x} ({src.size} bytes) from the device"


def _movx(c: Context, f: Form) -> None:
    dst, src = f.ops
    v = c.get(src)
    if f.mnemonic == "movsx" and v >> (8 * src.size - 1):
        v -= 1 << 8 * src.size
    c.set(dst, v)
    c.note = f"read {v & 0xFFFFFFFF:#x} from the device"


_ALU = {"add", "or", "adc", "sbb", "and", "sub", "xor", "cmp", "test"}


def _alu(c: Context, f: Form) -> None:
    dst, src = f.ops
    m = f.mnemonic
    writes = m not in ("cmp", "test")
    if writes:
        c.probe(dst)
    a, b, size = c.get(dst), c.get(src), dst.size
    cf = c.regs.read(R.EFLAGS) & CF
    if m in ("add", "adc"):
        res, fl = _add_flags(a, b, cf if m == "adc" else 0, size)
    elif m in ("sub", "sbb", "cmp"):
        res, fl = _sub_flags(a, b, cf if m == "sbb" else 0, size)
    else:
        res = a | b if m == "or" else a ^ b if m == "xor" else a & b
        fl = _szp(res, size)  # CF = OF = 0; AF undefined: 0 as the engine leaves it
    c.flags(fl)
    if writes:
        c.set(dst, res)


def _incdec(c: Context, f: Form) -> None:
    (dst,) = f.ops
    c.probe(dst)
    a = c.get(dst)
    if f.mnemonic == "inc":
        res, fl = _add_flags(a, 1, 0, dst.size)
    else:
        res, fl = _sub_flags(a, 1, 0, dst.size)
    c.flags(fl, STATUS & ~CF)  # CF is not affected
    c.set(dst, res)


def _not(c: Context, f: Form) -> None:
    (dst,) = f.ops
    c.probe(dst)
    c.set(dst, ~c.get(dst))


def _neg(c: Context, f: Form) -> None:
    (dst,) = f.ops
    c.probe(dst)
    res, fl = _sub_flags(0, c.get(dst), 0, dst.size)
    c.flags(fl)
    c.set(dst, res)


def _xchg(c: Context, f: Form) -> None:
    a, b = f.ops
    c.probe(a)
    c.probe(b)
    va, vb = c.get(a), c.get(b)
    c.set(a, vb)
    c.set(b, va)


def _xadd(c: Context, f: Form) -> None:
    dst, src = f.ops
    c.probe(dst)
    a, b = c.get(dst), c.get(src)
    res, fl = _add_flags(a, b, 0, dst.size)
    c.flags(fl)
    c.set(src, a)
    c.set(dst, res)


def _stack_mask(f: Form) -> int:
    """(E)SP's width: 16 bits for 16-bit code (real mode, a 16-bit segment), else 32. The stack's
    own size is SS.B; the two agree for every stack the emulated guests use."""
    return 0xFFFF if f.code16 else 0xFFFFFFFF


def _push(c: Context, f: Form) -> None:
    """push r/m (a device register pushed, or a push onto a stack in device memory)."""
    (src,) = f.ops
    value = c.get(src)
    mask = _stack_mask(f)
    esp = c.regs.read(R.ESP)
    top = (esp - src.size) & mask
    addr = (c.seg_base(R.SS) + top) & 0xFFFFFFFF
    c.mem.probe(addr, src.size)
    c.mem.write(addr, src.size, value)
    c.regs.write(R.ESP, (esp & ~mask) | top)
    c.note = f"pushed {value:#x} ({src.size} bytes)"


def _pop(c: Context, f: Form) -> None:
    """pop r/m: ESP is incremented before a destination addressed through it is computed (SDM: POP)."""
    (dst,) = f.ops
    mask = _stack_mask(f)
    esp = c.regs.read(R.ESP)
    value = c.mem.read((c.seg_base(R.SS) + (esp & mask)) & 0xFFFFFFFF, dst.size)
    c.regs.write(R.ESP, (esp & ~mask) | ((esp + dst.size) & mask))
    try:
        c.probe(dst)
    except BaseException:
        c.regs.write(R.ESP, esp)  # a fault on the destination leaves ESP as it was
        raise
    c.set(dst, value)
    c.note = f"popped {value:#x} ({dst.size} bytes)"


_ACC = {1: Op("reg", 1, R.EAX), 2: Op("reg", 2, R.EAX), 4: Op("reg", 4, R.EAX)}


def _cmpxchg(c: Context, f: Form) -> None:
    dst, src = f.ops
    c.probe(dst)
    acc = _ACC[dst.size]
    old, a = c.get(dst), c.get(acc)
    _, fl = _sub_flags(a, old, 0, dst.size)
    c.flags(fl)
    if a == old:
        c.set(dst, c.get(src))
    else:
        c.set(dst, old)  # the processor always writes (SDM: CMPXCHG)
        c.set(acc, old)


def _bt(c: Context, f: Form) -> None:
    dst, src = f.ops
    bits = 8 * dst.size
    offset = c.get(src)
    if src.kind == "imm":
        offset %= bits
        target = dst
    elif dst.kind == "mem":
        # A register bit offset reaches outside the operand: signed, in units of the operand size.
        if offset >> (bits - 1):
            offset -= 1 << bits
        target = Op(
            "mem",
            dst.size,
            base=dst.base,
            index=dst.index,
            scale=dst.scale,
            disp=dst.disp + (offset >> (5 if bits == 32 else 4)) * dst.size,
            seg=dst.seg,
            asize=dst.asize,
        )
        offset %= bits
    else:
        offset %= bits
        target = dst
    if f.mnemonic != "bt":
        c.probe(target)
    v = c.get(target)
    bit = v >> offset & 1
    c.flags(CF if bit else 0, CF)
    if f.mnemonic == "bts":
        c.set(target, v | 1 << offset)
    elif f.mnemonic == "btr":
        c.set(target, v & ~(1 << offset))
    elif f.mnemonic == "btc":
        c.set(target, v ^ 1 << offset)


def _bsx(c: Context, f: Form) -> None:
    dst, src = f.ops
    v = c.get(src)
    if v == 0:
        c.flags(ZF, ZF)  # destination unchanged (as the engine leaves it)
        return
    c.flags(0, ZF)
    c.set(dst, (v & -v).bit_length() - 1 if f.mnemonic == "bsf" else v.bit_length() - 1)


def _signed(v: int, size: int) -> int:
    return v - (1 << 8 * size) if v >> (8 * size - 1) else v


def _imul(c: Context, f: Form) -> None:
    if len(f.ops) == 3:
        dst, a_op, b_op = f.ops
    elif len(f.ops) == 2:
        dst, b_op = f.ops
        a_op = dst
    else:
        raise Unsupported(f"by `{f.text}`: one-operand imul is not emulated")
    size = dst.size
    full = _signed(c.get(a_op), size) * _signed(c.get(b_op), size)
    res = full & ((1 << 8 * size) - 1)
    over = CF | OF if _signed(res, size) != full else 0
    c.flags(over | _szp(res, size), STATUS & ~AF)
    c.set(dst, res)


def _shxd(c: Context, f: Form) -> None:
    dst, src, cnt = f.ops
    size = dst.size
    bits = 8 * size
    count = c.get(cnt) & 0x1F
    if count == 0:
        return
    c.probe(dst)
    a, b = c.get(dst), c.get(src)
    mask = (1 << bits) - 1
    if f.mnemonic == "shld":
        wide = (a << bits | b) << count
        res = (wide >> bits) & mask
        carry = (wide >> (2 * bits)) & 1 if count <= bits else 0
    else:
        wide = (b << bits | a) >> count
        res = wide & mask
        carry = ((b << bits | a) >> (count - 1)) & 1
    fl = _szp(res, size) | (CF if carry else 0)
    if (res ^ a) >> (bits - 1) & 1:
        fl |= OF
    c.flags(fl, STATUS & ~AF)
    c.set(dst, res)


def _smsw(c: Context, f: Form) -> None:
    (dst,) = f.ops
    if c.cr0 is None:
        raise Unsupported(f"by `{f.text}`: no CR0 view for smsw")
    c.probe(dst)
    c.set(dst, c.cr0() & 0xFFFF)


def _ltr(c: Context, f: Form) -> None:
    """LTR r/m16 (SDM): an available 32- or 16-bit TSS descriptor in the GDT; marked busy."""
    (src,) = f.ops
    sel = c.get(src) & 0xFFFF
    regs = c.regs
    if regs.read(R.CS) & 3:
        raise EmulatedFault(13, 0)
    if not sel & ~3:
        raise EmulatedFault(13, 0)
    if sel & 4:
        raise EmulatedFault(13, sel & ~3)
    _, gdt_base, gdt_limit, _ = regs.uc.reg_read(R.GDTR)
    if (sel | 7) > gdt_limit:
        raise EmulatedFault(13, sel & ~3)
    at = (gdt_base + (sel & ~7)) & 0xFFFFFFFF
    lo, hi = c.mem.read(at, 4), c.mem.read(at + 4, 4)
    if hi & (1 << 12) or (hi >> 8) & 0xF not in (1, 9):
        raise EmulatedFault(13, sel & ~3)
    if not hi & 0x8000:
        raise EmulatedFault(11, sel & ~3)
    c.mem.write(at + 4, 4, hi | 2 << 8)
    base = (lo >> 16) | ((hi & 0xFF) << 16) | (hi & 0xFF000000)
    limit = (lo & 0xFFFF) | (hi & 0xF0000)
    if hi & (1 << 23):
        limit = (limit << 12) | 0xFFF
    regs.uc.reg_write(R.TR, (sel, base, limit, ((hi | 2 << 8) >> 8) & 0xF0FF))


# -- string instructions -----------------------------------------------------------------------------
def _string(c: Context, f: Form) -> bool:
    """One string instruction, or up to REP_CHUNK iterations of its rep form. False: not finished."""
    m = f.mnemonic[:-1]
    regs = c.regs
    size = next(o.size for o in f.ops if o.kind == "mem")
    step = -size if regs.read(R.EFLAGS) & DF else size
    rep = f.rep
    amask = 0xFFFF if f.asize == 2 else 0xFFFFFFFF  # (E)SI, (E)DI, (E)CX by the address size
    src_base, dst_base = c.seg_base(f.src_seg), c.seg_base(R.ES)
    n = 0
    while True:
        if rep:
            count = regs.read(R.ECX) & amask
            if count == 0:
                return True
            if n == REP_CHUNK:
                return False
        rsi, rdi = regs.read(R.ESI), regs.read(R.EDI)
        esi, edi = (src_base + (rsi & amask)) & 0xFFFFFFFF, (dst_base + (rdi & amask)) & 0xFFFFFFFF
        if m == "movs":
            c.mem.probe(edi, size)
            c.mem.write(edi, size, c.mem.read(esi, size))
        elif m == "stos":
            c.mem.write(edi, size, c.get(_ACC[size]))
        elif m == "lods":
            c.set(_ACC[size], c.mem.read(esi, size))
        elif m == "cmps":
            a, b = c.mem.read(esi, size), c.mem.read(edi, size)
            c.flags(_sub_flags(a, b, 0, size)[1])
        elif m == "scas":
            c.flags(_sub_flags(c.get(_ACC[size]), c.mem.read(edi, size), 0, size)[1])
        elif m == "ins":
            if c.io is None:
                raise Unsupported(f"by `{f.text}`: no port bus")
            c.mem.probe(edi, size)
            c.mem.write(edi, size, c.io.read(regs.read(R.EDX) & 0xFFFF, size))
        elif m == "outs":
            if c.io is None:
                raise Unsupported(f"by `{f.text}`: no port bus")
            c.io.write(regs.read(R.EDX) & 0xFFFF, size, c.mem.read(esi, size))
        if m in ("movs", "lods", "cmps", "outs"):
            regs.write(R.ESI, (rsi & ~amask) | ((rsi + step) & amask))
        if m in ("movs", "stos", "cmps", "scas", "ins"):
            regs.write(R.EDI, (rdi & ~amask) | ((rdi + step) & amask))
        n += 1
        if not rep:
            return True
        regs.write(R.ECX, (regs.read(R.ECX) & ~amask) | ((count - 1) & amask))
        if m in ("cmps", "scas"):
            zf = regs.read(R.EFLAGS) & ZF
            if (rep == 0xF3 and not zf) or (rep == 0xF2 and zf):
                return True


_STRING = ("movs", "stos", "lods", "cmps", "scas", "ins", "outs")
_SSE_MOVES = ("movdqu", "movdqa", "movups", "movaps", "movupd", "movapd")

# capstone instruction id -> (mnemonic, emulator); _string alone returns whether the rep finished.
FORMS: dict[int, tuple[str, Callable[[Context, Form], object]]] = {}
for _name, _fn in (
    ("mov", _mov),
    ("movzx", _movx),
    ("movsx", _movx),
    ("inc", _incdec),
    ("dec", _incdec),
    ("not", _not),
    ("neg", _neg),
    ("xchg", _xchg),
    ("xadd", _xadd),
    ("cmpxchg", _cmpxchg),
    ("bt", _bt),
    ("bts", _bt),
    ("btr", _bt),
    ("btc", _bt),
    ("bsf", _bsx),
    ("bsr", _bsx),
    ("imul", _imul),
    ("shld", _shxd),
    ("shrd", _shxd),
    ("smsw", _smsw),
    ("ltr", _ltr),
    ("push", _push),
    ("pop", _pop),
    *((n, _alu) for n in _ALU),
    *((n, _mov) for n in _SSE_MOVES),
):
    FORMS[getattr(C, f"X86_INS_{_name.upper()}")] = (_name, _fn)
for _name in (
    "movsb",
    "movsw",
    "movsd",
    "stosb",
    "stosw",
    "stosd",
    "lodsb",
    "lodsw",
    "lodsd",
    "cmpsb",
    "cmpsw",
    "cmpsd",
    "scasb",
    "scasw",
    "scasd",
    "insb",
    "insw",
    "insd",
    "outsb",
    "outsw",
    "outsd",
):
    FORMS[getattr(C, f"X86_INS_{_name.upper()}")] = (_name, _string)


def _operand(insn, o, asize: int = 4, flat: bool = True) -> Op:
    if o.type == X86_OP_REG:
        r = _REG.get(o.reg)
        if r is None:
            raise Unsupported(
                f"by `{insn.mnemonic} {insn.op_str}` at {insn.address:#x}: "
                f"register {insn.reg_name(o.reg)} is not emulated"
            )
        full, shift, width = r
        return Op("reg", width, full, shift)
    if o.type == X86_OP_IMM:
        return Op("imm", o.size or 4, imm=o.imm)
    if o.type == X86_OP_MEM:
        mem = o.mem
        if flat and mem.segment not in _SEGMENT_OK:
            raise Unsupported(
                f"by `{insn.mnemonic} {insn.op_str}` at {insn.address:#x}: "
                f"segment override {insn.reg_name(mem.segment)} is not emulated"
            )
        base = _REG[mem.base][0] if mem.base != C.X86_REG_INVALID else None
        index = _REG[mem.index][0] if mem.index != C.X86_REG_INVALID else None
        seg = _SEG_PREFIX.get(insn.prefix[1])
        if seg is None:
            seg = _SEG.get(mem.segment) or (R.SS if mem.base in _STACK_BASES else R.DS)
        return Op("mem", o.size or 4, base=base, index=index, scale=mem.scale, disp=mem.disp, seg=seg, asize=asize)
    raise Unsupported(f"by `{insn.mnemonic} {insn.op_str}` at {insn.address:#x}: operand type {o.type} is not emulated")


def memory_operand(insn, o, code16: bool) -> Op:
    """Operand `o` of capstone's `insn` (a memory operand) as the CPU addresses it in 16-bit code or not:
    its registers, the address size the mode and a 0x67 prefix give, its segment (an override, else SS for
    a stack base, else DS). `Context.ea` gives its linear address. Unsupported for a register not modelled."""
    asize = 4 if code16 == (insn.prefix[3] == 0x67) else 2
    return _operand(insn, o, asize, flat=False)


_forms: dict = {}


def decode(code: bytes, eip: int, code16: bool = False, flat: bool = True) -> Form:
    """The form of the instruction at eip (cached per site, bytes and mode), or Unsupported.
    `code16`: 16-bit code (default operand and address size 16); `flat`: no segment bases known
    (FS/GS overrides refused)."""
    key = (eip, code, code16, flat)
    form = _forms.get(key)
    if form is not None:
        return form
    insn = next((_cs16 if code16 else _cs).disasm(code or b"", eip, 1), None)
    if insn is None:
        raise Unsupported(f"at {eip:#x}: cannot decode the instruction")
    text = f"{insn.mnemonic} {insn.op_str}".strip()
    entry = FORMS.get(insn.id)
    if entry is None:
        raise Unsupported(f"by `{text}` at {eip:#x}: not an emulated instruction form")
    asize = 4 if code16 == (insn.prefix[3] == 0x67) else 2  # 0x67 flips the default address size
    name, fn = entry
    ops = [_operand(insn, o, asize, flat) for o in insn.operands]
    if fn is _string and any(o.kind == "reg" and o.size == 16 for o in ops):
        raise Unsupported(f"by `{text}` at {eip:#x}: not an emulated instruction form")  # SSE movsd/cmpsd
    rep = insn.prefix[0] if insn.prefix[0] in (0xF2, 0xF3) and fn is _string else 0
    src_seg = _SEG_PREFIX.get(insn.prefix[1], R.DS)
    if flat and src_seg in (R.FS, R.GS):
        raise Unsupported(f"by `{text}` at {eip:#x}: segment override is not emulated")
    form = Form(fn, ops, insn.size, text, rep, name, asize, src_seg, code16)
    if len(_forms) > 4096:
        _forms.clear()
    limits.put(_forms, key, form)  # a guest can make any number of sites: capped
    return form


def emulate(code: bytes, eip: int, ctx: Context, code16: bool = False) -> tuple[int, bool, str]:
    """Carry out the instruction at eip. Returns (length, finished, what was done): not finished
    means a rep string instruction did REP_CHUNK iterations and must run again from eip (registers
    updated). Raises EmulatedFault, the memory accessor's page fault, or Unsupported (nothing was
    changed then, except by completed rep iterations)."""
    form = decode(code, eip, code16, ctx.segs is None)
    ctx.note = ""
    if form.fn is _string:
        done = _string(ctx, form)
        return form.length, done, f"emulated `{form.text}`" if done else f"emulated part of `{form.text}`"
    form.fn(ctx, form)
    return form.length, True, f"emulated `{form.text}`" + (f": {ctx.note}" if ctx.note else "")
