# description: real-address-mode fidelity: smsw into a 32-bit register, pushfd after an iretd that
# restored RF, and the privileged instructions 16-bit code may run (lidt through a based DS in 16-bit
# protected mode; clts, mov to DR0, wrmsr in real mode), which must act on the CPU the guest sees
# (under full: the virtual CPU, not the engine's own state).
#
# SDM: SMSW r32 leaves the register's upper half undefined (QEMU 7.2 and cpuvirt store all of CR0);
# PUSHF never copies RF (bit 16): the image has it cleared (kvm-unit-tests realmode `rflags.rf`).
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
    .long 0x7000FFFF, 0x00009200        # 0x28: 16-bit data, base 0x7000 (the stub's own data)
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
    mov esi, rm_stub                    # copy the 16-bit code to STUB
    mov edi, STUB
    mov ecx, rm_stub_end - rm_stub
    rep movsb
    mov dword ptr [MAILBOX + 8], 0
    mov dword ptr [MAILBOX + 16], 0
    sgdt [saved_gdtr]
    sidt [saved_idtr]
    mov dword ptr [saved_esp], esp
    lgdt [rm_gdtr]                      # (the IVT's IDTR is loaded by the 16-bit code, from its DS)
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
    CHECK_EQ("smsw eax in real mode stores all of CR0", dword ptr [MAILBOX + 16], dword ptr [MAILBOX + 8])
    mov eax, dword ptr [MAILBOX + 20]
    and eax, 0x10000
    CHECK_EQ("pushfd after an iretd that set RF stores RF clear", eax, 0)
    mov eax, dword ptr [MAILBOX + 24]
    and eax, 8
    CHECK_EQ("clts in real mode clears CR0.TS", eax, 0)
    mov eax, cr0
    and eax, 8
    CHECK_EQ("and CR0.TS stays clear in protected mode", eax, 0)
    movzx eax, word ptr [MAILBOX + 28]
    CHECK_EQ("lidt in 16-bit protected mode reads its operand through DS's base (limit)", eax, 0x3FF)
    CHECK_EQ("lidt in 16-bit protected mode reads its operand through DS's base (base)", dword ptr [MAILBOX + 30], 0)
    mov eax, dr0
    CHECK_EQ("mov dr0 in real mode sets the DR0 protected mode reads", eax, 0x1234)
    mov ecx, 0x174                      # IA32_SYSENTER_CS
    rdmsr
    CHECK_EQ("wrmsr in real mode sets the MSR protected mode reads", eax, 0x8)
    pop ebp
    pop edi
    pop esi
    pop ebx
    ret

# -- 16-bit code, copied to STUB and run there (offsets from rm_stub), written as its bytes (SDM Vol. 2).
rm_stub:
    .byte 0xB8, 0x20, 0x00              # mov ax, 0x20        16-bit protected mode (CS.D = 0)
    .byte 0x8E, 0xD8                    # mov ds, ax
    .byte 0x8E, 0xC0                    # mov es, ax
    .byte 0x8E, 0xD0                    # mov ss, ax
    .byte 0xB8, 0x28, 0x00              # mov ax, 0x28        DS base 0x7000
    .byte 0x8E, 0xD8                    # mov ds, ax
    .byte 0x0F, 0x01, 0x1E              # lidt [pm16_idtr - rm_stub]   the IVT (SDM Vol. 3A 20.1.4)
    .word pm16_idtr - rm_stub
    .byte 0xB8, 0x20, 0x00              # mov ax, 0x20
    .byte 0x8E, 0xD8                    # mov ds, ax
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
    .byte 0x0F, 0x01, 0x0E, 0x1C, 0x7F  # sidt [MAILBOX + 28]
    .byte 0x0F, 0x20, 0xC0              # mov eax, cr0
    .byte 0x66, 0xA3, 0x08, 0x7F        # mov dword ptr [MAILBOX + 8], eax
    .byte 0x66, 0xB8, 0x78, 0x56, 0x34, 0x12    # mov eax, 0x12345678
    .byte 0x66, 0x0F, 0x01, 0xE0        # smsw eax
    .byte 0x66, 0xA3, 0x10, 0x7F        # mov dword ptr [MAILBOX + 16], eax
    .byte 0x66, 0x9C                    # pushfd
    .byte 0x66, 0x58                    # pop eax
    .byte 0x66, 0x0D, 0x00, 0x00, 0x01, 0x00    # or eax, 0x10000      RF
    .byte 0x66, 0x50                    # push eax
    .byte 0x66, 0x0E                    # push cs (32 bits)
    .byte 0x66, 0x68                    # push dword rm_after_iret
    .long rm_after_iret - rm_stub
    .byte 0x66, 0xCF                    # iretd
rm_after_iret:
    .byte 0x66, 0x9C                    # pushfd
    .byte 0x66, 0x58                    # pop eax
    .byte 0x66, 0xA3, 0x14, 0x7F        # mov dword ptr [MAILBOX + 20], eax
    .byte 0x0F, 0x20, 0xC0              # mov eax, cr0
    .byte 0x66, 0x83, 0xC8, 0x08        # or eax, 8           CR0.TS
    .byte 0x0F, 0x22, 0xC0              # mov cr0, eax
    .byte 0x0F, 0x06                    # clts
    .byte 0x0F, 0x20, 0xC0              # mov eax, cr0
    .byte 0x66, 0xA3, 0x18, 0x7F        # mov dword ptr [MAILBOX + 24], eax
    .byte 0x66, 0xB8, 0x34, 0x12, 0x00, 0x00    # mov eax, 0x1234
    .byte 0x0F, 0x23, 0xC0              # mov dr0, eax
    .byte 0x66, 0xB9, 0x74, 0x01, 0x00, 0x00    # mov ecx, 0x174
    .byte 0x66, 0xB8, 0x08, 0x00, 0x00, 0x00    # mov eax, 8
    .byte 0x66, 0x31, 0xD2              # xor edx, edx
    .byte 0x0F, 0x30                    # wrmsr
    .byte 0x0F, 0x20, 0xC0              # mov eax, cr0
    .byte 0x66, 0x83, 0xC8, 0x01        # or eax, 1
    .byte 0x0F, 0x22, 0xC0              # mov cr0, eax        protected mode, still 16-bit code
    .byte 0x66, 0xEA                    # ljmp 0x08:back32    (32-bit offset)
    .long back32
    .word 0x08
pm16_idtr:
    .word 0x3FF
    .long 0
rm_stub_end:
