# description: prints the time stamp counter (EDX, then EAX, in decimal) at three points of a loop
#include "kernel.inc"
.text
main:
    mov esi, 3
rdtsc_point:
    rdtsc
    push eax
    mov eax, edx
    call print_dec
    mov al, ':'
    call putc
    pop eax
    call print_dec
    mov al, 10
    call putc
    mov ecx, 1000
rdtsc_spin:
    dec ecx
    jnz rdtsc_spin
    dec esi
    jnz rdtsc_point
    PASS("rdtsc read three times")
    ret
