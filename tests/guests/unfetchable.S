# description: execution reaches code it cannot fetch (item 7 of issue 10): CASE picks how
#   1: jmp to guest-physical 0x10000000 (outside RAM, unbacked: reads all-ones)
#   2: ESP outside RAM, then call/ret (the pushes are dropped, ret pops all-ones)
#   3: paging on with CR3 outside RAM (the page tables read all-ones)
#   4: jmp into the local APIC's MMIO page
#   5: paging on, the #PF gate points into a page that is not present: every delivery of the #PF
#      faults again on its first fetch (nothing retires; hardware would push frames until the stack
#      runs out, about 260,000 of them here)
# Whatever happens (an exception, a stop) must be a documented outcome: never a hang.
#include "kernel.inc"
#include "paging.inc"
#ifndef CASE
#define CASE 1
#endif
.text
main:
    PASS("start")
#if CASE == 1
    mov eax, 0x10000000
    jmp eax
#elif CASE == 2
    mov esp, 0x10000000
    call unfetchable_f
    FAIL("ret", "returned from a call whose return address was dropped")
    ret
unfetchable_f:
    ret
#elif CASE == 3
    mov eax, 0x10000000
    mov cr3, eax
    mov eax, cr0
    or eax, 0x80000000
    mov cr0, eax
    nop
    FAIL("paging", "ran on with page tables outside RAM")
    ret
#elif CASE == 4
    mov eax, 0xFEE00000
    jmp eax
#elif CASE == 5
    mov esi, page_table_low
    mov edi, page_dir
    mov eax, PTE_P | PTE_W
    call paging_identity_4m
    mov eax, 14                         # #PF gate -> 0x00800000: no PDE there
    mov edx, 0x00800000
    mov cl, 0x8E
    call idt_set_gate
    mov eax, page_dir
    call paging_enable
    mov esp, 0x3FFFF0                   # the top of the mapped 4 MiB: room for many frames
    mov eax, 0x00800000
    jmp eax
#endif
