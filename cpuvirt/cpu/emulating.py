"""The third floor of the deprivileging core: privileged instructions emulated against the VirtualCpu.

The guest kernel's privileged instructions fault at ring 1 (trap) or reach a translator callout (full);
`emulate_at` decodes the instruction and runs its function from privileged.py's table EMULATE (KVM's
emulator looks up an opcode the same way). What those functions need of the vCPU is here: operands,
control registers (`write_cr`, `read_cr`: the guest's translations flushed when they change), the
system segments of lldt/ltr, the control transfers done in the guest's view (iret, far jmp/call,
retf; gates and tasks through cpu/tasks.py) and the MSRs (SYSENTER ones kept in the VirtualCpu).
"""

from __future__ import annotations

import struct

from cpuvirt.cpu.faults import DeliveryFault
from cpuvirt.cpu.privileged import EMULATE
from cpuvirt.cpu.segments import SegmentLoadingVcpu
from cpuvirt.cpu.vcpu import EXIT_HYPERVISOR_STOP
from cpuvirt.cpu.virtualcpu import GuestFault
from cpuvirt.engine import regs as R
from cpuvirt.status import Unsupported
from cpuvirt.x86.faultaddr import operand_address
from cpuvirt.x86.flags import CR0_PE, CR0_PG, CR0_WP, CR4_PGE, CR4_PSE, CR4_SMEP, EFLAGS_NT, EFLAGS_RF, EFLAGS_VM
from cpuvirt.x86.vectors import HAS_ERROR_CODE, Vector

SYSENTER_MSRS = (0x174, 0x175, 0x176)  # IA32_SYSENTER_CS, _ESP, _EIP: kept in the VirtualCpu
_REG32 = dict(zip(R.GPR_NAMES, R.GPR_ORDER))
_REG16 = {n[1:]: r for n, r in _REG32.items()}
_REG8 = {
    "al": (R.EAX, 0),
    "cl": (R.ECX, 0),
    "dl": (R.EDX, 0),
    "bl": (R.EBX, 0),
    "ah": (R.EAX, 8),
    "ch": (R.ECX, 8),
    "dh": (R.EDX, 8),
    "bh": (R.EBX, 8),
}


class EmulatingVcpu(SegmentLoadingVcpu):
    """Privileged instructions of the guest kernel, emulated in its view (module docstring)."""

    def __init__(self, machine, trace=None, max_insns: int = 0):
        super().__init__(machine, trace=trace, max_insns=max_insns)
        self._decoded: dict[tuple[int, bytes], tuple[int, str, str]] = {}

    def decode(self, eip: int, code: bytes | None = None) -> tuple[int, str, str] | None:
        """(length, mnemonic, operands) of the guest instruction at eip, decoded once per site (from
        `code`, its bytes, when the caller has read them)."""
        if code is None:
            code = self.fetch_guest(eip, 15)
        if not code:
            return None
        key = (eip, code)
        d = self._decoded.get(key)
        if d is None:
            for _, size, mnem, ops in self._cs().disasm_lite(code, eip, 1):
                d = (size, mnem, ops)
            if d is None:
                return None
            if len(self._decoded) > 8192:
                self._decoded.clear()
            self._decoded[key] = d
        return d

    def emulate_at(self, eip: int, decoded=None) -> int | None:
        """Emulate the guest-kernel instruction at `eip` if it is one this core emulates; returns its
        length (EIP is then set: past it, or wherever it went), or None (not ours: the caller delivers
        the fault). A fault the instruction raises in the guest's view is delivered here."""
        d = decoded or self.decode(eip)
        if d is None:
            return None
        size, mnem, ops = d
        handler = EMULATE.get(mnem)
        if handler is None:
            return None
        try:
            done = handler(self, eip, size, ops)
        except Unsupported as u:
            self.finish("error", EXIT_HYPERVISOR_STOP, f"unsupported at {eip:#x} ({mnem} {ops}): {u}")
            return size
        except GuestFault as g:
            self.record(self.event_kind, mnem, 13, eip, {"fault": g.vector}, "emulated: raised a fault in the guest")
            if g.cr2 is not None:
                self.virtual_cpu.cr2 = g.cr2
            self.deliver(
                g.vector, g.eip if g.eip is not None else eip, g.error_code if g.vector in HAS_ERROR_CODE else None
            )
            return size
        if done is False:
            return None
        return size

    def emulated(self, eip: int, mnem: str, detail: dict, action: str = "emulated against the virtual CPU") -> None:
        self.record(self.event_kind, mnem, 13, eip, detail, action)

    # -- operands ------------------------------------------------------------------------------------
    def read_operand(self, eip: int, op: str, size: int = 4) -> int:
        op = op.strip()
        if op in _REG32:
            return self.regs.read(_REG32[op])
        if op in _REG16:
            return self.regs.read(_REG16[op]) & 0xFFFF
        if op in _REG8:
            reg, shift = _REG8[op]
            return (self.regs.read(reg) >> shift) & 0xFF
        if "[" in op:
            addr = self.memory_operand(eip)
            return int.from_bytes(self.read_guest(addr, size), "little")
        return int(op, 0)

    def memory_operand(self, eip: int) -> int:
        addr = operand_address(self.mmu.fetch_bytes(eip, 15), eip, self.regs)
        if addr is None:
            raise Unsupported(f"cannot find the memory operand of the instruction at {eip:#x}")
        return addr

    def write_reg(self, name: str, value: int) -> None:
        if name in _REG32:
            self.regs.write(_REG32[name], value)
        elif name in _REG16:
            r = _REG16[name]
            self.regs.write(r, (self.regs.read(r) & ~0xFFFF) | (value & 0xFFFF))
        else:
            raise Unsupported(f"register operand {name}")

    # -- control registers, system segments --------------------------------------------------------
    def write_cr(self, n: int, value: int) -> None:
        v = self.virtual_cpu
        value &= 0xFFFFFFFF
        if n == 0:
            if not value & CR0_PE:
                raise Unsupported("the guest cleared CR0.PE (real mode is not supported under deprivileging)")
            old, v.cr0 = v.cr0, value | 0x10  # ET is hard-wired to 1
            if (old ^ value) & (CR0_PG | CR0_PE):
                self.flush_guest_tlb()
            elif (old ^ value) & CR0_WP:
                self.flush_guest_tlb(rules_changed=False, wp_set=bool(value & CR0_WP))
        elif n == 2:
            v.cr2 = value
        elif n == 3:
            v.cr3 = value
            switch = getattr(self.mmu.strategy, "on_cr3_write", None)
            if switch is not None:
                self.mmu.crs = None
                self._rtlb.clear()
                switch(value)  # shadow paging: its root for this CR3 (flushes the engine)
            else:
                self.flush_guest_tlb()
        elif n == 4:
            from cpuvirt.x86.cpuid import CR4_RESERVED

            if value & ~v.cr4 & CR4_RESERVED:
                raise GuestFault(Vector.GP, 0)
            old, v.cr4 = v.cr4, value
            if (old ^ value) & CR4_PSE:
                self.flush_guest_tlb()
            elif (old ^ value) & (CR4_PGE | CR4_SMEP):
                self.flush_guest_tlb(rules_changed=False)
        else:
            raise GuestFault(Vector.UD)

    def guest_cr0(self) -> int:
        return self.virtual_cpu.cr0

    def read_cr(self, n: int) -> int:
        v = self.virtual_cpu
        if n in (0, 2, 3, 4):
            return (v.cr0, 0, v.cr2, v.cr3, v.cr4)[n]
        raise GuestFault(Vector.UD)

    def _system_segment(self, selector: int, types: tuple[int, ...]) -> tuple[int, int, int, int]:
        """(base, limit, lo, hi) of a GDT system descriptor of one of `types` for lldt/ltr; #GP/#NP."""
        if selector & 4:
            raise GuestFault(Vector.GP, selector & ~3)
        lo, hi = self.descriptor(selector)
        if hi & (1 << 12) or (hi >> 8) & 0xF not in types:
            raise GuestFault(Vector.GP, selector & ~3)
        if not hi & 0x8000:
            raise GuestFault(Vector.NP, selector & ~3)
        base = (lo >> 16) | ((hi & 0xFF) << 16) | (hi & 0xFF000000)
        limit = (lo & 0xFFFF) | (hi & 0xF0000)
        if hi & (1 << 23):
            limit = (limit << 12) | 0xFFF
        return base, limit, lo, hi

    # -- control transfers in the guest's view, MSRs -----------------------------------------------
    def iret(self, eip: int, size: int = 1) -> None:
        """iretd by the guest kernel (virtual CPL 0), in the guest's view (SDM IRET, protected mode):
        a task return with EFLAGS.NT (cpu/tasks.py), a return to virtual-8086 mode with VM in the
        image, else a protected-mode return. RF is not loaded: the engine would keep it for its next
        translation block, whose `pushf` would store it (Vcpu.iret_image_rf); breakpoints, RF's
        purpose, are not modelled under deprivileging (the debug registers are virtual)."""
        regs = self.regs
        self.unblock_nmi()
        if regs.read(R.EFLAGS) & EFLAGS_NT:
            from cpuvirt.cpu import tasks

            try:
                tasks.task_return(self.view, (eip + size) & 0xFFFFFFFF)
            except DeliveryFault as f:
                raise GuestFault(f.vector, f.error_code, f.cr2, f.eip) from None
            return
        esp = regs.read(R.ESP)
        new_eip, cs, flags = struct.unpack("<III", self.read_guest(esp, 12))
        flags &= ~EFLAGS_RF
        if flags & EFLAGS_VM:
            # RETURN-TO-VIRTUAL-8086-MODE: the segment values are real-mode ones, CPL becomes 3.
            new_esp, ss, es, ds, fs, gs = struct.unpack("<6I", self.read_guest(esp + 12, 24))
            self.set_guest_eflags(flags)
            for reg, value in ((R.SS, ss), (R.CS, cs), (R.ES, es), (R.DS, ds), (R.FS, fs), (R.GS, gs)):
                regs.write(reg, value & 0xFFFF)
            self._loaded.clear()
            regs.write(R.ESP, new_esp)
            regs.write(R.EIP, new_eip & 0xFFFF)
            return
        cs = self.guest_selector(cs & 0xFFFF)  # a CS the guest read natively (RPL 1) is its ring 0
        rpl = cs & 3
        _, hi = self.descriptor(cs)
        if not (hi >> 11) & 1 or not (hi >> 12) & 1 or rpl == 1 or rpl == 2:
            raise GuestFault(Vector.GP, cs & ~3)
        if not hi & 0x8000:
            raise GuestFault(Vector.NP, cs & ~3)
        if rpl == 0:
            self.load_cs_ss(cs, None, 0)
            regs.write(R.ESP, (esp + 12) & 0xFFFFFFFF)
            self.set_guest_eflags(flags)
            self.enter_kernel(new_eip)
            return
        new_esp, ss = struct.unpack("<II", self.read_guest(esp + 12, 8))
        ss = self.guest_selector(ss & 0xFFFF)
        _, shi = self.descriptor(ss)
        if (ss & 3) != 3 or (shi >> 13) & 3 != 3 or (shi >> 11) & 1 or not (shi >> 9) & 1:
            raise GuestFault(Vector.GP, ss & ~3)
        self.load_cs_ss(cs, ss, 3)
        regs.write(R.ESP, new_esp)
        self.set_guest_eflags(flags)
        regs.write(R.EIP, new_eip)
        # Data segments the outer ring may not use are nulled (SDM IRET, RETURN-TO-OUTER-PRIVILEGE-LEVEL).
        for reg in (R.ES, R.DS, R.FS, R.GS):
            sel = regs.read(reg)
            if sel & ~3:
                try:
                    _, dhi = self.descriptor(sel)
                except GuestFault:
                    regs.write(reg, 0)
                    continue
                conforming_code = (dhi >> 11) & 1 and (dhi >> 10) & 1
                if not conforming_code and (dhi >> 13) & 3 < 3:
                    regs.write(reg, 0)

    def far_transfer(self, eip: int, size: int, selector: int, offset: int, call: bool) -> None:
        """ljmp/lcall to a code segment at the same (virtual) privilege; other targets are #GP."""
        selector = self.guest_selector(selector)
        _, hi = self.descriptor(selector)
        cpl = self.vcpl()
        dpl = (hi >> 13) & 3
        if not (hi >> 12) & 1:
            # a call gate, TSS or task gate: cpu/tasks.py, in the guest's view
            from cpuvirt.cpu import tasks

            try:
                tasks.far_transfer(self.view, selector, offset, call, eip, (eip + size) & 0xFFFFFFFF)
            except DeliveryFault as f:
                raise GuestFault(f.vector, f.error_code, f.cr2, f.eip) from None
            return
        if not (hi >> 11) & 1:
            raise GuestFault(Vector.GP, selector & ~3)
        conforming = (hi >> 10) & 1
        if (conforming and dpl > cpl) or (not conforming and (dpl != cpl or (selector & 3) > cpl)):
            raise GuestFault(Vector.GP, selector & ~3)
        if not hi & 0x8000:
            raise GuestFault(Vector.NP, selector & ~3)
        if call:
            esp = (self.regs.read(R.ESP) - 8) & 0xFFFFFFFF
            self.write_guest(
                esp, struct.pack("<II", (eip + size) & 0xFFFFFFFF, self.guest_selector(self.regs.read(R.CS)))
            )
            self.regs.write(R.ESP, esp)
        self.load_cs_ss((selector & ~3) | cpl, None, cpl)
        if cpl == 0:
            self.enter_kernel(offset)
        else:
            self.regs.write(R.EIP, offset)

    def retf(self, eip: int, imm: int) -> None:
        regs = self.regs
        esp = regs.read(R.ESP)
        new_eip, cs = struct.unpack("<II", self.read_guest(esp, 8))
        cs = self.guest_selector(cs & 0xFFFF)
        cpl = self.vcpl()
        _, hi = self.descriptor(cs)
        if not (hi >> 11) & 1 or not (hi >> 12) & 1 or (cs & 3) < cpl:
            raise GuestFault(Vector.GP, cs & ~3)
        if (cs & 3) == cpl:
            self.load_cs_ss(cs, None, cpl)
            regs.write(R.ESP, (esp + 8 + imm) & 0xFFFFFFFF)
            if cpl == 0:
                self.enter_kernel(new_eip)
            else:
                regs.write(R.EIP, new_eip)
            return
        new_esp, ss = struct.unpack("<II", self.read_guest(esp + 8 + imm, 8))
        self.load_cs_ss(cs, ss & 0xFFFF, cs & 3)
        regs.write(R.ESP, (new_esp + imm) & 0xFFFFFFFF)
        regs.write(R.EIP, new_eip)

    def msr(self, eip: int, size: int, write: bool) -> None:
        regs, m = self.regs, self.machine
        msr = regs.read(R.ECX)
        from cpuvirt.machine.machine import MsrFault

        try:
            if msr in SYSENTER_MSRS:
                if write:
                    self.virtual_cpu.sysenter[msr - SYSENTER_MSRS[0]] = regs.read(R.EAX)
                else:
                    regs.write(R.EAX, self.virtual_cpu.sysenter[msr - SYSENTER_MSRS[0]])
                    regs.write(R.EDX, 0)
            elif m.implements_msr(msr):
                if write:
                    m.wrmsr(msr, regs.read(R.EAX) | regs.read(R.EDX) << 32)
                else:
                    value = m.rdmsr(msr)
                    regs.write(R.EAX, value & 0xFFFFFFFF)
                    regs.write(R.EDX, value >> 32 & 0xFFFFFFFF)
            elif write:
                self.uc.msr_write(msr, regs.read(R.EAX) | regs.read(R.EDX) << 32)
            else:
                value = self.uc.msr_read(msr)
                regs.write(R.EAX, value & 0xFFFFFFFF)
                regs.write(R.EDX, value >> 32 & 0xFFFFFFFF)
        except MsrFault:
            raise GuestFault(Vector.GP, 0) from None
