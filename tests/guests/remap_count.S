# description: one linear code page mapped to two frames that hold different code of the same length (by a
# CR3 switch and by a PTE store and invlpg); virtual time (rdtsc) must count the code that runs there
#
# Virtual time caches each block's instruction count by linear address (docs/design.md), and switching page
# tables translates nothing new at that address. FRAME_A and FRAME_B hold 8-byte functions (smc_count.S's):
#   A: inc eax x 7; ret                (8 instructions)
#   B: add eax, 7; nop; nop; ret       (4 instructions, 5 + 1 + 1 + 1 bytes)
# and HIGH_VA maps FRAME_A in space 1 and FRAME_B in space 2. `measure` calls the function at ebx between
# two rdtscs; the deltas go to MAILBOX for tests/test_clock_table.py:
#   +0  A, a copy never remapped          +4  B, a copy never remapped
#   +8  HIGH_VA in space 1 (A)            +12 HIGH_VA after a CR3 switch to space 2 (B)
#   +16 back in space 1 (A)               +20 space 1 with its PTE pointed at FRAME_B and invlpg (B)
#   +24 the PTE pointed back at FRAME_A (A)
# The guest checks only what the functions return (under QEMU the TSC runs on real time).
#include "kernel.inc"
#include "paging.inc"

#define HIGH_VA  0xC0000000
#define FRAME_A  0x00300000
#define FRAME_B  0x00301000
MAILBOX = 0x7F00

.text
main:
    push ebx
    push esi
    push edi
    mov esi, fn_a                       # the two functions into their frames
    mov edi, FRAME_A
    mov ecx, 8
    rep movsb
    mov esi, fn_b
    mov edi, FRAME_B
    mov ecx, 8
    rep movsb
    # two address spaces: identity 0-4 MiB, and HIGH_VA -> FRAME_A (space 1) or FRAME_B (space 2)
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

    mov ebx, fn_a                       # the two references
    call measure
    call measure
    mov dword ptr [MAILBOX], edx
    CHECK_EQ("A adds 7", eax, 7)
    mov ebx, fn_b
    call measure
    call measure
    mov dword ptr [MAILBOX + 4], edx
    CHECK_EQ("B adds 7", eax, 7)

    mov ebx, HIGH_VA                    # space 1: A, translated, run, its count cached
    call measure
    call measure
    mov dword ptr [MAILBOX + 8], edx
    CHECK_EQ("space 1 runs A at 0xC0000000", eax, 7)

    mov eax, page_dir2                  # space 2: B at the same address
    mov cr3, eax
    call measure
    mov dword ptr [MAILBOX + 12], edx
    CHECK_EQ("space 2 runs B at 0xC0000000", eax, 7)

    mov eax, page_dir                   # back to space 1: A
    mov cr3, eax
    call measure
    mov dword ptr [MAILBOX + 16], edx

    mov dword ptr [pt_a], FRAME_B | PTE_P | PTE_W   # space 1's PTE to FRAME_B: B
    invlpg [HIGH_VA]
    call measure
    mov dword ptr [MAILBOX + 20], edx
    CHECK_EQ("the remapped page runs B", eax, 7)

    mov dword ptr [pt_a], FRAME_A | PTE_P | PTE_W   # and back: A
    invlpg [HIGH_VA]
    call measure
    mov dword ptr [MAILBOX + 24], edx
    PASS("one linear page, two frames of code")
    pop edi
    pop esi
    pop ebx
    ret

#include "count_fns.inc"

.bss
.align 4096
pt_a: .zero 4096
pt_b: .zero 4096
page_dir2: .zero 4096
