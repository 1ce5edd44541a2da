# description: nanobenchmarks of Adams & Agesen 2006: N iterations of each operation, each ending in "done <op>"
#
# Each benchmark is a tight loop of N_ITER iterations of one operation; the guest prints
# "done <op>" after each loop and nothing else, so that a host can time the phases (or count the
# exits between two lines) without the output depending on time. The operations:
#   syscall     int 0x80 round trip from ring 3 (SYS_NOP)
#   in, out     port 0x80 (the POST port)
#   cli_sti     cli; sti
#   pushf_popf  pushfd; popfd
#   cr3         mov cr3, eax (a reload of the current directory: a full non-global TLB flush)
#   call_ret    call to a function that returns
#   pgfault     a #PF on a page whose PTE was made not-present; the handler sets P and the
#               access is retried
#   divzero     div by zero; the #DE handler skips the div
#   ptemod      flip a PTE's R/W bit, then invlpg the page
#   cpuid       leaf 0
#   rdtsc
#if PV
#define PARAVIRT 1                      // this guest has a paravirtualized build (guests/include/pvops.inc)
#endif
#include "kernel.inc"
#include "paging.inc"
#include "user.inc"

#ifndef N_ITER
#define N_ITER      5000            // bench/nanobench.py builds it with more
#endif
#define BENCH_PAGE  0x00380000          // the page whose PTE pgfault and ptemod change

# print "done <op>"
#define DONE(OP) PUSH_STRING(OP) ; call report_done ; add esp, 4

.text
main:
    call user_init
    SET_HANDLER(VEC_DE, divzero_handler)
    SET_HANDLER(VEC_PF, pgfault_handler)
    PAGING_IDENTITY_4M_ON(PTE_P | PTE_W | PTE_U)

    # --- syscall --------------------------------------------------------------------------------
    mov eax, user_syscall_loop
    mov edx, user_stack_top
    call run_user
    test eax, eax
    jz bench_syscall_ok
    FAIL("syscall", "the ring-3 loop did not exit with 0")
bench_syscall_ok:
    DONE("syscall")

    # --- in / out ---------------------------------------------------------------------------------
#if PV
    mov eax, 1                          # PV: a kernel with an I/O grant (physdev_op set_iopl 1)
    call pv_set_iopl                    # does its port I/O directly, as Xen's dom0 does
#endif
    mov esi, N_ITER
bench_in:
    in al, POST_PORT
    dec esi
    jnz bench_in
    DONE("in")
    mov esi, N_ITER
bench_out:
    out POST_PORT, al
    dec esi
    jnz bench_out
#if PV
    xor eax, eax                        # the grant goes again: IOPL 0
    call pv_set_iopl
#endif
    DONE("out")

    # --- cli_sti (every 8259 line is masked: no interrupt arrives) -----------------------------------
    mov esi, N_ITER
bench_cli_sti:
    IRQ_DISABLE                         # PV: evtchn_upcall_mask writes (pvops.inc)
    IRQ_ENABLE
    dec esi
    jnz bench_cli_sti
    IRQ_DISABLE
    DONE("cli_sti")

    # --- pushf_popf ---------------------------------------------------------------------------------
    mov esi, N_ITER
bench_pushf_popf:
#if PV
    SAVE_FL                             # PV: the flags with the virtual IF, and back
    RESTORE_FL
#else
    pushfd
    popfd
#endif
    dec esi
    jnz bench_pushf_popf
    DONE("pushf_popf")

    # --- cr3 ------------------------------------------------------------------------------------------
    READ_CR3(eax)
    mov esi, N_ITER
bench_cr3:
    WRITE_CR3(eax)                      # PV: MMUEXT_NEW_BASEPTR
    dec esi
    jnz bench_cr3
    DONE("cr3")

    # --- call_ret ---------------------------------------------------------------------------------------
    mov esi, N_ITER
bench_call_ret:
    call bench_leaf
    dec esi
    jnz bench_call_ret
    DONE("call_ret")

    # --- pgfault ------------------------------------------------------------------------------------------
    mov edi, BENCH_PAGE
    mov esi, N_ITER
bench_pgfault:
#if PV
    mov eax, dword ptr [page_table_low + 4 * (BENCH_PAGE >> 12)]
    and eax, ~PTE_P
    mov ebx, edi
    call pv_update_va                   # PV: PTE write + invlpg in one update_va_mapping
#else
    and dword ptr [page_table_low + 4 * (BENCH_PAGE >> 12)], ~PTE_P
    invlpg [edi]
#endif
    mov eax, dword ptr [edi]            # #PF, the handler sets P, the load is retried
    dec esi
    jnz bench_pgfault
    cmp dword ptr [pgfault_count], N_ITER
    je bench_pgfault_ok
    FAIL("pgfault", "the number of page faults is not N")
bench_pgfault_ok:
    DONE("pgfault")

    # --- divzero ------------------------------------------------------------------------------------------
    xor ecx, ecx
    mov esi, N_ITER
bench_divzero:
    div ecx                             # #DE; the handler skips these 2 bytes
    dec esi
    jnz bench_divzero
    cmp dword ptr [divzero_count], N_ITER
    je bench_divzero_ok
    FAIL("divzero", "the number of #DE is not N")
bench_divzero_ok:
    DONE("divzero")

    # --- ptemod -------------------------------------------------------------------------------------------
    mov edi, BENCH_PAGE
    mov esi, N_ITER
bench_ptemod:
#if PV
    mov eax, dword ptr [page_table_low + 4 * (BENCH_PAGE >> 12)]
    xor eax, PTE_W
    mov ebx, edi
    call pv_update_va                   # PV: PTE write + invlpg in one update_va_mapping
#else
    xor dword ptr [page_table_low + 4 * (BENCH_PAGE >> 12)], PTE_W
    invlpg [edi]
#endif
    dec esi
    jnz bench_ptemod
    DONE("ptemod")

    # --- cpuid ----------------------------------------------------------------------------------------------
    mov esi, N_ITER
bench_cpuid:
    xor eax, eax
    cpuid
    dec esi
    jnz bench_cpuid
    DONE("cpuid")

    # --- rdtsc ----------------------------------------------------------------------------------------------
    mov esi, N_ITER
bench_rdtsc:
    rdtsc
    dec esi
    jnz bench_rdtsc
    DONE("rdtsc")
    ret

bench_leaf:
    ret

# #PF: the page was made not-present on purpose; make it present again. No invlpg: the CPU does
# not cache not-present translations, and a #PF invalidates the faulting address's entries.
pgfault_handler:
    READ_CR2
    cmp eax, BENCH_PAGE
    jne isr_unexpected
    inc dword ptr [pgfault_count]
#if PV
    push edi
    mov edi, page_table_low + 4 * (BENCH_PAGE >> 12)
    mov eax, dword ptr [edi]
    or eax, PTE_P
    call pv_set_pte                     # PV: mmu_update
    pop edi
#else
    or dword ptr [page_table_low + 4 * (BENCH_PAGE >> 12)], PTE_P
#endif
    ret

# #DE: skip the 2-byte div ecx.
divzero_handler:
    inc dword ptr [divzero_count]
    add dword ptr [ebx + FRAME_EIP], 2
    ret

# report_done(op): "done op\n".
report_done:
    push esi
    mov esi, done_prefix
    call puts
    mov esi, dword ptr [esp + 8]
    call puts
    call newline
    pop esi
    ret

# ring 3: N_ITER null system calls, then exit(0).
user_syscall_loop:
    mov esi, N_ITER
user_syscall_next:
    mov eax, SYS_NOP
    int 0x80
    dec esi
    jnz user_syscall_next
    mov eax, SYS_EXIT
    xor ebx, ebx
    int 0x80

.data
done_prefix:   .asciz "done "
.align 4
pgfault_count: .long 0
divzero_count: .long 0
