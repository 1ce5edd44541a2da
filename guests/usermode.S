# description: ring 3 via iretd and the TSS: int 0x80 system calls, and #GP/#PF from user code caught by the kernel
#
# The kernel runs user tasks with run_user (user.inc): iretd to CS 0x1B / SS 0x23 with IF = 0,
# IOPL = 0. Events from ring 3 switch to the ring-0 stack named by TSS.SS0:ESP0. Paging is on: the
# first 4 MiB are identity-mapped and user-accessible, except SUPER_PAGE (U/S = 0).
#if PV
#define PARAVIRT 1                      // this guest has a paravirtualized build (guests/include/pvops.inc)
#endif
#include "kernel.inc"
#include "paging.inc"
#include "user.inc"

#define SUPER_PAGE  0x003FE000          // a supervisor-only page
#define EXIT_OK     42

.text
main:
    call user_init
    SET_HANDLER(VEC_SYSCALL, recording_syscall)
    SET_HANDLER(VEC_KERNEL_ONLY, kernel_only_handler)   # its gate keeps DPL 0

    mov edi, page_dir
    mov esi, page_table_low
    mov eax, PTE_P | PTE_W | PTE_U
    call paging_identity_4m
#if PV
    and dword ptr [page_table_low + 4 * (SUPER_PAGE >> 12)], ~PTE_U     # PV: the PTE holds an mfn
#else
    mov dword ptr [page_table_low + 4 * (SUPER_PAGE >> 12)], SUPER_PAGE | PTE_P | PTE_W
#endif
    mov eax, page_dir
    call paging_enable
    mov dword ptr [SUPER_PAGE], 0x5EC2E700
    CHECK_EQ("ring 0 reads and writes a supervisor-only page", dword ptr [SUPER_PAGE], 0x5EC2E700)

    # --- task 1: system calls ------------------------------------------------------------------
    mov eax, user_syscalls
    mov edx, user_stack_top
    call run_user
    CHECK_EQ("iretd enters ring 3 and SYS_EXIT returns to the kernel with the exit code", eax, EXIT_OK)
    CHECK_EQ("user code runs with CS.RPL = 3", dword ptr [u_cs_rpl], 3)
    CHECK_EQ("int 0x80 (gate DPL 3) from ring 3: the kernel saw CPL 3", dword ptr [u_getcpl], 3)
    CHECK_EQ("int 0x80 returns a value in eax: SYS_ADD(40, 2)", dword ptr [u_add], 42)
    CHECK_EQ("SYS_WRITE returns the byte count", dword ptr [u_write], user_msg_end - user_msg)
    CHECK_EQ("the ring-3 -> ring-0 switch pushed the user SS", dword ptr [sys_user_ss], USER_DS)
    mov eax, user_stack_top
    CHECK_EQ("the ring-3 -> ring-0 switch pushed the user ESP", dword ptr [sys_user_esp], eax)
    CHECK_EQ("the ring-0 stack came from TSS.ESP0", dword ptr [sys_frame_top], dword ptr [sys_esp0])
    CHECK_EQ("the ring-0 stack segment came from TSS.SS0", dword ptr [sys_ss], KERNEL_DS)

    # --- task 2: cli at CPL 3 > IOPL -----------------------------------------------------------------
    mov eax, user_cli
    mov edx, user_stack_top
    call run_user
    CHECK_EQ("user cli raises #GP; the kernel kills the task and carries on", eax, USER_KILLED | VEC_GP)
    CHECK_EQ("#GP from cli has error code 0", dword ptr [user_fault_error], 0)
    mov eax, user_cli
    CHECK_EQ("#GP is a fault: saved EIP is the cli", dword ptr [user_fault_eip], eax)

    # --- task 3: a user read of a supervisor-only page ---------------------------------------------
    mov eax, user_read_super
    mov edx, user_stack_top
    call run_user
    CHECK_EQ("a user read of a supervisor page raises #PF; the task is killed", eax, USER_KILLED | VEC_PF)
    CHECK_EQ("#PF error code for a user read of a present supervisor page is 5", dword ptr [user_fault_error], PF_P | PF_U)
    CHECK_EQ("#PF CR2 is the supervisor address", dword ptr [user_fault_cr2], SUPER_PAGE + 8)
    mov eax, user_read_super
    CHECK_EQ("#PF saved EIP is the faulting mov", dword ptr [user_fault_eip], eax)

    # --- task 4: int n through a DPL-0 gate -----------------------------------------------------------
    mov eax, user_int_kernel_gate
    mov edx, user_stack_top
    call run_user
    CHECK_EQ("int 0x81 from ring 3 through a DPL-0 gate raises #GP", eax, USER_KILLED | VEC_GP)
    CHECK_EQ("that #GP's error code names IDT entry 0x81 (0x81 * 8 + 2)", dword ptr [user_fault_error], VEC_KERNEL_ONLY * 8 + 2)
    mov eax, user_int_kernel_gate
    CHECK_EQ("that #GP's saved EIP is the int instruction", dword ptr [user_fault_eip], eax)
    CHECK_EQ("the DPL-0 gate's handler never ran", dword ptr [kernel_only_count], 0)
    ret

# recording_syscall: note what the CPU pushed for the first system call, then handle it.
recording_syscall:
    cmp dword ptr [sys_calls], 0
    jne recording_syscall_done
    mov eax, dword ptr [ebx + FRAME_USER_SS]
    mov dword ptr [sys_user_ss], eax
    mov eax, dword ptr [ebx + FRAME_USER_ESP]
    mov dword ptr [sys_user_esp], eax
    lea eax, [ebx + FRAME_USER_SS + 4]  # just above the CPU's frame: where the CPU set ESP
    mov dword ptr [sys_frame_top], eax
    mov eax, dword ptr [tss + 4]
    mov dword ptr [sys_esp0], eax
    xor eax, eax
    mov ax, ss
    mov dword ptr [sys_ss], eax
recording_syscall_done:
    inc dword ptr [sys_calls]
    jmp syscall_handler

kernel_only_handler:
    inc dword ptr [kernel_only_count]
    ret

# ---- ring-3 code (its pages are user-accessible) ------------------------------------------------
user_syscalls:
    mov eax, SYS_GETCPL                 # first: the stack is still empty (ESP = user_stack_top)
    int 0x80
    mov dword ptr [u_getcpl], eax
    xor eax, eax
    mov ax, cs
    and eax, 3
    mov dword ptr [u_cs_rpl], eax
    mov eax, SYS_WRITE
    mov ebx, user_msg
    mov ecx, user_msg_end - user_msg
    int 0x80
    mov dword ptr [u_write], eax
    mov eax, SYS_ADD
    mov ebx, 40
    mov ecx, 2
    int 0x80
    mov dword ptr [u_add], eax
    mov eax, SYS_EXIT
    mov ebx, EXIT_OK
    int 0x80
    ud2                                 # not reached

user_cli:
    cli                                 # CPL 3 > IOPL 0: #GP(0)
    mov eax, SYS_EXIT
    mov ebx, 1
    int 0x80

user_read_super:
    mov eax, dword ptr [SUPER_PAGE + 8] # U/S = 0: #PF(P | U)
    mov eax, SYS_EXIT
    mov ebx, 1
    int 0x80

user_int_kernel_gate:
    int VEC_KERNEL_ONLY                 # gate DPL 0 < CPL 3: #GP(0x81 * 8 + 2)
    mov eax, SYS_EXIT
    mov ebx, 1
    int 0x80

.data
user_msg:
    .ascii "PASS SYS_WRITE from ring 3 prints through the kernel\n"
user_msg_end:
.align 4
u_cs_rpl:          .long 0xFFFFFFFF
u_getcpl:          .long 0xFFFFFFFF
u_add:             .long 0xFFFFFFFF
u_write:           .long 0xFFFFFFFF
sys_calls:         .long 0
sys_user_ss:       .long 0
sys_user_esp:      .long 0
sys_frame_top:     .long 0
sys_esp0:          .long 1
sys_ss:            .long 0
kernel_only_count: .long 0
