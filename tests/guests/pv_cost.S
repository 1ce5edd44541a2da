# description: para-mode host-cost test (issue 10, item 5): CASE 1 one mmu_update of 65,536 requests,
# each validating or releasing a whole L1 table; CASE 2 the same work through mmuext_op (pin/unpin);
# CASE 3 console_io writes of 1 MiB, COUNT times. The hypervisor must charge the work to the budget
# and bound each call (continuations), and keep only a bounded part of the console output.
#include "pv_rt.inc"
#ifndef CASE
#define CASE 1
#endif
#ifndef COUNT
#define COUNT 3
#endif
#ifndef NREQ
#define NREQ 65536
#endif
.text
main:
    call rt_init_iret
    mov eax, dword ptr [start_info]
    mov eax, dword ptr [eax + SI_PT_BASE]
    mov dword ptr [l2_va], eax
    call mfn_of
    mov dword ptr [l2_mfn], eax
    mov eax, dword ptr [l2_va]
    mov eax, dword ptr [eax]            # L2[0] -> the first L1
    shr eax, 12
    mov dword ptr [l1_mfn], eax
    mov eax, 16
    call free_page
    mov dword ptr [buf], eax            # 1 MiB of free frames from here (requests or text)
#if CASE == 3
    mov edi, eax
    mov ecx, 1 << 20
    mov al, 'x'
    rep stosb
    mov edi, dword ptr [buf]
    mov byte ptr [edi + (1 << 20) - 1], 10
    mov ebp, COUNT
cost_print:
    mov ebx, 0
    mov ecx, 1 << 20
    mov edx, dword ptr [buf]
    HC(18)
    EXPECT(1 << 20, n_printed)
    dec ebp
    jnz cost_print
    xor eax, eax
    ret
#else
    # T: a zeroed frame, mapped read-only (so it may become a page table)
    mov eax, 5
    call free_page
    mov dword ptr [t_va], eax
    mov edi, eax
    xor eax, eax
    mov ecx, 1024
    rep stosd
    mov eax, dword ptr [t_va]
    call mfn_of
    mov dword ptr [t_mfn], eax
    mov ebx, dword ptr [t_va]
    shr ebx, 12
    and ebx, 0x3FF
    mov eax, dword ptr [l1_mfn]
    shl eax, 12
    lea ebx, [eax + 4 * ebx]
    mov ecx, dword ptr [t_mfn]
    shl ecx, 12
    or ecx, P | US
    call mmu1
    EXPECT(0, n_ro)
    mov edi, dword ptr [buf]
    mov ecx, NREQ / 2
#if CASE == 1
    mov ebx, dword ptr [l2_mfn]
    shl ebx, 12
    add ebx, 4 * 256                    # L2[256]
    mov edx, dword ptr [t_mfn]
    shl edx, 12
    or edx, P | RW | US
cost_fill:
    mov dword ptr [edi], ebx            # L2[256] = T: T is validated as an L1 (1024 entries)
    mov dword ptr [edi + 4], 0
    mov dword ptr [edi + 8], edx
    mov dword ptr [edi + 12], 0
    mov dword ptr [edi + 16], ebx       # L2[256] = 0: T is released (1024 entries)
    mov dword ptr [edi + 20], 0
    mov dword ptr [edi + 24], 0
    mov dword ptr [edi + 28], 0
    add edi, 32
    dec ecx
    jnz cost_fill
    mov ebx, dword ptr [buf]
    mov ecx, NREQ
    mov edx, done
    mov esi, DOMID_SELF
    HC(1)
#else
    mov edx, dword ptr [t_mfn]
cost_fill:
    mov dword ptr [edi], 0              # MMUEXT_PIN_L1_TABLE T
    mov dword ptr [edi + 4], edx
    mov dword ptr [edi + 8], 0
    mov dword ptr [edi + 12], 4         # MMUEXT_UNPIN_TABLE T
    mov dword ptr [edi + 16], edx
    mov dword ptr [edi + 20], 0
    add edi, 24
    dec ecx
    jnz cost_fill
    mov ebx, dword ptr [buf]
    mov ecx, NREQ
    mov edx, done
    mov esi, DOMID_SELF
    HC(26)
#endif
    EXPECT(0, n_batch)
    mov eax, dword ptr [done]
    EXPECT(NREQ, n_done)
    xor eax, eax
    ret
#endif
.data
l2_va: .long 0
l2_mfn: .long 0
l1_mfn: .long 0
t_va: .long 0
t_mfn: .long 0
buf: .long 0
done: .long 0
n_ro: .asciz "T mapped read-only"
n_batch: .asciz "the whole batch: 0"
n_done: .asciz "every request done"
n_printed: .asciz "1 MiB written"
