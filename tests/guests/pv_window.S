# description: para-mode test: an event pending behind the upcall mask is delivered right after the plain store that clears the mask (PAD: instructions spent masked first)
#include "pv_rt.inc"
#define MASK 1
#define PENDING 0
#ifndef PAD
#define PAD 1000
#endif
.text
main:
    call rt_init_iret
    mov ebx, 0x19
    mov ecx, upcall
    xor edx, edx
    xor esi, esi
    HC(4)
    mov ebx, 1
    mov ecx, bind_arg
    HC(32)
    mov eax, dword ptr [shared_info]
    mov byte ptr [eax + MASK], 1
    call timer_soon
wait_pending:
    cmp byte ptr [eax + PENDING], 0
    je wait_pending
    mov ecx, PAD
masked_spin:
    dec ecx
    jnz masked_spin
    mov byte ptr [eax + MASK], 0
unmasked:
    nop
    mov eax, dword ptr [ticks]
    EXPECT(1, n_one)
    mov eax, dword ptr [saved_eip]
    EXPECT(unmasked, n_exact)
    xor eax, eax
    ret

# set_timer_op(rdtsc + 100000). Preserves everything.
timer_soon:
    pushad
    rdtsc
    add eax, 100000
    adc edx, 0
    mov ebx, eax
    mov ecx, edx
    HC(15)
    popad
    ret

# The event callback: note where it interrupted, acknowledge, iret.
upcall:
    push eax
    push ebx
    inc dword ptr [ticks]
    mov eax, dword ptr [esp + 8]
    mov dword ptr [saved_eip], eax
    mov ebx, dword ptr [shared_info]
    mov byte ptr [ebx + PENDING], 0
    xor eax, eax
    xchg dword ptr [ebx + 4], eax
    xor eax, eax
    xchg dword ptr [ebx + 2048], eax
    pop ebx
    pop eax
    IRET

.data
bind_arg: .long 0, 0, 0
ticks: .long 0
saved_eip: .long 0
n_one: .ascii "one upcall"
.byte 0
n_exact: .ascii "the upcall interrupted the instruction right after the unmasking store"
.byte 0
