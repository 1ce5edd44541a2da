# description: one linear code page mapped in turn to two frames holding different SSE instructions
#
# Frame A holds `movaps xmm0, [esi]; ret` and frame B `movaps xmm0, [ebx]; ret` (the same length), both
# run at linear page X by rewriting X's PTE: processes at the same address, or a page reused for other
# code. An alignment check that kept the operand form decoded from the first frame, or compared bytes
# only in that frame, would check [esi] while B's [ebx] runs (cpu/ssealign.py).
#include "kernel.inc"
#include "paging.inc"

X = 0x300000                            # the linear page
FRAME_A = 0x310000
FRAME_B = 0x311000

.text
main:
    mov eax, cr0
    and eax, ~4                         # EM clear, MP set: SSE available
    or eax, 2
    mov cr0, eax
    mov eax, cr4
    or eax, 0x600                       # OSFXSR, OSXMMEXCPT
    mov cr4, eax
    SET_HANDLER(VEC_GP, gp_handler)
    mov dword ptr [FRAME_A], 0xC306280F # movaps xmm0, [esi]; ret
    mov dword ptr [FRAME_B], 0xC303280F # movaps xmm0, [ebx]; ret
    PAGING_IDENTITY_4M_ON(PTE_P | PTE_W)
    push ebx
    push esi

    mov esi, buf                        # [esi] aligned, [ebx] misaligned throughout
    mov ebx, buf + 8
    mov eax, FRAME_A
    call run_x
    CHECK_EQ("frame A at X: movaps [esi] aligned, no #GP", dword ptr [gps], 0)
    mov eax, FRAME_B
    call run_x
    CHECK_EQ("frame B at X: movaps [ebx] misaligned, #GP", dword ptr [gps], 1)
    mov eax, FRAME_A
    call run_x
    CHECK_EQ("frame A again: no #GP", dword ptr [gps], 1)
    mov eax, FRAME_B
    call run_x
    CHECK_EQ("frame B again: #GP", dword ptr [gps], 2)
    mov ebx, buf + 16
    call run_x
    CHECK_EQ("frame B with [ebx] aligned: no #GP", dword ptr [gps], 2)

    pop esi
    pop ebx
    call paging_disable
    ret

# run_x: map X to the frame in eax, then call X (a #GP returns here through gp_handler)
run_x:
    or eax, PTE_P | PTE_W
    mov dword ptr [page_table_low + 4 * 0x300], eax  # the PTE of X (0x300000 >> 12)
    invlpg [X]
    mov eax, X
    call eax
    ret

# #GP: count it and resume at X + 3, the page's own `ret`
gp_handler:
    inc dword ptr [gps]
    mov dword ptr [ebx + FRAME_EIP], X + 3
    ret

.data
.align 16
buf:
    .fill 8, 4, 0
gps: .long 0
