# description: the x87 instruction and data pointers that fnstenv, fnsave and fxsave store must be the
# guest's addresses (issue 10, item 8): under full the kernel's code runs from the translation cache,
# and the CPU records the address it really ran at.
#include "kernel.inc"
.text
main:
    fninit
    fld dword ptr [fpu_value]
fpu_last:
    fadd st(0), st(0)                   # the last x87 instruction before each store
    fnstenv [fpu_env]
    CHECK_EQ("fnstenv: FIP is the fadd's guest address", dword ptr [fpu_env + 12], fpu_last)
    mov eax, dword ptr [fpu_env + 16]
    and eax, 0xFFFF
    CHECK_EQ("fnstenv: FCS", eax, KERNEL_CS)
    fldenv [fpu_env]
    fld dword ptr [fpu_value]
fpu_last2:
    fmul st(0), st(1)
    fnsave [fpu_save]
    CHECK_EQ("fnsave: FIP is the fmul's guest address", dword ptr [fpu_save + 12], fpu_last2)
    frstor [fpu_save]
fpu_last3:
    fsub st(0), st(0)
    wait
    .byte 0x9B, 0xD9, 0x35              # fstenv [fpu_env] (wait + fnstenv)
    .long fpu_env
    CHECK_EQ("fstenv: FIP is the fsub's guest address", dword ptr [fpu_env + 12], fpu_last3)
    mov eax, dword ptr [fpu_env + 12]
    call print_hex32
    call newline
    ret
.data
.align 16
fpu_value: .long 0x3FC00000             # 1.5f
fpu_env: .zero 28
.align 16
fpu_save: .zero 108
