# description: #GP(0) for legacy-SSE instructions whose m128 operand is not 16-byte aligned
#
# The SDM (Vol. 2A 2.4) has movaps, movdqa, movntps, addps, pxor... with a memory operand raise
# #GP(0) when its linear address is not a multiple of 16 (the segment base counts); movups, movdqu
# and the scalar forms never do. Unicorn 2.1.3 checks nothing: cpuvirt does (cpu/ssealign.py).
#include "kernel.inc"

#define CHECK_GP(NAME, N) CHECK_EQ(NAME, dword ptr [gps], N)

.text
main:
    mov eax, cr0
    and eax, ~4                                 # EM clear, MP set: SSE available (SDM Vol. 3A 13.1.3)
    or eax, 2
    mov cr0, eax
    mov eax, cr4
    or eax, 0x600                               # OSFXSR, OSXMMEXCPT
    mov cr4, eax
    SET_HANDLER(VEC_GP, gp_handler)

    mov dword ptr [gps], 0
    movaps xmm0, xmmword ptr [buf + 16]
    movdqa xmm1, xmmword ptr [buf + 32]
    movaps xmmword ptr [buf + 48], xmm0
    addps xmm0, xmmword ptr [buf]
    CHECK_GP("aligned movaps, movdqa, movaps store, addps: no #GP", 0)

    mov dword ptr [resume], resume_1
gp_movaps:
    movaps xmm0, xmmword ptr [buf + 8]
resume_1:  CHECK_GP("movaps xmm, m128 at 8 mod 16 raises #GP", 1)
    CHECK_EQ("the #GP is a fault: saved EIP is the movaps", dword ptr [gp_eip], gp_movaps)
    CHECK_EQ("with error code 0", dword ptr [gp_error], 0)

    mov dword ptr [buf + 4], 0x11111111
    movups xmm2, xmmword ptr [ones]
    mov dword ptr [resume], resume_2
    movaps xmmword ptr [buf + 4], xmm2
resume_2:  CHECK_GP("movaps m128, xmm (store) at 4 mod 16 raises #GP", 2)
    CHECK_EQ("and stores nothing", dword ptr [buf + 4], 0x11111111)

    lea eax, [buf + 1]
    mov dword ptr [resume], resume_3
    movdqa xmm1, xmmword ptr [eax]
resume_3: CHECK_GP("movdqa xmm, [eax] with eax 1 mod 16 raises #GP", 3)

    mov dword ptr [resume], resume_4
    addps xmm0, xmmword ptr [buf + 8]
resume_4:  CHECK_GP("addps xmm, m128 misaligned raises #GP", 4)

    mov dword ptr [resume], resume_5
    movntps xmmword ptr [buf + 8], xmm0
resume_5:  CHECK_GP("movntps misaligned raises #GP", 5)

    lea ebx, [buf]
    mov ecx, 3
    mov dword ptr [resume], resume_6
    pxor xmm0, xmmword ptr [ebx + ecx * 4 + 16]
resume_6:  CHECK_GP("pxor xmm, [ebx + ecx*4 + 16] (SIB) misaligned raises #GP", 6)

    movups xmm0, xmmword ptr [buf + 8]
    movdqu xmm1, xmmword ptr [buf + 8]
    movups xmmword ptr [buf + 4], xmm0
    movss xmm2, dword ptr [buf + 4]
    addss xmm2, dword ptr [buf + 4]
    movsd xmm3, qword ptr [buf + 8]
    CHECK_GP("movups, movdqu, movss, addss, movsd at misaligned addresses: no #GP", 6)

    # one site run 1000 times aligned, then misaligned (the C check, then its Python path)
    lea esi, [buf]
    mov ecx, 1001
    mov dword ptr [resume], loop_resume
loop_top: cmp ecx, 1
    jne loop_site
    add esi, 8
loop_site: movaps xmm0, xmmword ptr [esi]
    dec ecx
    jnz loop_top
loop_resume: CHECK_GP("a site run 1000 times aligned raises #GP the first time it is misaligned", 7)
    CHECK_EQ("at that execution", ecx, 1)

    # the segment base counts: FS, then DS, with base 8 (the ring-3 data descriptor, rewritten)
    mov dword ptr [gdt + 0x20], 0x0008FFFF
    mov ax, 0x23
    mov fs, ax
    movaps xmm0, xmmword ptr fs:[buf + 8]       # linear buf + 16
    CHECK_GP("fs base 8: movaps fs:[buf + 8] (linear aligned): no #GP", 7)
    mov dword ptr [resume], resume_7
    mov ax, 0x23
    mov ds, ax
    movaps xmm0, xmmword ptr ds:[buf + 16]      # linear buf + 24
resume_7:
    mov ax, 0x10
    mov ds, ax
    mov fs, ax
    mov dword ptr [gdt + 0x20], 0x0000FFFF
    CHECK_GP("ds base 8: movaps [buf + 16] (linear 8 mod 16) raises #GP", 8)

    # fxsave/fxrstor m512byte: 16-byte aligned too (SDM Vol. 2A FXSAVE, FXRSTOR: #GP(0))
    fxsave [fxarea]
    fxrstor [fxarea]
    CHECK_GP("aligned fxsave, fxrstor: no #GP", 8)
    mov dword ptr [fxarea + 512 + 8], 0x33333333
    mov dword ptr [resume], resume_8
    fxsave [fxarea + 8]
resume_8:  CHECK_GP("fxsave at 8 mod 16 raises #GP", 9)
    CHECK_EQ("and stores nothing", dword ptr [fxarea + 512 + 8], 0x33333333)
    lea eax, [fxarea + 4]
    mov dword ptr [resume], resume_9
    fxrstor [eax]
resume_9:  CHECK_GP("fxrstor [eax] with eax 4 mod 16 raises #GP", 10)
    ret

gp_handler:
    inc dword ptr [gps]
    mov eax, dword ptr [ebx + FRAME_EIP]
    mov dword ptr [gp_eip], eax
    mov eax, dword ptr [ebx + FRAME_ERROR]
    mov dword ptr [gp_error], eax
    mov eax, dword ptr [resume]
    mov dword ptr [ebx + FRAME_EIP], eax
    ret

.data
.align 16
buf:
    .fill 32, 4, 0
ones:
    .fill 4, 4, 0x22222222
.align 16
fxarea:
    .fill 132, 4, 0
gps: .long 0
gp_eip: .long 0
gp_error: .long 0
resume: .long 0
