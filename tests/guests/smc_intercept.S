# description: an intercepted instruction (rdmsr) written over code that already ran, in place, with the
# same block length: the hypervisor must see the new block and hook it
#
# native and hw find instructions they must intercept (rdmsr of the MSRs the platform models) by a scan
# of each code page when it first serves a fetch, then by the clock's look at each newly translated
# block. smc_fn (inc eax x 7; ret: 8 bytes) runs, then is rewritten as mov ecx, 0x1B; rdmsr; ret (8
# bytes): the same address and block length. Unhooked, the engine's own rdmsr returns 0 for
# IA32_APIC_BASE instead of the local APIC's base.
#include "kernel.inc"
.text
main:
    push ebx
    push esi
    push edi
    mov ebx, smc_fn
    xor eax, eax
    call ebx
    xor eax, eax
    call ebx
    CHECK_EQ("smc_fn as written adds 7", eax, 7)
    mov esi, tpl_b
    mov edi, smc_fn
    mov ecx, 8
    rep movsb
    jmp smc_rewritten
smc_rewritten:
    xor eax, eax
    call ebx
    and eax, 0xFFFFF000
    CHECK_EQ("rdmsr of IA32_APIC_BASE written over code that ran reads the local APIC base", eax, 0xFEE00000)
    pop edi
    pop esi
    pop ebx
    ret
.align 64
smc_fn:
    .byte 0x40, 0x40, 0x40, 0x40, 0x40, 0x40, 0x40, 0xC3
tpl_b:
    .byte 0xB9, 0x1B, 0x00, 0x00, 0x00, 0x0F, 0x32, 0xC3
