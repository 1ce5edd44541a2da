# description: hostile GDT: paging on, then the GDT's page unmapped (its PTE cleared, invlpg); then a
# segment load / an interrupt / a fault / an iret / ltr, each of which must read a descriptor from it.
# On hardware each access to the GDT page faults (#PF), the #PF's delivery needs the GDT again (#DF),
# and the machine shuts down (a triple fault). Whatever the engine or the hypervisor reads of the table
# must take the same path: never a host crash, an internal error or a hang (tests/test_gates.py).
#include "kernel.inc"
#include "paging.inc"
#ifndef VARIANT
#define VARIANT 1
#endif

.text
main:
    mov esi, page_table_low
    mov edi, page_dir
    mov eax, PTE_P | PTE_W
    call paging_identity_4m
    mov esi, gdt                        # a copy of the GDT alone in its page (kernel.inc's shares a
    mov edi, own_gdt                    # page with code)
    mov ecx, gdt_end - gdt
    rep movsb
    lgdt [own_gdtr]
    mov eax, page_dir
    call paging_enable
    mov eax, own_gdt
    mov edi, page_dir
    call pte_address
    mov dword ptr [eax], 0              # the GDT's page: not present
    mov eax, own_gdt
    invlpg [eax]
    PASS("GDT page unmapped")
#if VARIANT == 1
    mov ax, KERNEL_DS
    mov ds, ax
#elif VARIANT == 2
    int 0x30
#elif VARIANT == 3
    xor edx, edx
    xor eax, eax
    div edx
#elif VARIANT == 4
    pushfd
    push KERNEL_CS
    push after_iret
    iretd
after_iret:
#else
    mov ax, TSS_SEL
    ltr ax
#endif
    FAIL("hostile GDT", "went on")
    ret

.data
own_gdtr:
    .word gdt_end - gdt - 1
    .long own_gdt

.bss
.align 4096
own_gdt:
    .zero 4096
