# description: reads IA32_APIC_BASE (MSR 0x1B): the platform's value, in every mode
#include "kernel.inc"
.text
main:
    mov ecx, 0x1B
    rdmsr
    and eax, 0xFFFFF900                 # base, enable (bit 11), BSP (bit 8)
    CHECK_EQ("IA32_APIC_BASE: 0xFEE00000, enabled, BSP", eax, 0xFEE00900)
    ret
