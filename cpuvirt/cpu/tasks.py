"""Privilege-changing control transfers, decided by cpuvirt and never by the engine.

Unicorn would perform far calls through call gates and hardware task switches itself, with no hook
first: it aborts the host process when it needs a stack from a TSS that is not there, and a task
switch it performs from ring 1 loads the new task's CPL as is (real ring 0 under deprivileging).
So every far `jmp`/`call` whose target is a system descriptor, every task gate in the IDT and every
`iret` with EFLAGS.NT is carried out here, for every mode, against a `CpuView`: the processor state
as the guest sees it (the real registers in native and hw; the virtual CPU under deprivileging,
where loading the new CS/SS is ring-compressed by the mode, so the guest never gets real CPL 0).

SDM Vol. 3A: 5.8.3-5.8.6 (call gates: privilege checks, stack switch, parameter copy), chapter 7
(task management: 7.2 the 32-bit and 16-bit TSS, 7.3 the task switch with its checks and the order
of its steps, 7.4 the back link, NT and busy flags), and the JMP/CALL/IRET pseudocode of Vol. 2.
Faults are raised as DeliveryFault with the error code of SDM table 7-1; a fault after the commit
point (the new task's state is loaded) carries `eip`, the new task's EIP, to return to.
"""

from __future__ import annotations

import struct

from cpuvirt.cpu.faults import DeliveryFault
from cpuvirt.engine import regs as R
from cpuvirt.memory.mmu import GuestPageFault, NestedFault
from cpuvirt.x86.flags import CR0_TS, EFLAGS_NT, EFLAGS_VM
from cpuvirt.x86.vectors import Vector

# System-descriptor types (SDM Vol. 3A table 3-2).
TSS16_AVAILABLE, LDT, TSS16_BUSY, CALL_GATE16, TASK_GATE = 1, 2, 3, 4, 5
TSS32_AVAILABLE, TSS32_BUSY, CALL_GATE32 = 9, 0xB, 0xC
TSS_TYPES = frozenset((TSS16_AVAILABLE, TSS16_BUSY, TSS32_AVAILABLE, TSS32_BUSY))
BUSY = 1 << 9  # the busy bit of a TSS descriptor's type (in its high dword)

# Why a task switch happens (SDM 7.3; the VMX exit qualification's source field, SDM 28.2.1).
CALL, IRET, JMP, INT = 0, 1, 2, 3

_P, _S, _CODE, _CONFORMING, _RW = 1 << 15, 1 << 12, 1 << 11, 1 << 10, 1 << 9


def _base(lo: int, hi: int) -> int:
    return (lo >> 16) | ((hi & 0xFF) << 16) | (hi & 0xFF000000)


def _limit(lo: int, hi: int) -> int:
    limit = (lo & 0xFFFF) | (hi & 0xF0000)
    return (limit << 12) | 0xFFF if hi & (1 << 23) else limit


def _dpl(hi: int) -> int:
    return (hi >> 13) & 3


def _type(hi: int) -> int:
    return (hi >> 8) & 0xF


class CpuView:
    """The processor state a control transfer reads and writes, as the guest sees it.

    This class works on the real registers (native, hw); the deprivileging core overrides what
    lives in its virtual CPU and how CS/SS are really loaded (cpu/deprivilege.py)."""

    def __init__(self, vcpu):
        self.vcpu = vcpu
        self.regs = vcpu.regs
        self.mmu = vcpu.mmu
        self.entered = 0  # the guest EIP the last load() went to

    # -- memory: the processor's own (supervisor) accesses ------------------------------------------
    def read(self, gva: int, size: int) -> bytes:
        try:
            return self.mmu.read_linear(gva & 0xFFFFFFFF, size, user=False)
        except GuestPageFault as pf:
            raise DeliveryFault(Vector.PF, pf.error_code, pf.gva) from None
        except NestedFault:
            return b"\xff" * size  # nothing behind that guest-physical address (hw, EPT)

    def write(self, gva: int, data: bytes) -> None:
        try:
            self.mmu.write_linear(gva & 0xFFFFFFFF, data, user=False)
        except GuestPageFault as pf:
            raise DeliveryFault(Vector.PF, pf.error_code, pf.gva) from None
        except NestedFault:
            pass

    # -- registers --------------------------------------------------------------------------------
    def cpl(self) -> int:
        return self.regs.cpl()

    def eflags(self) -> int:
        return self.regs.read(R.EFLAGS)

    def set_eflags(self, value: int) -> None:
        self.regs.write(R.EFLAGS, value | 2)

    def selector(self, reg: int) -> int:
        return self.regs.read(reg)

    def gprs(self) -> list[int]:
        return [self.regs.read(r) for r in R.GPR_ORDER]

    def set_gprs(self, values) -> None:
        for r, v in zip(R.GPR_ORDER, values):
            self.regs.write(r, v)

    def gdtr(self) -> tuple[int, int]:
        _, base, limit, _ = self.regs.table(R.GDTR)
        return base, limit

    def ldtr(self) -> tuple[int, int, int]:
        sel, base, limit, _ = self.regs.table(R.LDTR)
        return sel, base, limit

    def tr(self) -> tuple[int, int, int]:
        sel, base, limit, _ = self.regs.table(R.TR)
        return sel, base, limit

    def set_tr(self, sel: int, base: int, limit: int, hi: int) -> None:
        self.regs.set_table(R.TR, (sel, base, limit, hi & 0x00F0FF00))

    def set_ldtr(self, sel: int, base: int, limit: int, hi: int) -> None:
        self.regs.set_table(R.LDTR, (sel, base, limit, hi & 0x00F0FF00))

    def paging(self) -> bool:
        return bool(self.regs.read(R.CR0) & (1 << 31))

    def set_cr3(self, value: int) -> None:
        self.regs.write(R.CR3, value)
        self.mmu.crs = None

    def set_task_switched(self) -> None:
        self.regs.write(R.CR0, self.regs.read(R.CR0) | CR0_TS)
        self.mmu.crs = None

    # -- loading the new context ------------------------------------------------------------------
    def load(self, cs: int, ss: int | None, cpl: int, eip: int, esp: int, data: dict[int, int] | None = None) -> None:
        """Load CS (and SS) at `cpl`, ESP, EIP and data segments (descriptors already checked)."""
        regs = self.regs
        if ss is not None:
            self.vcpu.faults.set_cpl(cpl, ss)  # SS.RPL too: the load's descriptor accesses are supervisor ones
            regs.write(R.SS, ss)
        regs.write(R.ESP, esp)
        regs.write(R.CS, cs)
        for reg, sel in (data or {}).items():
            regs.write(reg, sel)
        regs.write(R.EIP, eip)
        self.entered = eip
        self.mmu.crs = None

    def load_v86(self, sels: dict[int, int], eip: int, esp: int) -> None:
        """Enter virtual-8086 mode (EFLAGS.VM already set): segment loads are real-mode style at CPL 3."""
        regs = self.regs
        for reg in (R.SS, R.CS, R.DS, R.ES, R.FS, R.GS):
            regs.write(reg, sels[reg])
        regs.write(R.ESP, esp)
        regs.write(R.EIP, eip)
        self.entered = eip
        self.mmu.crs = None


# -- descriptor tables ------------------------------------------------------------------------------
def descriptor(view: CpuView, sel: int, vector: int = Vector.GP, ext: int = 0) -> tuple[int, int]:
    """The descriptor `sel` names, GDT or LDT; `vector`(sel) when it lies outside its table."""
    if sel & 4:
        ldt_sel, base, limit = view.ldtr()
        if not ldt_sel & ~3:
            raise DeliveryFault(vector, (sel & ~3) | ext)
    else:
        base, limit = view.gdtr()
    if (sel & ~7) + 7 > limit:
        raise DeliveryFault(vector, (sel & ~3) | ext)
    return struct.unpack("<II", view.read(base + (sel & ~7), 8))


def _gdt_write_hi(view: CpuView, sel: int, hi: int) -> None:
    base, _ = view.gdtr()
    view.write(base + (sel & ~7) + 4, struct.pack("<I", hi))


# -- far jmp / far call -----------------------------------------------------------------------------
def far_transfer(
    view: CpuView, sel: int, offset: int, call: bool, eip: int, next_eip: int, operand32: bool = True
) -> bool:
    """A far jmp/call to `sel`:`offset` whose descriptor is a system descriptor (the caller found
    it): through a call gate, or a task switch (TSS descriptor or task gate). Returns False if the
    target is an ordinary code segment (the caller lets the engine do that transfer). Raises
    DeliveryFault for the guest."""
    if not sel & ~3:
        raise DeliveryFault(Vector.GP, 0)
    lo, hi = descriptor(view, sel)
    if hi & _S:
        return False
    kind = _type(hi)
    cpl, rpl, dpl = view.cpl(), sel & 3, _dpl(hi)
    if kind in (CALL_GATE16, CALL_GATE32):
        return _call_gate(view, sel, lo, hi, call, next_eip)
    if kind in (TSS32_AVAILABLE, TSS16_AVAILABLE, TASK_GATE, TSS32_BUSY, TSS16_BUSY):
        if dpl < cpl or dpl < rpl:
            raise DeliveryFault(Vector.GP, sel & ~3)
        if not hi & _P:
            raise DeliveryFault(Vector.NP, sel & ~3)
        if kind == TASK_GATE:
            tss = lo >> 16
            if tss & 4 or not tss & ~3:
                raise DeliveryFault(Vector.GP, tss & ~3)
            sel = tss
        view.vcpu.switch_task(view, sel, CALL if call else JMP, next_eip)
        return True
    raise DeliveryFault(Vector.GP, sel & ~3)


def _call_gate(view: CpuView, gate_sel: int, lo: int, hi: int, call: bool, next_eip: int) -> bool:
    """SDM 5.8.4-5.8.6: through a call gate to a code segment, switching stacks (from the TSS) and
    copying the gate's parameter count when a call goes to a more privileged nonconforming segment."""
    cpl, rpl = view.cpl(), gate_sel & 3
    if _dpl(hi) < cpl or _dpl(hi) < rpl:
        raise DeliveryFault(Vector.GP, gate_sel & ~3)
    if not hi & _P:
        raise DeliveryFault(Vector.NP, gate_sel & ~3)
    wide = _type(hi) == CALL_GATE32
    cs = lo >> 16
    offset = (lo & 0xFFFF) | (hi & 0xFFFF0000) if wide else lo & 0xFFFF
    if not cs & ~3:
        raise DeliveryFault(Vector.GP, 0)
    clo, chi = descriptor(view, cs)
    cdpl = _dpl(chi)
    if not chi & _S or not chi & _CODE or cdpl > cpl:
        raise DeliveryFault(Vector.GP, cs & ~3)
    conforming = bool(chi & _CONFORMING)
    if not call and not conforming and cdpl != cpl:
        raise DeliveryFault(Vector.GP, cs & ~3)
    if not chi & _P:
        raise DeliveryFault(Vector.NP, cs & ~3)
    old_cs, old_ss = view.selector(R.CS), view.selector(R.SS)
    esp = view.regs.read(R.ESP)
    if not call:
        view.load((cs & ~3) | cpl, None, cpl, offset, esp)
        return True
    unit = 4 if wide else 2
    pack = "<I" if wide else "<H"
    if not conforming and cdpl < cpl:
        # More privileged: the new stack comes from the TSS, parameters are copied (SDM 5.8.5).
        new_ss, new_esp = _stack_from_tss(view, cdpl)
        count = hi & 0x1F
        params = view.read(esp, count * unit) if count else b""
        ip = next_eip & (0xFFFFFFFF if wide else 0xFFFF)
        # The new stack from its top down: SS, ESP, the parameters (their order kept), CS, EIP
        # (SDM figure 5-13); ESP then points at the EIP.
        frame = (
            struct.pack(pack, ip)
            + struct.pack(pack, old_cs)
            + params
            + struct.pack(pack, esp)
            + struct.pack(pack, old_ss)
        )
        top = (new_esp - len(frame)) & 0xFFFFFFFF
        view.write(top, frame)
        view.load((cs & ~3) | cdpl, new_ss, cdpl, offset, top)
        return True
    top = (esp - 2 * unit) & 0xFFFFFFFF
    view.write(top, struct.pack(pack, next_eip & (0xFFFFFFFF if wide else 0xFFFF)) + struct.pack(pack, old_cs))
    view.load((cs & ~3) | cpl, None, cpl, offset, top)
    return True


def _stack_from_tss(view: CpuView, dpl: int) -> tuple[int, int]:
    """SS:ESP for ring `dpl` from the current TSS, checked as a stack switch does (SDM 6.12.1,
    5.8.5): #TS(TSS) beyond its limit, #TS(SS) for a bad selector, #SS(SS) if not present."""
    tr_sel, base, limit = view.tr()
    slot = 4 + 8 * dpl
    if slot + 5 > limit:
        raise DeliveryFault(Vector.TS, tr_sel & ~3)
    esp, ss = struct.unpack("<IH", view.read(base + slot, 6))
    if not ss & ~3:
        raise DeliveryFault(Vector.TS, 0)
    lo, hi = descriptor(view, ss, Vector.TS)
    if (ss & 3) != dpl or _dpl(hi) != dpl or not hi & _S or hi & _CODE or not hi & _RW:
        raise DeliveryFault(Vector.TS, ss & ~3)
    if not hi & _P:
        raise DeliveryFault(Vector.SS, ss & ~3)
    return ss, esp


# -- the task switch --------------------------------------------------------------------------------
# 32-bit TSS (SDM figure 7-2): link 0, ESPn/SSn 4.., CR3 0x1C, EIP 0x20, EFLAGS 0x24, EAX..EDI 0x28,
# ES CS SS DS FS GS 0x48.., LDT 0x60, T bit 0x64. 16-bit TSS (figure 7-11): link 0, IP 0x0E,
# FLAGS 0x10, AX..DI 0x12, ES CS SS DS 0x22.., LDT 0x2A.
_SEG_ORDER = (R.ES, R.CS, R.SS, R.DS, R.FS, R.GS)


def switch_task(view: CpuView, sel: int, reason: int, next_eip: int, ext: int = 0) -> None:
    """Switch to the task whose TSS selector is `sel` (SDM 7.3). `next_eip` is saved as the old
    task's EIP: the instruction after a jmp/call/iret, or the return address of an interrupt."""
    fault_vec = Vector.TS if reason == IRET else Vector.GP
    if sel & 4:
        raise DeliveryFault(fault_vec, (sel & ~3) | ext)
    lo, hi = descriptor(view, sel, fault_vec, ext)
    kind = _type(hi)
    if hi & _S or kind not in TSS_TYPES:
        raise DeliveryFault(fault_vec, (sel & ~3) | ext)
    busy = bool(hi & BUSY)
    if reason == IRET and not busy:
        raise DeliveryFault(Vector.TS, (sel & ~3) | ext)
    if reason != IRET and busy:
        raise DeliveryFault(Vector.GP, (sel & ~3) | ext)
    if not hi & _P:
        raise DeliveryFault(Vector.NP, (sel & ~3) | ext)
    new32 = bool(kind & 8)
    new_base, new_limit = _base(lo, hi), _limit(lo, hi)
    if new_limit < (0x67 if new32 else 0x2B):
        raise DeliveryFault(Vector.TS, (sel & ~3) | ext)

    old_sel, old_base, old_limit = view.tr()
    old32 = True
    old_hi = None
    if old_sel & ~3 and not old_sel & 4:
        try:
            _, old_hi = descriptor(view, old_sel)
            old32 = bool(_type(old_hi) & 8)
        except DeliveryFault:
            old_hi = None
    if old_limit < (0x67 if old32 else 0x2B):
        raise DeliveryFault(Vector.TS, (old_sel & ~3) | ext)

    # Read the whole new state first: a page fault here leaves everything as it was.
    if new32:
        raw = view.read(new_base, 0x68)
        new_cr3, new_eip, new_eflags = struct.unpack_from("<III", raw, 0x1C)
        new_gprs = list(struct.unpack_from("<8I", raw, 0x28))
        segs = struct.unpack_from("<6I", raw, 0x48)
        new_segs = {r: s & 0xFFFF for r, s in zip(_SEG_ORDER, segs)}
        new_ldt = struct.unpack_from("<I", raw, 0x60)[0] & 0xFFFF
    else:
        raw = view.read(new_base, 0x2C)
        new_cr3 = None
        new_eip, new_eflags = struct.unpack_from("<HH", raw, 0x0E)
        new_gprs = [v for v in struct.unpack_from("<8H", raw, 0x12)]
        segs = struct.unpack_from("<4H", raw, 0x22)
        new_segs = {r: s for r, s in zip(_SEG_ORDER[:4], segs)}
        new_segs[R.FS] = new_segs[R.GS] = 0
        new_ldt = struct.unpack_from("<H", raw, 0x2A)[0]

    eflags = view.eflags()
    if reason == IRET:
        eflags &= ~EFLAGS_NT
    if reason in (JMP, IRET) and old_hi is not None:
        _gdt_write_hi(view, old_sel, old_hi & ~BUSY)
    # Save the old task's state in its TSS (the dynamic fields only, SDM 7.2.1).
    gprs = view.gprs()
    sels = [view.selector(r) for r in _SEG_ORDER]
    if old32:
        view.write(old_base + 0x20, struct.pack("<II8I6I", next_eip & 0xFFFFFFFF, eflags, *gprs, *sels))
    else:
        view.write(
            old_base + 0x0E,
            struct.pack("<HH8H4H", next_eip & 0xFFFF, eflags & 0xFFFF, *(g & 0xFFFF for g in gprs), *sels[:4]),
        )
    if reason in (CALL, INT):
        view.write(new_base, struct.pack("<H", old_sel))  # the back link
        new_eflags |= EFLAGS_NT
    if reason != IRET:
        hi |= BUSY
        _gdt_write_hi(view, sel, hi)

    # Commit point: from here on, faults belong to the new task (SDM 7.3, step 12 onwards).
    view.set_tr(sel, new_base, new_limit, hi | BUSY)
    view.set_task_switched()
    if new32 and view.paging():
        view.set_cr3(new_cr3)
    if not new32:
        new_eflags |= eflags & 0xFFFF0000 & ~EFLAGS_VM
    view.set_eflags(new_eflags)
    view.set_gprs(new_gprs)
    try:
        _load_task_segments(view, new_ldt, new_segs, new_eflags, new_eip, new_gprs[4], ext)
    except DeliveryFault as f:
        f.eip = new_eip
        raise


def _load_task_segments(view: CpuView, ldt: int, segs: dict, eflags: int, eip: int, esp: int, ext: int) -> None:
    """SDM 7.3 steps 13-14: the LDT, then CS, SS and the data segments with their checks (#TS for a
    bad selector, #NP / #SS for a segment not present)."""
    if ldt & 4:
        raise DeliveryFault(Vector.TS, (ldt & ~3) | ext)
    if ldt & ~3:
        base, limit = view.gdtr()
        if (ldt & ~7) + 7 > limit:
            raise DeliveryFault(Vector.TS, (ldt & ~3) | ext)
        llo, lhi = struct.unpack("<II", view.read(base + (ldt & ~7), 8))
        if lhi & _S or _type(lhi) != LDT:
            raise DeliveryFault(Vector.TS, (ldt & ~3) | ext)
        if not lhi & _P:
            raise DeliveryFault(Vector.TS, (ldt & ~3) | ext)
        view.set_ldtr(ldt, _base(llo, lhi), _limit(llo, lhi), lhi)
    else:
        view.set_ldtr(0, 0, 0, 0)
    if eflags & EFLAGS_VM:
        view.load_v86(segs, eip, esp)
        return
    cs, ss = segs[R.CS], segs[R.SS]
    if not cs & ~3:
        raise DeliveryFault(Vector.TS, ext)
    _, chi = descriptor(view, cs, Vector.TS, ext)
    cpl = cs & 3
    if not chi & _S or not chi & _CODE:
        raise DeliveryFault(Vector.TS, (cs & ~3) | ext)
    if (chi & _CONFORMING and _dpl(chi) > cpl) or (not chi & _CONFORMING and _dpl(chi) != cpl):
        raise DeliveryFault(Vector.TS, (cs & ~3) | ext)
    if not chi & _P:
        raise DeliveryFault(Vector.NP, (cs & ~3) | ext)
    if not ss & ~3:
        raise DeliveryFault(Vector.TS, ext)
    _, shi = descriptor(view, ss, Vector.TS, ext)
    if (ss & 3) != cpl or _dpl(shi) != cpl or not shi & _S or shi & _CODE or not shi & _RW:
        raise DeliveryFault(Vector.TS, (ss & ~3) | ext)
    if not shi & _P:
        raise DeliveryFault(Vector.SS, (ss & ~3) | ext)
    data = {}
    for reg in (R.DS, R.ES, R.FS, R.GS):
        s = segs[reg]
        if s & ~3:
            _, dhi = descriptor(view, s, Vector.TS, ext)
            readable_code = dhi & _CODE and dhi & _RW
            if not dhi & _S or (dhi & _CODE and not readable_code):
                raise DeliveryFault(Vector.TS, (s & ~3) | ext)
            if (not dhi & _CODE or not dhi & _CONFORMING) and (_dpl(dhi) < cpl or _dpl(dhi) < (s & 3)):
                raise DeliveryFault(Vector.TS, (s & ~3) | ext)
            if not dhi & _P:
                raise DeliveryFault(Vector.NP, (s & ~3) | ext)
        data[reg] = s
    view.load(cs, ss, cpl, eip, esp, data)


def task_return(view: CpuView, next_eip: int) -> None:
    """`iret` with EFLAGS.NT = 1: back to the task named by the current TSS's back link (SDM IRET,
    TASK-RETURN; 7.4)."""
    _, base, limit = view.tr()
    if limit < 1:
        raise DeliveryFault(Vector.TS, view.tr()[0] & ~3)
    link = struct.unpack("<H", view.read(base, 2))[0]
    view.vcpu.switch_task(view, link, IRET, next_eip)


def push_error_code(view: CpuView, code: int) -> None:
    """After a task switch through an IDT task gate: the error code on the new task's stack."""
    regs = view.regs
    esp = (regs.read(R.ESP) - 4) & 0xFFFFFFFF
    try:
        view.write(esp, struct.pack("<I", code & 0xFFFFFFFF))
    except DeliveryFault as f:
        f.eip = view.entered
        raise
    regs.write(R.ESP, esp)
