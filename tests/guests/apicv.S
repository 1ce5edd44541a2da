# description: local APIC accesses whose VM exits under hw depend on the APIC-virtualization controls
# (tests/test_apicv.py counts them): 1000 ID reads (xv6's lapicid()), TPR, PPR, LDR, the timer's
# initial and current count, EOI, ICR high. The same checks pass in every mode.
#include "kernel.inc"

#define APIC            0xFEE00000
#define APIC_ID         (APIC + 0x20)
#define APIC_VERSION    (APIC + 0x30)
#define APIC_TPR        (APIC + 0x80)
#define APIC_PPR        (APIC + 0xA0)
#define APIC_EOI        (APIC + 0xB0)
#define APIC_LDR        (APIC + 0xD0)
#define APIC_ICR_HI     (APIC + 0x310)
#define APIC_LVT_TIMER  (APIC + 0x320)
#define APIC_TIMER_INIT (APIC + 0x380)
#define APIC_TIMER_CUR  (APIC + 0x390)
#define APIC_TIMER_DIV  (APIC + 0x3E0)

.text
main:
    mov ecx, 1000
id_loop:
    mov eax, dword ptr [APIC_ID]
    dec ecx
    jnz id_loop
    CHECK_EQ("APIC ID (0x20) reads 0, 1000 times", eax, 0)
    mov eax, dword ptr [APIC_VERSION]
    CHECK_EQ("APIC version (0x30) reads 0x50014", eax, 0x00050014)

    mov dword ptr [APIC_TPR], 0x20
    mov eax, dword ptr [APIC_TPR]
    CHECK_EQ("TPR reads back what was written", eax, 0x20)
    mov eax, dword ptr [APIC_PPR]
    CHECK_EQ("PPR follows the TPR (nothing in service)", eax, 0x20)
    mov dword ptr [APIC_TPR], 0

    mov dword ptr [APIC_LDR], 0x01ABCDEF
    mov eax, dword ptr [APIC_LDR]
    CHECK_EQ("LDR keeps only bits 31:24 of a write", eax, 0x01000000)

    mov dword ptr [APIC_LVT_TIMER], 0x10040          # masked, vector 0x40
    mov dword ptr [APIC_TIMER_DIV], 0xB              # divide by 1
    mov dword ptr [APIC_TIMER_INIT], 1000000
    mov eax, dword ptr [APIC_TIMER_CUR]
    test eax, eax
    jz count_bad
    cmp eax, 1000000
    ja count_bad
    PASS("the timer's current count (0x390) is running: 0 < count <= initial")
    jmp count_done
count_bad:
    FAIL("the timer's current count (0x390) is running: 0 < count <= initial", "0 or above the initial count")
count_done:
    mov eax, dword ptr [APIC_TIMER_INIT]
    CHECK_EQ("the initial count (0x380) reads back", eax, 1000000)
    mov dword ptr [APIC_TIMER_INIT], 0

    mov dword ptr [APIC_EOI], 0x1234
    mov eax, dword ptr [APIC_EOI]
    CHECK_EQ("EOI reads 0 after a write", eax, 0)

    mov dword ptr [APIC_ICR_HI], 0xFFFFFFFF
    mov eax, dword ptr [APIC_ICR_HI]
    CHECK_EQ("ICR high keeps only its destination field", eax, 0xFF000000)
    mov dword ptr [APIC_ICR_HI], 0
    ret
