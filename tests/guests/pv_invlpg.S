# description: para-mode test of the flushes a PV kernel asks for: update_va_mapping with UVMF_INVLPG and MMUEXT_INVLPG_LOCAL drop one page's translation (Xen's flush_tlb_one_local), so a read-only entry the kernel changed with mmu_update (no flush asked, none needed) still shows its old frame through the TLB until its own page is invalidated; UVMF_TLB_FLUSH drops them all, and so does a writable mapping lost through a table linked at two directory slots (through a table linked once, its one page goes)
#include "pv_rt.inc"
#define ALIAS_SLOT 0x100                // a directory slot nothing uses (0x40000000 up)
.text
main:
    FREE_FRAME(0, va0, mfn0)
    FREE_FRAME(1, va1, mfn1)
    FREE_FRAME(2, va2, mfn2)
    mov eax, dword ptr [va1]
    mov dword ptr [eax], 0xB1
    mov eax, dword ptr [va2]
    mov dword ptr [eax], 0xC2
    # va2 read-only (a writable mapping goes: Xen flushes, whatever was asked), then read: in the TLB
    mov ebx, dword ptr [va2]
    mov ecx, dword ptr [mfn2]
    shl ecx, 12
    or ecx, P | US
    call uva
    EXPECT(0, n_ro)
    mov ebx, dword ptr [va0]            # va0 read-only too: rewriting it later removes no protection
    mov ecx, dword ptr [mfn0]
    shl ecx, 12
    or ecx, P | US
    call uva
    EXPECT(0, n_ro0)
    mov eax, dword ptr [va2]
    mov eax, dword ptr [eax]
    EXPECT(0xC2, n_before)
    # the L1 entry of va2 (machine address, from the directory)
    mov eax, dword ptr [start_info]
    mov eax, dword ptr [eax + SI_PT_BASE]
    mov ebx, dword ptr [va2]
    shr ebx, 22
    mov eax, dword ptr [eax + 4 * ebx]
    and eax, 0xFFFFF000
    mov ebx, dword ptr [va2]
    shr ebx, 12
    and ebx, 0x3FF
    lea eax, [eax + 4 * ebx]
    mov dword ptr [pte_ma], eax

    # the entry now maps frame 1, read-only: no protection goes, so no flush
    mov ebx, dword ptr [pte_ma]
    mov ecx, dword ptr [mfn1]
    shl ecx, 12
    or ecx, P | US
    call mmu0
    EXPECT(0, n_remap)
    # an INVLPG of another page (va0, its entry written unchanged) leaves va2's translation alone
    mov ebx, dword ptr [va0]
    mov ecx, dword ptr [mfn0]
    shl ecx, 12
    or ecx, P | US
    call uva
    EXPECT(0, n_uva_other)
    mov eax, dword ptr [va2]
    mov eax, dword ptr [eax]
    EXPECT(0xC2, n_stale_after_uva)
    mov ebx, 7                          # MMUEXT_INVLPG_LOCAL of va0: the same
    mov ecx, dword ptr [va0]
    call ext1
    EXPECT(0, n_ext_other)
    mov eax, dword ptr [va2]
    mov eax, dword ptr [eax]
    EXPECT(0xC2, n_stale_after_ext)
    # MMUEXT_INVLPG_LOCAL of va2 itself: the new frame shows
    mov ebx, 7
    mov ecx, dword ptr [va2]
    call ext1
    EXPECT(0, n_ext_own)
    mov eax, dword ptr [va2]
    mov eax, dword ptr [eax]
    EXPECT(0xB1, n_fresh_after_ext)

    # back to frame 2 with mmu_update, then update_va_mapping of va0 with UVMF_TLB_FLUSH: all go
    mov ebx, dword ptr [pte_ma]
    mov ecx, dword ptr [mfn2]
    shl ecx, 12
    or ecx, P | US
    call mmu0
    mov eax, dword ptr [va2]
    mov eax, dword ptr [eax]
    EXPECT(0xB1, n_stale_again)
    mov ebx, dword ptr [va0]
    mov ecx, dword ptr [mfn0]
    shl ecx, 12
    or ecx, P | US
    xor edx, edx
    mov esi, 1                          # UVMF_TLB_FLUSH
    HC(14)
    EXPECT(0, n_uva_flush)
    mov eax, dword ptr [va2]
    mov eax, dword ptr [eax]
    EXPECT(0xC2, n_fresh_after_flush)

    # the same through update_va_mapping of va2 itself with UVMF_INVLPG: its own page goes
    mov ebx, dword ptr [pte_ma]
    mov ecx, dword ptr [mfn1]
    shl ecx, 12
    or ecx, P | US
    call mmu0
    mov ebx, dword ptr [va2]
    mov ecx, dword ptr [mfn1]
    shl ecx, 12
    or ecx, P | US
    call uva
    mov eax, dword ptr [va2]
    mov eax, dword ptr [eax]
    EXPECT(0xB1, n_fresh_after_uva)

    # a writable mapping that goes through update_va_mapping (va1 made read-only) drops that page only when its
    # table is linked once (no other linear page reaches the entry): va2, changed without a flush, stays stale
    mov ebx, dword ptr [pte_ma]
    mov ecx, dword ptr [mfn2]
    shl ecx, 12
    or ecx, P | US
    call mmu0
    mov ebx, dword ptr [va1]
    mov ecx, dword ptr [mfn1]
    shl ecx, 12
    or ecx, P | US
    call uva
    EXPECT(0, n_uva_ro)
    mov eax, dword ptr [va2]
    mov eax, dword ptr [eax]
    EXPECT(0xB1, n_stale_after_protection_loss)
    # the same table linked at a second directory slot too: the entry has another linear page, which the
    # engine may hold, so the whole TLB goes (va2 fresh)
    mov eax, dword ptr [start_info]
    mov eax, dword ptr [eax + SI_PT_BASE]
    mov ebx, dword ptr [va1]
    shr ebx, 22
    mov ecx, dword ptr [eax + 4 * ebx]  # the directory entry of va1's table
    call mfn_of                         # the directory's machine frame
    shl eax, 12
    lea ebx, [eax + 4 * ALIAS_SLOT]
    mov dword ptr [alias_ma], ebx
    call mmu0
    EXPECT(0, n_link_twice)
    mov ebx, dword ptr [va1]
    mov ecx, dword ptr [mfn1]
    shl ecx, 12
    or ecx, P | RW | US
    call uva                            # writable again (nothing goes)
    EXPECT(0, n_uva_rw)
    mov eax, dword ptr [va1]
    and eax, 0x003FFFFF
    or eax, ALIAS_SLOT << 22
    mov eax, dword ptr [eax]            # the alias reads frame 1 too
    EXPECT(0xB1, n_alias)
    mov ebx, dword ptr [va1]
    mov ecx, dword ptr [mfn1]
    shl ecx, 12
    or ecx, P | US
    call uva
    EXPECT(0, n_uva_ro_linked_twice)
    mov eax, dword ptr [va2]
    mov eax, dword ptr [eax]
    EXPECT(0xC2, n_fresh_after_protection_loss)
    mov ebx, dword ptr [alias_ma]       # unlinked again
    xor ecx, ecx
    call mmu0
    EXPECT(0, n_unlink)
    xor eax, eax
    ret


.data
.align 8
va0: .long 0
va1: .long 0
va2: .long 0
mfn0: .long 0
mfn1: .long 0
mfn2: .long 0
pte_ma: .long 0
alias_ma: .long 0
n_ro: .asciz "read-only"
n_ro0: .asciz "read-only0"
n_before: .asciz "before"
n_remap: .asciz "remap"
n_uva_other: .asciz "uva_other"
n_stale_after_uva: .asciz "stale_after_uva"
n_ext_other: .asciz "ext_other"
n_stale_after_ext: .asciz "stale_after_ext"
n_ext_own: .asciz "ext_own"
n_fresh_after_ext: .asciz "fresh_after_ext"
n_stale_again: .asciz "stale_again"
n_uva_flush: .asciz "uva_flush"
n_fresh_after_flush: .asciz "fresh_after_flush"
n_fresh_after_uva: .asciz "fresh_after_uva"
n_uva_ro: .asciz "uva_ro"
n_stale_after_protection_loss: .asciz "stale_after_protection_loss"
n_link_twice: .asciz "link_twice"
n_uva_rw: .asciz "uva_rw"
n_alias: .asciz "alias"
n_uva_ro_linked_twice: .asciz "uva_ro_linked_twice"
n_fresh_after_protection_loss: .asciz "fresh_after_protection_loss"
n_unlink: .asciz "unlink"
