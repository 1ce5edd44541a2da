"""Stores into write-traced guest pages: what KVM's emulator does for a write to a shadowed page table.

The few store forms kernels use on page tables (mov, or/and/xor, xchg, cmpxchg, stos), decoded once
per site. Instructions that touch device memory go to the general emulator, cpu/emulator.py.
"""

from __future__ import annotations

from capstone import CS_ARCH_X86, CS_MODE_32, Cs
from capstone.x86 import X86_OP_IMM, X86_OP_MEM, X86_OP_REG

from cpuvirt import limits
from cpuvirt.engine import regs as R
from cpuvirt.status import Unsupported
from cpuvirt.x86.faultaddr import _decoder, _operand_addresses
from cpuvirt.x86.flags import EFLAGS_DF

_cs = Cs(CS_ARCH_X86, CS_MODE_32)
_cs.detail = True

# register name -> (full register, bit shift, width in bytes)
_REGS = {}
for full, names in (
    (R.EAX, ("eax", "ax", "al", "ah")),
    (R.ECX, ("ecx", "cx", "cl", "ch")),
    (R.EDX, ("edx", "dx", "dl", "dh")),
    (R.EBX, ("ebx", "bx", "bl", "bh")),
):
    for name, shift, width in zip(names, (0, 0, 0, 8), (4, 2, 1, 1)):
        _REGS[name] = (full, shift, width)
for full, n32, n16 in ((R.ESP, "esp", "sp"), (R.EBP, "ebp", "bp"), (R.ESI, "esi", "si"), (R.EDI, "edi", "di")):
    _REGS[n32], _REGS[n16] = (full, 0, 4), (full, 0, 2)


def _get(regs, name):
    full, shift, width = _REGS[name]
    return (regs.read(full) >> shift) & ((1 << 8 * width) - 1)


def _set(regs, name, value):
    full, shift, width = _REGS[name]
    mask = ((1 << 8 * width) - 1) << shift
    regs.write(full, (regs.read(full) & ~mask) | ((value << shift) & mask))


# -- stores into write-protected (traced) guest pages --------------------------------------------------
_LOGIC = ("or", "and", "xor")


def _parity(v: int) -> bool:
    return bin(v & 0xFF).count("1") % 2 == 0


_store_forms: dict = {}


def _store_form(code: bytes, eip: int):
    """The decoded store at eip, once per site (capstone with details costs tens of microseconds)."""
    key = (eip, code)
    form = _store_forms.get(key)
    if form is not None:
        return form
    insn = next(_cs.disasm(code or b"", eip, 1), None)
    if insn is None:
        raise Unsupported(f"cannot decode the store at {eip:#x}")
    m, ops = insn.mnemonic, insn.operands
    text = f"{m} {insn.op_str}".strip()
    if m.startswith("lock "):
        m = m[5:]
    # A lock prefix changes nothing with one vCPU; rep forms are not emulated.
    if insn.prefix[0] in (0xF2, 0xF3):
        raise Unsupported(f"store by `{text}` at {eip:#x}: rep forms are not emulated")
    if m in ("stosb", "stosw", "stosd"):
        form = ("stos", insn.size, {"stosb": 1, "stosw": 2, "stosd": 4}[m], None, None, text)
    elif len(ops) == 2 and ops[0].type == X86_OP_MEM and m in ("mov", "xchg", "or", "and", "xor", "cmpxchg"):
        src = ops[1]
        if src.type == X86_OP_REG and insn.reg_name(src.reg) in _REGS:
            operand = ("reg", insn.reg_name(src.reg))
        elif src.type == X86_OP_IMM and m not in ("xchg", "cmpxchg"):
            operand = ("imm", src.imm)
        else:
            raise Unsupported(f"store by `{text}` at {eip:#x}: unsupported source operand")
        form = (m, insn.size, ops[0].size, operand[0], operand[1], text)
    else:
        raise Unsupported(f"store by `{text}` at {eip:#x}: not an emulated form")
    if len(_store_forms) > 4096:
        _store_forms.clear()
    limits.put(_store_forms, key, form)  # a guest can make any number of sites: capped
    return form


_GPR_INDEX = {"eax": 0, "ecx": 1, "edx": 2, "ebx": 3, "esp": 4, "ebp": 5, "esi": 6, "edi": 7}
_SITE_OPS = {"mov": 0, "or": 1, "and": 2, "xor": 3, "add": 4, "sub": 5, "inc": 6, "dec": 7}  # bt/_callout.c ST_*
_NONE = 0xFF
_sites: dict = {}


def store_site(code: bytes, eip: int) -> tuple | None:
    """The store at eip as a C path can make it without a decoder (bt/_callout.c store_t): (op, size,
    source register or 0xFF, its shift, immediate, base, index, scale, displacement), registers as
    indexes in ModRM order; None for a form only emulate_store does (xchg, cmpxchg, stos, 16-bit
    addressing, a 16-bit base or index). The same operand and address as emulate_store's and
    arith_store's (inc and dec: an immediate 1)."""
    key = (eip, code)
    if key in _sites:
        return _sites[key]
    site = None
    try:
        m, _length, size, src_kind, src, _text = _store_form(code, eip)
    except Unsupported:
        m = ""
    if m not in _SITE_OPS:
        arith = _arith_form(code, eip)
        if arith:
            m, _length, size, operand = arith
            src_kind, src = operand if operand is not None else ("imm", 1)
    insn = next(_cs.disasm(code or b"", eip, 1), None) if m in _SITE_OPS and size in (1, 2, 4) else None
    address = _address_form(insn)
    if address is not None:
        if src_kind == "reg":
            full, shift, _width = _REGS[src]
            reg, imm = R.GPR_ORDER.index(full), 0
        else:
            reg, shift, imm = _NONE, 0, src & 0xFFFFFFFF
        site = (_SITE_OPS[m], size, reg, shift, imm, *address)
    if len(_sites) > 4096:
        _sites.clear()
    limits.put(_sites, key, site)
    return site


def _address_form(insn) -> tuple[int, int, int, int] | None:
    """(base, index, scale, displacement) of the first operand, a memory operand with 32-bit registers
    (indexes in ModRM order, 0xFF: none); None otherwise."""
    if insn is None or 0x67 in insn.prefix or not insn.operands or insn.operands[0].type != X86_OP_MEM:
        return None
    mem = insn.operands[0].mem
    base = insn.reg_name(mem.base) if mem.base else None
    index = insn.reg_name(mem.index) if mem.index else None
    if (base is not None and base not in _GPR_INDEX) or (index is not None and index not in _GPR_INDEX):
        return None
    disp = ((mem.disp + (1 << 31)) & 0xFFFFFFFF) - (1 << 31)
    return (
        _NONE if base is None else _GPR_INDEX[base],
        _NONE if index is None else _GPR_INDEX[index],
        mem.scale if index is not None else 1,
        disp,
    )


def memory_site(code: bytes, eip: int) -> tuple | None:
    """An instruction's memory operand (invlpg m) in store_site's shape, for bt/_callout.c's site_address;
    None where it is not one. Decoded once per site (a site C declines is relinked at each Python serve)."""
    key = ("memory", eip, code)
    if key not in _sites:
        address = _address_form(next(_cs.disasm(code or b"", eip, 1), None))
        if len(_sites) > 4096:
            _sites.clear()
        limits.put(_sites, key, None if address is None else (0, 1, _NONE, 0, 0, *address))
    return _sites[key]


def stores(code: bytes, eip: int) -> bool:
    """Is the instruction at eip a store emulate_store or arith_store does?"""
    try:
        _store_form(code, eip)
    except Unsupported:
        return bool(_arith_form(code, eip))
    return True


def emulate_store(code: bytes, eip: int, regs, read, write) -> tuple[int, int, int, int, str]:
    """Emulate a store that hit a traced page (KVM's "emulate on write to a shadowed page").

    Forms: `mov [m], reg/imm`, `or/and/xor [m], reg/imm`, `xchg [m], reg`, `cmpxchg [m], reg` (lock
    or not), `stosb/w/d` (no rep). Segments are taken as flat, as everywhere in cpuvirt.
    `read(gva, size)` / `write(gva, size, value)` access guest-linear memory with the guest's
    rights (they may raise the hypervisor's GuestPageFault; nothing is changed then). Returns
    (instruction length, gva, size, value written, what was done); anything else is `Unsupported`.
    """
    from cpuvirt.x86.faultaddr import _operand_addresses

    m, length, size, src_kind, src, text = _store_form(code, eip)
    mask = (1 << 8 * size) - 1
    if m == "stos":
        gva = regs.read(R.EDI)
        value = regs.read(R.EAX) & mask
        write(gva, size, value)
        step = -size if regs.read(R.EFLAGS) & EFLAGS_DF else size
        regs.write(R.EDI, (gva + step) & 0xFFFFFFFF)
        return length, gva, size, value, f"emulated `{text}`"
    gva = _operand_addresses(code, eip, regs)[0][0]
    operand = (_get(regs, src) if src_kind == "reg" else src) & mask
    if m == "mov":
        write(gva, size, operand)
        return length, gva, size, operand, f"emulated `{text}`"
    if m == "xchg":
        old = read(gva, size)
        write(gva, size, operand)
        _set(regs, src, old)
        return length, gva, size, operand, f"emulated `{text}`"
    if m == "cmpxchg":
        acc_name = {1: "al", 2: "ax", 4: "eax"}[size]
        acc, old = _get(regs, acc_name), read(gva, size)
        value = operand if acc == old else old
        write(gva, size, value)  # the processor always writes (SDM: CMPXCHG)
        if acc != old:
            _set(regs, acc_name, old)
        # Flags of CMP acc, [m].
        res = (acc - old) & mask
        top = 8 * size - 1
        fl = regs.read(R.EFLAGS) & ~(0x1 | 0x4 | 0x10 | 0x40 | 0x80 | 0x800)
        fl |= (0x1 if acc < old else 0) | (0x4 if _parity(res) else 0) | (0x10 if (acc ^ old ^ res) & 0x10 else 0)
        fl |= (0x40 if res == 0 else 0) | (0x80 if res >> top & 1 else 0)
        fl |= 0x800 if ((acc ^ old) & (acc ^ res)) >> top & 1 else 0
        regs.write(R.EFLAGS, fl)
        return length, gva, size, value, f"emulated `{text}`"
    old = read(gva, size)
    value = (old | operand) if m == "or" else (old & operand) if m == "and" else (old ^ operand)
    write(gva, size, value)
    # CF = OF = 0; SF, ZF, PF from the result; AF is undefined (SDM), and the engine clears it (QEMU's
    # CC_OP_LOGIC): cleared here too, so that a store emulated under trap, full or hw shows the guest the
    # flags it shows under native.
    fl = regs.read(R.EFLAGS) & ~(0x1 | 0x4 | 0x10 | 0x40 | 0x80 | 0x800)
    if _parity(value):
        fl |= 0x4
    if value == 0:
        fl |= 0x40
    if value >> (8 * size - 1) & 1:
        fl |= 0x80
    regs.write(R.EFLAGS, fl)
    return length, gva, size, value, f"emulated `{text}`"


# -- read-modify-write arithmetic on memory -----------------------------------------------------------
_ARITH = ("add", "sub", "inc", "dec")
_ARITH_FORMS: dict[tuple[int, bytes], tuple] = {}  # site -> (mnemonic, length, size, source), () if none


def _arith_form(code: bytes, eip: int) -> tuple:
    """(mnemonic, length, size, source) of `add/sub [m], reg/imm` or `inc/dec [m]` at eip, once per site;
    () for any other instruction."""
    key = (eip, code)
    form = _ARITH_FORMS.get(key)
    if form is None:
        insn = next(_decoder().disasm(code or b"", eip, 1), None)
        form = ()
        if (
            insn is not None
            and insn.mnemonic in _ARITH
            and insn.operands
            and insn.operands[0].type == X86_OP_MEM
            and insn.prefix[0] not in (0xF2, 0xF3)
        ):
            ops = insn.operands
            src = None
            if len(ops) == 2:
                if ops[1].type == X86_OP_REG and insn.reg_name(ops[1].reg) in _REGS:
                    src = ("reg", insn.reg_name(ops[1].reg))
                elif ops[1].type == X86_OP_IMM:
                    src = ("imm", ops[1].imm)
            if len(ops) == 1 or src is not None:
                form = (insn.mnemonic, insn.size, ops[0].size, src)
        if len(_ARITH_FORMS) > 4096:
            _ARITH_FORMS.clear()
        limits.put(_ARITH_FORMS, key, form)
    return form


def arith_store(code: bytes, eip: int, regs, read, write) -> int | None:
    """`add/sub [m], reg/imm` and `inc/dec [m]` (counters kept beside code), with the flags the CPU
    sets; None for any other instruction. Complements emulate_store (translated code's coherence,
    cpuvirt/modes/full/coherence.py)."""
    form = _arith_form(code, eip)
    if not form:
        return None
    m, length, size, src = form
    bits = 8 * size
    mask = (1 << bits) - 1
    b = 1 if src is None else ((_get(regs, src[1]) if src[0] == "reg" else src[1]) & mask)
    gva = _operand_addresses(code, eip, regs)[0][0]
    a = read(gva, size)
    sub = m in ("sub", "dec")
    r = (a - b if sub else a + b) & mask
    write(gva, size, r)
    fl = regs.read(R.EFLAGS)
    keep_cf = m in ("inc", "dec")
    fl &= ~(0x4 | 0x10 | 0x40 | 0x80 | 0x800 | (0 if keep_cf else 0x1))
    if not keep_cf and ((a < b) if sub else (a + b > mask)):
        fl |= 0x1
    if bin(r & 0xFF).count("1") % 2 == 0:
        fl |= 0x4
    if (a ^ b ^ r) & 0x10:
        fl |= 0x10
    if r == 0:
        fl |= 0x40
    if r >> (bits - 1):
        fl |= 0x80
    sa, sb, sr = a >> (bits - 1), b >> (bits - 1), r >> (bits - 1)
    if (sa != sb and sr != sa) if sub else (sa == sb and sr != sa):
        fl |= 0x800
    regs.write(R.EFLAGS, fl)
    return length
