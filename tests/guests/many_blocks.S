# description: full-mode bookkeeping test (issue 10, item 5): calls N distinct one-instruction
# functions (`ret` at 0x400000 + i), so the translator makes N translations; with a small
# translation cache it is flushed many times, and what is kept per translation must go with it.
#include "kernel.inc"
#ifndef N
#define N 4000
#endif
.text
main:
    mov edi, 0x400000
    mov ecx, N
    mov al, 0xC3
    rep stosb
    mov esi, 0x400000
    mov ebp, N
many_loop:
    call esi
    inc esi
    dec ebp
    jnz many_loop
    PASS("called every function")
    ret
