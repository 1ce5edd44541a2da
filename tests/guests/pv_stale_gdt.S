# description: para-mode security test (issue 10, item 3): after set_gdt moves the GDT to a new frame,
# the old one is released and the guest maps it writable (legitimately) and writes a descriptor
# there. The engine must not go on reading descriptors from the old frame through a stale TLB
# entry of the GDT window: a segment load must see the new table.
#include "pv_rt.inc"
#define DESC_FLAT_DATA_LO 0x0000FFFF    // base 0, limit 4 GiB
#define DESC_DATA_HI      0x00CFB200    // data, DPL 1, present, 4 KiB granularity
#define PROBE_SEL 0x39                  // GDT index 7, RPL 1
.text
main:
    call rt_init_iret
    mov eax, dword ptr [start_info]
    mov eax, dword ptr [eax + SI_PT_BASE]
    mov eax, dword ptr [eax]            # L2[0] -> the L1 of the first 4 MiB
    shr eax, 12
    mov dword ptr [l1_mfn], eax
    FREE_FRAME(2, b_va, b_mfn)          # the new GDT
    FREE_FRAME(8, p_va, p_mfn)          # probe pages: p and p + 0x1000
    mov eax, dword ptr [p_va]
    mov dword ptr [eax], 0xAAAA         # what base 0 reads
    mov dword ptr [eax + 0x1000], 0xBBBB   # what base 0x1000 reads
    # B = the boot GDT's 7 entries, then entry 7: flat data, DPL 1
    mov esi, dword ptr [start_info]
    mov esi, dword ptr [esi + 0x808]
    mov dword ptr [a_va], esi
    mov eax, esi
    call mfn_of
    mov dword ptr [a_mfn], eax
    mov edi, dword ptr [b_va]
    mov ecx, 14
    rep movsd
    mov dword ptr [edi], DESC_FLAT_DATA_LO
    mov dword ptr [edi + 4], DESC_DATA_HI
    # B read-only (a frame must not be writable to become a GDT frame)
    mov ebx, dword ptr [b_va]
    call pte_ma
    mov ebx, eax
    mov ecx, dword ptr [b_mfn]
    shl ecx, 12
    or ecx, P | US
    call mmu1
    EXPECT(0, n_b_ro)
    mov ax, 0x21                        # a load through the GDT window: its TLB entry is hot
    mov fs, ax
    mov eax, dword ptr [b_mfn]
    mov dword ptr [frame_list], eax
    mov ebx, frame_list
    mov ecx, 8
    HC(2)
    EXPECT(0, n_set_gdt)
    # the old frame A is now an ordinary frame: map it writable (mmu_update: no flush asked) and
    # write entry 7 there with base 0x1000
    mov ebx, dword ptr [a_va]
    call pte_ma
    mov ebx, eax
    mov ecx, dword ptr [a_mfn]
    shl ecx, 12
    or ecx, P | RW | US
    call mmu1
    EXPECT(0, n_a_rw)
    mov eax, dword ptr [a_va]
    mov dword ptr [eax + 56], 0x1000FFFF
    mov dword ptr [eax + 60], DESC_DATA_HI
    # load entry 7: it must come from B (base 0)
    mov ax, PROBE_SEL
    mov fs, ax
    mov ebx, dword ptr [p_va]
    mov eax, dword ptr fs:[ebx]
    EXPECT(0xAAAA, n_new_gdt)
    mov ax, 0x21
    mov fs, ax
    xor eax, eax
    ret
# pte_ma: ebx = va in the first 4 MiB -> eax = machine address of its PTE
pte_ma:
    mov eax, dword ptr [l1_mfn]
    shl eax, 12
    shr ebx, 12
    and ebx, 0x3FF
    lea eax, [eax + 4 * ebx]
    ret
.data
.align 4
l1_mfn: .long 0
a_va: .long 0
a_mfn: .long 0
b_va: .long 0
b_mfn: .long 0
p_va: .long 0
p_mfn: .long 0
frame_list: .long 0
n_b_ro: .asciz "the new GDT frame mapped read-only"
n_set_gdt: .asciz "set_gdt to the new frame"
n_a_rw: .asciz "the old GDT frame mapped writable"
n_new_gdt: .asciz "a segment load after set_gdt reads the new GDT, not the released frame"
