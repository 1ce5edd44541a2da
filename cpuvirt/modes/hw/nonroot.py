"""VMX non-root operation, the processor's side: which sensitive instructions cause a VM exit.

In VMX non-root operation some instructions exit unconditionally, some when a VM-execution control
says so, and the CR/DR moves, CLTS, LMSW and SMSW by what they would do under the CR0/CR4 guest/host
masks and read shadows (SDM Vol. 3C 25.1.3); what does not exit behaves as 25.3 prescribes. The
intercept hook (cpu/intercept.py) hands each such instruction to `VmxCpu.on_sensitive` (vmx.py), which
first lets a privileged instruction at CPL > 0 fault and port I/O go through the I/O permission check,
then looks the mnemonic up in `INSTRUCTION_HANDLERS` below: the processor's counterpart of KVM's
kvm_vmx_exit_handlers (the root-mode side, the hypervisor's handlers: handlers.py). Each handler reads
the controls, decodes the operands it needs (typed, by capstone's detail mode: x86/sysreg.py), and
either takes the VM exit (`cpu.vm_exit`) or does what the instruction does in non-root operation.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Protocol

from cpuvirt.cpu.vcpu import IO_INSTRUCTIONS
from cpuvirt.engine import regs as R
from cpuvirt.memory.mmu import GuestPageFault, Mmu
from cpuvirt.memory.types import GVA
from cpuvirt.modes.hw import exits as E
from cpuvirt.modes.hw.exits import Exit, ExitReason
from cpuvirt.modes.hw.vmcs import Field as F
from cpuvirt.modes.hw.vmcs import Vmcs
from cpuvirt.x86.flags import CR0_ET
from cpuvirt.x86.privilege import CPL0_ONLY
from cpuvirt.x86.sysreg import mov_system_register, msw_operand

# What the intercept hook watches for the processor (with port I/O, which vmx.py's I/O gate takes).
SENSITIVE = IO_INSTRUCTIONS | frozenset(
    (
        "hlt",
        "mov",
        "clts",
        "lmsw",
        "smsw",
        "invlpg",
        "lgdt",
        "lidt",
        "sgdt",
        "sidt",
        "lldt",
        "ltr",
        "sldt",
        "str",
        "rdmsr",
        "wrmsr",
        "rdpmc",
        "wbinvd",
        "invd",
        "pause",
        "monitor",
        "mwait",
    )
)
# Privileged instructions: at CPL > 0 they raise #GP(0) before any VM exit is considered (SDM Vol. 3C
# 25.1.1, exceptions take priority over exits); the engine raises that #GP itself when they run.
PRIVILEGED = CPL0_ONLY | {"mov", "monitor", "mwait"}
# The instructions that exit as a whole, with no operand to decode, when the controls named are all 1
# (SDM Vol. 3C 25.1.3, tables 25-6 and 25-7): mnemonic -> (basic exit reason, controls); none: always.
INSTRUCTION_EXITS: dict[str, tuple[ExitReason, tuple[str, ...]]] = {
    "hlt": (ExitReason.HLT, ("hlt_exiting",)),
    "rdpmc": (ExitReason.RDPMC, ("rdpmc_exiting",)),
    "wbinvd": (ExitReason.WBINVD, ("activate_secondary_controls", "wbinvd_exiting")),
    "invd": (ExitReason.INVD, ()),
    "pause": (ExitReason.PAUSE, ("pause_exiting",)),
    "monitor": (ExitReason.MONITOR, ("monitor_exiting",)),
    "mwait": (ExitReason.MWAIT, ("mwait_exiting",)),
}


class Sensitive(NamedTuple):
    """One sensitive instruction about to run: where, how long, what (capstone's text), its bytes."""

    address: int
    size: int
    mnemonic: str
    ops: str
    code: bytes


class NonRootCpu(Protocol):
    """What the handlers use of the simulated processor (vmx.py's VmxCpu)."""

    vmcs: Vmcs
    regs: R.Regs
    mmu: Mmu

    def ctl(self, name: str) -> bool: ...
    def vm_exit(
        self,
        reason: ExitReason,
        rip: int,
        *,
        qualification: int = 0,
        length: int = 0,
        insn: str | None = None,
        intr_info: int = 0,
        intr_error: int | None = None,
        gpa: int | None = None,
        gla: int | None = None,
        instr_info: int = 0,
        detail: dict | None = None,
        implicit_rip: bool = False,
        value: int | None = None,
    ) -> Exit: ...
    def msr_exits(self, msr: int, write: bool) -> bool: ...
    def operand_address(self, address: int) -> int: ...
    def cr4_gate(self, address: int, size: int, ops: str) -> None: ...
    def msr_instruction(self, address: int, size: int, mnem: str) -> bool: ...
    def page_fault(self, gva: int, access: int, error_code: int, eip: int) -> None: ...
    def smsw_site(self, address: int, size: int) -> bool: ...


Handler = Callable[[NonRootCpu, Sensitive], None]


def _skip(cpu: NonRootCpu, at: Sensitive) -> None:
    """Done in non-root operation without an exit: the guest goes on after the instruction."""
    cpu.regs.write(R.EIP, at.address + at.size)


# -- the handlers, by instruction ----------------------------------------------------------------------
def mov_system_register_access(cpu: NonRootCpu, at: Sensitive) -> None:
    """MOV to/from CR0, CR3, CR4 (SDM 25.1.3: the masks and read shadows, CR3-load/store exiting and the
    CR3-target values) and to/from DRn (MOV-DR exiting); exit qualification: SDM 27.2.1, tables 27-3, 27-4.
    A MOV to CR4 setting a bit this CPU model lacks is #GP(0) before any exit (cpu/vcpu.py cr4_gate)."""
    eip = cpu.regs.read(R.EIP)  # an offset in CS: the linear address in flat code
    cpu.cr4_gate(at.address, at.size, at.ops)
    if cpu.regs.read(R.EIP) != eip:
        return  # the #GP was delivered
    form = mov_system_register(at.code)
    if form is None or form.gpr is None:
        return
    gpr, name = R.GPR_ORDER[form.gpr], R.GPR_NAMES[form.gpr]
    if form.debug:
        if cpu.ctl("mov_dr_exiting"):
            direction = 0 if form.to_system else 1
            q = form.number | (direction << 4) | (form.gpr << 8)
            cpu.vm_exit(
                ExitReason.DR_ACCESS,
                at.address,
                qualification=q,
                length=at.size,
                detail={"dr": form.number, "direction": "MOV from DR" if direction else "MOV to DR", "register": name},
            )
        return
    cr = form.number
    v = cpu.vmcs._values
    if form.to_system:
        value = cpu.regs.read(gpr)
        exits = False
        if cr == 0:
            exits = bool(v[F.CR0_GUEST_HOST_MASK] & (value ^ v[F.CR0_READ_SHADOW]))
        elif cr == 4:
            exits = bool(v[F.CR4_GUEST_HOST_MASK] & (value ^ v[F.CR4_READ_SHADOW]))
        elif cr == 3:
            exits = cpu.ctl("cr3_load_exiting") and not cr3_target(cpu.vmcs, value)
        if exits:
            q = E.cr_qualification(cr, E.CR_MOV_TO, form.gpr)
            d = E.decode_cr_qualification(q)
            d["value"] = f"{value:#x}"
            cpu.vm_exit(ExitReason.CR_ACCESS, at.address, qualification=q, length=at.size, detail=d)
        elif cr in (0, 4):
            # No exit: the processor writes the guest-owned bits and keeps the host-owned ones.
            mask = v[F.CR0_GUEST_HOST_MASK if cr == 0 else F.CR4_GUEST_HOST_MASK]
            real = cpu.regs.read(R.CR0 if cr == 0 else R.CR4)
            cpu.regs.write(R.CR0 if cr == 0 else R.CR4, (value & ~mask) | (real & mask))
            _skip(cpu, at)
    elif cr == 3 and cpu.ctl("cr3_store_exiting"):
        q = E.cr_qualification(3, E.CR_MOV_FROM, form.gpr)
        cpu.vm_exit(
            ExitReason.CR_ACCESS, at.address, qualification=q, length=at.size, detail=E.decode_cr_qualification(q)
        )
    elif cr in (0, 4):
        # A read sees the read shadow for host-owned bits (SDM 25.3): emulated, no exit.
        mask = v[F.CR0_GUEST_HOST_MASK if cr == 0 else F.CR4_GUEST_HOST_MASK]
        if mask or cr == 0:
            shadow = v[F.CR0_READ_SHADOW if cr == 0 else F.CR4_READ_SHADOW]
            real = cpu.regs.read(R.CR0 if cr == 0 else R.CR4)
            value = (real & ~mask) | (shadow & mask)
            if cr == 0:
                value |= CR0_ET  # hard-wired to 1 (the engine's CR0 lacks it)
            cpu.regs.write(gpr, value)
            _skip(cpu, at)


def cr3_target(vmcs: Vmcs, value: int) -> bool:
    """Is `value` one of the first CR3_TARGET_COUNT CR3-target values (SDM 24.6.7; at most 4)?"""
    v = vmcs._values
    n = min(v[F.CR3_TARGET_COUNT], 4)
    return any(v[F.CR3_TARGET_VALUE0 + 2 * i] == value for i in range(n))


def clts(cpu: NonRootCpu, at: Sensitive) -> None:
    """CLTS exits when CR0.TS is host-owned and set in the read shadow (SDM 25.1.3)."""
    v = cpu.vmcs._values
    if v[F.CR0_GUEST_HOST_MASK] & 8 and v[F.CR0_READ_SHADOW] & 8:
        q = E.cr_qualification(0, E.CR_CLTS)
        cpu.vm_exit(
            ExitReason.CR_ACCESS, at.address, length=at.size, qualification=q, detail=E.decode_cr_qualification(q)
        )


def smsw(cpu: NonRootCpu, at: Sensitive) -> None:
    """SMSW never exits: it reads CR0 through the guest/host mask and read shadow (SDM 25.3), into a
    register (a 32-bit register gets all of CR0, as QEMU stores it; a 16-bit one the MSW, its upper half
    unchanged) or memory."""
    v = cpu.vmcs._values
    mask = v[F.CR0_GUEST_HOST_MASK] & 0xFFFF
    real = cpu.regs.read(R.CR0)
    val = ((real & ~mask) | (v[F.CR0_READ_SHADOW] & mask) | CR0_ET) & 0xFFFF
    memory, gpr = msw_operand(at.code)
    if gpr is not None:
        if cpu.smsw_site(at.address, at.size):  # a 32-bit register: all of CR0, through guest_cr0
            return
        full = R.GPR_ORDER[gpr]
        cpu.regs.write(full, (cpu.regs.read(full) & 0xFFFF0000) | val)
        _skip(cpu, at)
    elif memory:
        try:
            cpu.mmu.write_linear(
                GVA(cpu.operand_address(at.address)), val.to_bytes(2, "little"), user=cpu.regs.cpl() == 3
            )
        except GuestPageFault as pf:
            cpu.page_fault(pf.gva, 1, pf.error_code, at.address)
            return
        _skip(cpu, at)


def lmsw(cpu: NonRootCpu, at: Sensitive) -> None:
    """LMSW exits if it would set PE against a clear shadow bit, or change a host-owned MP/EM/TS
    (SDM 25.1.3); otherwise the guest-owned bits change and PE is never cleared (SDM 25.3)."""
    _, gpr = msw_operand(at.code)
    memory = gpr is None
    if gpr is None:
        try:
            value = int.from_bytes(cpu.mmu.read_linear(GVA(cpu.operand_address(at.address)), 2), "little")
        except GuestPageFault as pf:
            cpu.page_fault(pf.gva, 0, pf.error_code, at.address)
            return
    else:
        value = cpu.regs.read(R.GPR_ORDER[gpr]) & 0xFFFF
    v = cpu.vmcs._values
    mask, shadow = v[F.CR0_GUEST_HOST_MASK] & 0xF, v[F.CR0_READ_SHADOW] & 0xF
    if (mask & 1 and not shadow & 1 and value & 1) or (mask & 0xE & (value ^ shadow)):
        q = E.cr_qualification(0, E.CR_LMSW, lmsw_memory=memory, lmsw_data=value)
        cpu.vm_exit(
            ExitReason.CR_ACCESS, at.address, qualification=q, length=at.size, detail=E.decode_cr_qualification(q)
        )
    elif mask & 0xF:
        real = cpu.regs.read(R.CR0)
        low = (real & 0xF & mask) | (value & 0xF & ~mask) | (real & 1)  # PE is never cleared
        cpu.regs.write(R.CR0, (real & ~0xF) | low)
        _skip(cpu, at)


def invlpg(cpu: NonRootCpu, at: Sensitive) -> None:
    """INVLPG exits with INVLPG exiting; the qualification is the linear-address operand (27.2.1)."""
    if cpu.ctl("invlpg_exiting"):
        la = cpu.operand_address(at.address)
        cpu.vm_exit(
            ExitReason.INVLPG, at.address, qualification=la, length=at.size, detail={"linear_address": f"{la:#x}"}
        )


def descriptor_table(cpu: NonRootCpu, at: Sensitive) -> None:
    """LGDT, LIDT, SGDT, SIDT and LLDT, LTR, SLDT, STR exit with descriptor-table exiting (a secondary
    control); the instruction-information field says which (SDM 27.2.5, tables 27-10, 27-11)."""
    if cpu.ctl("activate_secondary_controls") and cpu.ctl("descriptor_table_exiting"):
        reason = ExitReason.GDTR_IDTR if at.mnemonic in E.GDTR_IDTR_INSTRUCTIONS else ExitReason.LDTR_TR
        cpu.vm_exit(
            reason,
            at.address,
            length=at.size,
            instr_info=E.descriptor_instruction_info(at.mnemonic),
            detail={"instruction": at.mnemonic},
        )


def msr_access(cpu: NonRootCpu, at: Sensitive) -> None:
    """RDMSR/WRMSR exit unless the MSR bitmaps clear them for ECX (SDM 25.1.3, 24.6.9); otherwise the
    platform does them (cpu/vcpu.py msr_instruction)."""
    ecx = cpu.regs.read(R.ECX)
    write = at.mnemonic == "wrmsr"
    if cpu.msr_exits(ecx, write):
        cpu.vm_exit(
            ExitReason.MSR_WRITE if write else ExitReason.MSR_READ,
            at.address,
            length=at.size,
            detail={"msr": f"{ecx:#x}"},
        )
    else:
        cpu.msr_instruction(at.address, at.size, at.mnemonic)


def by_controls(cpu: NonRootCpu, at: Sensitive) -> None:
    """An instruction of INSTRUCTION_EXITS: no operand to decode, the controls decide."""
    reason, controls = INSTRUCTION_EXITS[at.mnemonic]
    if all(cpu.ctl(c) for c in controls):
        cpu.vm_exit(reason, at.address, length=at.size)


# mnemonic (the intercept hook's, capstone's) -> what the processor does with it in non-root operation
INSTRUCTION_HANDLERS: dict[str, Handler] = {
    "mov": mov_system_register_access,  # mov to/from CRn, DRn (the only movs intercepted)
    "clts": clts,
    "smsw": smsw,
    "lmsw": lmsw,
    "invlpg": invlpg,
    **{m: descriptor_table for m in (*E.GDTR_IDTR_INSTRUCTIONS, *E.LDTR_TR_INSTRUCTIONS)},
    "rdmsr": msr_access,
    "wrmsr": msr_access,
    **{m: by_controls for m in INSTRUCTION_EXITS},
}
