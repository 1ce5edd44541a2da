# description: one `mov cr3` site that reloads the current page directory and switches between two (1,000 rounds), and one that reloads CR3 after page-table writes the shadow left unsynchronised
#
# Under trap and full the kernel's CR3 reload (the same root) is answered in C; a switch to the other
# root must stay Python's even at a site C has served before. tests/test_cr3_reload.py runs it with and
# without the C path and compares everything a reader can see; the console is native's (and QEMU's).
#include "kernel.inc"
#include "paging.inc"

#define HIGH_VA  0xC0000000
#define FRAME_A  0x00300000
#define FRAME_B  0x00301000
#define ROUNDS   1000

.text
main:
    mov dword ptr [FRAME_A], 0xAAAAAAAA
    mov dword ptr [FRAME_B], 0xBBBBBBBB
    # two address spaces: identity 0-4 MiB, and 0xC0000000 -> frame A (space 1) or frame B (space 2)
    mov edi, page_dir
    mov esi, page_table_low
    mov eax, PTE_P | PTE_W
    call paging_identity_4m
    mov edi, page_dir2
    mov esi, page_table_low
    mov eax, PTE_P | PTE_W
    call paging_identity_4m
    mov eax, pt_a
    or eax, PTE_P | PTE_W
    mov dword ptr [page_dir + 4 * (HIGH_VA >> 22)], eax
    mov dword ptr [pt_a], FRAME_A | PTE_P | PTE_W
    mov eax, pt_b
    or eax, PTE_P | PTE_W
    mov dword ptr [page_dir2 + 4 * (HIGH_VA >> 22)], eax
    mov dword ptr [pt_b], FRAME_B | PTE_P | PTE_W
    mov eax, page_dir
    call paging_enable

    # rounds of: reload space 1, read; switch to space 2 at the same site, read; back to space 1
    xor ebx, ebx                        # sum of what 0xC0000000 read
    mov ecx, ROUNDS
round:
    mov eax, page_dir
    call load_cr3                       # a reload (the same root) ...
    add ebx, dword ptr [HIGH_VA]
    mov eax, page_dir2
    call load_cr3                       # ... and a switch, at the same `mov cr3`
    add ebx, dword ptr [HIGH_VA]
    mov eax, page_dir
    call load_cr3                       # a switch back
    dec ecx
    jnz round
    # each round adds 0xAAAAAAAA + 0xBBBBBBBB: 1,000 rounds make 0xFFFFFA88 (mod 2^32)
    CHECK_EQ("each round read frame A, then frame B, through one mov cr3 site", ebx, 0xFFFFFA88)
    mov eax, cr3
    CHECK_EQ("mov r32, cr3 reads space 1 back", eax, page_dir)

    # a page-table write the shadow cannot emulate (rep stosd over a PTE) leaves its frame unsynchronised
    # until the next CR3 load: the reload then resynchronises it (Python's) and the new PTE is seen
    mov eax, dword ptr [HIGH_VA]
    mov edi, pt_a
    mov eax, FRAME_B | PTE_P | PTE_W
    mov ecx, 1
    cld
    rep stosd
    mov eax, page_dir
    call load_cr3
    mov eax, dword ptr [HIGH_VA]
    CHECK_EQ("after a rep-stos PTE write and a CR3 reload, 0xC0000000 maps frame B", eax, 0xBBBBBBBB)

    # again, with a read through the unsynchronised frame before the reload (the shadow's entry for it is
    # not write-traced) and a plain store to the PTE after it: only the reload's resynchronisation (a
    # reload of the same root, Python's while a frame is unsynchronised) makes the new PTE seen
    mov edi, pt_a
    mov eax, FRAME_B | PTE_P | PTE_W
    mov ecx, 1
    rep stosd
    mov eax, dword ptr [HIGH_VA]
    mov dword ptr [pt_a], FRAME_A | PTE_P | PTE_W
    mov eax, page_dir
    call load_cr3
    mov eax, dword ptr [HIGH_VA]
    CHECK_EQ("after a PTE store through an unsynchronised frame and a CR3 reload, 0xC0000000 maps frame A", eax, 0xAAAAAAAA)
    PASS("cr3 switches and reloads")
    ret

load_cr3:
    mov cr3, eax
    ret

.bss
.align 4096
pt_a: .zero 4096
pt_b: .zero 4096
page_dir2: .zero 4096
