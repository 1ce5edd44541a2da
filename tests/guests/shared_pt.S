# description: a store into a page table two address spaces share, made while one is current: the other's entry goes too
#
# Two page directories point at one page table (pt_shared, 0xC0000000 up); each space reads 0xC0000000, so the
# shadow of each holds an entry derived from its PTE. Then, in space 1, the kernel stores a new frame into the
# PTE (a ptemod, emulated in C under trap and hw --no-ept, an adaptive store under full): the shadow zaps what
# derives from the word in every root, space 2's too (ShadowPaging._fold's zap record, memory/_tlbfill.c fold,
# which pops another root's entry through its table so that the C copy drops it as well). Space 2, entered
# with a CR3 write, must then read the new frame: a stale copy of its entry would read the old one. The frames
# read each round are summed; the sum must be native's (and QEMU's): tests/test_shadow_links.py.
#include "kernel.inc"
#include "paging.inc"

#define HIGH_VA  0xC0000000
#define FRAME_A  0x00300000
#define FRAME_B  0x00301000
#define ROUNDS   64

.text
main:
    mov dword ptr [FRAME_A], 0x0000000A
    mov dword ptr [FRAME_B], 0x00000B00
    mov edi, page_dir
    mov esi, page_table_low
    mov eax, PTE_P | PTE_W
    call paging_identity_4m
    mov edi, page_dir2
    mov esi, page_table_low
    mov eax, PTE_P | PTE_W
    call paging_identity_4m
    mov eax, pt_shared
    or eax, PTE_P | PTE_W
    mov dword ptr [page_dir + 4 * (HIGH_VA >> 22)], eax
    mov dword ptr [page_dir2 + 4 * (HIGH_VA >> 22)], eax
    mov dword ptr [pt_shared], FRAME_A | PTE_P | PTE_W
    mov eax, page_dir
    call paging_enable

    xor ebx, ebx                        # the sum of what space 2 read
    mov ecx, ROUNDS
round:
    mov eax, page_dir2                  # both spaces hold an entry for 0xC0000000
    mov cr3, eax
    add ebx, dword ptr [HIGH_VA]
    mov eax, page_dir
    mov cr3, eax
    mov eax, dword ptr [HIGH_VA]
    mov eax, ecx                        # the frame of this round: A on odd rounds, B on even ones
    and eax, 1
    shl eax, 12
    or eax, FRAME_A | PTE_P | PTE_W
    mov dword ptr [pt_shared], eax      # into the shared page table, space 1 current
    invlpg [HIGH_VA]
    mov eax, page_dir2
    mov cr3, eax
    add ebx, dword ptr [HIGH_VA]        # space 2 reads this round's frame
    mov eax, page_dir
    mov cr3, eax
    dec ecx
    jnz round
    mov eax, ebx
    call print_hex32
    call newline
    PASS("a store into a shared page table")
    ret

.bss
.align 4096
pt_shared: .zero 4096
page_dir2: .zero 4096
