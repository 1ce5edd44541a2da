"""VM-execution controls by their SDM names, the default preset, and `--vmx name=value` parsing.

SDM Vol. 3C 25.6: pin-based (table 25-5), primary processor-based (25-6) and secondary (25-7)
controls. Only controls whose behaviour cpuvirt simulates are accepted; asking for another one is an
input error that names it, rather than a control that silently does nothing.
"""

from __future__ import annotations

from cpuvirt.errors import CpuvirtError
from cpuvirt.modes.hw.vmcs import Field, Vmcs
from cpuvirt.x86.flags import (
    CR0_TS,
    CR0_WP,
    CR4_DE,
    CR4_OSFXSR,
    CR4_OSXMMEXCPT,
    CR4_PCE,
    CR4_PGE,
    CR4_PSE,
    CR4_PVI,
    CR4_SMEP,
    CR4_TSD,
)

PIN, PRIMARY, SECONDARY = (
    Field.PIN_BASED_VM_EXEC_CONTROL,
    Field.CPU_BASED_VM_EXEC_CONTROL,
    Field.SECONDARY_VM_EXEC_CONTROL,
)

# name -> (VMCS field, bit)
CONTROLS: dict[str, tuple[Field, int]] = {
    "external_interrupt_exiting": (PIN, 0),
    "nmi_exiting": (PIN, 3),
    "interrupt_window_exiting": (PRIMARY, 2),
    "use_tsc_offsetting": (PRIMARY, 3),
    "hlt_exiting": (PRIMARY, 7),
    "invlpg_exiting": (PRIMARY, 9),
    "mwait_exiting": (PRIMARY, 10),
    "rdpmc_exiting": (PRIMARY, 11),
    "rdtsc_exiting": (PRIMARY, 12),
    "cr3_load_exiting": (PRIMARY, 15),
    "cr3_store_exiting": (PRIMARY, 16),
    "use_tpr_shadow": (PRIMARY, 21),
    "mov_dr_exiting": (PRIMARY, 23),
    "unconditional_io_exiting": (PRIMARY, 24),
    "use_io_bitmaps": (PRIMARY, 25),
    "use_msr_bitmaps": (PRIMARY, 28),
    "monitor_exiting": (PRIMARY, 29),
    "pause_exiting": (PRIMARY, 30),
    "activate_secondary_controls": (PRIMARY, 31),
    "virtualize_apic_accesses": (SECONDARY, 0),
    "enable_ept": (SECONDARY, 1),
    "descriptor_table_exiting": (SECONDARY, 2),
    "wbinvd_exiting": (SECONDARY, 6),
    "apic_register_virtualization": (SECONDARY, 8),
}
APIC_CONTROLS = ("use_tpr_shadow", "virtualize_apic_accesses", "apic_register_virtualization")

# Values that are not single bits: name -> (what it sets, how to parse it).
SETTINGS = (
    "exception_bitmap",
    "io_bitmap",
    "msr_bitmap",
    "cr0_guest_host_mask",
    "cr4_guest_host_mask",
    "pf_error_code_mask",
    "pf_error_code_match",
    "tsc_offset",
    "lazy_ept",
)


# What KVM sets up for a guest with EPT (arch/x86/kvm/vmx/vmx.c, setup_vmcs_config and
# init_vmcs): HLT, MOV-DR, unconditional I/O, MWAIT/MONITOR and RDPMC exiting; no CR3 or INVLPG exiting
# (EPT makes them unnecessary); MSR bitmaps; external-interrupt and NMI exiting; #UD, #AC and #MC in
# the exception bitmap; the guest owns CR0.TS/WP and the CR4 bits it may flip freely. On a CPU with
# APICv (enable_apicv, every Intel server CPU since Ivy Bridge-EP) KVM also sets "use TPR shadow",
# "virtualize APIC accesses" and "APIC-register virtualization" for a guest whose APIC is in xAPIC
# mode (vmx_secondary_exec_control, vmx_refresh_apicv_exec_ctrl); the virtual-interrupt delivery and
# posted-interrupt controls it sets with them are not simulated (docs/hw.md).
KVM_PRESET = {
    "external_interrupt_exiting": 1,
    "nmi_exiting": 1,
    "hlt_exiting": 1,
    "mov_dr_exiting": 1,
    "unconditional_io_exiting": 1,
    "mwait_exiting": 1,
    "monitor_exiting": 1,
    "rdpmc_exiting": 1,
    "use_tsc_offsetting": 1,
    "use_msr_bitmaps": 1,
    "activate_secondary_controls": 1,
    "enable_ept": 1,
    "use_tpr_shadow": 1,
    "virtualize_apic_accesses": 1,
    "apic_register_virtualization": 1,
    "exception_bitmap": (1 << 6) | (1 << 17) | (1 << 18),
    "cr0_guest_host_mask": 0xFFFFFFFF & ~(CR0_TS | CR0_WP),
    "cr4_guest_host_mask": 0xFFFFFFFF & ~(CR4_PGE | CR4_PCE | CR4_TSD | CR4_DE | CR4_PVI | CR4_OSFXSR | CR4_OSXMMEXCPT),
}

# Without EPT KVM runs the guest on shadow page tables (arch/x86/kvm/vmx/vmx.c): CR3 loads and stores,
# INVLPG and #PF exit (exec_control keeps CR3_LOAD/STORE_EXITING and INVLPG_EXITING, which it drops
# only with enable_ept; update_exception_bitmap keeps PF_VECTOR), and the paging bits of CR0 (WP) and
# CR4 (PGE, PSE, SMEP: X86_CR4_TLBFLUSH_BITS) are host-owned, so changing one exits.
# cpuvirt simulates APIC virtualization over EPT only, so that preset leaves its controls off (the
# local APIC's registers are then the device's own MMIO, as before).
KVM_SHADOW_PRESET = {
    "enable_ept": 0,
    "use_tpr_shadow": 0,
    "virtualize_apic_accesses": 0,
    "apic_register_virtualization": 0,
    "cr3_load_exiting": 1,
    "cr3_store_exiting": 1,
    "invlpg_exiting": 1,
    "exception_bitmap": KVM_PRESET["exception_bitmap"] | (1 << 14),
    "cr0_guest_host_mask": 0xFFFFFFFF & ~CR0_TS,
    "cr4_guest_host_mask": KVM_PRESET["cr4_guest_host_mask"] | CR4_PGE | CR4_PSE | CR4_SMEP,
}


class VmxSettings:
    """The controls a run starts with: the preset plus the user's overrides."""

    def __init__(self, overrides: list[str] | None = None, ept: bool = True):
        self.bits = {name: 0 for name in CONTROLS}
        self.exception_bitmap = 0
        self.io_ports: set[int] = set()
        self.msrs: set[int] = set()
        self.cr0_mask = self.cr4_mask = 0
        self.pf_mask = self.pf_match = 0
        self.tsc_offset = 0
        self.lazy_ept = False
        for name, value in KVM_PRESET.items():
            self._set(name, value)
        # `--vmx enable_ept=0` asks for shadow paging as --no-ept does: KVM's shadow-MMU preset first,
        # then the user's overrides on top of it.
        if any(
            i.partition("=")[0].strip().lower() == "enable_ept" and i.partition("=")[2].strip() in ("0", "0x0")
            for i in overrides or ()
        ):
            ept = False
        if not ept:
            for name, value in KVM_SHADOW_PRESET.items():
                self._set(name, value)
        for item in overrides or ():
            name, _, text = item.partition("=")
            name = name.strip().lower()
            if not _:
                raise CpuvirtError(f"--vmx {item!r}: expected NAME=VALUE")
            self._set(name, self._parse(name, text.strip()))
        if not ept and self.bits["enable_ept"]:
            raise CpuvirtError("--no-ept and --vmx enable_ept=1 contradict each other")
        self.shadow_paging = not self.bits["enable_ept"]
        self._check_apic_controls()

    def _check_apic_controls(self) -> None:
        """VM entry fails on these (SDM Vol. 3C 26.2.1.1, checks on VM-execution control fields), so
        cpuvirt refuses them up front, naming the rule."""
        b = self.bits
        if b["apic_register_virtualization"] and b["activate_secondary_controls"] and not b["use_tpr_shadow"]:
            raise CpuvirtError(
                "--vmx apic_register_virtualization=1 needs use_tpr_shadow=1 (SDM 26.2.1.1: "
                "VM entry fails with an invalid control field otherwise)"
            )
        if any(b[c] for c in APIC_CONTROLS) and not b["enable_ept"]:
            raise CpuvirtError(
                "--vmx use_tpr_shadow / virtualize_apic_accesses / apic_register_virtualization: "
                "cpuvirt simulates APIC virtualization with EPT only (not with --no-ept)"
            )

    @staticmethod
    def _number(name: str, text: str) -> int:
        try:
            return int(text, 0)
        except ValueError:
            raise CpuvirtError(f"--vmx {name}={text}: not a number") from None

    def _parse(self, name: str, text: str):
        if name in ("io_bitmap", "msr_bitmap"):
            if text in ("", "none"):
                return set()
            return {self._number(name, t) for t in text.split(",")}
        if name in CONTROLS or name in SETTINGS:
            return self._number(name, text)
        known = ", ".join(sorted(CONTROLS) + list(SETTINGS))
        raise CpuvirtError(f"--vmx {name}: not a VMX control cpuvirt simulates (known: {known})")

    def _set(self, name: str, value) -> None:
        if name in CONTROLS:
            if value not in (0, 1):
                raise CpuvirtError(f"--vmx {name}={value}: a control is 0 or 1")
            self.bits[name] = value
        elif name == "exception_bitmap":
            self.exception_bitmap = value & 0xFFFFFFFF
        elif name == "io_bitmap":
            if any(not 0 <= p <= 0xFFFF for p in value):
                raise CpuvirtError("--vmx io_bitmap: ports are 0..0xffff")
            self.io_ports = set(value)
            self.bits["use_io_bitmaps"] = 1
        elif name == "msr_bitmap":
            self.msrs = set(value)
            self.bits["use_msr_bitmaps"] = 1
        elif name == "cr0_guest_host_mask":
            self.cr0_mask = value & 0xFFFFFFFF
        elif name == "cr4_guest_host_mask":
            self.cr4_mask = value & 0xFFFFFFFF
        elif name == "pf_error_code_mask":
            self.pf_mask = value & 0xFFFFFFFF
        elif name == "pf_error_code_match":
            self.pf_match = value & 0xFFFFFFFF
        elif name == "tsc_offset":
            self.tsc_offset = value & 0xFFFFFFFFFFFFFFFF
        elif name == "lazy_ept":
            self.lazy_ept = bool(value)
        else:
            raise CpuvirtError(f"--vmx {name}: unknown")

    def apply(self, vmcs: Vmcs) -> None:
        """Write the controls into the VMCS (the hypervisor's vmwrites before VMLAUNCH)."""
        words = {PIN: 0, PRIMARY: 0, SECONDARY: 0}
        for name, on in self.bits.items():
            if on:
                field, bit = CONTROLS[name]
                words[field] |= 1 << bit
        for field, value in words.items():
            vmcs.vmwrite(field, value)
        vmcs.vmwrite(Field.EXCEPTION_BITMAP, self.exception_bitmap)
        vmcs.vmwrite(Field.PAGE_FAULT_ERROR_CODE_MASK, self.pf_mask)
        vmcs.vmwrite(Field.PAGE_FAULT_ERROR_CODE_MATCH, self.pf_match)
        vmcs.vmwrite(Field.CR0_GUEST_HOST_MASK, self.cr0_mask)
        vmcs.vmwrite(Field.CR4_GUEST_HOST_MASK, self.cr4_mask)
        vmcs.vmwrite(Field.TSC_OFFSET, self.tsc_offset)

    def as_dict(self) -> dict:
        d: dict[str, int | str] = {k: v for k, v in self.bits.items() if v}
        d.update(
            {
                "exception_bitmap": f"{self.exception_bitmap:#x}",
                "cr0_guest_host_mask": f"{self.cr0_mask:#x}",
                "cr4_guest_host_mask": f"{self.cr4_mask:#x}",
            }
        )
        if self.io_ports:
            d["io_bitmap"] = ",".join(f"{p:#x}" for p in sorted(self.io_ports))
        if self.msrs:
            d["msr_bitmap"] = ",".join(f"{m:#x}" for m in sorted(self.msrs))
        if self.lazy_ept:
            d["lazy_ept"] = 1
        return d
