# description: full's C callouts and the translations' snapshot: ring 3's int 0x81 enters a handler in a second ring-0 code segment (a delivery changes CS without a callout); its CR4.PGE toggle and its segment load must reach Python, whose check drops the translation that baked the first CS in (`mov eax, cs`)
#
# tests/test_full_events.py runs this guest under full with and without the C path (CPUVIRT_FULL_EVENTS_C)
# and compares everything a reader can see, and its console with native's.
#include "kernel.inc"
#include "paging.inc"
#include "user.inc"

#define LOOPS 60
#define SEL_CS2 0x38                    // a second ring-0 code segment (flat, like KERNEL_CS)
#define CR4_PGE_BIT 0x80

.text
main:
    call user_init
    # Another GDT: the kernel's, and SEL_CS2 (the TSS and LDT descriptors copied: TR stays).
    mov eax, dword ptr [gdt_tss]
    mov dword ptr [gdt2 + 0x28], eax
    mov eax, dword ptr [gdt_tss + 4]
    mov dword ptr [gdt2 + 0x2C], eax
    mov eax, dword ptr [gdt_ldt]
    mov dword ptr [gdt2 + 0x30], eax
    mov eax, dword ptr [gdt_ldt + 4]
    mov dword ptr [gdt2 + 0x34], eax
    lgdt [gdt2r]
    # vector 0x81: a DPL-3 interrupt gate into SEL_CS2
    mov eax, cs2_handler
    mov word ptr [idt + 8 * 0x81], ax
    shr eax, 16
    mov word ptr [idt + 8 * 0x81 + 6], ax
    mov word ptr [idt + 8 * 0x81 + 2], SEL_CS2
    mov word ptr [idt + 8 * 0x81 + 4], 0xEE00
    PAGING_IDENTITY_4M_ON(PTE_P | PTE_W | PTE_U)
    xor ebp, ebp
    mov esi, LOOPS
loop:
    call get_cs                         # at KERNEL_CS
    add ebp, eax
    rol ebp, 5
    mov eax, user_code
    mov edx, user_stack_top
    call run_user
    add ebp, eax
    rol ebp, 5
    dec esi
    jnz loop
    mov eax, ebp
    call print_hex32
    call newline
    mov eax, dword ptr [cs_sum]
    call print_hex32
    call newline
    PASS("full's events under a second kernel code segment")
    ret

get_cs:
    mov eax, cs
    ret

# ring 3's int 0x81, at SEL_CS2: a data segment load, then CS as the kernel sees it
cs2_handler:
    mov eax, CR4_PGE_BIT                # a CR4.PGE toggle first (C's mov to CR4 once linked)
    mov cr4, eax
    call get_cs
    add dword ptr [cs_sum], eax
    xor eax, eax
    mov cr4, eax
    push ds
    mov ax, KERNEL_DS
    mov ds, ax
    call get_cs
    add dword ptr [cs_sum], eax
    rol dword ptr [cs_sum], 3
    pop ds
    iretd

user_code:
    int 0x81
    int 0x81
    mov eax, SYS_EXIT
    mov ebx, 7
    int 0x80

.data
.align 4
cs_sum: .long 0
.align 8
gdt2:
    .long 0, 0                          # 0x00
    .long 0x0000FFFF, 0x00CF9A00        # 0x08: ring-0 code
    .long 0x0000FFFF, 0x00CF9200        # 0x10: ring-0 data
    .long 0x0000FFFF, 0x00CFFA00        # 0x18: ring-3 code
    .long 0x0000FFFF, 0x00CFF200        # 0x20: ring-3 data
    .long 0, 0                          # 0x28: the TSS (copied)
    .long 0, 0                          # 0x30: the LDT (copied)
    .long 0x0000FFFF, 0x00CF9A00        # 0x38: SEL_CS2
gdt2_end:
.align 4
    .word 0
gdt2r:
    .word gdt2_end - gdt2 - 1
    .long gdt2
