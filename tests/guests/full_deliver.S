# description: full's event deliveries in C: ring 3's int n, #DE and #GP, and the kernel's #DE in translated code, while the handlers' translations go and come back: a handler's code rewritten between events (its translation invalidated), its IDT gate moved to another handler, a gate into a second kernel code segment (not the translations' snapshot's CS), and #DE at several kernel sites
#
# tests/test_full_deliver.py runs this guest under full with and without the C delivery
# (CPUVIRT_FULL_DELIVERY_C) and compares everything a reader can see, and its console with native's.
# A stale translation entered by C would add the old immediate to sum82 (the console then differs).
#include "kernel.inc"
#include "paging.inc"
#include "user.inc"

#define LOOPS 60
#define SEL_CS2 0x38                    // a second ring-0 code segment (flat, like KERNEL_CS)

.text
main:
    call user_init
    SET_HANDLER(VEC_DE, de_handler)
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
    mov eax, h82
    call set_gate_82
    # vector 0x83: a DPL-3 interrupt gate into SEL_CS2
    mov eax, h83
    mov word ptr [idt + 8 * 0x83], ax
    shr eax, 16
    mov word ptr [idt + 8 * 0x83 + 6], ax
    mov word ptr [idt + 8 * 0x83 + 2], SEL_CS2
    mov word ptr [idt + 8 * 0x83 + 4], 0xEE00
    # vectors 0x84, 0x85: handlers whose guest EIPs share a slot of C's guest-EIP -> TC table
    mov eax, hcol_a
    mov word ptr [idt + 8 * 0x84], ax
    shr eax, 16
    mov word ptr [idt + 8 * 0x84 + 6], ax
    mov word ptr [idt + 8 * 0x84 + 2], KERNEL_CS
    mov word ptr [idt + 8 * 0x84 + 4], 0xEE00
    mov eax, hcol_b
    mov word ptr [idt + 8 * 0x85], ax
    shr eax, 16
    mov word ptr [idt + 8 * 0x85 + 6], ax
    mov word ptr [idt + 8 * 0x85 + 2], KERNEL_CS
    mov word ptr [idt + 8 * 0x85 + 4], 0xEE00
    PAGING_IDENTITY_4M_ON(PTE_P | PTE_W | PTE_U)
    xor ebp, ebp
    mov esi, LOOPS
loop:
    # the kernel's #DE, at two sites
    xor ecx, ecx
    div ecx
    add ebp, eax
    jmp kde2
kde2:
    div ecx
    rol ebp, 3
    # ring 3: int 0x82 (raw handler), int 0x80, #DE, int 0x83 (second CS)
    mov eax, user_code
    mov edx, user_stack_top
    call run_user
    add ebp, eax
    rol ebp, 5
    # ring 3: #GP (cli at IOPL 0) kills the user code
    mov eax, user_gp
    mov edx, user_stack_top
    call run_user
    add ebp, eax
    add ebp, dword ptr [user_fault_eip]
    rol ebp, 7
    # every 5th loop: rewrite h82's immediate (its translation goes); every 8th: move the gate
    mov eax, esi
    xor edx, edx
    mov ecx, 5
    div ecx
    test edx, edx
    jnz no_patch
    xor byte ptr [h82_patch - 1], 3     # the imm8 of `add dword ptr [sum82], imm8`: 1 <-> 2
no_patch:
    mov eax, esi
    and eax, 7
    jnz no_move
    mov eax, h82b
    test esi, 8
    jz move
    mov eax, h82
move:
    call set_gate_82
no_move:
    dec esi
    jnz loop
    # a vector never used before, into a handler already translated: its first delivery is Python's
    # (Vcpu.reasons gets its key in event order), the next C's
    mov eax, h82
    mov word ptr [idt + 8 * 0x86], ax
    shr eax, 16
    mov word ptr [idt + 8 * 0x86 + 6], ax
    mov word ptr [idt + 8 * 0x86 + 2], KERNEL_CS
    mov word ptr [idt + 8 * 0x86 + 4], 0xEE00
    mov eax, user_once
    mov edx, user_stack_top
    call run_user
    add ebp, eax
    mov eax, ebp
    call print_hex32
    call newline
    mov eax, dword ptr [sum82]
    call print_hex32
    call newline
    mov eax, dword ptr [de_count]
    call print_hex32
    call newline
    PASS("full's event deliveries")
    ret

# eax = the handler of vector 0x82 (a DPL-3 interrupt gate into the kernel's CS)
set_gate_82:
    mov word ptr [idt + 8 * 0x82], ax
    shr eax, 16
    mov word ptr [idt + 8 * 0x82 + 6], ax
    mov word ptr [idt + 8 * 0x82 + 2], KERNEL_CS
    mov word ptr [idt + 8 * 0x82 + 4], 0xEE00
    ret

# #DE: skip the 2-byte div ecx (from the kernel or from ring 3)
de_handler:
    inc dword ptr [de_count]
    add dword ptr [ebx + FRAME_EIP], 2
    ret

h82:
    add dword ptr [sum82], 1
h82_patch:
    rol dword ptr [sum82], 1
    iretd

h82b:
    add dword ptr [sum82], 0x100
    rol dword ptr [sum82], 2
    iretd

h83:
    add dword ptr [sum82], 0x10000
    iretd

user_code:
    int 0x82
    int 0x84
    int 0x85
    int 0x84
    int 0x82
    mov eax, SYS_ADD
    mov ebx, 5
    mov ecx, 6
    int 0x80
    xor ecx, ecx
    div ecx
    int 0x83
    int 0x82
    mov ebx, eax
    mov eax, SYS_EXIT
    int 0x80

user_once:
    int 0x86
    int 0x86
    int 0x86
    mov eax, SYS_EXIT
    int 0x80

user_gp:
    int 0x82
    cli
    mov eax, SYS_EXIT
    int 0x80

# hcol_a at a multiple of 0x4000, hcol_b 0x2001 further (hcol_a is 18 bytes: the fill is 0x2001 - 18; the
# assembler takes no expression there): (geip ^ geip >> 13) & 0x1FFF is the same
.align 0x4000
hcol_a:
    add dword ptr [sum82], 0x1000000
    rol dword ptr [sum82], 3
    iretd
.fill 0x1FEF, 1, 0x90
hcol_b:
    add dword ptr [sum82], 0x3000000
    rol dword ptr [sum82], 5
    iretd

.data
.align 4
sum82: .long 0
de_count: .long 0
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
