# description: the I/O permission check holds at every in/out site whatever ran it first: a site run at
# ring 0 first, then at ring 3 with IOPL 0 (#GP), with IOPL 3 (allowed); sites rewritten in place
#
# The engine performs every in/out whatever CPL and IOPL say, so cpuvirt checks each one (cpu/ioperm.py).
# Native checks nothing until the guest first leaves ring 0; a site translated before then must be
# checked afterwards as well (it was not: the clock's block cache kept the first decision).
#include "kernel.inc"
#include "user.inc"

.text
main:
    call user_init
    mov ecx, 3                                  # the shared site runs at ring 0 first (unchecked)
warm:
    call io_site
    loop warm
    call smc_site                               # so does the site rewritten later
    mov eax, user_nop
    mov dword ptr [user_eflags], EFLAGS_FIXED
    call run_user_flags
    CHECK_EQ("ring 3 runs (nothing of I/O)", eax, 1)

    mov eax, user_calls_site
    call run_user_flags
    CHECK_EQ("ring 3, IOPL 0: an out site first run at ring 0 raises #GP", eax, USER_KILLED | VEC_GP)
    CHECK_EQ("that #GP is a fault at the out", dword ptr [user_fault_eip], io_site)
    call io_site
    PASS("the same site at ring 0 still works")

    mov dword ptr [user_eflags], EFLAGS_FIXED | 0x3000
    mov eax, user_calls_site
    call run_user_flags
    CHECK_EQ("ring 3, IOPL 3: the same site is allowed", eax, 2)

    mov dword ptr [user_eflags], EFLAGS_FIXED
    mov byte ptr [smc_site], 0x90               # rewritten in place: in al, 0x80 -> nop; nop
    mov byte ptr [smc_site + 1], 0x90
    mov eax, user_calls_smc
    call run_user_flags
    CHECK_EQ("ring 3: a site rewritten to nops runs", eax, 3)
    mov byte ptr [smc_site], 0xE6               # ... and to out 0x80, al
    mov byte ptr [smc_site + 1], 0x80
    mov eax, user_calls_smc
    call run_user_flags
    CHECK_EQ("ring 3, IOPL 0: a site rewritten to out raises #GP", eax, USER_KILLED | VEC_GP)
    CHECK_EQ("that #GP is at the rewritten site", dword ptr [user_fault_eip], smc_site)
    mov byte ptr [smc_site], 0xEC               # ... and to in al, dx; nop
    mov byte ptr [smc_site + 1], 0x90
    mov eax, user_calls_smc
    call run_user_flags
    CHECK_EQ("ring 3, IOPL 0: a site rewritten to in al, dx raises #GP", eax, USER_KILLED | VEC_GP)
    mov dword ptr [user_eflags], EFLAGS_FIXED | 0x3000
    mov eax, user_calls_smc
    call run_user_flags
    CHECK_EQ("ring 3, IOPL 3: the rewritten site is allowed", eax, 3)
    ret

io_site:
    out 0x80, al
    ret
smc_site:
    in al, 0x80
    ret

# run_user_flags: as user.inc's run_user, with EFLAGS from [user_eflags] (IOPL 0 or 3).
run_user_flags:
    mov edx, user_stack_top
    push ebx
    push esi
    push edi
    push ebp
    mov dword ptr [user_saved_esp], esp
    mov dword ptr [tss + 4], esp
    mov cx, USER_DS
    mov ds, cx
    mov es, cx
    mov fs, cx
    mov gs, cx
    push USER_DS
    push edx
    push dword ptr [user_eflags]
    push USER_CS
    push eax
    iretd

user_nop:
    mov eax, SYS_EXIT
    mov ebx, 1
    int 0x80
user_calls_site:
    mov dx, 0x80
    call io_site
    mov eax, SYS_EXIT
    mov ebx, 2
    int 0x80
user_calls_smc:
    mov dx, 0x80
    call smc_site
    mov eax, SYS_EXIT
    mov ebx, 3
    int 0x80

.data
.align 4
user_eflags: .long EFLAGS_FIXED
