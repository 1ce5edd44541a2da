# description: hostile TSS: its base (or its ESP0) outside RAM, then an interrupt from ring 3
#
# Build with -D ESP0_OUTSIDE to keep the TSS in RAM and point ESP0 outside RAM instead. As on
# hardware, reads of unbacked memory give all-ones and writes are dropped: a base outside RAM reads
# SS0 = 0xFFFF (#TS, then #DF, then a triple fault); an ESP0 outside RAM loses the pushed frame.
#include "kernel.inc"
#include "user.inc"
#define OUTSIDE 0xF0000000

.text
main:
    call user_init
#ifdef ESP0_OUTSIDE
    mov dword ptr [tss + 4], OUTSIDE + 0x1000
    mov eax, user_int
    mov edx, user_stack_top
    call run_user_keep_esp0
#else
    mov edi, big_gdt
    mov esi, gdt
    mov ecx, 14
    rep movsd
    lea edi, [big_gdt + 7 * 8]
    mov eax, OUTSIDE
    mov ecx, 103
    mov dl, 0x89
    call set_system_descriptor
    lgdt [big_gdtr]
    mov ax, 0x38
    ltr ax
    mov eax, user_int
    mov edx, user_stack_top
    call run_user_keep_esp0
#endif
    FAIL("hostile TSS", "the interrupt from ring 3 came back")
    ret

# run_user without setting TSS.ESP0 (user.inc's run_user writes it)
run_user_keep_esp0:
    mov dword ptr [user_saved_esp], esp
    push USER_DS
    push edx
    push EFLAGS_FIXED
    push USER_CS
    push eax
    iretd

user_int:
    mov eax, SYS_NOP
    int 0x80
    mov eax, SYS_EXIT
    mov ebx, 7
    int 0x80

.data
.align 8
big_gdt:
    .zero 8 * 8
big_gdt_end:
.align 4
    .word 0
big_gdtr:
    .word big_gdt_end - big_gdt - 1
    .long big_gdt
