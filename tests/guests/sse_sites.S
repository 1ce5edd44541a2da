# description: a hostile guest that spreads legacy-SSE instructions over many code pages
#
# Every aligned-SSE instruction site gets a code hook (cpu/ssealign.py), and the engine looks at
# every code hook when it translates an instruction and when a hooked one runs: without a bound, a
# guest that writes PAGES pages of `movaps xmm0, [esi]` (1,365 per page) and runs them makes the
# host pay for hundreds of thousands of hooks. The hypervisor keeps at most a fixed number
# (docs/security.md, "Bounds"). Then, on the first page, one site is rewritten from an aligned
# operand ([esi]) into a misaligned one ([esi + 8]) and must raise #GP(0), and so on.
#include "kernel.inc"

#ifndef PAGES
#define PAGES 64
#endif
AREA = 0x400000                         # the code pages (4 MiB up: guest RAM, unused by the kernel)

.text
main:
    push esi
    push edi
    push ebx
    mov eax, cr0
    and eax, ~4                         # EM clear, MP set: SSE available
    or eax, 2
    mov cr0, eax
    mov eax, cr4
    or eax, 0x600                       # OSFXSR, OSXMMEXCPT
    mov cr4, eax
    SET_HANDLER(VEC_GP, gp_handler)

    # fill PAGES pages: 1,365 x `movaps xmm0, [esi]` (0F 28 06), then `ret`
    mov edi, AREA
    mov ebx, PAGES
fill_page:
    mov ecx, 1365
fill_insn:
    mov byte ptr [edi], 0x0F
    mov byte ptr [edi + 1], 0x28
    mov byte ptr [edi + 2], 0x06
    add edi, 3
    dec ecx
    jnz fill_insn
    mov byte ptr [edi], 0xC3
    add edi, 1
    dec ebx
    jnz fill_page

    # run each page once, with an aligned operand
    mov esi, buf
    mov edi, AREA
    mov ebx, PAGES
run_page:
    call edi
    add edi, 4096
    dec ebx
    jnz run_page
    CHECK_EQ("PAGES pages of aligned movaps: no #GP", dword ptr [gps], 0)

    # rewrite the first page's first instruction: movaps xmm0, [esi + 8] (0F 28 46 08) then a nop
    # over the rest of the next one; run the page again
    mov edi, AREA
    mov dword ptr [edi], 0x0846280F
    mov word ptr [edi + 4], 0x9090
    mov dword ptr [resume], resume_1
    call edi
    CHECK_EQ("the rewritten site (now [esi + 8], misaligned) raises #GP", dword ptr [gps], 1)

    # rewrite it again into an aligned form with another base register: movaps xmm0, [ebx] (0F 28 03)
    mov ebx, buf + 16
    mov byte ptr [edi + 2], 0x03
    mov byte ptr [edi + 3], 0x90
    call edi
    CHECK_EQ("rewritten back to an aligned [ebx]: no #GP", dword ptr [gps], 1)
    mov ebx, buf + 4
    call edi
    CHECK_EQ("[ebx] misaligned: #GP", dword ptr [gps], 2)
    pop ebx
    pop edi
    pop esi
    ret
resume_1:
    ret

# #GP: count it and return from the page (the frame's ESP is the page's return address: resume)
gp_handler:
    inc dword ptr [gps]
    mov eax, dword ptr [resume]
    mov dword ptr [ebx + FRAME_EIP], eax
    ret

.data
.align 16
buf:
    .fill 8, 4, 0
gps: .long 0
resume: .long 0
