# description: pc-testdev (--device pc-testdev) and instructions on its MMIO scratch area; under hw every
# access to 0xFF000000 is an EPT violation whose instruction the hypervisor emulates (cpu/emulator.py)
#include "kernel.inc"

#define IOMEM       0xFF000000

.text
main:
    # the scratch register: wide at 0xE0, byte-wise at 0xE8
    mov eax, 0x11223344
    out 0xE0, eax
    xor eax, eax
    in al, 0xE1
    CHECK_EQ("byte 1 of the scratch register", eax, 0x33)
    in ax, 0xE2
    CHECK_EQ("word 1 of the scratch register", eax, 0x1122)
    mov al, 0x55
    out 0xE9, al
    in eax, 0xE0
    CHECK_EQ("a byte written at 0xE9", eax, 0x11225544)
    mov eax, 0xA1B2C3D4
    out 0xE8, eax
    xor eax, eax
    in ax, 0xEA
    CHECK_EQ("0xE8 takes a dword a byte at a time", eax, 0xA1B2)
    mov eax, 0x1000
    out 0xE4, eax                       # flush page: nothing the guest can see

    # read-modify-write instructions on the MMIO area
    mov dword ptr [IOMEM], 0x1234
    mov eax, 0x8001
    or dword ptr [IOMEM], eax
    mov eax, dword ptr [IOMEM]
    CHECK_EQ("or [mmio], reg", eax, 0x9235)
    add dword ptr [IOMEM], 0x7FFFFFFF
    setc bl
    seto cl
    mov eax, dword ptr [IOMEM]
    CHECK_EQ("add [mmio], imm", eax, 0x80009234)
    movzx ebx, bl
    CHECK_EQ("add [mmio] sets no CF here", ebx, 0)
    movzx ecx, cl
    CHECK_EQ("add [mmio] sets OF", ecx, 1)
    mov dword ptr [IOMEM + 4], 0x1234
    mov ecx, 0x5A5A
    xchg dword ptr [IOMEM + 4], ecx
    CHECK_EQ("xchg [mmio], reg: the old value", ecx, 0x1234)
    lock inc byte ptr [IOMEM + 4]
    movzx eax, byte ptr [IOMEM + 4]
    CHECK_EQ("lock inc byte [mmio]", eax, 0x5B)
    btc dword ptr [IOMEM], 31
    setc al
    movzx eax, al
    CHECK_EQ("btc [mmio] returns the old bit", eax, 1)
    mov eax, dword ptr [IOMEM]
    CHECK_EQ("btc [mmio] flips it", eax, 0x9234)
    bsr ecx, dword ptr [IOMEM]
    CHECK_EQ("bsr reg, [mmio]", ecx, 15)
    imul ecx, dword ptr [IOMEM], -2
    CHECK_EQ("imul reg, [mmio], imm", ecx, 0xFFFEDB98)
    mov cl, 4
    mov eax, 0xF0000000
    shld dword ptr [IOMEM], eax, cl
    mov eax, dword ptr [IOMEM]
    CHECK_EQ("shld [mmio], reg, cl", eax, 0x9234F)

    # string instructions: RAM -> MMIO and back, with rep
    cld
    mov esi, pattern
    mov edi, IOMEM + 0x100
    mov ecx, 37
    rep movsb
    mov esi, pattern
    mov edi, IOMEM + 0x100
    mov ecx, 37
    repe cmpsb
    CHECK_EQ("rep movsb to [mmio], repe cmpsb back: count left", ecx, 0)
    mov eax, dword ptr [IOMEM + 0x100 + 36 - 3]
    CHECK_EQ("the last dword copied", eax, 0x2F2E2D2C)
    mov edi, IOMEM + 0x200
    mov eax, 0x77
    mov ecx, 8
    rep stosd
    mov eax, dword ptr [IOMEM + 0x21C]
    CHECK_EQ("rep stosd to [mmio]", eax, 0x77)
    mov edi, IOMEM + 0x100
    mov al, 0x1A
    mov ecx, 100
    repne scasb
    mov eax, edi
    sub eax, IOMEM + 0x100
    CHECK_EQ("repne scasb stops after the match", eax, 27)

    # device memory to a RAM page nothing touched yet (hw --vmx lazy_ept=1: not yet in EPT either)
    mov esi, IOMEM + 0x100
    mov edi, 0x380000
    mov ecx, 37
    rep movsb
    CHECK_MEM_EQ("rep movsb from [mmio] to a fresh RAM page", 0x380000, pattern, 37)

    # a long rep: under hw, 1,024 iterations per exit, re-entered until done
    mov edi, IOMEM + 0x400
    mov eax, 0x600DF00D
    mov ecx, 15000
    rep stosd
    mov eax, dword ptr [IOMEM + 0x400 + 4 * 14999]
    CHECK_EQ("rep stosd of 15000 dwords to [mmio]", eax, 0x600DF00D)

    # a 16-byte SSE load and store
    mov eax, cr4
    or eax, 0x200                       # OSFXSR
    mov cr4, eax
    movdqu xmm1, xmmword ptr [pattern]
    movdqu xmmword ptr [IOMEM + 0x301], xmm1
    movdqu xmm2, xmmword ptr [IOMEM + 0x301]
    movdqu xmmword ptr [copy], xmm2
    CHECK_MEM_EQ("movdqu through [mmio]", copy, pattern, 16)
    ret

.data
pattern:
    .byte 0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09, 0x0A, 0x0B, 0x0C, 0x0D, 0x0E, 0x0F
    .byte 0x10, 0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, 0x18, 0x19, 0x1A, 0x1B, 0x1C, 0x1D, 0x1E, 0x1F
    .byte 0x2B, 0x2C, 0x2D, 0x2E, 0x2F
copy:
    .space 16
