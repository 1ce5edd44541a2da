"""Deprivileging (ring compression), shared by modes `trap` and `full`: docs/deprivileging.md.

The guest kernel (virtual CPL 0) runs at real CPL 1, guest user code at CPL 3. What the guest believes
(CR0-4, GDTR, IDTR, LDTR, TR, IOPL, CPL 0) is kept in a `VirtualCpu`, Python state the guest can never
address. The real CPU holds only what the engine needs: the guest's own GDT in the real GDTR (so native
descriptor loads read the guest's descriptors), the hypervisor's IDTR/TR/LDTR and CR0, and IF (which the
engine never uses to deliver anything, so it carries the guest's IF).

`DeprivilegedVcpu` is the Vcpu every deprivileging mode builds on, one floor per job, each a module:

- guestview.py: the VirtualCpu and the guest's view of it (virtual CPL, selectors, EFLAGS), guest-linear
  reads and writes with the CPU's supervisor rights;
- segments.py: segment loads, ring-compressed, from the shadow GDT or straight into the engine's saved
  context;
- emulating.py: the privileged instructions, emulated against the VirtualCpu (privileged.py's table);
- iogate.py: the I/O privilege check the engine does not do;
- ringdelivery.py: event delivery through the guest's IDT in its view, and the view task switches see;
- here: the class that puts them together, page faults with the virtual CR2, and the boot (`deprivilege`).

Modes decide when to call it (trap: on #GP; full: from translator callouts) and where kernel code runs
(`enter_kernel`).
"""

from __future__ import annotations

from typing import Any

from unicorn import UC_CTL_IO_WRITE, UC_CTL_TLB_FLUSH

from cpuvirt.cpu.emulating import SYSENTER_MSRS, EmulatingVcpu  # noqa: F401  (SYSENTER_MSRS re-exported)
from cpuvirt.cpu.guestview import KERNEL_RING  # noqa: F401  (re-exported: the modes import it from here)
from cpuvirt.cpu.iogate import IoGateVcpu
from cpuvirt.cpu.ringdelivery import RingCompressedDelivery, VirtualView
from cpuvirt.cpu.segments import HV_SIZE, SHADOW_GDT_BYTES, SHADOW_GDT_WINDOW, ShadowGdt  # noqa: F401  (re-exported)
from cpuvirt.cpu.virtualcpu import SREGS, GuestFault, SegCache, VirtualCpu  # noqa: F401  (re-exported)
from cpuvirt.engine import regs as R
from cpuvirt.x86.flags import EFLAGS_VM
from cpuvirt.x86.vectors import Vector

# The hypervisor's CR0 (what `smsw` shows natively): PE MP ET NE WP PG. Its low 16 bits differ from a
# guest's usual PE|ET (0x11), which is what makes the smsw hole visible.
HV_CR0 = 0x80010033
HV_IDTR = (0, 0xFFC00000, 0x7FF, 0)  # the hypervisor's IDTR (the engine never uses it): `sidt` shows it


class DeprivilegedVcpu(IoGateVcpu, EmulatingVcpu):
    """A Vcpu whose guest kernel runs at ring 1 against a VirtualCpu (docs/deprivileging.md, "API").

    Subclasses set `event_kind` ("trap" or "callout": the trace kind of each emulation) and may override
    `enter_kernel(guest_eip)` (where guest-kernel code really runs) and `real_iopl(vcpl)`."""

    # the mode's C delivery (trap's TrapFast, full's FullDelivery), offered each #PF first: see deliver
    c_delivery: Any = None

    @property
    def trace(self):
        return self._trace

    @trace.setter
    def trace(self, trace) -> None:
        """A trace line needs Python: while one is written, every event (and under trap every trap) takes
        the mode's Python path (c_delivery off)."""
        self._trace = trace
        if self.c_delivery is not None:
            self.c_delivery.enabled = trace is None

    def deliver(
        self,
        vector: int,
        return_eip: int,
        error_code: int | None = None,
        soft: bool = False,
        external: bool = False,
        fault_eip: int | None = None,
    ) -> None:
        """A #PF of a refused fill (page_fault: recorded, counted, CR2 set) goes through the mode's C
        delivery first (`c_delivery.deliver_page_fault`: False when it changed nothing); every other
        event, and a #PF it declines, through the Python delivery."""
        fast = self.c_delivery
        if (
            fast is not None
            and vector == Vector.PF
            and error_code is not None
            and not soft
            and not external
            and fast.deliver_page_fault(return_eip, error_code)
        ):
            return
        super().deliver(vector, return_eip, error_code, soft, external, fault_eip)

    def __init__(self, machine, trace=None, max_insns: int = 0):
        super().__init__(machine, trace=trace, max_insns=max_insns)
        self.delivery = RingCompressedDelivery(self)
        self.delivery.view = self.view = VirtualView(self)
        mmu = self.mmu
        if hasattr(mmu, "crs_source"):
            mmu.crs_source = self.virtual_cpu.crs
        else:

            def load_crs():
                mmu.crs = crs = self.virtual_cpu.crs()
                return crs

            mmu.load_crs = load_crs

    def iret_to_v86(self, address: int) -> None:
        """An iretd with VM in its image: at virtual CPL 0 a return to V86 mode (emulated, since the
        engine runs it at ring 1), at CPL 3 the bit is ignored as on hardware."""
        if self.vcpl() != 0:
            self.strip_vm_image(address)
            return
        esp = self.regs.read(R.ESP)
        try:
            image = int.from_bytes(self.read_guest(esp + 8, 4), "little")
        except GuestFault:
            return
        if image & EFLAGS_VM:
            self.emulate_at(address)

    # -- what the engine hands the hypervisor ---------------------------------------------------------
    def sysenter_msrs(self) -> tuple[int, int, int]:
        return tuple(self.virtual_cpu.sysenter)

    def page_fault(self, gva: int, access: int, error_code: int, eip: int) -> None:
        """A guest #PF: CR2 is the virtual one (the real CR2 is the hypervisor's)."""
        self.charge_fault(access)
        self.virtual_cpu.cr2 = gva
        self.record_page_fault(gva, access, error_code, eip)
        self.deliver(Vector.PF, eip, error_code)

    # -- boot ----------------------------------------------------------------------------------------
    def deprivilege(self) -> None:
        """Take the loader's state (flat protected mode at ring 0) into the VirtualCpu and drop the
        guest to ring 1: the hypervisor's CR0/IDTR/TR/LDTR in the real CPU, the guest's GDT in GDTR."""
        regs, v = self.regs, self.virtual_cpu
        v.cr0 = regs.read(R.CR0) | 0x10
        v.cr3 = regs.read(R.CR3)
        v.cr4 = regs.read(R.CR4)
        _, base, limit, _ = regs.table(R.GDTR)
        v.gdtr = (base, limit)
        _, base, limit, _ = regs.table(R.IDTR)
        v.idtr = (base, limit)
        v.iopl = (regs.read(R.EFLAGS) >> 12) & 3
        sels = {name: regs.read(reg) for name, reg in SREGS.items()}
        regs.write(R.CR0, HV_CR0)  # the real CR4 stays the engine's (OSFXSR...: SSE works)
        regs.set_table(R.IDTR, HV_IDTR)
        self.load_cs_ss(sels["cs"], sels["ss"], 0)
        self.hv_load([(SREGS[n], sels[n], sels[n]) for n in ("ds", "es", "fs", "gs") if sels[n] & ~3])
        self.set_guest_eflags(regs.read(R.EFLAGS) | (v.iopl << 12))
        self.mmu.crs = None
        self.uc.ctl(UC_CTL_TLB_FLUSH, UC_CTL_IO_WRITE)
