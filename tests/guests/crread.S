# description: CR0 as the guest reads it: ET set, smsw to a register and to memory, lmsw from memory
#include "kernel.inc"
.text
main:
    mov eax, cr0
    mov dword ptr [cr0_now], eax
    and eax, 0x10
    CHECK_EQ("mov from cr0 shows ET (hard-wired to 1)", eax, 0x10)
    xor eax, eax
    smsw ax
    movzx ecx, word ptr [cr0_now]
    CHECK_EQ("smsw ax gives CR0's low 16 bits", eax, ecx)
    mov word ptr [msw], 0xAAAA
    smsw word ptr [msw]
    movzx eax, word ptr [msw]
    movzx ecx, word ptr [cr0_now]
    CHECK_EQ("smsw to memory gives the same bits", eax, ecx)
    movzx eax, word ptr [cr0_now]
    or eax, 8                           # TS
    mov word ptr [msw], ax
    lmsw word ptr [msw]
    mov eax, cr0
    and eax, 8
    CHECK_EQ("lmsw from memory sets CR0.TS", eax, 8)
    smsw word ptr [msw]
    movzx eax, word ptr [msw]
    and eax, 8
    CHECK_EQ("and smsw to memory shows it", eax, 8)
    clts
    mov eax, cr0
    CHECK_EQ("clts: CR0 is back", eax, dword ptr [cr0_now])
    ret
.data
cr0_now: .long 0
msw: .long 0
