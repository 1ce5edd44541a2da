# description: a function rewritten in place with the same length and another number of instructions;
# virtual time (rdtsc) must count the code that runs, not the code that was there before
#
# Virtual time counts each translated block's instructions, cached per block (docs/design.md). The
# function smc_fn is 8 bytes long either way:
#   A: inc eax x 7; ret                (8 instructions)
#   B: add eax, 7; nop; nop; ret       (4 instructions, 5 + 1 + 1 + 1 bytes)
# so a block rewritten from A to B (or back) has the same address and length as before. `measure`
# calls a function through ebx between two rdtscs; the deltas go to MAILBOX for the test:
#   +0  A, a copy never rewritten          +4  B, a copy never rewritten
#   +8  smc_fn as A (second call)          +12 smc_fn rewritten to B, first call after the rewrite
#   +16 the same, second call              +20 smc_fn rewritten back to A, first call
# The guest checks only what the functions return (under QEMU the TSC runs on real time).
#include "kernel.inc"

MAILBOX = 0x7F00

.text
main:
    push ebx
    push esi
    push edi
    mov ebx, fn_a                       # the two references
    call measure
    call measure
    mov dword ptr [MAILBOX], edx
    CHECK_EQ("A adds 7", eax, 7)
    mov ebx, fn_b
    call measure
    call measure
    mov dword ptr [MAILBOX + 4], edx
    CHECK_EQ("B adds 7", eax, 7)

    mov ebx, smc_fn                     # smc_fn as A: translated, run, its count cached
    call measure
    call measure
    mov dword ptr [MAILBOX + 8], edx
    CHECK_EQ("smc_fn as written adds 7", eax, 7)

    mov esi, fn_b                       # rewrite it in place as B: same address, same length
    call smc_rewrite
    jmp smc_rewritten_b
smc_rewritten_b:
    call measure
    mov dword ptr [MAILBOX + 12], edx
    CHECK_EQ("smc_fn rewritten as B adds 7", eax, 7)
    call measure
    mov dword ptr [MAILBOX + 16], edx

    mov esi, fn_a                       # and back to A
    call smc_rewrite
    jmp smc_rewritten_a
smc_rewritten_a:
    call measure
    mov dword ptr [MAILBOX + 20], edx
    CHECK_EQ("smc_fn rewritten back as A adds 7", eax, 7)
    pop edi
    pop esi
    pop ebx
    ret

#include "count_fns.inc"

# smc_rewrite: copy the 8 bytes at esi over smc_fn.
smc_rewrite:
    mov edi, smc_fn
    mov ecx, 8
    rep movsb
    ret

.align 64
smc_fn:                                 # A at first
    .byte 0x40, 0x40, 0x40, 0x40, 0x40, 0x40, 0x40, 0xC3
