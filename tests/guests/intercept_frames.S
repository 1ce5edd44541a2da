# description: intercepted instructions found where they run: one linear page mapped in turn to two frames, and bytes in a code page that decode as sensitive instructions but never run
#
# Frame A holds `nop; nop; ret` and frame B `invd; ret` (the same length: three bytes), both run at
# linear page X by rewriting X's PTE: processes at the same address, or a page reused for other code.
# The clock knows a block by (linear address, length), so B's block is no new block to it: a hypervisor
# that found intercepted instructions only in blocks the clock counts for the first time would let B's
# `invd` run unseen (under hw INVD always exits, SDM 25.1.2). `not_code` below is data in a code page
# whose bytes decode as hlt, sldt, lgdt, a far jmp and mov to CR0: it never runs, so it needs no hooks,
# nor does the `hlt` byte after each frame's `ret` in X, a page that serves two frames
# (tests/test_intercepts.py).
#include "kernel.inc"
#include "paging.inc"

X = 0x300000                            # the linear page
FRAME_A = 0x310000
FRAME_B = 0x311000

.text
main:
    mov dword ptr [FRAME_A], 0xF4C39090 # nop; nop; ret; then a byte that never runs: hlt
    mov dword ptr [FRAME_B], 0xF4C3080F # invd; ret; the same
    PAGING_IDENTITY_4M_ON(PTE_P | PTE_W)
    mov eax, FRAME_A
    call run_x
    mov eax, FRAME_B
    call run_x
    mov eax, FRAME_A
    call run_x
    mov eax, FRAME_B
    call run_x
    call paging_disable
    mov eax, not_code
    movzx ecx, byte ptr [eax]
    CHECK_EQ("the data in the code page is intact", ecx, 0xF4)
    ret

# run_x: map X to the frame in eax, then call X
run_x:
    or eax, PTE_P | PTE_W
    mov dword ptr [page_table_low + 4 * 0x300], eax  # the PTE of X (0x300000 >> 12)
    invlpg [X]
    mov eax, X
    call eax
    ret

not_code:                               # never executed
    .byte 0xF4, 0xF4, 0x0F, 0x00, 0xC0, 0x0F, 0x01, 0x10, 0xEA, 0, 0, 0, 0, 8, 0, 0x0F, 0x22, 0xC0, 0xF4
not_code_end:
