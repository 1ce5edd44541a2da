# description: page faults taken by a kernel that never leaves ring 0 (its code descriptor never marked accessed)
#
# The CPU sets a descriptor's accessed bit when it loads the descriptor into a segment register; a kernel that
# stays in ring 0 takes its events through gates naming the CS it runs in, a CS that is not loaded again, so
# its GDT's code descriptor may keep the bit clear (gdt.inc's does: no far jump or iret ever reloads it here).
# hw --no-ept's #PF exits in C (modes/hw/_fastexit.c) deliver through cpu/_delivery.c, which must not let the
# engine load a descriptor whose accessed bit it would then write (that store's fill could miss the shadow);
# it once required the bit even where CS is not loaded at all, and every #PF of such a kernel took the whole
# exit in Python (tests/test_hw_pf_c.py counts the exits C made). Each round makes a page not present and
# loads from it; the handler sums CR2, the error code and the faulting EIP into a checksum and makes
# the page present again. The rounds run twice: then again with IF = 0 and a timer interrupt pending, which
# hw waits for with interrupt-window exiting on (those exits too are C's: with IF = 0 the window stays shut).
# The checksum must be native's and QEMU's.
#include "kernel.inc"
#include "paging.inc"
#include "pit.inc"

#define ROUNDS      64
#define PAGE_A      0x00300000
#define PTE(p)      page_table_low + 4 * (p >> 12)

.text
main:
    SET_HANDLER(VEC_PF, pf_handler)
    SET_HANDLER(0x20, tick)
    PAGING_IDENTITY_4M_ON(PTE_P | PTE_W)
    xor esi, esi                        # the checksum
    call rounds
    mov ax, PIT_DIVISOR(1000)           # then with IRQ 0 pending and IF = 0
    call pit_start_periodic
    mov al, 0xFE
    out PIC1_DATA, al
    mov ecx, 1500000                    # about 3 ms of guest time
spin:
    dec ecx
    jnz spin
    call rounds
    CHECK_EQ("no tick while IF = 0", dword ptr [ticks], 0)
    and dword ptr [PTE(PAGE_A)], ~PTE_P # and a #PF in sti's interrupt shadow: IF = 1, the window not yet open
    invlpg [PAGE_A]
    sti
    mov eax, dword ptr [PAGE_A + 0x44]
    add esi, eax
    hlt                                 # the pending tick (or the next one) is taken
    cli
    mov al, 0xFF
    out PIC1_DATA, al
    cmp dword ptr [pf_count], 2 * ROUNDS + 1
    je counted
    FAIL("ring-0 page faults", "the number of #PF is not 2 * ROUNDS + 1")
counted:
    mov eax, esi
    add eax, dword ptr [pf_sum]
    call print_hex32
    call newline
    PASS("ring-0 page faults")
    ret

rounds:
    mov ebp, ROUNDS
round:
    and dword ptr [PTE(PAGE_A)], ~PTE_P
    invlpg [PAGE_A]
    mov eax, ebp
    and eax, 0xFFC
    mov eax, dword ptr [PAGE_A + eax]   # #PF: the handler makes the page present, the load runs again
    add esi, eax
    rol esi, 5
    dec ebp
    jnz round
    ret

tick:
    inc dword ptr [ticks]
    mov al, 0x20
    out PIC1_CMD, al
    ret

pf_handler:
    inc dword ptr [pf_count]
    READ_CR2
    add dword ptr [pf_sum], eax
    mov eax, dword ptr [ebx + FRAME_ERROR]
    add dword ptr [pf_sum], eax
    mov eax, dword ptr [ebx + FRAME_EIP]
    add dword ptr [pf_sum], eax
    or dword ptr [PTE(PAGE_A)], PTE_P
    ret

.data
pf_count:
    .long 0
pf_sum:
    .long 0
ticks:
    .long 0
