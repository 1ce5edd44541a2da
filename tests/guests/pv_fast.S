# description: para-mode test of the events para answers in C (modes/para/pvfast.py): loops of int 0x80, #DE, #GP and #PF bounced through the trap table and returned with HYPERVISOR_iret, and the hostile cases C must leave to Python (an odd upcall-mask byte, an int above its entry's DPL, int3, an iretd image with RF, an event pending behind the mask, a ring-1 stack that cannot be written), the common cases of update_va_mapping, mmu_update and mmuext_op with their refusals
#include "pv_rt.inc"
#define LOOPS 40
.text
main:
    call rt_init_iret
    mov ebx, trap_table
    HC(0)
    EXPECT(0, n_stt)

    # int 0x80 from ring 1, LOOPS times: the handler adds to a sum and returns through HYPERVISOR_iret
    mov dword ptr [sum], 0
    mov ecx, LOOPS
loop_int80:
    mov eax, ecx
    int 0x80
    loop loop_int80
    mov eax, dword ptr [sum]
    EXPECT(LOOPS * (LOOPS + 1) / 2, n_int80)

    # #DE (no error code), LOOPS times: the handler skips the 2-byte div
    mov dword ptr [count], 0
    mov ecx, LOOPS
loop_de:
    xor edx, edx
    xor ebx, ebx
    mov eax, 1
de_site:
    div ebx
    loop loop_de
    mov eax, dword ptr [count]
    EXPECT(LOOPS, n_de)

    # #GP(0) from cli at ring 1 (an error code), LOOPS times
    mov dword ptr [count], 0
    mov ecx, LOOPS
loop_gp:
gp_site:
    cli
    loop loop_gp
    mov eax, dword ptr [count]
    EXPECT(LOOPS, n_gp)
    mov eax, dword ptr [last_ec]
    EXPECT(0, n_gp_ec)

    # #PF beyond RAM, LOOPS times: CR2 in vcpu_info.arch.cr2, the entry masks events
    mov dword ptr [count], 0
    mov ecx, LOOPS
loop_pf:
    mov eax, ecx
    shl eax, 4
    add eax, 0x7000000
    mov dword ptr [pf_addr], eax
pf_site:
    mov eax, dword ptr [eax + 3]
    loop loop_pf
    mov eax, dword ptr [count]
    EXPECT(LOOPS, n_pf)
    mov eax, dword ptr [last_cr2]
    EXPECT(0x7000013, n_pf_cr2)
    mov eax, dword ptr [last_ec]
    EXPECT(0, n_pf_ec)
    mov eax, dword ptr [last_cs]
    shr eax, 16
    EXPECT(1, n_pf_mask)

    # a hostile upcall-mask byte (0x5A): saved CS carries it in bits 16-23, saved EFLAGS.IF = 0
    mov ebx, dword ptr [shared_info]
    mov byte ptr [ebx + 1], 0x5A
    mov eax, 7
    int 0x80
    mov ebx, dword ptr [shared_info]
    movzx eax, byte ptr [ebx + 1]
    EXPECT(1, n_mask_kept)
    mov eax, dword ptr [last_cs]
    EXPECT(0x5A0019, n_mask_cs)
    mov eax, dword ptr [last_fl]
    and eax, 0x200
    EXPECT(0, n_mask_if)
    mov ebx, dword ptr [shared_info]
    mov byte ptr [ebx + 1], 0
    mov eax, 8
    int 0x80
    mov eax, dword ptr [last_fl]
    and eax, 0x200
    EXPECT(0x200, n_unmask_if)

    # int 0x81 through a DPL-0 entry: #GP(0x81 * 8 + 2) (Python's), then int3 through a DPL-3 entry
    mov dword ptr [last_ec], 0
int81_site:
    int 0x81
    mov eax, dword ptr [last_ec]
    EXPECT(0x81 * 8 + 2, n_int81)
    mov dword ptr [count], 0
    int3
    mov eax, dword ptr [count]
    EXPECT(1, n_int3)

    # an iretd at ring 1 whose image sets RF: cleared before the engine pops it (pushf shows RF = 0)
    pushfd
    or dword ptr [esp], 0x10000
    push 0x19
    push after_rf
    iretd
after_rf:
    pushfd
    pop eax
    and eax, 0x10000
    EXPECT(0, n_rf)

    # an event pending behind the mask (the shared-info frame write-traced): bounces are Python's then
    mov ebx, dword ptr [shared_info]
    mov byte ptr [ebx + 1], 1
    mov byte ptr [ebx], 1
    mov dword ptr [sum], 0
    mov eax, 3
    int 0x80
    mov eax, 0x7000100
    mov eax, dword ptr [eax + 3]
    mov ebx, dword ptr [shared_info]
    mov byte ptr [ebx], 0
    mov eax, dword ptr [sum]
    EXPECT(3, n_pending_int80)
    mov eax, dword ptr [last_cr2]
    EXPECT(0x7000103, n_pending_pf)

    # update_va_mapping: a frame mapped writable twice (its count goes 1 -> 2), one mapping flipped
    # read-only and back 10 times, then given back its own frame; a write through the second mapping
    # shows through the first
    FREE_FRAME(0, va0, mfn0)
    FREE_FRAME(1, va1, mfn1)
    mov ebx, dword ptr [va1]
    mov ecx, dword ptr [mfn0]
    shl ecx, 12
    or ecx, P | RW | US
    call uva
    EXPECT(0, n_uva_alias)
    mov ebx, dword ptr [va1]
    mov dword ptr [ebx + 8], 0x600DF00D
    mov eax, dword ptr [va0]
    mov eax, dword ptr [eax + 8]
    EXPECT(0x600DF00D, n_uva_shared)
    mov edi, 10
loop_uva:
    mov ebx, dword ptr [va1]
    mov ecx, dword ptr [mfn0]
    shl ecx, 12
    or ecx, P | US
    call uva
    mov ebx, dword ptr [va1]
    mov ecx, dword ptr [mfn0]
    shl ecx, 12
    or ecx, P | RW | US
    call uva
    dec edi
    jnz loop_uva
    EXPECT(0, n_uva_flip)
    mov ebx, dword ptr [va1]
    mov ecx, dword ptr [mfn1]
    shl ecx, 12
    or ecx, P | RW | US
    call uva
    EXPECT(0, n_uva_back)
    # mmu_update of one request with no `done` pointer, 10 times: va1's L1 entry (its machine address
    # from the directory) read-only and back; then a plain write to a frame of no type
    mov eax, dword ptr [start_info]
    mov eax, dword ptr [eax + SI_PT_BASE]
    mov ebx, dword ptr [va1]
    shr ebx, 22
    mov eax, dword ptr [eax + 4 * ebx]
    and eax, 0xFFFFF000
    mov ebx, dword ptr [va1]
    shr ebx, 12
    and ebx, 0x3FF
    lea eax, [eax + 4 * ebx]
    mov dword ptr [pte_ma], eax
    mov edi, 10
loop_mmu:
    mov ebx, dword ptr [pte_ma]
    mov ecx, dword ptr [mfn1]
    shl ecx, 12
    or ecx, P | US
    call mmu0
    mov ebx, dword ptr [pte_ma]
    mov ecx, dword ptr [mfn1]
    shl ecx, 12
    or ecx, P | RW | US
    call mmu0
    dec edi
    jnz loop_mmu
    EXPECT(0, n_mmu_flip)
    mov ebx, dword ptr [va1]
    mov dword ptr [ebx], 0x1234
    mov eax, dword ptr [ebx]
    EXPECT(0x1234, n_mmu_write)
    FREE_FRAME(2, va2, mfn2)
    mov ebx, dword ptr [mfn2]
    shl ebx, 12
    add ebx, 16
    mov ecx, 0xCAFE
    call mmu0
    mov eax, dword ptr [va2]
    mov eax, dword ptr [eax + 16]
    EXPECT(0xCAFE, n_mmu_plain)
    # hostile: a request with a command other than MMU_NORMAL_PT_UPDATE, and one writing the directory
    mov ebx, dword ptr [pte_ma]
    or ebx, 2
    mov ecx, 0
    call mmu0
    EXPECT(-ENOSYS, n_mmu_cmd)
    mov eax, dword ptr [start_info]
    mov eax, dword ptr [eax + SI_PT_BASE]
    call mfn_of
    shl eax, 12
    add eax, 4 * 1000
    mov ebx, eax
    mov ecx, 0
    call mmu0
    EXPECT(0, n_mmu_l2)

    # mmuext_op of one op with no `done` pointer, 10 times: TLB_FLUSH_LOCAL, then NEW_BASEPTR of the
    # current directory (a reload); hostile: NEW_BASEPTR of a frame that is not a directory, and an
    # unknown command (refused)
    mov eax, dword ptr [start_info]
    mov eax, dword ptr [eax + SI_PT_BASE]
    call mfn_of
    mov dword ptr [l2_mfn], eax
    mov edi, 10
loop_ext:
    mov ebx, 6
    mov ecx, 0
    call ext1
    mov ebx, 5
    mov ecx, dword ptr [l2_mfn]
    call ext1
    dec edi
    jnz loop_ext
    EXPECT(0, n_ext_loop)
    mov ebx, 5
    mov ecx, dword ptr [mfn1]
    call ext1
    EXPECT(-EINVAL, n_ext_bad_base)
    mov ebx, 99
    mov ecx, 0
    call ext1
    EXPECT(-ENOSYS, n_ext_unknown)
    mov ebx, dword ptr [va1]
    mov dword ptr [ebx + 4], 0x5678
    mov eax, dword ptr [ebx + 4]
    EXPECT(0x5678, n_ext_after)
    # a second directory (a copy of the first, remapped read-only, pinned: Python validates it), then
    # NEW_BASEPTR back and forth between the two pinned directories 10 times, then unpinned
    FREE_FRAME(3, va3, mfn3)
    mov eax, dword ptr [start_info]
    mov esi, dword ptr [eax + SI_PT_BASE]
    mov edi, dword ptr [va3]
    mov ecx, 1024
    cld
    rep movsd
    mov ebx, dword ptr [va3]
    mov ecx, dword ptr [mfn3]
    shl ecx, 12
    or ecx, P | US
    call uva
    EXPECT(0, n_dir_ro)
    mov ebx, 1
    mov ecx, dword ptr [mfn3]
    call ext1
    EXPECT(0, n_dir_pin)
    mov edi, 10
loop_switch:
    mov ebx, 5
    mov ecx, dword ptr [mfn3]
    call ext1
    mov ebx, dword ptr [va1]
    add dword ptr [ebx + 4], 1
    mov ebx, 5
    mov ecx, dword ptr [l2_mfn]
    call ext1
    dec edi
    jnz loop_switch
    EXPECT(0, n_dir_switch)
    mov ebx, dword ptr [va1]
    mov eax, dword ptr [ebx + 4]
    EXPECT(0x5678 + 10, n_dir_mem)
    mov ebx, 4
    mov ecx, dword ptr [mfn3]
    call ext1
    EXPECT(0, n_dir_unpin)
    # unpinned, its only reference gone: NEW_BASEPTR to it validates it again (Python's), and back
    mov ebx, 5
    mov ecx, dword ptr [mfn3]
    call ext1
    EXPECT(0, n_dir_revalidate)
    mov ebx, 5
    mov ecx, dword ptr [l2_mfn]
    call ext1
    EXPECT(0, n_dir_back)

    # hostile: a writable mapping of an L1 table (the first PDE's) is refused
    mov eax, dword ptr [start_info]
    mov eax, dword ptr [eax + SI_PT_BASE]
    mov ecx, dword ptr [eax]
    and ecx, 0xFFFFF000
    or ecx, P | RW | US
    mov ebx, dword ptr [va1]
    call uva
    EXPECT(-EINVAL, n_uva_l1)
    # and a mapping of a frame that is not the guest's
    mov ebx, dword ptr [va1]
    mov ecx, 0xFFFFF000 | P | US
    call uva
    EXPECT(-EPERM, n_uva_foreign)

    # last: the ring-1 stack is the read-only hypercall page: the bounce cannot push its frame, and
    # the domain is crashed (docs/pv-abi.md); nothing after this runs
    mov esi, n_crash
    call print
    mov eax, dword ptr [hypercall_page]
    add eax, 0x800
    mov esp, eax
    int 0x80
    xor eax, eax
    ret

# Handlers: record the frame, skip the faulting instruction, return through HYPERVISOR_iret.
int80_handler:
    add dword ptr [sum], eax
    push eax
    mov eax, dword ptr [esp + 8]
    mov dword ptr [last_cs], eax
    mov eax, dword ptr [esp + 12]
    mov dword ptr [last_fl], eax
    pop eax
    IRET
de_handler:
    inc dword ptr [count]
    add dword ptr [esp], 2
    IRET
int3_handler:
    inc dword ptr [count]
    IRET
gp_handler:
    inc dword ptr [count]
    push eax
    mov eax, dword ptr [esp + 4]
    mov dword ptr [last_ec], eax
    mov eax, dword ptr [esp + 8]
    cmp eax, int81_site
    jne gp_skip1
    add dword ptr [esp + 8], 1
gp_skip1:
    add dword ptr [esp + 8], 1
    pop eax
    add esp, 4
    IRET
pf_handler:
    inc dword ptr [count]
    push eax
    mov eax, dword ptr [shared_info]
    mov eax, dword ptr [eax + 8]
    mov dword ptr [last_cr2], eax
    mov eax, dword ptr [esp + 4]
    mov dword ptr [last_ec], eax
    mov eax, dword ptr [esp + 12]
    mov dword ptr [last_cs], eax
    add dword ptr [esp + 8], 3
    pop eax
    add esp, 4
    IRET

.data
.align 4
trap_table:
    .byte 0, 0
    .word 0x19
    .long de_handler
    .byte 3, 3
    .word 0x19
    .long int3_handler
    .byte 13, 0
    .word 0x19
    .long gp_handler
    .byte 14, 4
    .word 0x19
    .long pf_handler
    .byte 0x80, 3
    .word 0x19
    .long int80_handler
    .byte 0x81, 0
    .word 0x19
    .long int80_handler
    .long 0, 0
sum: .long 0
va0: .long 0
va2: .long 0
va3: .long 0
mfn3: .long 0
mfn2: .long 0
pte_ma: .long 0
l2_mfn: .long 0
va1: .long 0
mfn0: .long 0
mfn1: .long 0
count: .long 0
pf_addr: .long 0
last_ec: .long 0
last_cs: .long 0
last_fl: .long 0
last_cr2: .long 0
n_stt: .asciz "set_trap_table"
n_int80: .asciz "int 0x80 through the trap table and HYPERVISOR_iret, 40 times"
n_de: .asciz "#DE bounced 40 times"
n_gp: .asciz "#GP(0) from cli bounced 40 times"
n_gp_ec: .asciz "#GP error code 0"
n_pf: .asciz "#PF beyond RAM bounced 40 times"
n_pf_cr2: .asciz "CR2 of the last #PF in vcpu_info.arch.cr2"
n_pf_ec: .asciz "#PF error code 0"
n_pf_mask: .asciz "saved CS holds the boot mask (1) in bits 16-23"
n_mask_kept: .asciz "HYPERVISOR_iret sets the mask from the frame's IF (0: masked, 1)"
n_mask_cs: .asciz "saved CS holds the mask byte 0x5A in bits 16-23"
n_mask_if: .asciz "saved EFLAGS.IF = 0 under a non-zero mask"
n_unmask_if: .asciz "saved EFLAGS.IF = 1 under mask 0"
n_int81: .asciz "int through a DPL-0 entry is #GP(vector*8+2)"
n_int3: .asciz "int3 through a DPL-3 entry"
n_rf: .asciz "iretd image RF cleared at ring 1"
n_pending_int80: .asciz "int 0x80 with an event pending behind the mask"
n_pending_pf: .asciz "#PF with an event pending behind the mask"
n_uva_alias: .asciz "update_va_mapping: a second writable mapping of a frame"
n_uva_shared: .asciz "a write through it shows through the first"
n_uva_flip: .asciz "update_va_mapping: read-only and back, 10 times"
n_uva_back: .asciz "update_va_mapping: the mapping's own frame back"
n_mmu_flip: .asciz "mmu_update of an L1 entry, read-only and back, 10 times"
n_mmu_write: .asciz "the entry is writable again"
n_mmu_plain: .asciz "mmu_update of a frame of no type is a plain write"
n_mmu_cmd: .asciz "mmu_update with another command is refused (ENOSYS)"
n_mmu_l2: .asciz "mmu_update of an empty directory slot"
n_ext_loop: .asciz "mmuext_op TLB_FLUSH_LOCAL and NEW_BASEPTR (a reload), 10 times"
n_ext_bad_base: .asciz "NEW_BASEPTR of a frame that is not a directory is refused"
n_ext_unknown: .asciz "an unknown mmuext command is refused"
n_ext_after: .asciz "memory works after the reloads"
n_dir_ro: .asciz "a copied directory remapped read-only"
n_dir_pin: .asciz "MMUEXT_PIN_L2_TABLE of the copy"
n_dir_switch: .asciz "NEW_BASEPTR between two pinned directories, 10 times"
n_dir_mem: .asciz "memory through both directories"
n_dir_unpin: .asciz "MMUEXT_UNPIN_TABLE of the copy"
n_dir_revalidate: .asciz "NEW_BASEPTR to an unpinned directory (validated again)"
n_dir_back: .asciz "NEW_BASEPTR back to the first (the copy released)"
n_uva_l1: .asciz "update_va_mapping: a writable mapping of an L1 table is refused"
n_uva_foreign: .asciz "update_va_mapping: a frame that is not the guest's is refused"
n_crash: .asciz "now a bounce onto a read-only ring-1 stack\n"
