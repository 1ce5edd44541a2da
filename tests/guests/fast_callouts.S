# description: cpuid, rdtsc and CR0.WP / CR4.PGE writes in loops (mode full answers them in C once a site was served): what cpuid answered, the TSC, and CR0.WP still enforced after writes served in C
#include "kernel.inc"
#include "paging.inc"

#define N         300
#define RO_PAGE   0x003FF000            // read-only, then made writable by the #PF handler
#define RO_PAGE2  0x003FE000            // read-only: written with WP = 0, then with WP = 1
#define CR4_PGE   0x80

.text
main:
    SET_HANDLER(VEC_PF, pf_handler)
    mov edi, page_dir
    mov esi, page_table_low
    mov eax, PTE_P | PTE_W
    call paging_identity_4m
    mov dword ptr [page_table_low + 4 * (RO_PAGE >> 12)], RO_PAGE | PTE_P
    mov dword ptr [page_table_low + 4 * (RO_PAGE2 >> 12)], RO_PAGE2 | PTE_P | 0x60   # accessed, dirty
    mov eax, page_dir
    call paging_enable                  # CR0.PG | CR0.WP

    # cpuid: leaves 0-3, N times, every register summed
    xor ebp, ebp
    mov edi, N
cpuid_loop:
    mov eax, edi
    and eax, 3
    mov ecx, edi
    cpuid
    add ebp, eax
    add ebp, ebx
    add ebp, ecx
    add ebp, edx
    dec edi
    jnz cpuid_loop
    mov eax, ebp
    call print_hex32
    mov al, 10
    call putc

    # rdtsc: N times, the low halves xor-ed (the virtual clock, so the same in every run)
    xor ebp, ebp
    mov edi, N
rdtsc_loop:
    rdtsc
    xor ebp, eax
    dec edi
    jnz rdtsc_loop
    mov eax, ebp
    call print_hex32
    mov al, 10
    call putc

    # CR0.WP and CR4.PGE toggled N times through one mov-to-CR site each
    mov eax, cr0
    mov dword ptr [cr0_base], eax
    mov eax, cr4
    mov dword ptr [cr4_base], eax
    mov edi, N
toggle_loop:
    mov eax, dword ptr [cr0_base]
    xor eax, CR0_WP
    call set_cr0
    mov eax, dword ptr [cr0_base]
    call set_cr0
    mov eax, dword ptr [cr4_base]
    xor eax, CR4_PGE
    call set_cr4
    mov eax, dword ptr [cr4_base]
    call set_cr4
    dec edi
    jnz toggle_loop
    # WP cleared through the same site: a ring-0 write to a read-only page goes through; WP set
    # again (the same site): the engine's TLB must forget that the page was writable
    mov eax, dword ptr [cr0_base]
    and eax, ~CR0_WP
    call set_cr0
    mov dword ptr [RO_PAGE2], 0x22222222
    mov eax, dword ptr [cr0_base]
    call set_cr0
    mov dword ptr [RO_PAGE2 + 4], 0x33333333
    mov dword ptr [RO_PAGE], 0x11111111
    CHECK_EQ("with WP = 0 the write went through", dword ptr [RO_PAGE2], 0x22222222)
    CHECK_EQ("with WP = 1 again the writes to read-only pages fault", dword ptr [pf_count], 2)
    CHECK_EQ("first at the page written with WP = 0", dword ptr [pf_first_cr2], RO_PAGE2 + 4)
    CHECK_EQ("then at the other read-only page", dword ptr [pf_cr2], RO_PAGE)
    CHECK_EQ("both writes landed", dword ptr [RO_PAGE2 + 4], 0x33333333)
    mov eax, cr0
    CHECK_EQ("CR0 after the toggles", eax, dword ptr [cr0_base])
    mov eax, cr4
    CHECK_EQ("CR4 after the toggles", eax, dword ptr [cr4_base])

    # the code after a cpuid site served in C is rewritten: the next call runs the new code
    mov edi, 20
smc_loop:
    call smc_probe
    dec edi
    jnz smc_loop
    CHECK_EQ("before the code is written", eax, 1)
    mov dword ptr [smc_imm + 1], 2
    call smc_probe
    CHECK_EQ("the new code after the cpuid runs", eax, 2)
    PASS("fast callouts")
    ret

smc_probe:
    xor eax, eax
    cpuid
smc_imm:
    mov eax, 1
    ret

set_cr0:
    mov cr0, eax
    ret
set_cr4:
    mov cr4, eax
    ret

# pf_handler: make the page writable, invalidate its TLB entry, retry the write
pf_handler:
    inc dword ptr [pf_count]
    cmp dword ptr [pf_count], 4
    ja isr_unexpected
    mov eax, cr2
    mov dword ptr [pf_cr2], eax
    cmp dword ptr [pf_count], 1
    jne pf_not_first
    mov dword ptr [pf_first_cr2], eax
pf_not_first:
    mov edi, page_dir
    call pte_address
    or dword ptr [eax], PTE_W
    mov eax, dword ptr [pf_cr2]
    invlpg [eax]
    ret

.data
.align 4
pf_count:  .long 0
pf_cr2:    .long 0
pf_first_cr2: .long 0
cr0_base:  .long 0
cr4_base:  .long 0
