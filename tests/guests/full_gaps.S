# description: instructions mode full used to stop on (issue 10, item 9): lar, lsl, verr, verw on
# the guest's own descriptors, ins/outs and their rep forms, into, vmcall/syscall/sysenter/
# sysret (#UD: the CPU model reports no VMX or SYSCALL), sysenter (as QEMU: #GP(0) while
# IA32_SYSENTER_CS is null, else the kernel at virtual CPL 0: never real ring 0 under deprivileging),
# and branches with hint or rep prefixes. Every mode must print what native prints.
#include "kernel.inc"
#include "user.inc"
#define ZF 0x40
#define GET_ZF(REG) pushfd ; pop REG ; and REG, ZF
.text
main:
    call user_init
    SET_HANDLER(4, on_of)
    SET_HANDLER(6, on_ud)
    SET_HANDLER(13, on_gp)
    # -- lar, lsl, verr, verw: the guest's own GDT, at CPL 0 --------------------------------------
    mov ebx, dword ptr [gdt + 8 + 4]
    and ebx, 0x00F0FF00
    mov dword ptr [want], ebx
    xor eax, eax
    mov ecx, KERNEL_CS
    lar eax, ecx
    GET_ZF(edx)
    CHECK_EQ("lar KERNEL_CS: ZF", edx, ZF)
    CHECK_EQ("lar KERNEL_CS: the guest's access rights (DPL 0)", eax, dword ptr [want])
    mov ebx, dword ptr [gdt + TSS_SEL + 4]
    and ebx, 0x00F0FF00
    mov dword ptr [want], ebx
    mov ecx, TSS_SEL
    lar eax, ecx
    GET_ZF(edx)
    CHECK_EQ("lar TSS: ZF", edx, ZF)
    CHECK_EQ("lar TSS: access rights", eax, dword ptr [want])
    mov eax, 0x1234
    xor ecx, ecx
    lar eax, ecx
    GET_ZF(edx)
    CHECK_EQ("lar null: ZF clear", edx, 0)
    CHECK_EQ("lar null: destination unchanged", eax, 0x1234)
    mov ecx, 0x3F8
    lar eax, ecx
    GET_ZF(edx)
    CHECK_EQ("lar beyond the GDT limit: ZF clear", edx, 0)
    mov ecx, KERNEL_DS
    lsl eax, ecx
    GET_ZF(edx)
    CHECK_EQ("lsl KERNEL_DS: ZF", edx, ZF)
    CHECK_EQ("lsl KERNEL_DS: 4 GiB limit", eax, 0xFFFFFFFF)
    mov ecx, TSS_SEL
    lsl eax, ecx
    CHECK_EQ("lsl TSS: its limit", eax, TSS_SIZE - 1)
    mov ecx, KERNEL_CS
    verr cx
    GET_ZF(edx)
    CHECK_EQ("verr KERNEL_CS: readable", edx, ZF)
    verw cx
    GET_ZF(edx)
    CHECK_EQ("verw KERNEL_CS: not writable", edx, 0)
    mov ecx, KERNEL_DS
    verw cx
    GET_ZF(edx)
    CHECK_EQ("verw KERNEL_DS: writable", edx, ZF)
    mov ecx, USER_DS
    verw cx
    GET_ZF(edx)
    CHECK_EQ("verw USER_DS: writable", edx, ZF)
    mov ecx, TSS_SEL
    verr cx
    GET_ZF(edx)
    CHECK_EQ("verr TSS: not a segment", edx, 0)
    # -- ins / outs ----------------------------------------------------------------------------------
    mov dx, POST_PORT
    mov edi, io_buf
    mov ecx, 4
    rep insb
    CHECK_EQ("rep insb from port 0x80: all-ones", dword ptr [io_buf], 0xFFFFFFFF)
    CHECK_EQ("rep insb: ECX", ecx, 0)
    CHECK_EQ("rep insb: EDI", edi, io_buf + 4)
    mov dword ptr [io_buf], 0
    mov dx, COM1_LSR
    mov edi, io_buf
    insb
    CHECK_EQ("insb from the UART's LSR: THR empty", dword ptr [io_buf], 0x60)
    mov esi, io_buf
    outsw
    CHECK_EQ("outsw: ESI", esi, io_buf + 2)
    mov esi, outs_text
    mov dx, COM1
    mov ecx, outs_text_end - outs_text
    rep outsb
    CHECK_EQ("rep outsb to COM1: ESI", esi, outs_text_end)
    std
    mov esi, outs_text_end - 1
    mov dx, POST_PORT
    mov ecx, 2
    rep outsb
    cld
    CHECK_EQ("std; rep outsb: ESI goes down", esi, outs_text_end - 3)
    # -- into ----------------------------------------------------------------------------------------
    mov al, 1
    add al, 1                           # OF = 0
    into
    mov al, 0x7F
    add al, 1                           # OF = 1
    into
    CHECK_EQ("into: #OF once", dword ptr [of_count], 1)
    # -- what this CPU does not have: #UD -----------------------------------------------------------
    mov dword ptr [ud_skip], 3
    vmcall
    mov dword ptr [ud_skip], 2
    syscall
    .byte 0x0F, 0x07                    # sysret
    CHECK_EQ("vmcall, syscall, sysret: #UD each", dword ptr [ud_count], 3)
    sysenter
    CHECK_EQ("sysenter with IA32_SYSENTER_CS null: #GP(0)", dword ptr [gp_count], 1)
    SET_HANDLER(13, user_fault_handler)
    # -- branch prefixes: hints (ds/cs), rep ret ----------------------------------------------------
    xor eax, eax
    .byte 0x3E, 0x74, 0x05              # ds jz +5 (a "taken" hint): taken
    mov eax, 1
    nop
    nop
    .byte 0x2E, 0x75, 0x05              # cs jnz +5: not taken
    add eax, 2
    jmp branch_done
    add eax, 4
branch_done:
    CHECK_EQ("hinted jz taken, hinted jnz not taken", eax, 2)
    call rep_ret_function
    CHECK_EQ("rep ret returns", eax, 0x1234)
    # -- sysenter from ring 3, with the SYSENTER MSRs pointing into the kernel ------------------------
    mov ecx, 0x174
    mov eax, KERNEL_CS
    xor edx, edx
    wrmsr
    mov ecx, 0x175
    mov eax, kernel_stack_top - 64
    wrmsr
    mov ecx, 0x176
    mov eax, sysenter_target
    wrmsr
    SET_HANDLER(6, user_fault_handler)
    mov eax, user_sysenter
    mov edx, user_stack_top
    call run_user
    CHECK_EQ("sysenter at ring 3: the kernel's entry point", eax, 0x5E7E)
    CHECK_EQ("sysenter: ESP from IA32_SYSENTER_ESP", dword ptr [sysenter_esp], kernel_stack_top - 64)
    CHECK_EQ("sysenter: IF cleared", dword ptr [sysenter_flags], 0)
    ret

rep_ret_function:
    mov eax, 0x1234
    .byte 0xF3, 0xC3                    # rep ret

sysenter_target:
    mov dword ptr [sysenter_esp], esp
    pushfd
    pop eax
    and eax, EFLAGS_IF
    mov dword ptr [sysenter_flags], eax
    mov eax, 0x5E7E
    jmp user_return

on_of:
    inc dword ptr [of_count]
    ret
on_gp:
    inc dword ptr [gp_count]
    add dword ptr [ebx + FRAME_EIP], 2
    ret
on_ud:
    inc dword ptr [ud_count]
    mov eax, dword ptr [ud_skip]
    add dword ptr [ebx + FRAME_EIP], eax
    ret

user_sysenter:
    sysenter
    mov eax, SYS_EXIT
    mov ebx, 0x5E5E
    int VEC_SYSCALL

.data
.align 4
want: .long 0
io_buf: .long 0, 0
of_count: .long 0
ud_count: .long 0
ud_skip: .long 0
sysenter_esp: .long 0
sysenter_flags: .long 0
gp_count: .long 0
outs_text: .ascii "outs to COM1\n"
outs_text_end:
