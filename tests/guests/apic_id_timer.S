# description: the local APIC's ID read in C (machine/apicmmio.py) while its timer runs: 100,000 ID
# reads with a periodic timer interrupt falling between them, then an ID written and read back
#
# The C read answers only while the timer's catch-up would do nothing; each read at or after a due
# zero crossing must go to the model, which raises the interrupt there (tests/test_apic_mmio.py runs
# this with and without the C path and compares everything). Console: what QEMU prints too.
#include "kernel.inc"

#define APIC            0xFEE00000
#define APIC_ID         (APIC + 0x20)
#define APIC_EOI        (APIC + 0xB0)
#define APIC_SPIV       (APIC + 0xF0)
#define APIC_LVT_TIMER  (APIC + 0x320)
#define APIC_TIMER_INIT (APIC + 0x380)
#define APIC_TIMER_DIV  (APIC + 0x3E0)
#define VEC_TIMER       0x2D

.text
main:
    mov dword ptr [APIC_ID], 0x03000000                 # no timer running yet: every read is C's
    mov ecx, 1000
    xor edx, edx
written_loop:
    or edx, dword ptr [APIC_ID]
    dec ecx
    jnz written_loop
    CHECK_EQ("an APIC ID written before the timer runs reads back", edx, 0x03000000)
    mov dword ptr [APIC_ID], 0
    SET_HANDLER(VEC_TIMER, on_timer)
    mov dword ptr [APIC_SPIV], 0x1FF                    # software-enabled
    mov dword ptr [APIC_TIMER_DIV], 0xB                 # divide by 1
    mov dword ptr [APIC_LVT_TIMER], 0x20000 | VEC_TIMER # periodic, unmasked
    mov dword ptr [APIC_TIMER_INIT], 20000
    sti
    mov ecx, 100000
    xor edx, edx
id_loop:
    mov eax, dword ptr [APIC_ID]
    or edx, eax
    dec ecx
    jnz id_loop
    mov esi, 10000000                                   # QEMU's timer runs on host time: if it has not
more_reads:                                             # ticked yet (a busy host), read on until it has
    cmp dword ptr [ticks], 0                            # (cpuvirt's has: virtual time, deterministic)
    jne reads_done
    mov eax, dword ptr [APIC_ID]
    or edx, eax
    dec esi
    jnz more_reads
reads_done:
    cli
    mov dword ptr [APIC_LVT_TIMER], 0x10000 | VEC_TIMER # masked
    mov dword ptr [APIC_TIMER_INIT], 0
    CHECK_EQ("APIC ID reads 0 every time, the timer running", edx, 0)
    cmp dword ptr [ticks], 1
    jb few_ticks
    PASS("the periodic timer interrupted the reads")
    jmp ticks_done
few_ticks:
    FAIL("the periodic timer interrupted the reads", "no tick")
ticks_done:
    mov dword ptr [APIC_ID], 0x05000000
    mov eax, dword ptr [APIC_ID]
    CHECK_EQ("a written APIC ID reads back", eax, 0x05000000)
    mov dword ptr [APIC_ID], 0
    mov eax, dword ptr [APIC_ID]
    CHECK_EQ("and again", eax, 0)
    ret

on_timer:
    inc dword ptr [ticks]
    mov dword ptr [APIC_EOI], 0
    ret

.data
ticks: .long 0
