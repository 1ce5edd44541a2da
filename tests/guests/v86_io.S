# description: virtual-8086 code decoded as 16-bit code: an `out` hidden from a 32-bit decoding
#
# In V86 mode `mov dx, 0x3F8` is BA F8 03; decoded as 32-bit code it is `mov edx, imm32` and swallows
# the `out dx, al` (EE) after it. The TSS has no I/O bitmap (its base is past the limit), so that out
# must raise #GP (SDM Vol. 1 19.5.2: in V86 mode every in/out is checked against the bitmap) and never
# reach COM1. QEMU prints the same lines.
#include "kernel.inc"
#include "user.inc"

#define EFLAGS_VM  0x20000
#define V86_CS     0x7000       // V86 code at linear 0x70000

.text
main:
    call user_init
    mov word ptr [tss + 0x66], 0xFFFF      # I/O map base past the limit: no port permitted
    mov esi, v86_code
    mov edi, V86_CS * 16
    mov ecx, v86_code_end - v86_code
    rep movsb
    SET_HANDLER(VEC_GP, v86_gp)
    call run_v86
    SET_HANDLER(VEC_GP, user_fault_handler)
    CHECK_EQ("out in V86 mode without I/O permission raised #GP", eax, 0x86)
    CHECK_EQ("at the out (CS:EIP)", dword ptr [v86_cseip], (V86_CS << 16) | 5)
    ret

# run_v86: iretd into V86 mode at V86_CS:0 (IF = 0, IOPL = 0); the #GP handler comes back through
# user_return with 0x86.
run_v86:
    push ebx
    push esi
    push edi
    push ebp
    mov dword ptr [user_saved_esp], esp
    mov dword ptr [tss + 4], esp
    push 0                              # GS
    push 0                              # FS
    push 0                              # DS
    push 0                              # ES
    push 0x7800                         # SS
    push 0x100                          # ESP
    push EFLAGS_VM | EFLAGS_FIXED
    push V86_CS
    push 0                              # EIP
    iretd

v86_gp:
    mov eax, dword ptr [ebx + FRAME_CS]
    shl eax, 16
    or eax, dword ptr [ebx + FRAME_EIP]
    mov dword ptr [v86_cseip], eax
    mov eax, 0x86
    jmp user_return

v86_code:                               # 16-bit code, written as its bytes
    .byte 0xB0, 0x58                    # mov al, 'X'
    .byte 0xBA, 0xF8, 0x03              # mov dx, 0x3F8
    .byte 0xEE                          # out dx, al
    .byte 0xF4                          # hlt
    .byte 0x90, 0x90, 0x90, 0x90        # (what a 32-bit decoding of BA takes as its immediate)
v86_code_end:

.data
v86_cseip: .long 0
