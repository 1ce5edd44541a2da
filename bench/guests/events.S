# description: event-cost benchmark kernel: N x (an I/O exit | a #PF round trip), or the bare loop
#
# EVENT selects the loop body, run N times:
#   0  nop; nop                  the bare I/O loop (the baseline of 1)
#   1  out 0x80, al              one I/O exit per iteration (port 0x80: the POST port, writes ignored)
#   2  clear PTE.P, invlpg, load one #PF per iteration; the handler sets PTE.P, invlpg, returns: retry
#   3  rewrite PTE (P kept), invlpg, load: the same loop without the fault (the baseline of 2)
#   4  xor eax, eax; cpuid        one CPUID per iteration (always a VM exit in hw mode; baseline 0)
#   5  a store to each of N pages from FRESH_A, then one to each of N pages from FRESH_B: under
#      hw --vmx lazy_ept=1 the second pass is N EPT violations (first touches of fresh pages)
#   6  the same two passes, both over the pages from FRESH_A: the second pass touches pages the
#      first already mapped (the baseline of 5; both pay the first pass's N violations)
#   7  mov eax, [0xFEE00020]        a local APIC ID read (xv6's lapicid() on every spinlock): under hw an
#                                EPT violation, an APIC_ACCESS exit, or no exit (APIC-register virtualization)
#   8  mov eax, [0xFEE00390]        a current-count (TMCCT) read: an exit whatever the controls
#   9  mov [0xFEE000B0], eax        an EOI write (nothing in service): APIC_WRITE under register virtualization
#  10  rewrite PTE (P and A kept), invlpg, load: the loop of 2 without the fault, whose refill (A already
#      set) is as cheap as the retry of 2 (native answers both in C; 3's refill sets A: a Python walk)
#   EVENT 5/6 need 2 * N pages of RAM above FRESH_A (16 MiB): run them with --mem 64 for N <= 6144.
# Prints "events EVENT=<e> N=<n>" and exits with status 0.
#include "kernel.inc"
#include "paging.inc"

#ifndef EVENT
#define EVENT 1
#endif
#ifndef N
#define N 100000
#endif
#define TARGET 0x00200000               // an identity-mapped data page
#define TARGET_PTE_OFF 0x800          // 4 * (TARGET >> 12): its PTE's offset in page_table_low
#define FRESH_A 0x01000000              // EVENT 5/6: guest-physical pages nobody touched (paging off)
#if EVENT == 5
#define FRESH_B (FRESH_A + N * 4096)
#else
#define FRESH_B FRESH_A
#endif

.text
main:
#if EVENT == 2 || EVENT == 3 || EVENT == 10
    SET_HANDLER(VEC_PF, pf_handler)
    PAGING_IDENTITY_4M_ON(PTE_P | PTE_W)
#endif
#if EVENT == 5 || EVENT == 6
    mov edi, FRESH_A
    mov ecx, N
touch_a:
    mov dword ptr [edi], ecx
    add edi, 4096
    dec ecx
    jnz touch_a
    mov edi, FRESH_B
    mov ecx, N
touch_b:
    mov dword ptr [edi], ecx
    add edi, 4096
    dec ecx
    jnz touch_b
    jmp events_done
#endif
    mov edi, page_table_low
    mov ecx, N
    xor eax, eax
events_loop:
#if EVENT == 0
    nop
    nop
#elif EVENT == 1
    out POST_PORT, al
#elif EVENT == 4
    push ecx
    xor eax, eax
    cpuid
    pop ecx
#elif EVENT == 7
    mov eax, dword ptr [0xFEE00020]
#elif EVENT == 8
    mov eax, dword ptr [0xFEE00390]
#elif EVENT == 9
    mov dword ptr [0xFEE000B0], eax
#elif EVENT == 2
    and dword ptr [edi + TARGET_PTE_OFF], ~PTE_P
    invlpg [TARGET]
    mov eax, dword ptr [TARGET]
#elif EVENT == 10
    or dword ptr [edi + TARGET_PTE_OFF], PTE_P
    invlpg [TARGET]
    mov eax, dword ptr [TARGET]
#else
    and dword ptr [edi + TARGET_PTE_OFF], ~PTE_A
    invlpg [TARGET]
    mov eax, dword ptr [TARGET]
#endif
    dec ecx
    jnz events_loop
events_done:
    mov esi, done_text
    call puts
    mov eax, EVENT
    call print_dec
    mov esi, n_text
    call puts
    mov eax, N
    call print_dec
    call newline
    ret

pf_handler:
    inc dword ptr [pf_count]
    mov eax, page_table_low
    or dword ptr [eax + TARGET_PTE_OFF], PTE_P
    mov eax, cr2
    invlpg [eax]
    ret

.data
done_text: .asciz "events EVENT="
n_text:    .asciz " N="
.align 4
pf_count:  .long 0
