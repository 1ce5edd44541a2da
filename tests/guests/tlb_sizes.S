# description: how many TLB misses a run makes must not depend on the host's speed: 400 pages read between flushes (the engine grows its TLB), 50 flushes with 8 pages read between them and one more (it shrinks it if a window of its clock has passed), then 150 pages read 50 times with no flush (a small TLB misses, a large one does not)
#
# QEMU sizes its software TLB at each flush from the use it saw over a window of time. tests/test_tlb_clock.py
# runs this with the host stalled at each `#` the guest prints, and with the engine's clock moved on there, and
# compares the TLB fills and walks (cpuvirt pins that clock to the flushes: engine/internals.py pin_tlb_clock).
#include "kernel.inc"
#include "paging.inc"

#define FIRST 0x00100000                // the pages read: 1 MiB and up, inside the identity-mapped 4 MiB

.text
main:
    PAGING_IDENTITY_4M_ON(PTE_P | PTE_W)
    mov al, '#'
    call putc

    mov ecx, 20                         # A: 400 pages between flushes, 20 times
grow:
    mov esi, FIRST
    mov edx, 400
grow_read:
    mov eax, dword ptr [esi]
    add esi, 4096
    dec edx
    jnz grow_read
    mov eax, cr3
    mov cr3, eax
    dec ecx
    jnz grow
    mov al, '#'
    call putc

    mov ecx, 50                         # B: 8 pages between flushes, 50 times (fewer than a window of 100)
calm:
    mov esi, FIRST
    mov edx, 8
calm_read:
    mov eax, dword ptr [esi]
    add esi, 4096
    dec edx
    jnz calm_read
    mov eax, cr3
    mov cr3, eax
    dec ecx
    jnz calm
    mov al, '#'
    call putc
    mov eax, cr3                        # one more flush (the engine resizes its TLB only at a flush)
    mov cr3, eax

    mov ecx, 50                         # C: 150 pages 50 times, no flush
reuse:
    mov esi, FIRST
    mov edx, 150
reuse_read:
    mov eax, dword ptr [esi]
    add esi, 4096
    dec edx
    jnz reuse_read
    dec ecx
    jnz reuse
    PASS("the guest read its pages")
    ret
