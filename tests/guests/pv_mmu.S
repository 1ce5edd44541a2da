# description: para-mode test: direct paging: a new page table through validated updates, type rules (a page table never writable), pin/unpin, NEW_BASEPTR to a copied directory, and a ring-3 round trip (stack_switch, iret hypercall, int 0x80, ring-3 hypercall refused)
#include "pv_rt.inc"
#define NEWVA 0x40000000
.text
main:
    call rt_init_iret
    mov ebx, trap_table
    HC(0)
    # frames: T = new L1 (free 1), F = data frame (free 2), N = new L2 (free 3)
    FREE_FRAME(1, t_va, t_mfn)
    FREE_FRAME(2, f_va, f_mfn)
    FREE_FRAME(3, n_va, n_mfn)
    mov eax, dword ptr [start_info]
    mov eax, dword ptr [eax + SI_PT_BASE]
    mov dword ptr [l2_va], eax
    call mfn_of
    mov dword ptr [l2_mfn], eax

    # fill T while it is still writable: entry 0 maps F read/write
    mov edi, dword ptr [t_va]
    xor eax, eax
    mov ecx, 1024
    rep stosd
    mov eax, dword ptr [f_mfn]
    shl eax, 12
    or eax, P | RW | US
    mov edi, dword ptr [t_va]
    mov dword ptr [edi], eax

    # hooking T into the directory while T is mapped writable is refused
    call l2_slot_ma
    mov ebx, eax
    mov ecx, dword ptr [t_mfn]
    shl ecx, 12
    or ecx, P | RW | US
    call mmu1
    EXPECT(-EINVAL, n_l1_writable)
    # make T read-only, then hook it: validated as an L1
    mov ebx, dword ptr [t_va]
    mov ecx, dword ptr [t_mfn]
    shl ecx, 12
    or ecx, P | US
    call uva
    EXPECT(0, n_t_ro)
    call l2_slot_ma
    mov ebx, eax
    mov ecx, dword ptr [t_mfn]
    shl ecx, 12
    or ecx, P | RW | US
    call mmu1
    EXPECT(0, n_hook)
    mov eax, dword ptr [mmu_done]
    EXPECT(1, n_done)
    # the same frame through both addresses
    mov edi, dword ptr [f_va]
    mov dword ptr [edi], 0xCAFEBABE
    mov eax, dword ptr [NEWVA]
    EXPECT(0xCAFEBABE, n_alias)
    mov dword ptr [NEWVA + 4], 0x12345678
    mov eax, dword ptr [edi + 4]
    EXPECT(0x12345678, n_alias2)
    # T is a page table now: it can be mapped read-only only
    mov ebx, dword ptr [t_va]
    mov ecx, dword ptr [t_mfn]
    shl ecx, 12
    or ecx, P | RW | US
    call uva
    EXPECT(-EINVAL, n_t_rw)
    # an entry of T mapping the page directory writable is refused; read-only is fine
    mov ebx, dword ptr [t_mfn]
    shl ebx, 12
    add ebx, 4
    mov ecx, dword ptr [l2_mfn]
    shl ecx, 12
    or ecx, P | RW
    call mmu1
    EXPECT(-EINVAL, n_l2_rw)
    mov eax, dword ptr [mmu_done]
    EXPECT(0, n_done0)
    mov ebx, dword ptr [t_mfn]
    shl ebx, 12
    add ebx, 4
    mov ecx, dword ptr [l2_mfn]
    shl ecx, 12
    or ecx, P
    call mmu1
    EXPECT(0, n_l2_ro)
    mov eax, dword ptr [NEWVA + 0x1000 + 4 * (NEWVA >> 22)]
    and eax, 0xFFFFF000
    mov ebx, dword ptr [t_mfn]
    shl ebx, 12
    mov esi, n_l2_read
    call expect
    # the guest reads its own tables directly: T's entry 0
    mov edi, dword ptr [t_va]
    mov eax, dword ptr [edi]
    and eax, 0xFFFFF000
    mov ebx, dword ptr [f_mfn]
    shl ebx, 12
    mov esi, n_read_pt
    call expect
    # a direct write to a page table is a #PF (present, write)
    mov dword ptr [last_vec], 0xFF
pt_write_site:
    mov dword ptr [edi], 0
    mov eax, dword ptr [last_vec]
    EXPECT(14, n_pt_write)

    # pin T (it is also referenced), pin twice refused, unhook, T stays an L1 while pinned
    mov ebx, 0
    mov ecx, dword ptr [t_mfn]
    call ext1
    EXPECT(0, n_pin)
    mov ebx, 0
    mov ecx, dword ptr [t_mfn]
    call ext1
    EXPECT(-EINVAL, n_pin2)
    call l2_slot_ma
    mov ebx, eax
    xor ecx, ecx
    call mmu1
    EXPECT(0, n_unhook)
    mov ebx, dword ptr [t_va]
    mov ecx, dword ptr [t_mfn]
    shl ecx, 12
    or ecx, P | RW | US
    call uva
    EXPECT(-EINVAL, n_pinned_rw)
    mov ebx, 4
    mov ecx, dword ptr [t_mfn]
    call ext1
    EXPECT(0, n_unpin)
    mov ebx, 4
    mov ecx, dword ptr [t_mfn]
    call ext1
    EXPECT(-EINVAL, n_unpin2)
    # unreferenced and unpinned: an ordinary frame again
    mov ebx, dword ptr [t_va]
    mov ecx, dword ptr [t_mfn]
    shl ecx, 12
    or ecx, P | RW | US
    call uva
    EXPECT(0, n_released)

    # NEW_BASEPTR: copy the directory into N, make N read-only, switch, keep running
    mov esi, dword ptr [l2_va]
    mov edi, dword ptr [n_va]
    mov ecx, 1024
    rep movsd
    mov ebx, dword ptr [n_va]
    mov ecx, dword ptr [n_mfn]
    shl ecx, 12
    or ecx, P | US
    call uva
    EXPECT(0, n_n_ro)
    mov ebx, 5
    mov ecx, dword ptr [f_mfn]
    call ext1
    EXPECT(-EINVAL, n_base_bad)
    mov ebx, 5
    mov ecx, dword ptr [n_mfn]
    call ext1
    EXPECT(0, n_base)
    mov ebx, 5
    mov ecx, dword ptr [l2_mfn]
    call ext1
    EXPECT(0, n_base_back)

    # ring 3 and back
    mov ebx, 0x21
    mov ecx, kstack_top
    HC(3)
    EXPECT(0, n_ss)
    mov dword ptr [kesp], esp
    push 0x33
    push ustack_top
    push 0x202
    push 0x2B
    push user_code
    IRET
back_in_kernel:
    mov eax, dword ptr [u_result]
    EXPECT(-EPERM, n_u_hc)
    mov eax, dword ptr [u_cs]
    and eax, 0xFFFF
    EXPECT(0x2B, n_u_cs)
    mov eax, dword ptr [u_esp]
    EXPECT(ustack_top, n_u_esp)
    mov eax, dword ptr [u_gp]
    EXPECT(1, n_u_gp)
    xor eax, eax
    ret

# l2_slot_ma: eax = machine address of the L2 entry for NEWVA
l2_slot_ma:
    mov eax, dword ptr [l2_mfn]
    shl eax, 12
    add eax, 4 * (NEWVA >> 22)
    ret

user_code:
    mov eax, 17
    xor ebx, ebx
    int 0x82
    mov dword ptr [u_result], eax
u_cli_site:
    cli
    int 0x80
user_stuck:
    jmp user_stuck

syscall_handler:
    mov eax, dword ptr [esp + 4]
    mov dword ptr [u_cs], eax
    mov eax, dword ptr [esp + 12]
    mov dword ptr [u_esp], eax
    mov esp, dword ptr [kesp]
    jmp back_in_kernel
gp_handler:
    mov eax, dword ptr [esp + 4]
    cmp eax, u_cli_site
    jne gp_other
    mov dword ptr [u_gp], 1
    add dword ptr [esp + 4], 1
    add esp, 4
    IRET
gp_other:
    inc dword ptr [fail_count]
    add esp, 4
    IRET
pf_handler:
    mov dword ptr [last_vec], 14
    mov eax, dword ptr [esp + 4]
    cmp eax, pt_write_site
    jne pf_other
    add dword ptr [esp + 4], 6
pf_other:
    add esp, 4
    IRET

.data
.align 4
trap_table:
    .byte 13, 0
    .word 0x19
    .long gp_handler
    .byte 14, 0
    .word 0x19
    .long pf_handler
    .byte 0x80, 3
    .word 0x19
    .long syscall_handler
    .long 0, 0
t_va: .long 0
t_mfn: .long 0
f_va: .long 0
f_mfn: .long 0
n_va: .long 0
n_mfn: .long 0
l2_va: .long 0
l2_mfn: .long 0
kesp: .long 0
last_vec: .long 0
u_result: .long 0
u_cs: .long 0
u_esp: .long 0
u_gp: .long 0
n_l1_writable: .ascii "a writable frame cannot become a page table"
.byte 0
n_t_ro: .ascii "update_va_mapping: remap read-only"
.byte 0
n_hook: .ascii "mmu_update: L2 entry to a new L1"
.byte 0
n_done: .ascii "success count"
.byte 0
n_alias: .ascii "new mapping reads the frame"
.byte 0
n_alias2: .ascii "new mapping writes the frame"
.byte 0
n_t_rw: .ascii "a page table cannot be mapped writable"
.byte 0
n_l2_rw: .ascii "L1 entry mapping the directory writable refused"
.byte 0
n_done0: .ascii "success count 0 on refusal"
.byte 0
n_l2_ro: .ascii "L1 entry mapping the directory read-only"
.byte 0
n_l2_read: .ascii "the directory read through it"
.byte 0
n_read_pt: .ascii "page tables read directly hold machine frames"
.byte 0
n_pt_write: .ascii "direct write to a page table is #PF"
.byte 0
n_pin: .ascii "pin L1"
.byte 0
n_pin2: .ascii "pin twice refused"
.byte 0
n_unhook: .ascii "L2 entry cleared"
.byte 0
n_pinned_rw: .ascii "a pinned L1 cannot be mapped writable"
.byte 0
n_unpin: .ascii "unpin"
.byte 0
n_unpin2: .ascii "unpin twice refused"
.byte 0
n_released: .ascii "an unpinned, unreferenced table is writable again"
.byte 0
n_n_ro: .ascii "new directory read-only"
.byte 0
n_base_bad: .ascii "NEW_BASEPTR of a writable frame refused"
.byte 0
n_base: .ascii "NEW_BASEPTR to the copy"
.byte 0
n_base_back: .ascii "NEW_BASEPTR back"
.byte 0
n_ss: .ascii "stack_switch"
.byte 0
n_u_hc: .ascii "hypercall from ring 3 is -EPERM"
.byte 0
n_u_cs: .ascii "int 0x80 from ring 3: saved CS"
.byte 0
n_u_esp: .ascii "int 0x80 from ring 3: saved ESP"
.byte 0
n_u_gp: .ascii "cli at ring 3 is #GP to the kernel"
.byte 0
.bss
.align 16
kstack: .zero 4096
kstack_top:
ustack: .zero 4096
ustack_top:
