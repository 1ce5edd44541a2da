# description: a far jmp/call to GDT entry 7, whose 8 bytes the test writes into the image (hostile_desc)
#
# hostile_action: 0 = lcall from ring 0, 1 = ljmp from ring 0, 2 = lcall from ring 3, 3 = ljmp from
# ring 3 (selector 0x3B). Every exception ends the run with status 0x40 + vector (printed first).
#include "kernel.inc"
#include "user.inc"
.text
main:
    mov esi, gdt
    mov edi, big_gdt
    mov ecx, 14
    rep movsd
    mov eax, dword ptr [hostile_desc]
    mov dword ptr [big_gdt + 7 * 8], eax
    mov eax, dword ptr [hostile_desc + 4]
    mov dword ptr [big_gdt + 7 * 8 + 4], eax
    lgdt [big_gdtr]
    mov ecx, 0
fuzz_handlers:
    mov dword ptr [isr_handlers + 4 * ecx], fuzz_fault
    inc ecx
    cmp ecx, 32
    jne fuzz_handlers
    mov eax, dword ptr [hostile_action]
    cmp eax, 2
    jae fuzz_user
    cmp eax, 1
    je fuzz_ljmp0
    .byte 0x9A
    .long 0
    .word 0x38
    ret
fuzz_ljmp0:
    .byte 0xEA
    .long 0
    .word 0x38
    ret
fuzz_user:
    mov eax, user_lcall
    cmp dword ptr [hostile_action], 2
    je fuzz_user_go
    mov eax, user_ljmp
fuzz_user_go:
    mov edx, user_stack_top
    call run_user
    ret

fuzz_fault:
    mov esi, fault_text
    call puts
    mov eax, dword ptr [ebx + FRAME_VECTOR]
    call print_hex32
    call newline
    mov eax, dword ptr [ebx + FRAME_VECTOR]
    add al, 0x40
    jmp exit_with_status

user_lcall:
    .byte 0x9A
    .long 0
    .word 0x3B
    mov eax, SYS_EXIT
    int 0x80
user_ljmp:
    .byte 0xEA
    .long 0
    .word 0x3B
    mov eax, SYS_EXIT
    int 0x80

.data
.align 8
hostile_desc: .long 0x5A5A5A5A, 0xA5A5A5A5
hostile_action: .long 0
fault_text: .asciz "fault "
big_gdt:
    .zero 8 * 8
big_gdt_end:
.align 4
    .word 0
big_gdtr:
    .word big_gdt_end - big_gdt - 1
    .long big_gdt
