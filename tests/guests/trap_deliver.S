# description: what trap's C delivery of events through the guest's IDT and its C look at iretd sites must leave to Python: iretd at ring 3 with VM and with RF in the image, system calls, #DE, #GP and #PF from ring 3, #DE, #PF and int 0x81 in the kernel, with an IDT entry not present, a gate DPL below the caller's CPL, an IDT limit below the vector, the TSS's and the IDT's pages dropped from the shadow, a frame crossing a page, a frame on a page whose PTE has D clear, on a page the shadow has no entry for, on a read-only page while CR0.WP is clear, on a traced page-table page, and the IDT's page remapped between events
#
# Under `--mode trap` every event the engine raises is delivered by the hypervisor; modes/_trapfast.c
# delivers the common ones in C. tests/test_trap_deliver.py runs this guest with and without the C
# path and compares everything a reader can see. Nothing printed depends on host timing.
#include "kernel.inc"
#include "paging.inc"
#include "user.inc"

#define LOOPS 200
#define VEC_K 0x81                      // the kernel's own int (gate DPL 0)
#define SCRATCH 0x00300000              // a page for frames on hostile stacks (identity-mapped)
#define SCRATCH_PTE page_table_low + 0xC00   // 4 * (SCRATCH >> 12)
#define TRACED 0x003F0000               // three pages whose PTEs a frame overwrites
#define TRACED_PTE page_table_low + 0xFC0    // 4 * (TRACED >> 12)
#define PF_PAGE 0x00310000              // made not-present for a kernel #PF, present again by the handler
#define PF_PTE page_table_low + 0xC40   // 4 * (PF_PAGE >> 12)
#define PF_USER 0x00311000              // never present: a ring-3 #PF
#define SYS_DROP_TSS 5                  // invlpg the TSS's page (the next delivery from ring 3 walks)
#define SYS_DROP_IDT 6                  // invlpg the IDT's page
// A data-segment load C cannot answer after a flush of the hypervisor's TLB (invlpg, CR3, CR0.WP):
// Python's reads the GDT's page into it again, so that what C declines next is for the case itself.
// Then a push and a pop: the stack's page back in the shadow (a fallback may have zapped it).
#define REFILL mov ax, KERNEL_DS ; mov ds, ax ; push eax ; pop eax

.text
main:
    call user_init
    SET_HANDLER(VEC_SYSCALL, my_syscall)
    SET_HANDLER(VEC_DE, de_handler)
    SET_HANDLER(VEC_GP, gp_handler)
    SET_HANDLER(11, np_handler)         # #NP
    SET_HANDLER(VEC_K, k_handler)
    SET_HANDLER(VEC_PF, pf_handler)
    # The IDT in a page of its own (remapped for a while), and a copy whose VEC_K gate goes to #DE's stub.
    mov esi, idt
    mov edi, my_idt
    mov ecx, 512
    rep movsd
    mov esi, idt
    mov edi, my_idt_alt
    mov ecx, 512
    rep movsd
    mov eax, dword ptr [idt + 8 * VEC_DE]
    mov dword ptr [my_idt_alt + 8 * VEC_K], eax
    mov eax, dword ptr [idt + 8 * VEC_DE + 4]
    mov dword ptr [my_idt_alt + 8 * VEC_K + 4], eax
    lidt [my_idtr]

    mov esi, page_table_low
    mov edi, page_dir
    mov eax, PTE_P | PTE_W | PTE_U
    call paging_identity_4m
    mov eax, page_dir
    call paging_enable
    and dword ptr [PF_PTE + 4], ~PTE_P  # PF_USER
    invlpg [PF_USER]

    xor ebp, ebp
    mov edi, LOOPS
hot_loop:
    # The common cases: system calls, #DE and #GP from ring 3, #DE and int VEC_K in the kernel.
    mov eax, user_syscalls
    mov edx, user_stack_top
    call run_user
    add ebp, eax
    mov eax, user_divide
    mov edx, user_stack_top
    call run_user
    add ebp, eax
    mov eax, user_cli
    mov edx, user_stack_top
    call run_user
    add ebp, eax
    mov eax, user_iret_vm
    mov edx, user_stack_top
    call run_user
    add ebp, eax
    mov eax, user_pf
    mov edx, user_stack_top
    call run_user
    add ebp, eax
    add ebp, dword ptr [user_fault_error]
    # #PF in the kernel (a refused fill: delivered from the run loop)
    and dword ptr [PF_PTE], ~PTE_P
    invlpg [PF_PAGE]
    REFILL
    cmp eax, eax                        # AF defined (after the `and`, emulated by trap as a ptemod, it is not)
    mov eax, dword ptr [PF_PAGE + 4]
    add ebp, eax
    rol ebp, 3
    mov ecx, 0
    div ecx                             # #DE: the handler skips it
    int VEC_K
    add ebp, eax                        # k_handler's EFLAGS image
    # Every fourth turn, the cases C must leave to Python.
    test edi, 3
    jnz hot_next
    # A frame across a page boundary.
    mov dword ptr [cross_area + 0xFF0], 0   # its lower page in the shadow, dirty;
    invlpg [cross_area + 0x1000]        # the upper one not (Python's write walks it)
    REFILL
    mov dword ptr [saved_esp], esp
    mov esp, cross_area + 0x1000 + 8
    mov ecx, 0
    div ecx
    mov esp, dword ptr [saved_esp]
    # A frame on a page whose PTE has D clear (the shadow's entry made by a read: not dirty).
    and dword ptr [SCRATCH_PTE], ~PTE_D
    invlpg [SCRATCH]
    mov eax, dword ptr [SCRATCH + 0x10]
    add ebp, eax
    REFILL
    mov dword ptr [saved_esp], esp
    mov esp, SCRATCH + 0x800
    mov ecx, 0
    div ecx
    mov esp, dword ptr [saved_esp]
    # A frame on a page the shadow has no entry for (the delivery is its first access).
    invlpg [SCRATCH]
    REFILL
    mov dword ptr [saved_esp], esp
    mov esp, SCRATCH + 0x800
    int VEC_K
    mov esp, dword ptr [saved_esp]
    add ebp, eax
    # A frame on a read-only, dirty page, read while CR0.WP was set, then written by the delivery
    # while WP is clear: the shadow grants ring 1 that write then (the handler's own pushes go to the
    # page below), so setting WP again must flush the engine's TLB.
    mov eax, dword ptr [SCRATCH_PTE]
    and eax, ~PTE_W
    or eax, PTE_D
    mov dword ptr [SCRATCH_PTE], eax
    invlpg [SCRATCH]
    mov eax, dword ptr [SCRATCH + 0x10]
    mov eax, cr0
    and eax, ~CR0_WP
    mov cr0, eax
    REFILL
    mov dword ptr [saved_esp], esp
    mov esp, SCRATCH + 12
    mov ecx, 0
    div ecx
    int VEC_K
    mov esp, dword ptr [saved_esp]
    mov eax, cr0
    or eax, CR0_WP
    mov cr0, eax
    or dword ptr [SCRATCH_PTE], PTE_W
    invlpg [SCRATCH]
    mov eax, dword ptr [SCRATCH]        # the last frame's EIP
    add ebp, eax
    rol ebp, 1
    # A frame on a traced page-table page: over the PTEs of three pages the shadow maps (read just
    # before), which Python's write must zap; then the PTEs are put back.
    mov eax, dword ptr [TRACED]
    mov eax, dword ptr [TRACED + 0x1000]
    mov eax, dword ptr [TRACED + 0x2000]
    invlpg [TRACED_PTE]                 # the page table's own entry made again: dirty by now
    mov eax, dword ptr [TRACED_PTE]
    REFILL
    mov dword ptr [saved_esp], esp
    mov esp, TRACED_PTE + 12
    mov ecx, 0
    div ecx
    mov esp, dword ptr [saved_esp]
    mov eax, dword ptr [TRACED_PTE]     # the frame's EIP
    add ebp, eax
    # (the handler's own pushes went below, over the PTEs of the 16 pages before: put back too)
    mov eax, (TRACED - 0x10000) | PTE_P | PTE_W | PTE_U
    mov edx, TRACED_PTE - 64
traced_restore:
    mov dword ptr [edx], eax
    add eax, 0x1000
    add edx, 4
    cmp edx, TRACED_PTE + 12
    jne traced_restore
    invlpg [TRACED]
    invlpg [TRACED + 0x1000]
    invlpg [TRACED + 0x2000]
    REFILL
    # The gate of VEC_K not present: #NP(VEC_K * 8 + 2).
    and byte ptr [my_idt + 8 * VEC_K + 5], 0x7F
    int VEC_K
    or byte ptr [my_idt + 8 * VEC_K + 5], 0x80
    # The IDT's limit below VEC_K: #GP(VEC_K * 8 + 2).
    lidt [my_idtr_short]
    int VEC_K
    lidt [my_idtr]
    # From ring 3: a gate of DPL 0 (#GP, the user code killed); the TSS's and the IDT's pages
    # dropped from the shadow between system calls.
    mov eax, user_kernel_int
    mov edx, user_stack_top
    call run_user
    add ebp, eax
    add ebp, dword ptr [user_fault_error]
    mov eax, user_drops
    mov edx, user_stack_top
    call run_user
    add ebp, eax
    # The IDT's page mapped to the copy (VEC_K to #DE's handler), CR3 reloaded: first a delivery
    # with no shadow entry for the IDT's page, then, after a read made one, through it; and back.
    mov edx, my_idt
    shr edx, 12
    lea edx, [page_table_low + 4 * edx]
    mov eax, my_idt_alt
    or eax, PTE_P | PTE_W | PTE_U
    mov dword ptr [edx], eax
    mov eax, cr3
    mov cr3, eax
    REFILL
    int VEC_K
    add ebp, eax
    mov eax, dword ptr [my_idt]
    int VEC_K
    add ebp, eax
    mov eax, my_idt
    or eax, PTE_P | PTE_W | PTE_U
    mov dword ptr [edx], eax
    mov eax, cr3
    mov cr3, eax
    REFILL
    int VEC_K
    add ebp, eax
    mov eax, dword ptr [my_idt]
    int VEC_K
    add ebp, eax
hot_next:
    dec edi
    jnz hot_loop

    mov eax, ebp
    call print_hex32
    mov al, 10
    call putc
    mov eax, dword ptr [sum]
    call print_hex32
    mov al, 10
    call putc
    CHECK_EQ("every kernel #DE was taken", dword ptr [de_count], LOOPS + 6 * LOOPS / 4)
    CHECK_EQ("every ring-3 #DE was taken", dword ptr [user_de_count], LOOPS)
    CHECK_EQ("every kernel int was taken", dword ptr [k_count], LOOPS + 4 * LOOPS / 4)
    CHECK_EQ("every bad gate faulted", dword ptr [bad_count], 2 * LOOPS / 4)
    CHECK_EQ("every kernel #PF was taken", dword ptr [pf_count], LOOPS)
    PASS("trap's event deliveries")
    ret

# #DE: skip the 2-byte div (or, through the remapped IDT, the 2-byte int VEC_K); from ring 3 counted apart.
de_handler:
    add dword ptr [ebx + FRAME_EIP], 2
    mov eax, dword ptr [ebx + FRAME_EFLAGS]
    add dword ptr [sum], eax
    mov eax, dword ptr [ebx + FRAME_CS]
    add dword ptr [sum], eax
    rol dword ptr [sum], 3
    test dword ptr [ebx + FRAME_CS], 3
    jnz de_user
    inc dword ptr [de_count]
    mov dword ptr [ebx + FRAME_EAX], 0x100
    ret
de_user:
    inc dword ptr [user_de_count]
    mov eax, dword ptr [ebx + FRAME_USER_ESP]
    add dword ptr [sum], eax
    ret

# #PF: from ring 3, user_fault_handler's; in the kernel, PF_PAGE made present again (the access retried).
pf_handler:
    test dword ptr [ebx + FRAME_CS], 3
    jnz user_fault_handler
    READ_CR2
    cmp eax, PF_PAGE + 4
    jne isr_unexpected
    inc dword ptr [pf_count]
    mov eax, dword ptr [ebx + FRAME_ERROR]
    add dword ptr [sum], eax
    mov eax, dword ptr [ebx + FRAME_EFLAGS]
    add dword ptr [sum], eax
    rol dword ptr [sum], 2
    or dword ptr [PF_PTE], PTE_P
    ret

# int VEC_K from the kernel: EAX := the frame's EFLAGS image.
k_handler:
    inc dword ptr [k_count]
    mov eax, dword ptr [ebx + FRAME_EFLAGS]
    mov dword ptr [ebx + FRAME_EAX], eax
    add dword ptr [sum], eax
    rol dword ptr [sum], 1
    ret

# #GP: from ring 3, user_fault_handler's (the user code is killed); in the kernel (an int through a
# gate beyond the IDT's limit), recorded and skipped.
gp_handler:
    test dword ptr [ebx + FRAME_CS], 3
    jnz user_fault_handler
np_handler:
    inc dword ptr [bad_count]
    mov eax, dword ptr [ebx + FRAME_VECTOR]
    shl eax, 16
    add eax, dword ptr [ebx + FRAME_ERROR]
    add dword ptr [sum], eax
    rol dword ptr [sum], 5
    add dword ptr [ebx + FRAME_EIP], 2
    ret

my_syscall:
    mov eax, dword ptr [ebx + FRAME_EAX]
    cmp eax, SYS_DROP_TSS
    je drop_tss
    cmp eax, SYS_DROP_IDT
    je drop_idt
    jmp syscall_handler
drop_tss:
    invlpg [tss]
    REFILL
    ret
drop_idt:
    invlpg [my_idt]
    REFILL
    ret

# ring 3: system calls, then exit with their sum.
user_syscalls:
    mov esi, 3
user_syscalls_next:
    mov eax, SYS_NOP
    int 0x80
    mov eax, SYS_ADD
    mov ebx, esi
    mov ecx, 7
    int 0x80
    dec esi
    jnz user_syscalls_next
    mov ebx, eax
    mov eax, SYS_EXIT
    int 0x80

user_divide:
    mov ecx, 0
    div ecx                             # the handler skips it
    mov ebx, 0x77
    mov eax, SYS_EXIT
    int 0x80

user_cli:
    cli                                 # #GP(0) from ring 3: killed

# an iretd at ring 3 whose image sets VM: ignored at CPL > 0 (the hypervisor clears it in the image)
user_iret_vm:
    pushfd
    or dword ptr [esp], 0x20000
    push USER_CS
    push user_iret_vm_back
    iretd
user_iret_vm_back:
    pushfd
    pop ebx
    shr ebx, 17                         # VM: 0
    add ebx, 0x5A
    pushfd                              # and one whose image sets RF: pushfd stores it clear (SDM)
    or dword ptr [esp], 0x10000
    push USER_CS
    push user_iret_rf_back
    iretd
user_iret_rf_back:
    pushfd
    pop ecx
    shr ecx, 16
    and ecx, 1
    add ebx, ecx
    mov eax, SYS_EXIT
    int 0x80

user_pf:
    mov eax, dword ptr [PF_USER]        # not present: #PF, killed

user_kernel_int:
    int VEC_K                           # gate DPL 0: #GP(VEC_K * 8 + 2), killed

user_drops:
    mov eax, SYS_DROP_TSS
    int 0x80
    mov eax, SYS_NOP
    int 0x80                            # the TSS's page: not in the shadow
    mov eax, SYS_DROP_IDT
    int 0x80
    mov eax, SYS_ADD
    mov ebx, 5
    mov ecx, 6
    int 0x80                            # the IDT's page: not in the shadow
    mov ebx, eax
    mov eax, SYS_EXIT
    int 0x80

.data
.align 4
    .word 0
my_idtr:
    .word 256 * 8 - 1
    .long my_idt
    .word 0
my_idtr_short:
    .word 8 * VEC_K - 1
    .long my_idt
saved_esp: .long 0
sum: .long 0
de_count: .long 0
user_de_count: .long 0
k_count: .long 0
bad_count: .long 0
pf_count: .long 0
.align 4096
my_idt: .zero 4096
my_idt_alt: .zero 4096
cross_area: .zero 0x2000
