# description: hostile TSS: its base (or its ESP0) outside RAM, then an interrupt from ring 3
#
# With -D CALL_GATE, ring 3 calls through a call gate instead (the engine used to abort the host
# process when such a gate needed a stack from an unusable TSS). Build with -D ESP0_OUTSIDE to keep the TSS in RAM and point ESP0 outside RAM instead. As on
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
    mov eax, gate_target                # GDT 8: a DPL-3 call gate to ring-0 code
    and eax, 0xFFFF
    or eax, KERNEL_CS << 16
    mov dword ptr [big_gdt + 8 * 8], eax
    mov eax, gate_target
    and eax, 0xFFFF0000
    or eax, 0xEC00
    mov dword ptr [big_gdt + 8 * 8 + 4], eax
    lgdt [big_gdtr]
    mov ax, 0x38
    ltr ax
#ifdef CALL_GATE
    .byte 0x9A                          # from ring 0 the gate needs no stack: it works
    .long 0
    .word 0x40
    CHECK_EQ("a call gate from ring 0 works without a usable TSS", dword ptr [gate_calls], 1)
    mov eax, user_gate                  # from ring 3 it needs SS0:ESP0 from the TSS: #TS, #DF, shutdown
#else
    mov eax, user_int
#endif
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

gate_target:
    inc dword ptr [gate_calls]
    retf

user_gate:
    .byte 0x9A
    .long 0
    .word 0x43
    mov eax, SYS_EXIT
    mov ebx, 8
    int 0x80

user_int:
    mov eax, SYS_NOP
    int 0x80
    mov eax, SYS_EXIT
    mov ebx, 7
    int 0x80

.data
gate_calls: .long 0
.align 8
big_gdt:
    .zero 9 * 8
big_gdt_end:
.align 4
    .word 0
big_gdtr:
    .word big_gdt_end - big_gdt - 1
    .long big_gdt
