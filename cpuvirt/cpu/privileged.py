"""The emulation of privileged instructions for the deprivileged modes (trap, full): one function per
mnemonic, looked up in the table EMULATE as KVM's emulator looks up an opcode, and called by
`DeprivilegedVcpu.emulate_at` (deprivilege.py) with the instruction the guest kernel ran at ring 1.

Each function takes (vcpu, eip, size, operands): it does to the `VirtualCpu` and the engine what the
instruction does at CPL 0, records the event, and sets EIP (past the instruction, or wherever it went);
it returns False when the instruction is not one it emulates (the caller delivers the fault), and raises
`GuestFault` for an exception the guest must see.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from functools import partial

from unicorn import UC_CTL_IO_WRITE, UC_CTL_TLB_FLUSH

from cpuvirt.cpu.virtualcpu import SREGS, GuestFault, SegCache
from cpuvirt.engine import regs as R
from cpuvirt.x86.flags import CR0_PE, CR0_TS, CR4_DE, EFLAGS_IF, EFLAGS_ZF
from cpuvirt.x86.vectors import Vector

Emulator = Callable[..., "bool | None"]


def _cli(vcpu, eip, size, ops):
    vcpu.regs.write(R.EFLAGS, vcpu.regs.read(R.EFLAGS) & ~EFLAGS_IF)
    if vcpu.trace is None:
        vcpu.tally(vcpu.event_kind, "cli")  # what `emulated` records when no trace is written
    else:
        vcpu.emulated(eip, "cli", {"if": 0})
    vcpu.regs.write(R.EIP, eip + size)


def _sti(vcpu, eip, size, ops):
    flags = vcpu.regs.read(R.EFLAGS)
    vcpu.regs.write(R.EFLAGS, flags | EFLAGS_IF)
    if vcpu.trace is None:
        vcpu.tally(vcpu.event_kind, "sti")
    else:
        vcpu.emulated(eip, "sti", {"if": 1})
    vcpu.regs.write(R.EIP, eip + size)
    if not flags & EFLAGS_IF:
        vcpu.set_interrupt_shadow()


def _mov(vcpu, eip, size, ops):
    dst, src = (o.strip() for o in ops.split(",", 1))
    if dst.startswith("cr"):
        value = vcpu.read_operand(eip, src)
        vcpu.write_cr(int(dst[2:]), value)
        vcpu.emulated(eip, "mov", {"cr": int(dst[2:]), "value": f"{value:#x}"})
    elif src.startswith("cr"):
        value = vcpu.read_cr(int(src[2:]))
        vcpu.write_reg(dst, value)
        vcpu.emulated(eip, "mov", {"cr": int(src[2:]), "value": f"{value:#x}"})
    elif dst.startswith("dr") or src.startswith("dr"):
        # Debug registers: kept as the guest wrote them (hardware breakpoints are not modelled, as in
        # every mode); DR4/DR5 are DR6/DR7 while CR4.DE is clear.
        n = int((dst if dst.startswith("dr") else src)[2:])
        if n in (4, 5):
            if vcpu.virtual_cpu.cr4 & CR4_DE:
                raise GuestFault(Vector.UD)
            n += 2
        if dst.startswith("dr"):
            vcpu.virtual_cpu.dr[n] = vcpu.read_operand(eip, src) & 0xFFFFFFFF
        else:
            vcpu.write_reg(dst, vcpu.virtual_cpu.dr[n])
        vcpu.emulated(eip, "mov", {"dr": n})
    elif dst in SREGS and dst != "cs":
        sel = vcpu.read_operand(eip, src, 2) & 0xFFFF
        vcpu.load_segment(dst, sel)
        if vcpu.trace is None:
            vcpu.tally(vcpu.event_kind, "mov sreg")
        else:
            vcpu.emulated(eip, "mov", {"sreg": dst, "selector": f"{sel:#x}"})
        vcpu.regs.write(R.EIP, eip + size)
        if dst == "ss":
            vcpu.set_interrupt_shadow()
        return
    else:
        return False
    vcpu.regs.write(R.EIP, eip + size)


def _pop(vcpu, eip, size, ops):
    name = ops.strip()
    if name not in SREGS or name == "cs":
        return False
    esp = vcpu.regs.read(R.ESP)
    sel = int.from_bytes(vcpu.read_guest(esp, 2), "little")
    vcpu.load_segment(name, sel)
    vcpu.regs.write(R.ESP, (esp + 4) & 0xFFFFFFFF)
    if vcpu.trace is None:
        vcpu.tally(vcpu.event_kind, "pop")
    else:
        vcpu.emulated(eip, "pop", {"sreg": name, "selector": f"{sel:#x}"})
    vcpu.regs.write(R.EIP, eip + size)
    if name == "ss":
        vcpu.set_interrupt_shadow()


def _hlt(vcpu, eip, size, ops):
    vcpu.emulated(eip, "hlt", {"if": bool(vcpu.regs.read(R.EFLAGS) & EFLAGS_IF)}, "emulated: idle until an interrupt")
    vcpu.regs.write(R.EIP, eip + size)
    vcpu.faults.clear_interrupt_shadow()
    vcpu.on_hlt(eip + size)


def _table_load(vcpu, eip, size, ops, which):
    addr = vcpu.memory_operand(eip)
    limit, base = struct.unpack("<HI", vcpu.read_guest(addr, 6))
    if which == "lgdt":
        vcpu.virtual_cpu.gdtr = (base, limit)
        vcpu.regs.set_table(R.GDTR, (0, base, limit, 0))
    else:
        vcpu.virtual_cpu.idtr = (base, limit)
    vcpu.emulated(eip, which, {"base": f"{base:#x}", "limit": f"{limit:#x}"})
    vcpu.regs.write(R.EIP, eip + size)


def _lldt(vcpu, eip, size, ops):
    sel = vcpu.read_operand(eip, ops, 2) & 0xFFFF
    if not sel & ~3:
        vcpu.virtual_cpu.ldtr = SegCache(sel, 0, 0)
    else:
        base, limit, _, _ = vcpu._system_segment(sel, (2,))
        vcpu.virtual_cpu.ldtr = SegCache(sel, base, limit)
    vcpu.emulated(eip, "lldt", {"selector": f"{sel:#x}"})
    vcpu.regs.write(R.EIP, eip + size)


def _ltr(vcpu, eip, size, ops):
    sel = vcpu.read_operand(eip, ops, 2) & 0xFFFF
    if not sel & ~3:
        raise GuestFault(Vector.GP, 0)
    base, limit, _, hi = vcpu._system_segment(sel, (1, 9))
    vcpu.write_guest(vcpu.virtual_cpu.gdtr[0] + (sel & ~7) + 4, struct.pack("<I", hi | (2 << 8)))  # mark it busy
    vcpu.virtual_cpu.tr = SegCache(sel, base, limit)
    vcpu.emulated(eip, "ltr", {"selector": f"{sel:#x}", "base": f"{base:#x}", "limit": f"{limit:#x}"})
    vcpu.regs.write(R.EIP, eip + size)


def _invlpg(vcpu, eip, size, ops):
    addr = vcpu.memory_operand(eip)
    inv = getattr(vcpu.mmu.strategy, "invlpg", None)
    vcpu._rtlb.pop(addr >> 12, None)
    vcpu.mmu.crs = None
    if inv is not None:
        inv(addr)  # shadow paging: drop the entry, flush the engine
    else:
        vcpu.uc.ctl(UC_CTL_TLB_FLUSH, UC_CTL_IO_WRITE)
    vcpu.emulated(eip, "invlpg", {"address": f"{addr:#x}"})
    vcpu.regs.write(R.EIP, eip + size)


def _clts(vcpu, eip, size, ops):
    vcpu.virtual_cpu.cr0 &= ~CR0_TS
    vcpu.emulated(eip, "clts", {})
    vcpu.regs.write(R.EIP, eip + size)


def _lmsw(vcpu, eip, size, ops):
    value = vcpu.read_operand(eip, ops, 2) & 0xF
    cr0 = vcpu.virtual_cpu.cr0
    vcpu.write_cr(0, (cr0 & ~0xE) | value | (cr0 & CR0_PE))  # lmsw cannot clear PE
    vcpu.emulated(eip, "lmsw", {"value": f"{value:#x}"})
    vcpu.regs.write(R.EIP, eip + size)


def _nop(vcpu, eip, size, ops):
    vcpu.emulated(eip, "wbinvd" if size == 2 else "invd", {})
    vcpu.regs.write(R.EIP, eip + size)


def _msr(vcpu, eip, size, ops, write):
    vcpu.msr(eip, size, write)
    vcpu.emulated(eip, "wrmsr" if write else "rdmsr", {"msr": f"{vcpu.regs.read(R.ECX):#x}"})
    vcpu.regs.write(R.EIP, eip + size)


def _iretd(vcpu, eip, size, ops):
    vcpu.emulated(eip, "iretd", {})
    vcpu.iret(eip, size)


def _far_indirect(vcpu, eip, size, ops, call):
    """jmp/call m16:32 (capstone: `jmp ptr [m]`); a near indirect one is not emulated here."""
    if not ops.startswith("ptr "):
        return False
    return _ljmp(vcpu, eip, size, ops, call)


def _ljmp(vcpu, eip, size, ops, call=False):
    if "[" in ops:
        addr = vcpu.memory_operand(eip)
        offset, sel = struct.unpack("<IH", vcpu.read_guest(addr, 6))
    else:
        a, b = ops.replace(",", ":").split(":")
        sel, offset = int(a.strip(), 0), int(b.strip(), 0)
    vcpu.emulated(eip, "lcall" if call else "ljmp", {"selector": f"{sel:#x}", "offset": f"{offset:#x}"})
    vcpu.far_transfer(eip, size, sel, offset, call)


def _retf(vcpu, eip, size, ops):
    vcpu.emulated(eip, "retf", {})
    vcpu.retf(eip, int(ops, 0) if ops.strip() else 0)


def segment_query(vcpu, sel: int, what: str) -> tuple[bool, int, int]:
    """lar / lsl / verr / verw in the guest's view (SDM Vol. 2A, LAR, LSL, VERR/VERW): whether the
    selector passes at the virtual CPL, and the guest's descriptor (lo, hi). Never a fault."""
    if not sel & ~3 and not sel & 4:
        return False, 0, 0
    try:
        lo, hi = vcpu.descriptor(sel)
    except GuestFault:
        return False, 0, 0
    typ, dpl = (hi >> 8) & 0xF, (hi >> 13) & 3
    privileged = dpl < vcpu.vcpl() or dpl < sel & 3
    if hi & (1 << 12):  # a code or data segment
        code = typ & 8
        if privileged and not (code and typ & 4):  # conforming code skips the DPL check
            return False, lo, hi
        if what == "verr":
            return (not code or bool(typ & 2)), lo, hi
        if what == "verw":
            return (not code and bool(typ & 2)), lo, hi
        return True, lo, hi
    valid = {"lar": (1, 2, 3, 4, 5, 9, 0xB, 0xC), "lsl": (1, 2, 3, 9, 0xB)}.get(what, ())
    return (typ in valid and not privileged), lo, hi


def _set_zf(vcpu, on: bool) -> None:
    flags = vcpu.regs.read(R.EFLAGS)
    vcpu.regs.write(R.EFLAGS, flags | EFLAGS_ZF if on else flags & ~EFLAGS_ZF)


def _lar_lsl(vcpu, eip, size, ops, what):
    dst, src = (o.strip() for o in ops.split(","))
    sel = vcpu.read_operand(eip, src, 2) & 0xFFFF
    ok, lo, hi = segment_query(vcpu, sel, what)
    if ok:
        if what == "lar":
            value = hi & (0x00F0FF00 if dst in R.GPR_NAMES else 0xFF00)  # a 32-bit destination
        else:
            value = (lo & 0xFFFF) | (hi & 0xF0000)
            if hi & (1 << 23):
                value = (value << 12) | 0xFFF
        vcpu.write_reg(dst, value)
    _set_zf(vcpu, ok)
    vcpu.emulated(eip, what, {"selector": f"{sel:#x}", "zf": ok}, "emulated against the guest's descriptor tables")
    vcpu.regs.write(R.EIP, eip + size)


def _verr_verw(vcpu, eip, size, ops, what):
    sel = vcpu.read_operand(eip, ops, 2) & 0xFFFF
    ok, _, _ = segment_query(vcpu, sel, what)
    _set_zf(vcpu, ok)
    vcpu.emulated(eip, what, {"selector": f"{sel:#x}", "zf": ok}, "emulated against the guest's descriptor tables")
    vcpu.regs.write(R.EIP, eip + size)


def _sysenter(vcpu, eip, size, ops):
    """full's kernel: Vcpu.sysenter against the virtual MSRs (CS and SS descriptors from the guest's
    GDT, as the ring-compressed delivery loads them)."""
    cs, esp, target = vcpu.virtual_cpu.sysenter
    vcpu.emulated(eip, "sysenter", {"cs": f"{cs:#x}", "eip": f"{target:#x}", "esp": f"{esp:#x}"})
    vcpu.sysenter(eip)


def _sysexit(vcpu, eip, size, ops):
    """SDM SYSEXIT: from virtual CPL 0 to CPL 3 at EDX/ECX, CS = IA32_SYSENTER_CS + 16, SS = + 24."""
    cs = vcpu.virtual_cpu.sysenter[0] & 0xFFFC
    if not cs or vcpu.vcpl() != 0:
        raise GuestFault(Vector.GP, 0)
    regs = vcpu.regs
    vcpu.emulated(eip, "sysexit", {"eip": f"{regs.read(R.EDX):#x}", "esp": f"{regs.read(R.ECX):#x}"})
    vcpu.load_cs_ss((cs + 16) | 3, (cs + 24) | 3, 3)
    regs.write(R.ESP, regs.read(R.ECX))
    vcpu.set_guest_eflags(vcpu.guest_eflags())  # the real IOPL of ring 3
    regs.write(R.EIP, regs.read(R.EDX))


# mnemonic (as capstone names it) -> what emulates it at virtual CPL 0 (SDM Vol. 2 for each instruction)
EMULATE: dict[str, Emulator] = {
    "cli": _cli,  # IF := 0 (the real IF carries the virtual one)
    "sti": _sti,  # IF := 1, with its one-instruction interrupt shadow
    "mov": _mov,  # mov to/from CR0-4 and DR0-7, mov to a segment register
    "pop": _pop,  # pop of a segment register
    "hlt": _hlt,  # idle until an interrupt
    "lgdt": partial(_table_load, which="lgdt"),  # the real GDTR is the guest's GDT
    "lidt": partial(_table_load, which="lidt"),  # the virtual IDTR only
    "lldt": _lldt,
    "ltr": _ltr,
    "invlpg": _invlpg,
    "clts": _clts,
    "lmsw": _lmsw,
    "wbinvd": _nop,
    "invd": _nop,
    "rdmsr": partial(_msr, write=False),
    "wrmsr": partial(_msr, write=True),
    "iretd": _iretd,  # through the deprivileging core's return path
    "ljmp": _ljmp,  # far jump: a code segment, or a task switch
    "lcall": partial(_ljmp, call=True),
    "retf": _retf,
    "jmp": partial(_far_indirect, call=False),  # jmp far [m]
    "call": partial(_far_indirect, call=True),  # call far [m]
    "lar": partial(_lar_lsl, what="lar"),  # in the guest's view: its descriptor, the virtual CPL
    "lsl": partial(_lar_lsl, what="lsl"),
    "verr": partial(_verr_verw, what="verr"),
    "verw": partial(_verr_verw, what="verw"),
    "sysenter": _sysenter,  # through the virtual IA32_SYSENTER MSRs
    "sysexit": _sysexit,
}
