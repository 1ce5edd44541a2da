# description: prints CPUID for every leaf of the model and some outside it, then again for leaf 1 after clearing IA32_APIC_BASE's enable bit (the APIC feature bit follows it)
#include "kernel.inc"
.text
main:
    mov esi, cpuid_leaves
    mov edi, 14
cpuid_next:
    mov eax, [esi]
    call cpuid_line
    add esi, 4
    dec edi
    jnz cpuid_next
    mov ecx, 0x1B                   # IA32_APIC_BASE
    rdmsr
    and eax, 0xFFFFF7FF             # global enable (bit 11) off
    wrmsr
    mov eax, 1
    call cpuid_line
    PASS("cpuid answered the model")
    ret

# prints "LEAF: EAX EBX ECX EDX" for CPUID with EAX = leaf (ECX = 7, which no leaf looks at)
cpuid_line:
    push esi
    push eax
    call print_hex32
    mov al, ':'
    call putc
    pop eax
    mov ecx, 7
    cpuid
    push edx
    push ecx
    push ebx
    call cpuid_reg
    pop eax
    call cpuid_reg
    pop eax
    call cpuid_reg
    pop eax
    call cpuid_reg
    mov al, 10
    call putc
    pop esi
    ret
cpuid_reg:
    push eax
    mov al, ' '
    call putc
    pop eax
    call print_hex32
    ret

.data
cpuid_leaves:
    .long 0, 1, 2, 7, 0x40000000, 0x7FFFFFFF, 0x80000000, 0x80000001, 0x80000002, 0x80000003
    .long 0x80000004, 0x80000005, 0xFFFFFFFE, 0xFFFFFFFF
