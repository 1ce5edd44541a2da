# description: the hypervisor's own TLB under full after CR3 loads: segment pops whose stack and GDT pages it has lost, answered in C from the shadow; and a stale entry (a PTE rewritten without invlpg) that C must not refresh once the C copy has lost the page while Python's TLB keeps it
#
# Under `--mode full` the guest kernel's `pop es` and `mov fs, ax` are callouts that bt/_callout.c
# answers through a copy of the hypervisor's TLB (GuestViewVcpu._rtlb); a CR3 load empties it, and C
# then puts the stack's and the GDT's pages back from the shadow as Python's walk would (hv_walk).
# tests/test_full_events.py runs this guest with and without the C path and compares everything a reader
# can see. What ES holds after a pop through a stale translation is not architectural (a PTE changed
# without invlpg), so it goes into EBP, which the test compares between the two paths, and the console
# prints only the loop count.
#include "kernel.inc"
#include "paging.inc"

#define LOOPS 64
#define PAGE_S 0x00280000               // a stack page: frame F1 (itself) or F2 below
#define FRAME_2 0x00290000
#define PAGE_S2 0x00380000              // 256 pages on: the same slot of the C copy (256 slots)

.text
main:
    PAGING_IDENTITY_4M_ON(PTE_P | PTE_W)
    mov eax, dword ptr [gdt + KERNEL_DS]        # the GDT's page: an entry in the shadow (xv6's GDT is in data
                                                # its kernel reads; a page nobody touched is Python's walk)
    mov dword ptr [PAGE_S + 0xFFC], KERNEL_DS   # F1's slot: the kernel's data segment
    mov dword ptr [FRAME_2 + 0xFFC], 0          # F2's: null
    mov dword ptr [PAGE_S2 + 0xFFC], KERNEL_DS
    xor ebp, ebp
    mov esi, LOOPS
loop:
    mov dword ptr [page_table_low + 4 * (PAGE_S >> 12)], PAGE_S | PTE_P | PTE_W
    invlpg [PAGE_S]
    # a CR3 load (xv6's switch): the hypervisor's TLB is empty, the next pop's stack and GDT pages miss
    mov eax, cr3
    mov cr3, eax
    push KERNEL_DS
    pop es
    mov ax, KERNEL_DS
    mov fs, ax
    # the stack at PAGE_S (F1), then its PTE rewritten to F2 without invlpg and the page read again
    mov ebx, esp
    mov esp, PAGE_S + 0xFFC
    pop es
    mov dword ptr [page_table_low + 4 * (PAGE_S >> 12)], FRAME_2 | PTE_P | PTE_W
    add ebp, dword ptr [PAGE_S + 0xFFC]
    # PAGE_S2 takes PAGE_S's slot in C's copy (Python's TLB keeps both) and leaves it again (invlpg), then
    # PAGE_S: a free slot, but only Python's TLB knows what it holds for the page
    mov esp, PAGE_S2 + 0xFFC
    pop es
    invlpg [PAGE_S2]
    mov ax, KERNEL_DS                   # (Python's: its TLB takes the invlpg C may have served)
    mov ss, ax
    mov esp, PAGE_S + 0xFFC
    pop es
    mov esp, ebx
    mov eax, es
    rol ebp, 5
    add ebp, eax
    mov ax, KERNEL_DS
    mov es, ax
    dec esi
    jnz loop
    mov eax, LOOPS
    call print_hex32
    call newline
    PASS("full's hypervisor TLB after CR3 loads")
    ret
