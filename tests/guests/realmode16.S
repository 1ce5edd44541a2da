# description: a trip through 16-bit code: a 16-bit protected-mode code segment, real-address mode
# (an interrupt through the guest's own IVT entry, port I/O to COM1, a data segment loaded with a
# 4 GiB limit before PE was cleared: "big real mode", used to read RAM above 1 MiB and a local APIC
# register: device memory that hw's instruction emulator reaches from 16-bit code), then back to
# 32-bit protected mode. QEMU and
# native run it; full runs the 16-bit code in place (bt/direct.py); trap refuses real mode (123).
#include "kernel.inc"

STUB = 0x7000                           # where the 16-bit code runs: CS base 0x7000 (segment 0x700)
MAILBOX = 0x7F00                        # what the real-mode code reports (linear)
BIG = 0x200000                          # a byte above 1 MiB, reached through big real mode

.data
.align 8
rm_gdt:
    .long 0, 0
    .long 0x0000FFFF, 0x00CF9A00        # 0x08: flat 32-bit code, DPL 0
    .long 0x0000FFFF, 0x00CF9200        # 0x10: flat 32-bit data, 4 GiB
    .long 0x7000FFFF, 0x00009A00        # 0x18: 16-bit code, base 0x7000, limit 0xFFFF (D = 0)
    .long 0x0000FFFF, 0x00009200        # 0x20: 16-bit data, base 0, limit 0xFFFF
rm_gdt_end:
rm_gdtr:
    .word rm_gdt_end - rm_gdt - 1
    .long rm_gdt
saved_gdtr:
    .word 0
    .long 0
rm_idtr:                                # real mode's IDTR: the IVT at 0 (SDM Vol. 3A 20.1.4)
    .word 0x3FF
    .long 0
saved_idtr:
    .word 0
    .long 0
saved_esp:
    .long 0

.text
main:
    push ebx
    push esi
    push edi
    push ebp
    mov byte ptr [BIG], 0x5A
    mov esi, rm_stub                    # copy the 16-bit code to STUB
    mov edi, STUB
    mov ecx, rm_stub_end - rm_stub
    rep movsb
    mov dword ptr [MAILBOX], 0
    sgdt [saved_gdtr]
    sidt [saved_idtr]
    mov dword ptr [saved_esp], esp
    lgdt [rm_gdtr]
    lidt [rm_idtr]
    .byte 0xEA                          # ljmp 0x18:0 (a 16-bit code segment)
    .long 0
    .word 0x18

back32:                                 # from the 16-bit code: ljmp 0x08:back32
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov esp, dword ptr [saved_esp]
    lgdt [saved_gdtr]
    lidt [saved_idtr]
    .byte 0xEA
    .long back32_kernel
    .word 0x08
back32_kernel:
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov fs, ax
    mov gs, ax
    mov ss, ax
    CHECK_EQ("int 0x42 through the IVT", dword ptr [MAILBOX], 0x1234)
    CHECK_EQ("big real mode read above 1 MiB", dword ptr [MAILBOX + 4], 0x5A)
    CHECK_EQ("CR0 read in real mode", dword ptr [MAILBOX + 8], 0x10)
    mov eax, dword ptr [0xFEE00030]
    CHECK_EQ("APIC register read from real mode", dword ptr [MAILBOX + 12], eax)
    pop ebp
    pop edi
    pop esi
    pop ebx
    ret

# -- 16-bit code, copied to STUB and run there (offsets from rm_stub). The toolchain assembles 32-bit
# code only, so each 16-bit instruction is written as its bytes (SDM Vol. 2), its text beside it.
rm_stub:
    .byte 0xB8, 0x20, 0x00              # mov ax, 0x20        16-bit protected mode (CS.D = 0)
    .byte 0x8E, 0xD8                    # mov ds, ax
    .byte 0x8E, 0xC0                    # mov es, ax
    .byte 0x8E, 0xD0                    # mov ss, ax
    .byte 0xB8, 0x10, 0x00              # mov ax, 0x10        FS: 4 GiB limit, kept once PE is clear
    .byte 0x8E, 0xE0                    # mov fs, ax
    .byte 0x0F, 0x20, 0xC0              # mov eax, cr0
    .byte 0x66, 0x83, 0xE0, 0xFE        # and eax, 0xFFFFFFFE
    .byte 0x0F, 0x22, 0xC0              # mov cr0, eax        real-address mode
    .byte 0xEA                          # ljmp 0x700:rm_real
    .word rm_real - rm_stub
    .word 0x700
rm_real:
    .byte 0x31, 0xC0                    # xor ax, ax
    .byte 0x8E, 0xD8                    # mov ds, ax
    .byte 0x8E, 0xC0                    # mov es, ax
    .byte 0x8E, 0xD0                    # mov ss, ax
    .byte 0xBC, 0x00, 0x7E              # mov sp, 0x7E00
    .byte 0xC7, 0x06, 0x08, 0x01        # mov word ptr [0x42 * 4], rm_handler - rm_stub
    .word rm_handler - rm_stub
    .byte 0xC7, 0x06, 0x0A, 0x01        # mov word ptr [0x42 * 4 + 2], 0x700
    .word 0x700
    .byte 0xCD, 0x42                    # int 0x42            through the IVT
    .byte 0x0F, 0x20, 0xC0              # mov eax, cr0
    .byte 0x66, 0xA3, 0x08, 0x7F        # mov dword ptr [MAILBOX + 8], eax
    .byte 0x66, 0xBA, 0x00, 0x00, 0x20, 0x00    # mov edx, BIG
    .byte 0x64, 0x67, 0x66, 0x0F, 0xB6, 0x02    # movzx eax, byte ptr fs:[edx]  (big real mode)
    .byte 0x66, 0xA3, 0x04, 0x7F        # mov dword ptr [MAILBOX + 4], eax
    .byte 0x66, 0xBA, 0x30, 0x00, 0xE0, 0xFE    # mov edx, 0xFEE00030 (the local APIC's version)
    .byte 0x64, 0x67, 0x66, 0x8B, 0x02  # mov eax, dword ptr fs:[edx]   device memory from real mode
    .byte 0x66, 0xA3, 0x0C, 0x7F        # mov dword ptr [MAILBOX + 12], eax
    .byte 0xBA, 0xF8, 0x03              # mov dx, 0x3F8       "real" on COM1, from real mode
    .byte 0xB0, 0x72, 0xEE              # mov al, 'r' ; out dx, al
    .byte 0xB0, 0x65, 0xEE              # mov al, 'e' ; out dx, al
    .byte 0xB0, 0x61, 0xEE              # mov al, 'a' ; out dx, al
    .byte 0xB0, 0x6C, 0xEE              # mov al, 'l' ; out dx, al
    .byte 0xB0, 0x0A, 0xEE              # mov al, '\n' ; out dx, al
    .byte 0x0F, 0x20, 0xC0              # mov eax, cr0
    .byte 0x66, 0x83, 0xC8, 0x01        # or eax, 1
    .byte 0x0F, 0x22, 0xC0              # mov cr0, eax        protected mode, still 16-bit code
    .byte 0x66, 0xEA                    # ljmp 0x08:back32    (32-bit offset)
    .long back32
    .word 0x08
rm_handler:
    .byte 0x66, 0xC7, 0x06, 0x00, 0x7F, 0x34, 0x12, 0x00, 0x00  # mov dword ptr [MAILBOX], 0x1234
    .byte 0xCF                          # iret
rm_stub_end:
