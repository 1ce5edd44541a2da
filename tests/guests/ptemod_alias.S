# description: a store into a page table linked at two directory slots: the shadow zaps two pages of the current space
#
# pt_alias is linked at two page-directory slots, so one PTE maps two linear pages (ALIAS_A and ALIAS_B). Each
# round reads both (the engine's TLB holds both), then the kernel stores a new frame into the PTE: the shadow
# zaps the entries of both pages, and the engine's TLB must lose both (memory/shadow.py _flush_pages, and the
# C paths' _shadowmirror.h sm_flush_pages, which flush the zapped pages only). Both are read again before the
# guest's own TLB flush, a CR3 reload (what they read then is the TLB's business, not summed: hardware may
# show either frame), then after it. The checksum of the reads after the invlpg must be native's and QEMU's; the C paths and
# Python's must leave the same TLB fills (tests/test_shadow_links.py).
#include "kernel.inc"
#include "paging.inc"

#define ALIAS_A  0x00800000
#define ALIAS_B  0x00C00000
#define ALIAS_C  0x01000000
#define FRAME_X  0x00300000
#define FRAME_Y  0x00301000
#define ROUNDS   64

.text
main:
    SET_HANDLER(VEC_DE, skip_div)
    mov dword ptr [FRAME_X], 0x00000011
    mov dword ptr [FRAME_Y], 0x00002200
    PAGING_IDENTITY_4M_ON(PTE_P | PTE_W)
    mov eax, pt_alias
    or eax, PTE_P | PTE_W
    mov dword ptr [page_dir + 4 * (ALIAS_A >> 22)], eax
    mov dword ptr [page_dir + 4 * (ALIAS_B >> 22)], eax
    mov dword ptr [pt_alias], FRAME_X | PTE_P | PTE_W
    mov dword ptr [pt_alias + 4], FRAME_Y | PTE_P | PTE_W   # a second entry, read each round: the table
    xor esi, esi                        # the checksum        # keeps a linked word besides the one zapped
    xor eax, eax                        # an event (trap's C paths take each kind once Python has seen it):
    div eax                             # #DE, the handler skips the div
    mov ecx, ROUNDS
round:
    add esi, dword ptr [ALIAS_A]        # both pages in the TLB
    add esi, dword ptr [ALIAS_B]
    add esi, dword ptr [ALIAS_A + 0x1000]
    mov edx, ecx                        # this round's frame: X on even rounds, Y on odd ones
    and edx, 1
    shl edx, 12
    or edx, FRAME_X | PTE_P | PTE_W
    mov dword ptr [pt_alias], edx       # the store into the shared PTE (mov r/m32, r32)
    mov eax, dword ptr [ALIAS_A]        # before the TLB flush: not summed
    mov eax, dword ptr [ALIAS_B]
    mov eax, cr3                        # the guest's flush (a CR3 reload: invlpgs not yet folded would keep
    mov cr3, eax                        # the store Python's)
    add esi, dword ptr [ALIAS_A]
    add esi, dword ptr [ALIAS_B]
    rol esi, 3
    dec ecx
    jnz round
    # Entries made and zapped at once, before the shadow's tables take them (_shadowmirror.h sm_cancel_made):
    # through a third slot, its directory word new, two pages from PTEs no entry derived from; the first one
    # zapped (the directory word stays linked: the second page derives from it, and a store into it zaps that
# entry), then one through slot A (its
    # directory word linked by the loop's entries: it stays), then the second page (its directory word goes
    # from `linked`: nothing derives from it any more)
    mov eax, pt_alias
    or eax, PTE_P | PTE_W
    mov dword ptr [page_dir + 4 * (ALIAS_C >> 22)], eax
    mov edx, FRAME_X | PTE_P | PTE_W
    mov dword ptr [pt_alias + 8], edx
    mov dword ptr [pt_alias + 12], edx
    mov dword ptr [pt_alias + 16], edx
    add esi, dword ptr [ALIAS_C + 0x2000]
    add esi, dword ptr [ALIAS_C + 0x4000]
    mov edx, FRAME_Y | PTE_P | PTE_W
    mov dword ptr [pt_alias + 8], edx
    mov dword ptr [page_dir + 4 * (ALIAS_C >> 22)], eax   # the directory word written (the same value): the
    add esi, dword ptr [ALIAS_C + 0x4000]                 # second page's entry derives from it, and goes
    add esi, dword ptr [ALIAS_A + 0x3000]
    mov dword ptr [pt_alias + 12], edx
    mov dword ptr [pt_alias + 16], edx
    mov eax, esi
    call print_hex32
    call newline
    PASS("a store into a page table linked twice")
    ret
skip_div:
    add dword ptr [ebx + FRAME_EIP], 2
    ret

.bss
.align 4096
pt_alias: .zero 4096
