"""The root-mode hypervisor: one handler per basic exit reason, as KVM's kvm_vmx_exit_handlers[].

Each handler reads the exit information it needs (vmread), emulates, advances GUEST_RIP by the
instruction length when it completed the instruction itself, and says what it did (`x.action`, shown
in the trace). Events for the guest are injected through the VM-entry interruption-information field,
never delivered directly: the processor does that at the next VM entry.
"""

from __future__ import annotations

from cpuvirt.cpu.vcpu import EXIT_ERROR, EXIT_HYPERVISOR_STOP, EXIT_TRIPLE_FAULT
from cpuvirt.engine import regs as R
from cpuvirt.machine.apic import APIC_BASE_GPA, TPR
from cpuvirt.modes.hw import exits as E
from cpuvirt.modes.hw.exits import Exit, ExitReason
from cpuvirt.modes.hw.vmcs import Field as F
from cpuvirt.x86.flags import EFLAGS_IF, EFLAGS_VM
from cpuvirt.x86.vectors import HAS_ERROR_CODE, Vector

# KVM hypercalls (Documentation/virt/kvm/x86/hypercalls.rst, include/uapi/linux/kvm_para.h).
KVM_HC_VAPIC_POLL_IRQ, KVM_HC_KICK_CPU, KVM_HC_CLOCK_PAIRING = 1, 5, 9
KVM_HC_SEND_IPI, KVM_HC_SCHED_YIELD, KVM_HC_MAP_GPA_RANGE = 10, 11, 12
KVM_ENOSYS, KVM_EINVAL = 1000, 22
HYPERCALL_NAMES = {
    1: "KVM_HC_VAPIC_POLL_IRQ",
    5: "KVM_HC_KICK_CPU",
    9: "KVM_HC_CLOCK_PAIRING",
    10: "KVM_HC_SEND_IPI",
    11: "KVM_HC_SCHED_YIELD",
    12: "KVM_HC_MAP_GPA_RANGE",
}


class RootHypervisor:
    _segments = None  # cpu/segcache.EngineSegments, made at the first emulated instruction

    def __init__(self, cpu):
        self.cpu = cpu
        self.vmcs = cpu.vmcs
        self.handlers = {
            ExitReason.EXCEPTION_NMI: self.handle_exception_nmi,
            ExitReason.EXTERNAL_INTERRUPT: self.handle_external_interrupt,
            ExitReason.TRIPLE_FAULT: self.handle_triple_fault,
            ExitReason.INTERRUPT_WINDOW: self.handle_interrupt_window,
            ExitReason.CPUID: self.handle_cpuid,
            ExitReason.HLT: self.handle_hlt,
            ExitReason.INVD: self.handle_skip,
            ExitReason.INVLPG: self.handle_invlpg,
            ExitReason.RDPMC: self.handle_execute,
            ExitReason.RDTSC: self.handle_rdtsc,
            ExitReason.VMCALL: self.handle_vmcall,
            ExitReason.CR_ACCESS: self.handle_cr,
            ExitReason.DR_ACCESS: self.handle_execute,
            ExitReason.IO_INSTRUCTION: self.handle_io,
            ExitReason.MSR_READ: self.handle_rdmsr,
            ExitReason.MSR_WRITE: self.handle_wrmsr,
            ExitReason.MWAIT: self.handle_skip,
            ExitReason.MONITOR: self.handle_skip,
            ExitReason.PAUSE: self.handle_skip,
            ExitReason.GDTR_IDTR: self.handle_execute,
            ExitReason.LDTR_TR: self.handle_execute,
            ExitReason.EPT_VIOLATION: self.handle_ept_violation,
            ExitReason.EPT_MISCONFIG: self.handle_ept_misconfig,
            ExitReason.WBINVD: self.handle_skip,
            ExitReason.TASK_SWITCH: self.handle_task_switch,
            ExitReason.APIC_ACCESS: self.handle_apic_access,
            ExitReason.APIC_WRITE: self.handle_apic_write,
            ExitReason.TPR_BELOW_THRESHOLD: self.handle_tpr_below_threshold,
        }
        for name in E.VMX_INSTRUCTIONS.values():
            if name is not ExitReason.VMCALL:
                self.handlers[name] = self.handle_vmx_instruction

    # -- helpers ----------------------------------------------------------------------------------------
    def skip_instruction(self, x: Exit) -> None:
        """KVM's kvm_skip_emulated_instruction: RIP += the exit's instruction length."""
        self.vmcs.vmwrite(F.GUEST_RIP, x.rip + self.vmcs.vmread(F.VM_EXIT_INSTRUCTION_LEN))

    def inject(self, vector: int, kind: int, error_code: int | None = None, length: int = 0) -> None:
        self.vmcs.vmwrite(F.VM_ENTRY_INTR_INFO_FIELD, E.intr_info(vector, kind, error_code is not None))
        if error_code is not None:
            self.vmcs.vmwrite(F.VM_ENTRY_EXCEPTION_ERROR_CODE, error_code)
        self.vmcs.vmwrite(F.VM_ENTRY_INSTRUCTION_LEN, length)

    def guest_interruptible(self) -> bool:
        """RFLAGS.IF and no blocking by STI / MOV SS (GUEST_INTERRUPTIBILITY_INFO bits 0-1)."""
        return (
            bool(self.vmcs.vmread(F.GUEST_RFLAGS) & EFLAGS_IF)
            and not self.vmcs.vmread(F.GUEST_INTERRUPTIBILITY_INFO) & 3
        )

    # -- handlers ----------------------------------------------------------------------------------------
    def handle_exception_nmi(self, x: Exit) -> None:
        """Reflect the exception to the guest (KVM: handle_exception_nmi -> kvm_queue_exception)."""
        info = self.vmcs.vmread(F.VM_EXIT_INTR_INFO)
        vector, kind = info & 0xFF, (info >> 8) & 7
        code = self.vmcs.vmread(F.VM_EXIT_INTR_ERROR_CODE) if info & E.INTR_INFO_DELIVER_CODE else None
        if (
            vector == Vector.PF
            and self.cpu.shadow is not None
            and kind == E.INTR_TYPE_HW_EXCEPTION
            and code is not None
        ):  # a #PF always delivers its error code
            code = self.shadow_page_fault(x, code)
            if code is None:
                return
        if vector == Vector.PF:
            # The processor did not touch CR2: the hypervisor sets it from the exit qualification.
            self.cpu.regs.write(R.CR2, self.vmcs.vmread(F.EXIT_QUALIFICATION))
        if kind == E.INTR_TYPE_NMI:
            self.inject(Vector.NMI, E.INTR_TYPE_NMI)  # the guest's own (virtual) NMI
        elif kind == E.INTR_TYPE_SOFT_EXCEPTION:
            self.inject(vector, kind, None, self.vmcs.vmread(F.VM_EXIT_INSTRUCTION_LEN))
        else:
            self.inject(vector, E.INTR_TYPE_HW_EXCEPTION, code if vector in HAS_ERROR_CODE else None)
        x.action = f"reflected {x.detail.get('name', vector)} to the guest (VM-entry injection)"

    def shadow_page_fault(self, x: Exit, hw_code: int) -> int | None:
        """KVM's kvm_mmu_page_fault on shadow page tables: walk the guest's tables for the faulting
        address. A hidden fault fills the shadow and resumes; a write the guest may make to one of its
        write-protected page tables is emulated (ptemod); a true fault returns the guest's own error
        code, to be injected."""
        cpu = self.cpu
        gva = self.vmcs.vmread(F.EXIT_QUALIFICATION)
        access = 1 if hw_code & 2 else (cpu.pf_access if cpu.pf_access != 1 else 0)
        kind, value = cpu.shadow.page_fault(gva, access, bool(hw_code & 4))
        if kind == "hidden":
            x.detail["fault"] = "hidden"
            x.action = "hidden #PF: shadow entry filled from the guest's page tables; resumed"
            return None
        if kind == "traced":
            from cpuvirt.memory.traces import TracedWrite, TraceError

            tw = TracedWrite(gva, value, eip=x.rip)
            try:
                cpu.mmu.traces.dispatch(tw, cpu)
            except TraceError as e:
                cpu.finish("error", EXIT_ERROR, str(e))
                x.action = "cannot emulate"
                return None
            x.detail["fault"] = "ptemod"
            rip = cpu.regs.read(R.EIP)
            if tw.done and rip != x.rip:
                self.vmcs.vmwrite(F.GUEST_RIP, rip)
                cpu.clock.unretire(-1)  # the emulated store retired the instruction
                x.action = "write to a write-protected shadowed page table: emulated, shadow updated, skipped"
            else:
                x.action = "write to a shadowed page table not emulated: frame unshadowed, store re-executed"
            return None
        x.detail["fault"] = "true"
        x.detail["guest_error_code"] = value
        return value

    def handle_external_interrupt(self, x: Exit) -> None:
        """The emulated PIC has a request for the guest: inject it, or wait for the interrupt window."""
        if self.guest_interruptible():
            vector = self.cpu.machine.acknowledge_interrupt()
            self.inject(vector, E.INTR_TYPE_EXT_INTR)
            x.action = f"injected external interrupt vector {vector:#x}"
        else:
            self.cpu.set_ctl("interrupt_window_exiting", True)
            x.action = "guest has IF=0: requested interrupt-window exiting"

    def handle_interrupt_window(self, x: Exit) -> None:
        self.cpu.set_ctl("interrupt_window_exiting", False)
        if self.cpu.machine.pending_interrupt() is not None:
            vector = self.cpu.machine.acknowledge_interrupt()
            self.inject(vector, E.INTR_TYPE_EXT_INTR)
            x.action = f"window open: injected external interrupt vector {vector:#x}"
        else:
            x.action = "window open, nothing pending"

    def handle_triple_fault(self, x: Exit) -> None:
        self.cpu.finish("triple_fault", EXIT_TRIPLE_FAULT, f"triple fault at {x.rip:#x}: {x.detail.get('why', '')}")
        x.action = "shut the guest down (KVM_EXIT_SHUTDOWN)"

    def handle_cpuid(self, x: Exit) -> None:
        model = getattr(self.cpu.machine, "cpuid", None)
        if model is None:
            x.action = "executed CPUID on the guest's behalf (engine's model)"
            return
        regs = self.cpu.regs
        eax, ebx, ecx, edx = model(regs.read(R.EAX), regs.read(R.ECX))
        for reg, val in ((R.EAX, eax), (R.EBX, ebx), (R.ECX, ecx), (R.EDX, edx)):
            regs.write(reg, val)
        x.value = True
        x.action = f"emulated CPUID: {eax:#x} {ebx:#x} {ecx:#x} {edx:#x}"

    def handle_hlt(self, x: Exit) -> None:
        self.skip_instruction(x)
        x.block = True
        x.action = "skipped hlt; vCPU blocked until an interrupt (kvm_vcpu_halt)"

    def handle_invlpg(self, x: Exit) -> None:
        la = self.vmcs.vmread(F.EXIT_QUALIFICATION)
        if self.cpu.shadow is not None:
            self.cpu.shadow.invlpg(la, flush_engine=False)  # the engine executes the invlpg
            x.action = f"invalidated {la:#x}: shadow entry dropped (kvm_mmu_invlpg), executed for the guest"
            return
        x.action = f"invalidated {la:#x} (executed for the guest)"

    def handle_rdtsc(self, x: Exit) -> None:
        tsc = self.cpu.clock.now
        if self.cpu.ctl("use_tsc_offsetting"):
            tsc = (tsc + self.vmcs.vmread(F.TSC_OFFSET)) & 0xFFFFFFFFFFFFFFFF
        x.value = tsc
        x.action = f"returned TSC {tsc}"

    def handle_vmcall(self, x: Exit) -> None:
        """The KVM hypercall ABI: number in EAX, arguments in EBX, ECX, EDX, ESI, result in EAX."""
        regs = self.cpu.regs
        nr = regs.read(R.EAX)
        if nr in (KVM_HC_VAPIC_POLL_IRQ, KVM_HC_KICK_CPU, KVM_HC_SCHED_YIELD):
            ret = 0  # one vCPU: nothing to poll, kick or yield to
        elif nr == KVM_HC_SEND_IPI:
            ret = -KVM_EINVAL  # no other vCPU to send to
        else:
            ret = -KVM_ENOSYS
        regs.write(R.EAX, ret & 0xFFFFFFFF)
        self.skip_instruction(x)
        x.detail.update(
            {
                "hypercall": HYPERCALL_NAMES.get(nr, f"unknown ({nr})"),
                "nr": nr,
                "args": [f"{regs.read(r):#x}" for r in (R.EBX, R.ECX, R.EDX, R.ESI)],
                "ret": ret,
            }
        )
        x.action = f"hypercall {HYPERCALL_NAMES.get(nr, nr)} -> {ret}"

    def handle_vmx_instruction(self, x: Exit) -> None:
        """No nested virtualization: like KVM without `nested`, answer with #UD."""
        self.inject(Vector.UD, E.INTR_TYPE_HW_EXCEPTION)
        x.action = "no nested VMX: injected #UD"

    def handle_cr(self, x: Exit) -> None:
        """KVM's handle_cr: MOV to CR0/CR3/CR4 updates the guest's view (read shadow) and real value."""
        q = self.vmcs.vmread(F.EXIT_QUALIFICATION)
        cr, access, gpr = q & 0xF, (q >> 4) & 3, R.GPR_ORDER[(q >> 8) & 7]
        regs = self.cpu.regs
        if access == E.CR_MOV_TO:
            value = regs.read(gpr)
            if cr == 0:
                self.vmcs.vmwrite(F.CR0_READ_SHADOW, value)
                self.vmcs.vmwrite(F.GUEST_CR0, value | (1 << 5))  # keep CR0.NE, as KVM does
            elif cr == 4:
                self.vmcs.vmwrite(F.CR4_READ_SHADOW, value)
                self.vmcs.vmwrite(F.GUEST_CR4, value)
            elif cr == 3:
                self.vmcs.vmwrite(F.GUEST_CR3, value)
                if self.cpu.shadow is not None:
                    # KVM: kvm_mmu_new_pgd, a cached root; the engine flushes its TLB on the CR3 load.
                    self.cpu.shadow.on_cr3_write(value, flush_engine=False)
            x.action = f"CR{cr} <- {value:#x}"
        elif access == E.CR_MOV_FROM:
            value = self.vmcs.vmread(F.GUEST_CR3) if cr == 3 else 0
            regs.write(gpr, value)
            x.action = f"{R.GPR_NAMES[(q >> 8) & 7]} <- CR{cr} ({value:#x})"
        elif access == E.CR_CLTS:
            self.vmcs.vmwrite(F.CR0_READ_SHADOW, self.vmcs.vmread(F.CR0_READ_SHADOW) & ~8)
            self.vmcs.vmwrite(F.GUEST_CR0, self.vmcs.vmread(F.GUEST_CR0) & ~8)
            x.action = "CR0.TS cleared"
        else:
            data = q >> 16 & 0xF
            shadow = self.vmcs.vmread(F.CR0_READ_SHADOW)
            new = (shadow & ~0xE) | (data & 0xF) | (shadow & 1)  # LMSW cannot clear PE
            self.vmcs.vmwrite(F.CR0_READ_SHADOW, new)
            self.vmcs.vmwrite(F.GUEST_CR0, (self.vmcs.vmread(F.GUEST_CR0) & ~0xF) | (new & 0xF))
            x.action = f"LMSW: CR0 low bits <- {data:#x}"
        self.skip_instruction(x)

    def handle_task_switch(self, x: Exit) -> None:
        """KVM's handle_task_switch: emulate the hardware task switch (the guest's TSS, GDT, CR3)."""
        x.action = self.cpu.perform_task_switch()

    def handle_io(self, x: Exit) -> None:
        """Emulate the port access in the device model (KVM: kvm_fast_pio, or an exit to user space)."""
        q = self.vmcs.vmread(F.EXIT_QUALIFICATION)
        port, size, is_in = q >> 16, (q & 7) + 1, bool(q & 8)
        bus = self.cpu.machine.bus
        if is_in:
            x.value = bus.read(port, size)
            x.action = f"emulated in from {port:#x} -> {x.value:#x}"
        else:
            bus.write(port, size, x.value)
            x.action = f"emulated out to {port:#x}"

    def handle_rdmsr(self, x: Exit) -> None:
        regs = self.cpu.regs
        msr = regs.read(R.ECX)
        value = self._machine_msr("rdmsr", msr)
        if msr == 0x10:  # IA32_TIME_STAMP_COUNTER
            value = self.cpu.clock.now
        if value is None:
            x.action = f"MSR {msr:#x}: executed for the guest"
            return
        regs.write(R.EAX, value & 0xFFFFFFFF)
        regs.write(R.EDX, value >> 32 & 0xFFFFFFFF)
        self.skip_instruction(x)
        x.action = f"MSR {msr:#x} -> {value:#x}"

    def handle_wrmsr(self, x: Exit) -> None:
        regs = self.cpu.regs
        msr = regs.read(R.ECX)
        value = regs.read(R.EAX) | regs.read(R.EDX) << 32
        if self._machine_msr("wrmsr", msr, value) is not None:
            self.skip_instruction(x)
            x.action = f"MSR {msr:#x} <- {value:#x}"
        else:
            x.action = f"MSR {msr:#x} <- {value:#x}: executed for the guest"

    def _machine_msr(self, op: str, msr: int, *value):
        """The machine's MSR model (APIC base...), or None for an MSR it leaves to the engine."""
        fn = getattr(self.cpu.machine, op, None)
        if fn is None:
            return None
        try:
            result = fn(msr, *value)
        except Exception as e:  # the model does not implement this MSR
            if type(e).__name__ != "MsrFault":
                raise
            return None
        return True if value and result is None else result

    def handle_execute(self, x: Exit) -> None:
        """Let the instruction run once on the guest's behalf (it has no hidden effect to emulate here)."""
        x.action = "executed for the guest"

    def handle_skip(self, x: Exit) -> None:
        self.skip_instruction(x)
        x.action = "nothing to do (no caches, one vCPU): skipped"

    def handle_ept_violation(self, x: Exit) -> None:
        cpu = self.cpu
        gpa = self.vmcs.vmread(F.GUEST_PHYSICAL_ADDRESS)
        page = gpa & ~0xFFF
        m = cpu.machine
        if getattr(m, "mmio", None) is not None and m.mmio.find(gpa) is not None:
            # A device register: KVM's handle_ept_violation -> kvm_mmu_page_fault -> emulation.
            self.emulate_instruction(x, "")
            return
        if cpu.settings.lazy_ept and page < cpu.machine.mem_bytes:
            from cpuvirt.memory.p2m import RAM_HPA

            cpu.ept.map(page, RAM_HPA + page)
            x.action = f"allocated guest page {page:#x} on demand; retry"
            return
        if page >= cpu.machine.mem_bytes and not self.vmcs.vmread(F.EXIT_QUALIFICATION) & 4:
            # Unassigned guest-physical memory reads all-ones and drops writes (pc-lite), emulated
            # access by access as KVM hands it to QEMU's unassigned region (no EPT entry: mapping
            # a sweep of the 4 GiB space would exhaust the hypervisor's memory with EPT tables).
            self.emulate_instruction(x, "unassigned guest-physical memory (reads all-ones, writes dropped): ")
            return
        cpu.finish(
            "ept_violation",
            EXIT_HYPERVISOR_STOP,
            f"EPT violation at guest-physical {gpa:#x} (linear {self.vmcs.vmread(F.GUEST_LINEAR_ADDRESS):#x}, "
            f"{x.detail.get('access')}): outside guest RAM and emulated MMIO",
        )
        x.action = "no memory there: the hypervisor stops the guest"

    def emulate_instruction(self, x: Exit, what: str) -> None:
        """Carry out the guest instruction at RIP in the hypervisor (cpu/emulator.py): its memory
        operands reach RAM, device registers and unassigned memory as the guest's accesses would.
        A #PF or #GP it raises is injected; a rep string instruction done in part is re-entered at
        the same RIP (its registers say how far it got); a form not emulated stops the guest."""
        from cpuvirt.cpu.emulator import Context, EmulatedFault
        from cpuvirt.memory.mmu import GuestPageFault, NestedFault
        from cpuvirt.status import Unsupported

        cpu = self.cpu
        # Segments as the CPU forms addresses: real mode, V86 mode and 16-bit code segments are
        # rarely flat (cpu/segcache.py); 16-bit code is decoded as such (cpu/emulator.py).
        segs = self._segments
        if segs is None:
            from cpuvirt.cpu.segcache import EngineSegments

            segs = self._segments = EngineSegments(cpu.uc)
        code16 = not cpu.regs.read(R.CR0) & 1 or bool(cpu.regs.read(R.EFLAGS) & EFLAGS_VM)
        if segs.available:
            segs.refresh()
            code16 = code16 or not segs.code32()
            linear = (segs.base(R.CS) + x.rip) & 0xFFFFFFFF
        elif code16:
            cpu.finish(
                "error",
                EXIT_HYPERVISOR_STOP,
                f"hw: MMIO access at {x.rip:#x} from 16-bit code: the "
                "engine's segment caches cannot be read, so its addresses cannot be formed",
            )
            x.action = "cannot emulate"
            return
        else:
            linear = x.rip
        user = bool(cpu.regs.read(R.EFLAGS) & EFLAGS_VM) or (
            bool(cpu.regs.read(R.CR0) & 1) and cpu.regs.read(R.SS) & 3 == 3
        )  # real mode: supervisor
        ctx = Context(
            cpu.regs,
            _GuestLinear(cpu.mmu, user),
            io=_ChargedPorts(cpu),
            cr0=self._guest_cr0,
            segs=segs.base if segs.available else None,
        )
        try:
            length, done, text = self._emulate_mapping_lazily(linear, code16, ctx)
        except NestedFault as nf:
            cpu.finish(
                "ept_violation",
                EXIT_HYPERVISOR_STOP,
                f"hw: emulating the instruction at {x.rip:#x}: EPT refuses guest-physical {nf.gpa:#x}",
            )
            x.action = "cannot emulate"
            return
        except Unsupported as u:
            cpu.finish("error", EXIT_HYPERVISOR_STOP, f"hw: MMIO access {u}")
            x.action = "cannot emulate"
            return
        except GuestPageFault as pf:
            cpu.regs.write(R.CR2, pf.gva)
            self.inject(Vector.PF, E.INTR_TYPE_HW_EXCEPTION, pf.error_code)
            x.action = f"{what}emulation raised #PF at {pf.gva:#x}: injected"
            return
        except EmulatedFault as f:
            self.inject(f.vector, E.INTR_TYPE_HW_EXCEPTION, f.error_code if f.vector in HAS_ERROR_CODE else None)
            x.action = f"{what}emulation raised vector {f.vector}: injected"
            return
        # Virtual time as native counts it: one instruction, however many iterations a rep made.
        if done:
            self.vmcs.vmwrite(F.GUEST_RIP, x.rip + length)
            cpu.clock.unretire(-1)  # the emulated access retired the instruction
            x.action = f"{what}{text}"
        else:
            x.action = f"{what}{text}; re-entered to continue"

    def _emulate_mapping_lazily(self, linear: int, code16: bool, ctx):
        """emulate(), mapping on demand (lazy_ept) the guest RAM pages its operands or the guest's page
        tables touch. Written operands are translated first and a rep string instruction resumes from
        its registers, so a retry repeats at most the device reads of the interrupted step (cmps
        between a device and an unmapped RAM page)."""
        from cpuvirt.cpu.emulator import emulate
        from cpuvirt.memory.mmu import NestedFault
        from cpuvirt.memory.p2m import RAM_HPA

        cpu = self.cpu
        for _ in range(8):  # at most 8 distinct pages: two operands, each walk's tables
            try:
                return emulate(cpu.mmu.fetch_bytes(linear, 15), linear, ctx, code16)
            except NestedFault as nf:
                page = nf.gpa & ~0xFFF
                if not (cpu.settings.lazy_ept and page < cpu.machine.mem_bytes):
                    raise
                cpu.ept.map(page, RAM_HPA + page)
        return emulate(cpu.mmu.fetch_bytes(linear, 15), linear, ctx, code16)

    def _guest_cr0(self) -> int:
        """CR0 as the guest reads it: through the guest/host mask and read shadow (SDM 25.3)."""
        mask = self.vmcs.vmread(F.CR0_GUEST_HOST_MASK)
        return (self.cpu.regs.read(R.CR0) & ~mask) | (self.vmcs.vmread(F.CR0_READ_SHADOW) & mask) | 0x10

    # -- APIC virtualization (modes/hw/apicv.py) -----------------------------------------------------------
    def handle_apic_access(self, x: Exit) -> None:
        """KVM's handle_apic_access: an access to the APIC-access page that the processor did not
        virtualize (a register it does not serve from the virtual-APIC page, e.g. the timer's current
        count, or every register with APIC-register virtualization off) is emulated on the local APIC.
        The instruction's operand size and value are what KVM's emulator would decode (`apic_access`)."""
        q = self.vmcs.vmread(F.EXIT_QUALIFICATION)
        offset, access = q & 0xFFF, (q >> 12) & 0xF
        size, value = self.cpu.apic_access
        name = E.apic_register_name(offset)
        bus = self.cpu.machine.mmio
        if access == E.APIC_ACCESS_LINEAR_READ:
            x.value = bus.read(APIC_BASE_GPA + offset, size)
            x.action = f"emulated read of {name} -> {x.value:#x}"
        elif access == E.APIC_ACCESS_LINEAR_WRITE:
            bus.write(APIC_BASE_GPA + offset, size, value)
            x.action = f"emulated write of {value:#x} to {name}"
        else:
            self.cpu.finish(
                "error", EXIT_HYPERVISOR_STOP, f"hw: APIC access of type {access} at {x.rip:#x}: not emulated"
            )
            x.action = "cannot emulate"

    def handle_apic_write(self, x: Exit) -> None:
        """KVM's handle_apic_write -> kvm_apic_write_nodecode: the processor already wrote the value
        into the virtual-APIC page (trap-like exit, RIP past the instruction); the hypervisor completes
        the write on the emulated APIC (EOI, ICR send, LVT, timer...). Its registers go back into the
        page at VM entry, so the page never keeps a value the APIC would not show."""
        offset = self.vmcs.vmread(F.EXIT_QUALIFICATION) & 0xFF0
        vapic = self.cpu.vapic
        vapic.pull()  # an ICR low write sends with the ICR high in the page
        value = vapic.read32(offset)
        self.cpu.machine.mmio.write(APIC_BASE_GPA + offset, 4, value)
        if offset != TPR:  # the register as the APIC now shows it (EOI reads 0...)
            vapic.write32(offset, self.cpu.machine.apic.read(offset, 4))
        x.action = f"completed the write of {value:#x} to {E.apic_register_name(offset)} in the local APIC"

    def handle_tpr_below_threshold(self, x: Exit) -> None:
        """KVM's handle_tpr_below_threshold: the guest lowered its TPR (in the virtual-APIC page, no
        exit) below the class of an interrupt the APIC holds: look for a deliverable interrupt again."""
        self.cpu.machine.apic.on_change()
        x.action = "TPR lowered below a pending interrupt's class: interrupts re-evaluated"

    def handle_ept_misconfig(self, x: Exit) -> None:
        self.cpu.finish(
            "ept_misconfig",
            EXIT_HYPERVISOR_STOP,
            f"EPT misconfiguration at guest-physical {self.vmcs.vmread(F.GUEST_PHYSICAL_ADDRESS):#x}",
        )
        x.action = "misconfigured EPT entry: the hypervisor stops the guest"

    def unhandled(self, x: Exit) -> None:
        self.cpu.finish(
            "error", EXIT_HYPERVISOR_STOP, f"hw: no handler for exit reason {x.reason.name} ({int(x.reason)})"
        )
        x.action = "no handler"


class _GuestLinear:
    """Guest-linear memory for the instruction emulator, at the guest's privilege (user or not)."""

    __slots__ = ("mmu", "user")

    def __init__(self, mmu, user: bool):
        self.mmu, self.user = mmu, user

    def read(self, gva: int, size: int) -> int:
        return int.from_bytes(self.mmu.read_linear(gva, size, self.user), "little")

    def write(self, gva: int, size: int, value: int) -> None:
        self.mmu.write_linear(gva, value.to_bytes(size, "little"), self.user)

    def probe(self, gva: int, size: int) -> None:
        self.mmu.check_linear(gva, size, self.user)


class _ChargedPorts:
    """The port bus for an emulated ins/outs: each element is a port access, charged IO_CYCLES of
    virtual time as every port access is (cpu/vcpu.py port_io, and hw's IO_INSTRUCTION exits)."""

    __slots__ = ("cpu",)

    def __init__(self, cpu):
        self.cpu = cpu

    def read(self, port: int, size: int) -> int:
        from cpuvirt.cpu.vcpu import IO_CYCLES

        self.cpu.clock.advance(IO_CYCLES)
        return self.cpu.machine.bus.read(port, size)

    def write(self, port: int, size: int, value: int) -> None:
        from cpuvirt.cpu.vcpu import IO_CYCLES

        self.cpu.clock.advance(IO_CYCLES)
        self.cpu.machine.bus.write(port, size, value)
