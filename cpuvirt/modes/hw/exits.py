"""VM-exit reasons and the exit-information encodings (SDM Vol. 3C chapter 28, appendix C).

Each encoder builds the value the processor stores, each decoder turns it back into the dict the
trace shows, so a reader sees the same fields the SDM names.
"""

from __future__ import annotations

from enum import IntEnum

from cpuvirt.engine.regs import GPR_NAMES


class ExitReason(IntEnum):
    EXCEPTION_NMI = 0
    EXTERNAL_INTERRUPT = 1
    TRIPLE_FAULT = 2
    INIT_SIGNAL = 3
    SIPI = 4
    IO_SMI = 5
    OTHER_SMI = 6
    INTERRUPT_WINDOW = 7
    NMI_WINDOW = 8
    TASK_SWITCH = 9
    CPUID = 10
    GETSEC = 11
    HLT = 12
    INVD = 13
    INVLPG = 14
    RDPMC = 15
    RDTSC = 16
    RSM = 17
    VMCALL = 18
    VMCLEAR = 19
    VMLAUNCH = 20
    VMPTRLD = 21
    VMPTRST = 22
    VMREAD = 23
    VMRESUME = 24
    VMWRITE = 25
    VMXOFF = 26
    VMXON = 27
    CR_ACCESS = 28
    DR_ACCESS = 29
    IO_INSTRUCTION = 30
    MSR_READ = 31
    MSR_WRITE = 32
    ENTRY_FAIL_GUEST_STATE = 33
    ENTRY_FAIL_MSR_LOAD = 34
    MWAIT = 36
    MONITOR_TRAP_FLAG = 37
    MONITOR = 39
    PAUSE = 40
    ENTRY_FAIL_MACHINE_CHECK = 41
    TPR_BELOW_THRESHOLD = 43
    APIC_ACCESS = 44
    EOI_INDUCED = 45
    GDTR_IDTR = 46
    LDTR_TR = 47
    EPT_VIOLATION = 48
    EPT_MISCONFIG = 49
    INVEPT = 50
    RDTSCP = 51
    PREEMPTION_TIMER = 52
    INVVPID = 53
    WBINVD = 54
    XSETBV = 55
    APIC_WRITE = 56
    RDRAND = 57
    INVPCID = 58
    VMFUNC = 59
    ENCLS = 60
    RDSEED = 61
    PML_FULL = 62
    XSAVES = 63
    XRSTORS = 64


ENTRY_FAILURE = 1 << 31  # bit 31 of the exit reason: the VM entry failed

# The VMX instructions a guest may execute; each exits with its own reason (SDM 26.1.2).
VMX_INSTRUCTIONS = {
    "vmcall": ExitReason.VMCALL,
    "vmlaunch": ExitReason.VMLAUNCH,
    "vmresume": ExitReason.VMRESUME,
    "vmxoff": ExitReason.VMXOFF,
    "vmxon": ExitReason.VMXON,
    "vmptrld": ExitReason.VMPTRLD,
    "vmptrst": ExitReason.VMPTRST,
    "vmclear": ExitReason.VMCLEAR,
    "vmread": ExitReason.VMREAD,
    "vmwrite": ExitReason.VMWRITE,
    "invept": ExitReason.INVEPT,
    "invvpid": ExitReason.INVVPID,
    "vmfunc": ExitReason.VMFUNC,
}

# -- interruption information (VM-exit and VM-entry; SDM 25.8.3, 27.2.2) -------------------------------
INTR_TYPE_EXT_INTR, INTR_TYPE_NMI, INTR_TYPE_HW_EXCEPTION = 0, 2, 3
INTR_TYPE_SOFT_INTR, INTR_TYPE_PRIV_SW_EXCEPTION, INTR_TYPE_SOFT_EXCEPTION = 4, 5, 6
INTR_INFO_DELIVER_CODE = 1 << 11
INTR_INFO_VALID = 1 << 31
INTR_TYPE_NAMES = {
    0: "external interrupt",
    2: "NMI",
    3: "hardware exception",
    4: "software interrupt",
    5: "privileged software exception",
    6: "software exception",
    7: "other event",
}


def intr_info(vector: int, kind: int, has_error_code: bool) -> int:
    return INTR_INFO_VALID | (kind << 8) | vector | (INTR_INFO_DELIVER_CODE if has_error_code else 0)


def decode_intr_info(info: int) -> dict:
    return {
        "vector": info & 0xFF,
        "type": INTR_TYPE_NAMES[(info >> 8) & 7],
        "error_code_valid": bool(info & INTR_INFO_DELIVER_CODE),
        "valid": bool(info & INTR_INFO_VALID),
    }


# -- control-register accesses (SDM table 28-3) --------------------------------------------------------
CR_MOV_TO, CR_MOV_FROM, CR_CLTS, CR_LMSW = 0, 1, 2, 3
CR_ACCESS_NAMES = ("MOV to CR", "MOV from CR", "CLTS", "LMSW")


def cr_qualification(cr: int, access: int, gpr: int = 0, lmsw_memory: bool = False, lmsw_data: int = 0) -> int:
    return cr | (access << 4) | (int(lmsw_memory) << 6) | (gpr << 8) | ((lmsw_data & 0xFFFF) << 16)


def decode_cr_qualification(q: int) -> dict:
    access = (q >> 4) & 3
    d = {"cr": q & 0xF, "access": CR_ACCESS_NAMES[access]}
    if access in (CR_MOV_TO, CR_MOV_FROM):
        d["register"] = GPR_NAMES[(q >> 8) & 0xF & 7]
    if access == CR_LMSW:
        d["lmsw_operand"] = "memory" if q & (1 << 6) else "register"
        d["lmsw_data"] = f"{q >> 16:#x}"
    return d


# -- I/O instructions (SDM table 28-5) ------------------------------------------------------------------
def io_qualification(port: int, size: int, is_in: bool, string: bool, rep: bool, immediate: bool) -> int:
    return (size - 1) | (int(is_in) << 3) | (int(string) << 4) | (int(rep) << 5) | (int(immediate) << 6) | (port << 16)


def decode_io_qualification(q: int) -> dict:
    return {
        "port": f"{q >> 16:#x}",
        "size": (q & 7) + 1,
        "direction": "in" if q & 8 else "out",
        "string": bool(q & 16),
        "rep": bool(q & 32),
        "operand": "immediate" if q & 64 else "dx",
    }


# -- EPT violations (SDM table 28-7) ----------------------------------------------------------------
EPT_READ, EPT_WRITE, EPT_FETCH = 1, 2, 4


def ept_qualification(access_bit: int, entry_perms: int, linear_valid: bool, final: bool) -> int:
    return access_bit | ((entry_perms & 7) << 3) | (int(linear_valid) << 7) | (int(final) << 8)


def decode_ept_qualification(q: int) -> dict:
    acc = [n for b, n in ((1, "read"), (2, "write"), (4, "fetch")) if q & b]
    perms = "".join(c if q & (1 << (3 + i)) else "-" for i, c in enumerate("rwx"))
    d = {"access": "/".join(acc), "ept_entry": perms, "linear_valid": bool(q & 0x80)}
    if q & 0x80:
        d["translation"] = "final guest-physical" if q & 0x100 else "guest paging structure"
    return d


# -- APIC-access VM exits (SDM table 28-6 / 27-6: "Exit Qualification for APIC-Access VM Exits from
#    Linear Accesses and Guest-Physical Accesses") and APIC-write VM exits (29.4.3.3) ----------------
APIC_ACCESS_LINEAR_READ, APIC_ACCESS_LINEAR_WRITE, APIC_ACCESS_LINEAR_FETCH = 0, 1, 2
APIC_ACCESS_LINEAR_EVENT, APIC_ACCESS_PHYSICAL_EVENT, APIC_ACCESS_PHYSICAL_INSN = 3, 10, 15
APIC_ACCESS_TYPES = {
    0: "linear access for a data read during instruction execution",
    1: "linear access for a data write during instruction execution",
    2: "linear access for an instruction fetch",
    3: "linear access (read or write) during event delivery",
    10: "guest-physical access during event delivery",
    15: "guest-physical access for an instruction fetch or during instruction execution",
}
APIC_REGISTER_NAMES = {
    0x20: "ID",
    0x30: "VER",
    0x80: "TPR",
    0x90: "APR",
    0xA0: "PPR",
    0xB0: "EOI",
    0xC0: "RRD",
    0xD0: "LDR",
    0xE0: "DFR",
    0xF0: "SVR",
    0x280: "ESR",
    0x300: "ICR_LO",
    0x310: "ICR_HI",
    0x320: "LVT_TIMER",
    0x330: "LVT_THERMAL",
    0x340: "LVT_PERF",
    0x350: "LVT_LINT0",
    0x360: "LVT_LINT1",
    0x370: "LVT_ERROR",
    0x380: "TMICT",
    0x390: "TMCCT",
    0x3E0: "TDCR",
    **{0x100 + 16 * i: f"ISR{i}" for i in range(8)},
    **{0x180 + 16 * i: f"TMR{i}" for i in range(8)},
    **{0x200 + 16 * i: f"IRR{i}" for i in range(8)},
}


def apic_register_name(offset: int) -> str:
    return APIC_REGISTER_NAMES.get(offset & 0xFF0, f"reserved {offset & 0xFF0:#x}")


def apic_access_qualification(offset: int, access_type: int) -> int:
    return (offset & 0xFFF) | ((access_type & 0xF) << 12)


def decode_apic_access_qualification(q: int) -> dict:
    return {
        "offset": f"{q & 0xFFF:#x}",
        "register": apic_register_name(q & 0xFFF),
        "access": APIC_ACCESS_TYPES.get((q >> 12) & 0xF, f"type {(q >> 12) & 0xF}"),
    }


def decode_apic_write_qualification(q: int) -> dict:
    return {"offset": f"{q & 0xFFF:#x}", "register": apic_register_name(q & 0xFFF)}


# -- descriptor-table exits: instruction information (SDM tables 28-10, 28-11) ----------------------------
GDTR_IDTR_INSTRUCTIONS = ("sgdt", "sidt", "lgdt", "lidt")
LDTR_TR_INSTRUCTIONS = ("sldt", "str", "lldt", "ltr")


def descriptor_instruction_info(mnemonic: str) -> int:
    """Bits 29:28 of the VMX-instruction-information field: which instruction it was."""
    for table in (GDTR_IDTR_INSTRUCTIONS, LDTR_TR_INSTRUCTIONS):
        if mnemonic in table:
            return table.index(mnemonic) << 28
    return 0


class Exit:
    """One VM exit as the root-mode handler sees it."""

    __slots__ = (
        "reason",
        "qualification",
        "length",
        "rip",
        "insn",
        "detail",
        "value",
        "action",
        "implicit_rip",
        "block",
        "vmcs_at_exit",
    )

    def __init__(self, reason, qualification, length, rip, insn, detail, implicit_rip, value=None):
        self.reason, self.qualification, self.length, self.rip = reason, qualification, length, rip
        self.insn, self.detail, self.implicit_rip = insn, detail, implicit_rip
        # In: the value an OUT writes. Out: what the handler produced (IN result, RDTSC value,
        # or True when it answered CPUID itself).
        self.value = value
        self.action = ""
        self.block = False  # the handler parks the vCPU until an interrupt (HLT)
        self.vmcs_at_exit = ""  # the VMCS as the exit left it, before the handler ran (for a dump)
