"""What each VM-execution control does, for `cpuvirt vmx controls` and the VMCS dump.

SDM Vol. 3C 25.6.1 (pin-based, table 25-5), 25.6.2 (primary processor-based, table 25-6; secondary,
table 25-7) and chapter 26.1 (instructions that cause VM exits conditionally). Each entry says what
setting the control to 1 makes exit (or changes), in cpuvirt's simulation.
"""

from __future__ import annotations

SDM_NAMES = {
    "external_interrupt_exiting": "External-interrupt exiting",
    "nmi_exiting": "NMI exiting",
    "interrupt_window_exiting": "Interrupt-window exiting",
    "use_tsc_offsetting": "Use TSC offsetting",
    "hlt_exiting": "HLT exiting",
    "invlpg_exiting": "INVLPG exiting",
    "mwait_exiting": "MWAIT exiting",
    "rdpmc_exiting": "RDPMC exiting",
    "rdtsc_exiting": "RDTSC exiting",
    "cr3_load_exiting": "CR3-load exiting",
    "cr3_store_exiting": "CR3-store exiting",
    "use_tpr_shadow": "Use TPR shadow",
    "mov_dr_exiting": "MOV-DR exiting",
    "unconditional_io_exiting": "Unconditional I/O exiting",
    "use_io_bitmaps": "Use I/O bitmaps",
    "use_msr_bitmaps": "Use MSR bitmaps",
    "monitor_exiting": "MONITOR exiting",
    "pause_exiting": "PAUSE exiting",
    "activate_secondary_controls": "Activate secondary controls",
    "virtualize_apic_accesses": "Virtualize APIC accesses",
    "enable_ept": "Enable EPT",
    "descriptor_table_exiting": "Descriptor-table exiting",
    "wbinvd_exiting": "WBINVD exiting",
    "apic_register_virtualization": "APIC-register virtualization",
}

EFFECT = {
    "external_interrupt_exiting": "an external interrupt exits (EXTERNAL_INTERRUPT) and the hypervisor injects it; "
    "0: the guest takes it through its IDT with no exit",
    "nmi_exiting": "an NMI exits (EXCEPTION_NMI); 0: delivered to the guest directly",
    "interrupt_window_exiting": "exit (INTERRUPT_WINDOW) as soon as the guest can take an interrupt (RFLAGS.IF=1, "
    "no STI/MOV SS blocking); set by the hypervisor while an injection waits",
    "use_tsc_offsetting": "RDTSC returns the TSC plus TSC_OFFSET",
    "hlt_exiting": "HLT exits (HLT); 0: the guest halts in place until an interrupt",
    "invlpg_exiting": "INVLPG exits (INVLPG); needed by shadow paging, not with EPT",
    "mwait_exiting": "MWAIT exits (MWAIT)",
    "rdpmc_exiting": "RDPMC exits (RDPMC)",
    "rdtsc_exiting": "RDTSC exits (RDTSC); 0: the guest reads the (offset) TSC directly",
    "cr3_load_exiting": "MOV to CR3 exits (CR_ACCESS); needed by shadow paging, not with EPT",
    "cr3_store_exiting": "MOV from CR3 exits (CR_ACCESS)",
    "mov_dr_exiting": "MOV to/from DR0-DR7 exits (DR_ACCESS)",
    "unconditional_io_exiting": "every IN/OUT/INS/OUTS exits (IO_INSTRUCTION) when I/O bitmaps are off",
    "use_io_bitmaps": "IN/OUT exit only for ports set in the I/O bitmaps (io_bitmap=PORT,...); "
    "overrides unconditional I/O exiting",
    "use_msr_bitmaps": "RDMSR/WRMSR exit only for MSRs set in the MSR bitmap; 0: every RDMSR/WRMSR exits",
    "monitor_exiting": "MONITOR exits (MONITOR)",
    "pause_exiting": "PAUSE exits (PAUSE)",
    "activate_secondary_controls": "the secondary controls (EPT, descriptor-table exiting...) take effect",
    "enable_ept": "guest-physical addresses go through EPT (EPT_VIOLATION on a miss); 0: shadow paging, "
    "#PF, CR3 and INVLPG exit (KVM's shadow MMU)",
    "descriptor_table_exiting": "LGDT/LIDT/SGDT/SIDT exit (GDTR_IDTR), LLDT/LTR/SLDT/STR exit (LDTR_TR)",
    "wbinvd_exiting": "WBINVD exits (WBINVD)",
    "use_tpr_shadow": "a virtual-APIC page (VIRTUAL_APIC_PAGE_ADDR) holds the guest's TPR: with virtualize APIC "
    "accesses, TPR reads and writes cost no exit (TPR_BELOW_THRESHOLD when a write lowers it "
    "below TPR_THRESHOLD)",
    "virtualize_apic_accesses": "the guest's local APIC page is the APIC-access page (APIC_ACCESS_ADDR): accesses "
    "the processor does not virtualize exit as APIC_ACCESS instead of EPT_VIOLATION",
    "apic_register_virtualization": "reads of most APIC registers come from the virtual-APIC page with no exit "
    "(not APR, PPR, the timer's current count); writes to the others end in "
    "APIC_WRITE exits",
}
