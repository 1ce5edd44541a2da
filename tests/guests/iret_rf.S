# description: pushfd after an iretd whose EFLAGS image sets RF stores RF clear, in protected mode
#
# SDM Vol. 2B PUSHF: "the VM and RF flags (bits 16 and 17) are not copied; instead, the values for
# these flags are cleared in the EFLAGS image stored on the stack". Unicorn 2.1.3 keeps RF = 1 from
# an iretd to the end of the next translation block and its pushfd stores it. Each case below puts
# the pushfd in the same block as the iretd's target: a plain iretd at ring 0, the iretd of an
# interrupt handler that set RF in its frame (native's C delivery and iret paths), an iretd to
# ring 3 and a ring-3 system call whose handler sets RF.
#include "kernel.inc"
#include "user.inc"

#define EFLAGS_RF 0x10000

.text
main:
    call user_init
    SET_HANDLER(VEC_KERNEL_ONLY, set_rf_handler)
    SET_GATE_DPL(VEC_SYSCALL, 3)

    # 1: a plain iretd at CPL 0 whose image has RF = 1, to the next instruction
    pushfd
    or dword ptr [esp], EFLAGS_RF
    push KERNEL_CS
    mov eax, after_iret
    push eax
#if PARAVIRT
    jmp pv_iret                         # PV: the iret hypercall
#else
    iretd
#endif
after_iret:
    pushfd
    pop eax
    and eax, EFLAGS_RF
    CHECK_EQ("pushfd right after an iretd that set RF stores RF = 0", eax, 0)

    # 2: an interrupt handler sets RF in its frame (isr_common returns with iretd)
    int VEC_KERNEL_ONLY
    pushfd
    pop eax
    and eax, EFLAGS_RF
    CHECK_EQ("pushfd after int 0x81 whose handler set RF stores RF = 0", eax, 0)

    # 3: the same a thousand times (the C paths, once their sites are warm)
    mov ecx, 1000
    xor edx, edx
loop_rf:
    int VEC_KERNEL_ONLY
    pushfd
    pop eax
    or edx, eax
    dec ecx
    jnz loop_rf
    and edx, EFLAGS_RF
    CHECK_EQ("1000 times: pushfd never stores RF", edx, 0)

    # 4: ring 3, entered by an iretd whose image has RF = 1, then a system call whose handler sets RF
    SET_HANDLER(VEC_SYSCALL, rf_syscall_handler)
    mov eax, user_code
    mov edx, rf_stack_top
    call run_user_rf
    CHECK_EQ("ring 3: pushfd after an iretd with RF stores RF = 0", dword ptr [user_seen], 0)
    CHECK_EQ("ring 3: pushfd after int 0x80 whose handler set RF stores RF = 0", dword ptr [user_seen + 4], 0)
    call user_init
#if DEBUG_BP
    # 5: an instruction breakpoint (DR0, DR7.L0, execute): the #DB handler returns with RF = 1 so
    # that the instruction runs once (SDM Vol. 3B 18.3.1.1)
    SET_HANDLER(1, db_handler)
    mov eax, bp_site
    mov dr0, eax
    mov eax, 0x401
    mov dr7, eax
    xor ecx, ecx
bp_site:
    inc ecx
    xor eax, eax
    mov dr7, eax
    CHECK_EQ("instruction breakpoint: one #DB", dword ptr [db_count], 1)
    CHECK_EQ("and the instruction ran once after it (RF)", ecx, 1)
#endif
    ret

db_handler:
    inc dword ptr [db_count]
    cmp dword ptr [db_count], 5
    jb db_keep
    mov eax, 0x400
    mov dr7, eax
db_keep:
    or dword ptr [ebx + FRAME_EFLAGS], EFLAGS_RF
    ret

set_rf_handler:
    or dword ptr [ebx + FRAME_EFLAGS], EFLAGS_RF
    ret

# int 0x80 from user_code: eax = 1 records the pushfd value in ebx, eax = 0 returns to the kernel
rf_syscall_handler:
    mov eax, dword ptr [ebx + FRAME_EAX]
    test eax, eax
    jz rf_syscall_exit
    mov eax, dword ptr [ebx + FRAME_EBX]
    and eax, EFLAGS_RF
    mov ecx, dword ptr [ebx + FRAME_ECX]
    mov dword ptr [user_seen + 4 * ecx], eax
    or dword ptr [ebx + FRAME_EFLAGS], EFLAGS_RF
    ret
rf_syscall_exit:
    xor eax, eax
    jmp user_return

# run_user with RF = 1 in the iretd image: eax = entry, edx = stack top
run_user_rf:
    push ebx
    push esi
    push edi
    push ebp
    mov dword ptr [user_saved_esp], esp
    mov dword ptr [tss + 4], esp
#if PARAVIRT
    call pv_load_esp0
#endif
    mov cx, USER_DS
    mov ds, cx
    mov es, cx
    mov fs, cx
    mov gs, cx
    push USER_DS
    push edx
    push EFLAGS_FIXED | EFLAGS_RF
    push USER_CS
    push eax
#if PARAVIRT
    jmp pv_iret
#else
    iretd
#endif

user_code:
    pushfd
    pop ebx
    mov eax, 1
    xor ecx, ecx
    int 0x80
    pushfd
    pop ebx
    mov eax, 1
    mov ecx, 1
    int 0x80
    xor eax, eax
    int 0x80

.data
.align 4
db_count: .long 0
user_seen: .long 0xFFFFFFFF, 0xFFFFFFFF
.align 16
rf_stack: .fill 1024, 1, 0
rf_stack_top:
