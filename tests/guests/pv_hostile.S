# description: para-mode security test: a hostile PV guest maps frames it does not own, makes its page tables writable, installs ring-0 and system descriptors, passes bad pointers and hypercall numbers; every attempt must get the right errno and change nothing
#include "pv_rt.inc"
.text
main:
    call rt_init_iret
    mov ebx, trap_table
    HC(0)
    FREE_FRAME(2, f_va, f_mfn)
    FREE_FRAME(3, g_va, g_mfn)
    mov eax, dword ptr [start_info]
    mov eax, dword ptr [eax + SI_PT_BASE]
    mov dword ptr [l2_va], eax
    call mfn_of
    mov dword ptr [l2_mfn], eax
    mov eax, dword ptr [l2_va]
    mov eax, dword ptr [eax]            # L2[0] -> the first L1
    shr eax, 12
    mov dword ptr [l1_mfn], eax
    mov eax, dword ptr [f_va]
    mov dword ptr [eax], 0x600DF00D
    # snapshot F's PTE (through the first L1, read directly)
    mov ebx, dword ptr [f_va]
    call pte_of
    mov dword ptr [f_pte], eax

    # 1. frames it does not own: the hypervisor's, beyond RAM, below RAM, the APIC
    mov ebx, dword ptr [f_va]
    mov ecx, 0x20000000 | P | RW
    call uva
    EXPECT(-EPERM, n_hv)
    mov ebx, dword ptr [start_info]
    mov ecx, dword ptr [ebx + SI_NR_PAGES]
    add ecx, 0x40000
    shl ecx, 12
    or ecx, P
    mov ebx, dword ptr [f_va]
    call uva
    EXPECT(-EPERM, n_beyond)
    mov ebx, dword ptr [f_va]
    mov ecx, 0x3FFFF000 | P
    call uva
    EXPECT(-EPERM, n_below)
    mov ebx, dword ptr [f_va]
    mov ecx, 0xFEE00000 | P | RW
    call uva
    EXPECT(-EPERM, n_apic)
    mov ebx, dword ptr [f_va]
    call pte_of
    EXPECT(dword ptr [f_pte], n_pte_same)
    mov eax, dword ptr [f_va]
    mov eax, dword ptr [eax]
    EXPECT(0x600DF00D, n_f_same)

    # 2. make a page table writable: the directory, an L1, via update_va_mapping and mmu_update
    mov ebx, dword ptr [l2_va]
    mov ecx, dword ptr [l2_mfn]
    shl ecx, 12
    or ecx, P | RW
    call uva
    EXPECT(-EINVAL, n_l2w)
    mov ecx, dword ptr [l1_mfn]
    mov eax, ecx
    sub eax, 0x40000
    shl eax, 12
    mov ebx, eax
    shl ecx, 12
    or ecx, P | RW
    call uva
    EXPECT(-EINVAL, n_l1w)
    mov ebx, dword ptr [f_va]
    call pte_ma
    mov ebx, eax
    mov ecx, dword ptr [l1_mfn]
    shl ecx, 12
    or ecx, P | RW
    call mmu1
    EXPECT(-EINVAL, n_l1w_mmu)
    # a 4 MiB writable page over RAM 0-4 MiB (it holds page tables) is refused
    mov ebx, dword ptr [l2_mfn]
    shl ebx, 12
    add ebx, 4 * 256
    mov ecx, 0x40000000 | P | RW | PS
    call mmu1
    EXPECT(-EINVAL, n_pse)
    # the hypervisor's L2 slots
    mov ebx, dword ptr [l2_mfn]
    shl ebx, 12
    add ebx, 4 * 1008
    mov ecx, dword ptr [f_mfn]
    shl ecx, 12
    or ecx, P
    call mmu1
    EXPECT(-EINVAL, n_hvslot)
    # plain mmu_update into the hypercall page
    mov eax, dword ptr [hypercall_page]
    call mfn_of
    shl eax, 12
    mov ebx, eax
    mov ecx, 0x90909090
    call mmu1
    EXPECT(-EINVAL, n_hcpage)
    # writes to the directory and to the hypervisor window fault
    mov dword ptr [faults], 0
    mov eax, dword ptr [l2_va]
w1: mov dword ptr [eax + 4 * 1000], 0x12345067
    mov eax, 0xFC000000
w2: mov dword ptr [eax], 0
    mov eax, dword ptr [faults]
    EXPECT(2, n_wfault)
    mov eax, dword ptr [l2_va]
    mov eax, dword ptr [eax + 4 * 1000]
    EXPECT(0, n_l2_same)

    # 3. descriptors: a GDT page G with a DPL-0 code descriptor, a TSS, or still writable
    mov edi, dword ptr [g_va]
    xor eax, eax
    mov ecx, 1024
    rep stosd
    mov edi, dword ptr [g_va]
    mov dword ptr [edi + 8], 0x0000FFFF
    mov dword ptr [edi + 12], 0x00CF9A00          # code, DPL 0
    mov eax, dword ptr [g_mfn]
    mov dword ptr [frame_list], eax
    mov ebx, frame_list
    mov ecx, 2
    HC(2)
    EXPECT(-EINVAL, n_gdt_writable)
    mov ebx, dword ptr [g_va]
    mov ecx, dword ptr [g_mfn]
    shl ecx, 12
    or ecx, P
    call uva
    EXPECT(0, n_g_ro)
    mov ebx, frame_list
    mov ecx, 2
    HC(2)
    EXPECT(-EINVAL, n_gdt_dpl0)
    mov dword ptr [frame_list], 0x20000
    mov ebx, frame_list
    mov ecx, 2
    HC(2)
    EXPECT(-EPERM, n_gdt_foreign)
    # the boot GDT is still in force: reload a data segment
    mov ax, 0x21
    mov ds, ax
    mov eax, dword ptr [f_va]
    mov eax, dword ptr [eax]
    EXPECT(0x600DF00D, n_gdt_same)

    # 4. pointers outside the guest's memory or to read-only pages
    mov ebx, 0
    mov ecx, 10
    mov edx, 0x7000000
    HC(18)
    EXPECT(-EFAULT, n_ptr_beyond)
    mov ebx, 0xFFFFF000
    HC(0)
    EXPECT(-EFAULT, n_ptr_tt)
    mov ebx, 0x7000000
    mov ecx, 1
    xor edx, edx
    mov esi, DOMID_SELF
    HC(1)
    EXPECT(-EFAULT, n_ptr_req)
    # success count written to the directory (read-only) or into the hypervisor window
    mov ebx, dword ptr [f_va]
    call pte_ma
    mov dword ptr [mmu_req], eax
    mov dword ptr [mmu_req + 4], 0
    mov eax, dword ptr [f_pte]
    mov dword ptr [mmu_req + 8], eax
    mov dword ptr [mmu_req + 12], 0
    mov ebx, mmu_req
    mov ecx, 1
    mov edx, dword ptr [l2_va]
    add edx, 4 * 1000
    mov esi, DOMID_SELF
    HC(1)
    EXPECT(-EFAULT, n_ptr_ro)
    mov ebx, mmu_req
    mov ecx, 1
    mov edx, 0xFC000000
    mov esi, DOMID_SELF
    HC(1)
    EXPECT(-EFAULT, n_ptr_hv)
    mov eax, dword ptr [l2_va]
    mov eax, dword ptr [eax + 4 * 1000]
    EXPECT(0, n_l2_same2)
    # event_channel_op bind_virq {VIRQ_TIMER, vcpu 0} with its output in the boot GDT (read-only)
    mov ebx, 1
    mov ecx, dword ptr [start_info]
    mov ecx, dword ptr [ecx + 0x808]
    HC(32)
    EXPECT(-EFAULT, n_ptr_evt)

    # 5. bad numbers, foreign domains, unknown commands, the hypercall vector in the trap table
    mov eax, 99
    int 0x82
    EXPECT(-ENOSYS, n_nr99)
    mov eax, 0xFFFFFFFF
    int 0x82
    EXPECT(-ENOSYS, n_nrneg)
    mov ebx, mmu_req
    mov ecx, 1
    xor edx, edx
    mov esi, 1
    HC(1)
    EXPECT(-EPERM, n_domid)
    mov dword ptr [mmu_req], 1                       # MMU_MACHPHYS_UPDATE
    mov ebx, mmu_req
    mov ecx, 1
    xor edx, edx
    mov esi, DOMID_SELF
    HC(1)
    EXPECT(-ENOSYS, n_machphys)
    mov ebx, 99
    mov ecx, 0
    call ext1
    EXPECT(-ENOSYS, n_extcmd)
    mov ebx, bad_trap_table
    HC(0)
    EXPECT(-EPERM, n_tt82)
    mov ebx, 0x33
    mov ecx, 0x10000
    HC(3)
    EXPECT(-EINVAL, n_ss3)
    mov ebx, 0x2B
    mov ecx, main
    xor edx, edx
    xor esi, esi
    HC(4)
    EXPECT(-EINVAL, n_cb3)
    mov ebx, 7
    mov ecx, 0
    HC(29)
    EXPECT(-ENOSYS, n_sched)
    mov dword ptr [shutdown_arg], 1                  # SHUTDOWN_reboot: not supported
    mov ebx, 2
    mov ecx, shutdown_arg
    HC(29)
    EXPECT(-EINVAL, n_reboot)
    # 6. a stale writable TLB entry: T is written (the engine caches the writable translation),
    #    then ONE mmu_update batch makes its mapping read-only and hooks T in as a page table.
    #    A write through the old translation must fault (the hypervisor flushed the TLB).
    mov eax, 5
    call free_page
    mov dword ptr [t_va], eax
    mov edi, eax
    xor eax, eax
    mov ecx, 1024
    rep stosd                                        # T is all zero (a valid, empty L1) and hot
    mov eax, dword ptr [t_va]
    call mfn_of
    mov dword ptr [t_mfn], eax
    mov ebx, dword ptr [t_va]
    call pte_ma
    mov dword ptr [batch], eax                       # PTE(T) = T, read-only
    mov eax, dword ptr [t_mfn]
    shl eax, 12
    or eax, P | US
    mov dword ptr [batch + 8], eax
    mov eax, dword ptr [l2_mfn]
    shl eax, 12
    add eax, 4 * 256
    mov dword ptr [batch + 16], eax                  # L2[256] = T (as an L1)
    mov eax, dword ptr [t_mfn]
    shl eax, 12
    or eax, P | RW | US
    mov dword ptr [batch + 24], eax
    mov ebx, batch
    mov ecx, 2
    xor edx, edx
    mov esi, DOMID_SELF
    HC(1)
    EXPECT(0, n_batch)
    mov dword ptr [faults], 0
    mov eax, dword ptr [t_va]
w3: mov dword ptr [eax], 0x00000007                  # would map frame 0 writable at 0x40000000
    mov eax, dword ptr [faults]
    EXPECT(1, n_stale)
    mov eax, dword ptr [t_va]
    mov eax, dword ptr [eax]
    EXPECT(0, n_t_same)
    mov ebx, dword ptr [l2_mfn]
    shl ebx, 12
    add ebx, 4 * 256
    xor ecx, ecx
    call mmu1
    EXPECT(0, n_unhook)

    # everything still as it was
    mov ebx, dword ptr [f_va]
    call pte_of
    EXPECT(dword ptr [f_pte], n_pte_same2)
    xor eax, eax
    ret

# pte_ma: ebx = va (mapped through the first 4 MiB) -> eax = machine address of its PTE
pte_ma:
    mov eax, dword ptr [l1_mfn]
    shl eax, 12
    push ebx
    shr ebx, 12
    and ebx, 0x3FF
    lea eax, [eax + 4 * ebx]
    pop ebx
    ret
# pte_of: ebx = va (first 4 MiB) -> eax = its PTE without A/D, read directly
pte_of:
    mov eax, dword ptr [l1_mfn]
    sub eax, 0x40000
    shl eax, 12
    push ebx
    shr ebx, 12
    and ebx, 0x3FF
    mov eax, dword ptr [eax + 4 * ebx]
    and eax, ~0x60
    pop ebx
    ret

pf_handler:
    inc dword ptr [faults]
    push eax
    mov eax, dword ptr [esp + 8]
    cmp eax, w1
    jne pf_not_w1
    add dword ptr [esp + 8], 10
pf_not_w1:
    cmp eax, w2
    jne pf_not_w2
    add dword ptr [esp + 8], 6
pf_not_w2:
    cmp eax, w3
    jne pf_not_w3
    add dword ptr [esp + 8], 6
pf_not_w3:
    pop eax
    add esp, 4
    IRET

.data
.align 4
trap_table:
    .byte 14, 0
    .word 0x19
    .long pf_handler
    .long 0, 0
bad_trap_table:
    .byte 0x82, 3
    .word 0x19
    .long pf_handler
    .long 0, 0
frame_list: .long 0
shutdown_arg: .long 0
f_va: .long 0
f_mfn: .long 0
g_va: .long 0
g_mfn: .long 0
l2_va: .long 0
l2_mfn: .long 0
l1_mfn: .long 0
f_pte: .long 0
t_va: .long 0
t_mfn: .long 0
.align 8
batch: .long 0, 0, 0, 0, 0, 0, 0, 0
faults: .long 0
n_hv: .ascii "map a hypervisor frame: -EPERM"
.byte 0
n_beyond: .ascii "map a frame beyond RAM: -EPERM"
.byte 0
n_below: .ascii "map a frame below RAM: -EPERM"
.byte 0
n_apic: .ascii "map the local APIC: -EPERM"
.byte 0
n_pte_same: .ascii "the PTE is unchanged"
.byte 0
n_f_same: .ascii "the frame's contents are unchanged"
.byte 0
n_l2w: .ascii "map the directory writable: -EINVAL"
.byte 0
n_l1w: .ascii "map an L1 writable: -EINVAL"
.byte 0
n_l1w_mmu: .ascii "mmu_update an entry mapping an L1 writable: -EINVAL"
.byte 0
n_pse: .ascii "a writable 4 MiB page over page tables: -EINVAL"
.byte 0
n_hvslot: .ascii "an L2 entry in the hypervisor's area: -EINVAL"
.byte 0
n_hcpage: .ascii "mmu_update into the hypercall page: -EINVAL"
.byte 0
n_wfault: .ascii "direct writes to the directory and the hypervisor window fault"
.byte 0
n_l2_same: .ascii "the directory is unchanged"
.byte 0
n_gdt_writable: .ascii "set_gdt with a writable frame: -EINVAL"
.byte 0
n_g_ro: .ascii "remap the GDT frame read-only"
.byte 0
n_gdt_dpl0: .ascii "set_gdt with a DPL-0 descriptor: -EINVAL"
.byte 0
n_gdt_foreign: .ascii "set_gdt with a frame not the guest's: -EPERM"
.byte 0
n_gdt_same: .ascii "the boot GDT still works"
.byte 0
n_ptr_beyond: .ascii "console_io buffer beyond RAM: -EFAULT"
.byte 0
n_ptr_tt: .ascii "set_trap_table pointer unmapped: -EFAULT"
.byte 0
n_ptr_req: .ascii "mmu_update requests unmapped: -EFAULT"
.byte 0
n_ptr_ro: .ascii "success count into the directory: -EFAULT"
.byte 0
n_ptr_hv: .ascii "success count into the hypervisor window: -EFAULT"
.byte 0
n_l2_same2: .ascii "the directory is still unchanged"
.byte 0
n_ptr_evt: .ascii "bind_virq output into a read-only page: -EFAULT"
.byte 0
n_nr99: .ascii "hypercall 99: -ENOSYS"
.byte 0
n_nrneg: .ascii "hypercall 0xffffffff: -ENOSYS"
.byte 0
n_domid: .ascii "mmu_update of another domain: -EPERM"
.byte 0
n_machphys: .ascii "MMU_MACHPHYS_UPDATE: -ENOSYS"
.byte 0
n_extcmd: .ascii "unknown mmuext command: -ENOSYS"
.byte 0
n_tt82: .ascii "trap_info for vector 0x82: -EPERM"
.byte 0
n_ss3: .ascii "stack_switch to a ring-3 stack: -EINVAL"
.byte 0
n_cb3: .ascii "set_callbacks with a ring-3 selector: -EINVAL"
.byte 0
n_sched: .ascii "unknown sched_op: -ENOSYS"
.byte 0
n_reboot: .ascii "SHUTDOWN_reboot: -EINVAL"
.byte 0
n_batch: .ascii "one batch: T read-only, then T as a page table"
.byte 0
n_stale: .ascii "a write through the stale writable translation faults"
.byte 0
n_t_same: .ascii "the new page table is untouched"
.byte 0
n_unhook: .ascii "unhook T"
.byte 0
n_pte_same2: .ascii "the PTE is still unchanged"
.byte 0
