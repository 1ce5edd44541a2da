# description: kernel functions returning to 24 call sites each, round after round (a megamorphic `ret` and `ret 4`)
#
# Under full, a translated `ret` compares its target with its inline cache; a miss is a callout that fills an
# entry (a patch of the translated code). A `ret` with more live targets than the widest cache (16) misses
# forever; once the translator finds it megamorphic it fills no more, and its misses are served by a look-up
# only, in C (bt/_callout.c ic_ret) when the stack read and the translation are known there.
# tests/test_full_events.py compares the C and Python runs; the sum must be native's and QEMU's.
#include "kernel.inc"

#define ROUNDS 100
#define CALL8 call bump ; call bump ; call bump ; call bump ; call bump ; call bump ; call bump ; call bump
#define ARG(N) push N ; call bump_arg
#define ARG8 ARG(1) ; ARG(2) ; ARG(3) ; ARG(4) ; ARG(5) ; ARG(6) ; ARG(7) ; ARG(8)

.text
main:
    xor esi, esi
    mov ecx, ROUNDS
round:
    CALL8
    CALL8
    CALL8
    ARG8                                # and a `ret 4` the same way
    ARG8
    ARG8
    rol esi, 1
    dec ecx
    jnz round
    mov eax, esi
    call print_hex32
    call newline
    PASS("a megamorphic return")
    ret

bump:
    add esi, dword ptr [esp]            # the return address: each call site adds its own
    ret

bump_arg:
    add esi, dword ptr [esp]
    add esi, dword ptr [esp + 4]        # and its argument, which `ret 4` drops
    ret 4
