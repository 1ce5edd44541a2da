"""Event delivery and task switches in a deprivileged guest's view (ring compression).

`RingCompressedDelivery` delivers through the guest's IDT as the CPU would at the guest's virtual CPL
(its IDT, GDT and TSS from the VirtualCpu, a frame holding guest-view CS and EFLAGS), then runs the
handler at real ring 1. `VirtualView` is what far transfers and task switches (tasks.py) see: the
guest's tables, CR0/CR3 and CPL from the VirtualCpu, CS/SS loaded ring-compressed.
"""

from __future__ import annotations

from cpuvirt.cpu.events import EventDelivery
from cpuvirt.cpu.faults import DeliveryFault
from cpuvirt.cpu.segments import SegmentLoadingVcpu
from cpuvirt.cpu.tasks import CpuView
from cpuvirt.cpu.virtualcpu import GuestFault, SegCache
from cpuvirt.engine import regs as R
from cpuvirt.x86.flags import CR0_PG, CR0_TS, EFLAGS_VM


class RingCompressedDelivery(EventDelivery):
    """IDT delivery in the guest's view: the guest's IDT, GDT and TSS from the VirtualCpu, privilege
    rules against the virtual CPL, a frame holding guest-view CS/EFLAGS; the handler then runs at real
    ring 1 (its code and stack segments loaded from the shadow GDT) and starts at `enter_kernel`."""

    def __init__(self, vcpu: SegmentLoadingVcpu):
        super().__init__(vcpu.uc, vcpu.regs, vcpu.mmu)
        self.vcpu = vcpu

    def _descriptor(self, selector: int, ext: int) -> tuple[int, int]:
        try:
            return self.vcpu.descriptor(selector, ext)
        except GuestFault as g:
            raise DeliveryFault(g.vector, g.error_code or 0, g.cr2) from None

    def _idt(self) -> tuple[int, int]:
        return self.vcpu.virtual_cpu.idtr

    def _tss(self) -> tuple[int, int, int]:
        tr = self.vcpu.virtual_cpu.tr
        return tr.selector, tr.base, tr.limit

    def _cpl(self) -> int:
        return self.vcpu.vcpl()

    def _eflags(self) -> int:
        return self.vcpu.guest_eflags()

    def _view(self, selector: int) -> int:
        return self.vcpu.guest_selector(selector)

    def _set_cr2(self, cr2: int) -> None:
        self.vcpu.virtual_cpu.cr2 = cr2

    def _enter(self, selector, new_ss, cpl, new_cpl, old_cs, esp, flags, offset) -> None:
        vc, regs = self.vcpu, self.regs
        new_cs = (selector & ~3) | new_cpl
        if new_ss is not None:
            vc.load_cs_ss(new_cs, (new_ss & ~3) | new_cpl, new_cpl)
        elif (old_cs & ~3) != (selector & ~3):
            vc.load_cs_ss(new_cs, None, new_cpl)
        regs.write(R.ESP, esp)
        vc.set_guest_eflags(flags)
        if new_cpl == 0:
            vc.enter_kernel(offset)
        else:
            regs.write(R.EIP, offset)


class VirtualView(CpuView):
    """What a far transfer or task switch sees under deprivileging (cpu/tasks.py): the guest's GDT,
    LDT, TR, CR0/CR3 and CPL from the virtual CPU; CS/SS loaded ring-compressed (a new task or gate
    target at virtual CPL 0 runs at real ring 1, never 0)."""

    def read(self, gva: int, size: int) -> bytes:
        try:
            return self.vcpu.read_guest(gva & 0xFFFFFFFF, size)
        except GuestFault as g:
            raise DeliveryFault(g.vector, g.error_code or 0, g.cr2) from None

    def write(self, gva: int, data: bytes) -> None:
        try:
            self.vcpu.write_guest(gva & 0xFFFFFFFF, data)
        except GuestFault as g:
            raise DeliveryFault(g.vector, g.error_code or 0, g.cr2) from None

    def cpl(self) -> int:
        return self.vcpu.vcpl()

    def eflags(self) -> int:
        return self.vcpu.guest_eflags()

    def set_eflags(self, value: int) -> None:
        self.vcpu.set_guest_eflags(value)

    def selector(self, reg: int) -> int:
        real = self.regs.read(reg)
        return real if self.regs.read(R.EFLAGS) & EFLAGS_VM else self.vcpu.guest_selector(real)

    def gdtr(self) -> tuple[int, int]:
        return self.vcpu.virtual_cpu.gdtr

    def ldtr(self) -> tuple[int, int, int]:
        t = self.vcpu.virtual_cpu.ldtr
        return t.selector, t.base, t.limit

    def tr(self) -> tuple[int, int, int]:
        t = self.vcpu.virtual_cpu.tr
        return t.selector, t.base, t.limit

    def set_tr(self, sel: int, base: int, limit: int, hi: int) -> None:
        self.vcpu.virtual_cpu.tr = SegCache(sel, base, limit)

    def set_ldtr(self, sel: int, base: int, limit: int, hi: int) -> None:
        self.vcpu.virtual_cpu.ldtr = SegCache(sel, base, limit)

    def paging(self) -> bool:
        return bool(self.vcpu.virtual_cpu.cr0 & CR0_PG)

    def set_cr3(self, value: int) -> None:
        self.vcpu.write_cr(3, value)

    def set_task_switched(self) -> None:
        self.vcpu.virtual_cpu.cr0 |= CR0_TS

    def load(self, cs, ss, cpl, eip, esp, data=None) -> None:
        c, regs = self.vcpu, self.regs
        names = {R.DS: "ds", R.ES: "es", R.FS: "fs", R.GS: "gs"}
        c.load_cs_ss(cs, ss, cpl)
        regs.write(R.ESP, esp)
        try:
            for reg, sel in (data or {}).items():
                c.load_segment(names[reg], sel)
        except GuestFault as g:
            raise DeliveryFault(g.vector, g.error_code or 0, g.cr2) from None
        c.set_guest_eflags(c.guest_eflags())  # the real IOPL of the new ring
        self.entered = eip
        if cpl == 0:
            c.enter_kernel(eip)
        else:
            regs.write(R.EIP, eip)

    def load_v86(self, sels, eip, esp) -> None:
        regs = self.regs
        for reg in (R.SS, R.CS, R.DS, R.ES, R.FS, R.GS):
            regs.write(reg, sels[reg])
        self.vcpu._loaded.clear()
        regs.write(R.ESP, esp)
        regs.write(R.EIP, eip)
        self.entered = eip
