# description: stores, loads and a fetch on fresh guest-physical pages (under hw --vmx lazy_ept=1 each first
# touch of a page is an EPT violation) while the PIT interrupts, with CPUID exits and port writes between them,
# IRQ 0 masked for a while after some (the armed timer deadline goes away), with paging off and on (4 KiB pages with A/D set and not, a 4 MiB page); prints what it read and counted
#
# Everything the guest reads goes into a checksum it prints, with the number of timer ticks it saw (virtual
# time decides it), so a difference in which accesses exit or in the virtual time they spend shows.
#include "kernel.inc"

FRESH = 0x01000000                      # 16 MiB: guest-physical pages nobody touched
PAGES = 240
FRESH_PT = 0x01200000                   # paging phase: linear FRESH_LIN.. -> physical FRESH_PT..
FRESH_LIN = 0x00800000                  # (8 MiB, PDE 2: the page table below)
PT_PAGES = 96

.text
main:
    push ebx
    push esi
    push edi
    push ebp
    SET_HANDLER(VEC_IRQ0, qe_tick)
    mov ax, 0xFFFE                      # only IRQ 0
    call pic_set_mask
    mov ax, 16                          # ~75 kHz: a tick every ~13k instructions
    call pit_start_periodic
    sti
    xor ebp, ebp                        # checksum
    xor esi, esi                        # page index
qe_loop:
    mov edi, esi
    shl edi, 12
    add edi, FRESH
    mov eax, esi
    and eax, 7
    cmp eax, 0
    je qe_store_disp
    cmp eax, 1
    je qe_store_sib
    cmp eax, 2
    je qe_load
    cmp eax, 3
    je qe_straddle
    cmp eax, 4
    je qe_rep
    cmp eax, 5
    je qe_cpuid_first
    cmp eax, 6
    je qe_cmpxchg
    # 7: movsd from a mapped page into a fresh one, then CPUID last before a port write
    push esi
    lea esi, [qe_data]
    add edi, 0x20
    movsd
    pop esi
    xor eax, eax
    cpuid
    add ebp, eax
    out POST_PORT, al
    jmp qe_next
qe_store_disp:
    mov dword ptr [edi + 0x7F8], esi
    add ebp, dword ptr [edi + 0x7F8]
    jmp qe_next
qe_store_sib:
    mov ecx, 5
    mov dword ptr [edi + ecx * 4 + 0x10], esi
    jmp qe_next
qe_load:
    add ebp, dword ptr [edi + 0xABC]    # a fresh page reads zero
    rol ebp, 1
    jmp qe_next
qe_straddle:
    mov dword ptr [edi + 0xFFE], 0x11223344   # the next page too: two violations, one instruction
    add ebp, dword ptr [edi + 0xFFE]
    jmp qe_next
qe_rep:
    push edi
    add edi, 0xFF0                      # rep stosd over the page boundary
    mov ecx, 8
    mov eax, esi
    rep stosd
    pop edi
    jmp qe_next
qe_cpuid_first:
    xor eax, eax
    cpuid                               # a CPUID exit answered in C, then the violation: it comes last
    mov dword ptr [edi + 0x444], ebx
    out POST_PORT, al
    jmp qe_next
qe_cmpxchg:
    mov al, 0xFF
    out PIC1_DATA, al                   # IRQ 0 masked: the timer deadline the clock has armed goes away
    xor eax, eax
    mov ecx, esi
    lock cmpxchg dword ptr [edi + 0x100], ecx
    add ebp, dword ptr [edi + 0x100]
    mov ecx, 20000                      # past that deadline (a tick is ~13k instructions)
qe_masked:
    dec ecx
    jnz qe_masked
    mov al, 0xFE
    out PIC1_DATA, al
qe_next:
    mov ecx, 300                        # time for the timer
qe_delay:
    dec ecx
    jnz qe_delay
    inc esi
    cmp esi, PAGES
    jb qe_loop

    call qe_fresh_code                  # a fetch from a page nothing touched before
    add ebp, eax

    # Paging: PDE 0 a 4 MiB page (kernel), PDE 2 a page table mapping FRESH_LIN.. to FRESH_PT..; the
    # even PTEs have A and D set already (the walk needs no update), the odd ones not.
    cli
    mov edi, qe_pt
    xor ecx, ecx
qe_pt_fill:
    mov eax, ecx
    shl eax, 12
    add eax, FRESH_PT
    or eax, PTE_P | PTE_W
    test ecx, 1
    jnz qe_pt_plain
    or eax, PTE_A | PTE_D
qe_pt_plain:
    mov dword ptr [edi + 4 * ecx], eax
    inc ecx
    cmp ecx, PT_PAGES
    jb qe_pt_fill
    mov dword ptr [qe_pd], PDE_PS | PTE_P | PTE_W | PTE_A | PTE_D
    mov eax, qe_pt
    or eax, PTE_P | PTE_W | PTE_A
    mov dword ptr [qe_pd + 8], eax
    mov eax, cr4
    or eax, CR4_PSE
    mov cr4, eax
    mov eax, qe_pd
    mov cr3, eax
    mov eax, cr0
    or eax, CR0_PG
    mov cr0, eax
    sti
    xor esi, esi
qe_pg_loop:
    mov edi, esi
    shl edi, 12
    add edi, FRESH_LIN
    mov dword ptr [edi + 0x10], esi
    add ebp, dword ptr [edi + 0x10]
    mov ecx, 300
qe_pg_delay:
    dec ecx
    jnz qe_pg_delay
    inc esi
    cmp esi, PT_PAGES
    jb qe_pg_loop
    cli
    mov eax, cr0
    and eax, ~CR0_PG
    mov cr0, eax
    mov al, 0xFF
    out PIC1_DATA, al

    mov eax, dword ptr [qe_ticks]
    cmp eax, 10
    setae al
    movzx eax, al
    CHECK_EQ("timer ticks between the violations", eax, 1)
    CHECK_EQ("a store straddling two fresh pages reads back", dword ptr [FRESH + 3 * 4096 + 0xFFE], 0x11223344)
    CHECK_EQ("rep stosd over a page boundary", dword ptr [FRESH + 4 * 4096 + 0x100C], 4)
    CHECK_EQ("movsd into a fresh page", dword ptr [FRESH + 7 * 4096 + 0x20], 0x5A5AA5A5)
    CHECK_EQ("a store through paging reached its frame", dword ptr [FRESH_PT + 5 * 4096 + 0x10], 5)
    mov eax, ebp                        # the checksum and the ticks: the same under every exit path
    call print_hex32
    mov al, ' '
    call putc
    mov eax, dword ptr [qe_ticks]
    call print_hex32
    call newline
    pop ebp
    pop edi
    pop esi
    pop ebx
    ret

qe_tick:
    inc dword ptr [qe_ticks]
    mov al, PIC_EOI
    out PIC1_CMD, al
    ret

.balign 4096
qe_fresh_code:                          # alone on its page: its first fetch is an EPT violation
    mov eax, 0x1234
    ret
.balign 4096

.data
qe_data:  .long 0x5A5AA5A5
qe_ticks: .long 0

.bss
.align 4096
qe_pd:    .zero 4096
qe_pt:    .zero 4096
