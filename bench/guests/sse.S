# description: SSE loop benchmark kernel: ITERS passes of a 4 KiB array summed with movaps/addps
#
# Each pass loads the 256 16-byte elements of an aligned array with movaps and adds them with
# addps (two aligned-SSE instructions per element, eight instructions per element in all), so
# every iteration runs the alignment check cpuvirt puts on such instructions (cpu/ssealign.py).
# Prints "sse ITERS=<n> sum=<hex>" and exits with status 0.
#include "kernel.inc"

#ifndef ITERS
#define ITERS 1000
#endif

.text
main:
    mov eax, cr0
    and eax, ~4                         # EM clear, MP set (SDM Vol. 3A 13.1.3)
    or eax, 2
    mov cr0, eax
    mov eax, cr4
    or eax, 0x600                       # OSFXSR, OSXMMEXCPT
    mov cr4, eax
    mov edi, array                      # fill: element i holds i as four floats' bits
    xor eax, eax
fill:
    mov dword ptr [edi + eax * 4], eax
    inc eax
    cmp eax, 1024
    jb fill
    xorps xmm1, xmm1
    mov ecx, ITERS
pass:
    mov esi, array
    mov edx, 256
element:
    movaps xmm0, xmmword ptr [esi]
    addps xmm1, xmmword ptr [esi]
    pxor xmm2, xmm0
    add esi, 16
    dec edx
    jnz element
    dec ecx
    jnz pass
    movd eax, xmm1
    push eax
    mov esi, result_text
    call puts
    mov eax, ITERS
    call print_dec
    mov esi, sum_text
    call puts
    pop eax
    call print_hex32
    call newline
    jmp kernel_exit

.data
result_text: .asciz "sse ITERS="
sum_text: .asciz " sum="
.align 16
array:
    .fill 1024, 4, 0
