# description: a 16-bit protected-mode code segment (CS.D = 0) whose instructions are counted as the CPU
# decodes them
#
# Virtual time counts the instructions of each translated block (docs/design.md). Decoded as 32-bit
# code, `mov cx, 100` (B9 64 00) would swallow the next instruction's first two bytes, and the
# loop's three `mov ax, imm16` would become one `mov eax, imm32` and garbage: the instruction count,
# and the TSC read by rdtsc, would be wrong. The guest stores the rdtsc delta across the loop at
# MAILBOX + 4 (the test reads it; under QEMU the TSC runs on real time, so it is not printed).
#include "kernel.inc"

STUB = 0x7000                           # the 16-bit code segment's base
MAILBOX = 0x7F00

.data
.align 8
pm16_gdt:
    .long 0, 0
    .long 0x0000FFFF, 0x00CF9A00        # 0x08: flat 32-bit code, DPL 0
    .long 0x0000FFFF, 0x00CF9200        # 0x10: flat 32-bit data
    .long 0x7000FFFF, 0x00009A00        # 0x18: 16-bit code, base 0x7000, limit 0xFFFF (D = 0)
pm16_gdt_end:
pm16_gdtr:
    .word pm16_gdt_end - pm16_gdt - 1
    .long pm16_gdt
saved_gdtr:
    .word 0
    .long 0

.text
main:
    push esi
    push edi
    mov esi, pm16_stub
    mov edi, STUB
    mov ecx, pm16_stub_end - pm16_stub
    rep movsb
    mov dword ptr [MAILBOX], 0
    mov dword ptr [MAILBOX + 4], 0
    sgdt [saved_gdtr]
    lgdt [pm16_gdtr]
    .byte 0xEA                          # ljmp 0x18:0
    .long 0
    .word 0x18
back32:
    lgdt [saved_gdtr]
    .byte 0xEA
    .long back32_kernel
    .word 0x08
back32_kernel:
    CHECK_EQ("the 16-bit loop ran 100 times to its end", dword ptr [MAILBOX], 0x30000)
    pop edi
    pop esi
    ret

# 16-bit code (CS.D = 0), written as bytes: the toolchain assembles 32-bit code only.
pm16_stub:
    .byte 0x0F, 0x31                    # rdtsc
    .byte 0x66, 0x89, 0xC6              # mov esi, eax
    .byte 0xB9, 0x64, 0x00              # mov cx, 100
pm16_loop:
    .byte 0xB8, 0x01, 0x00              # mov ax, 1
    .byte 0xB8, 0x02, 0x00              # mov ax, 2
    .byte 0xB8, 0x03, 0x00              # mov ax, 3
    .byte 0x49                          # dec cx
    .byte 0x75, 0xF4                    # jnz pm16_loop (back 12 bytes)
    .byte 0x89, 0xC3                    # mov bx, ax
    .byte 0x0F, 0x31                    # rdtsc
    .byte 0x66, 0x29, 0xF0              # sub eax, esi
    .byte 0x66, 0xA3, 0x04, 0x7F        # mov dword ptr [MAILBOX + 4], eax
    .byte 0x89, 0x1E, 0x02, 0x7F        # mov word ptr [MAILBOX + 2], bx
    .byte 0x89, 0x0E, 0x00, 0x7F        # mov word ptr [MAILBOX], cx
    .byte 0x66, 0xEA                    # ljmp 0x08:back32 (32-bit offset)
    .long back32
    .word 0x08
pm16_stub_end:
