# description: 2-level paging: aliases, A/D bits, demand paging (#PF CR2/error code), CR3 switch, invlpg, 4 MiB pages, CR0.WP
#
# Address space 1 (page_dir):
#   0x00000000-0x003FFFFF  identity, 4 KiB pages (page_table_low); RO_PAGE is read-only
#   0x00400000-0x007FFFFF  identity, one 4 MiB page (PDE.PS)
#   0xC0000000             -> FRAME_A (pt_high); later FRAME_C, to test invlpg
#   0xD0000000-0xD03FFFFF  a page table with no present entry: pages are mapped on demand
#   0xE0000000-0xE03FFFFF  -> 0x00400000, a second 4 MiB page
# Address space 2 (page_dir2): the same, except 0xC0000000 -> FRAME_B.
#if PV
#define PARAVIRT 1                      // this guest has a paravirtualized build (guests/include/pvops.inc)
#endif
#include "kernel.inc"
#include "paging.inc"

#define HIGH_VA      0xC0000000
#define DEMAND_VA    0xD0000000
#define BIG_VA       0xE0000000
#define BIG_PA       0x00400000
#define FRAME_A      0x00300000
#define FRAME_B      0x00301000
#define FRAME_C      0x00302000
#define DEMAND_POOL  0x00310000         // frames handed out by the #PF handler
#define RO_PAGE      0x003FF000
#define PF_LIMIT     16                 // more faults than this means a fault loop: give up

.text
main:
    SET_HANDLER(VEC_PF, pf_handler)

    # --- build address space 1 -----------------------------------------------------------------
    mov edi, page_dir
    mov esi, page_table_low
    mov eax, PTE_P | PTE_W
    call paging_identity_4m
#if PV
    # PV: the tables are still ordinary frames here, written directly, with machine frames
    and dword ptr [page_table_low + 4 * (RO_PAGE >> 12)], ~PTE_W                # read-only
    mov eax, pt_high
    call pv_machine_address
    or eax, PTE_P | PTE_W
    mov dword ptr [page_dir + 4 * (HIGH_VA >> 22)], eax
    mov eax, FRAME_A | PTE_P | PTE_W
    call pv_machine_pte
    mov dword ptr [pt_high], eax
    mov eax, pt_demand
    call pv_machine_address
    or eax, PTE_P | PTE_W
    mov dword ptr [page_dir + 4 * (DEMAND_VA >> 22)], eax
    mov eax, BIG_PA | PDE_PS | PTE_P | PTE_W
    call pv_machine_pte
    mov dword ptr [page_dir + 4 * (BIG_PA >> 22)], eax
    mov dword ptr [page_dir + 4 * (BIG_VA >> 22)], eax

    # --- turn paging on (PV: CR4.PSE is always set under direct paging) -------------------------
#else
    mov dword ptr [page_table_low + 4 * (RO_PAGE >> 12)], RO_PAGE | PTE_P       # read-only
    mov eax, pt_high
    or eax, PTE_P | PTE_W
    mov dword ptr [page_dir + 4 * (HIGH_VA >> 22)], eax
    mov dword ptr [pt_high], FRAME_A | PTE_P | PTE_W
    mov eax, pt_demand
    or eax, PTE_P | PTE_W
    mov dword ptr [page_dir + 4 * (DEMAND_VA >> 22)], eax
    mov dword ptr [page_dir + 4 * (BIG_PA >> 22)], BIG_PA | PDE_PS | PTE_P | PTE_W
    mov dword ptr [page_dir + 4 * (BIG_VA >> 22)], BIG_PA | PDE_PS | PTE_P | PTE_W

    # --- turn paging on ---------------------------------------------------------------------------
    mov eax, cr4
    or eax, CR4_PSE
    mov cr4, eax
#endif
    mov eax, page_dir
    call paging_enable
    READ_CR0(eax)
    and eax, CR0_PG | CR0_WP
    CHECK_EQ("CR0.PG and CR0.WP are set, and the identity-mapped code runs on", eax, CR0_PG | CR0_WP)
    READ_CR3(eax)
    mov edx, page_dir
    CHECK_EQ("CR3 reads back the page directory", eax, edx)

    # --- two virtual addresses, one frame --------------------------------------------------------
    mov dword ptr [HIGH_VA + 0x10], 0x11C0FFEE
    CHECK_EQ("a write via 0xC0000000 is visible via the identity alias", dword ptr [FRAME_A + 0x10], 0x11C0FFEE)
    mov dword ptr [FRAME_A + 0x14], 0x22C0FFEE
    CHECK_EQ("a write via the identity alias is visible via 0xC0000000", dword ptr [HIGH_VA + 0x14], 0x22C0FFEE)
    mov eax, dword ptr [pt_high]
    and eax, PTE_A | PTE_D
    CHECK_EQ("the CPU sets PTE.A and PTE.D when it writes through a PTE", eax, PTE_A | PTE_D)
    mov eax, dword ptr [page_dir + 4 * (HIGH_VA >> 22)]
    and eax, PTE_A
    CHECK_EQ("the CPU sets PDE.A when it walks through a PDE", eax, PTE_A)

    # --- demand paging: the handler maps the page and the instruction is retried -----------------
    mov dword ptr [DEMAND_POOL], 0x33D3A4D0     # what the first demand frame holds
    mov dword ptr [pf_count], 0
    mov eax, dword ptr [DEMAND_VA]              # not present: #PF, map, retry
    CHECK_EQ("a not-present read retried after the #PF handler maps the page", eax, 0x33D3A4D0)
    CHECK_EQ("one #PF for that read", dword ptr [pf_count], 1)
    CHECK_EQ("#PF sets CR2 to the faulting address (read)", dword ptr [pf_cr2], DEMAND_VA)
    CHECK_EQ("#PF error code for a not-present read at ring 0 is 0", dword ptr [pf_error], 0)
    mov dword ptr [DEMAND_VA + 0x1000 + 8], 0x44D3A4D0    # not present: #PF, map, retry
    CHECK_EQ("a not-present write retried after the #PF handler maps the page", dword ptr [DEMAND_POOL + 0x1000 + 8], 0x44D3A4D0)
    CHECK_EQ("#PF sets CR2 to the faulting address (write)", dword ptr [pf_cr2], DEMAND_VA + 0x1000 + 8)
    CHECK_EQ("#PF error code for a not-present write at ring 0 is 2", dword ptr [pf_error], PF_W)
    CHECK_EQ("two #PFs in all", dword ptr [pf_count], 2)

    # --- two address spaces: same virtual address, different frames ---------------------------------
    mov edi, page_dir2
    mov esi, page_dir
    mov ecx, 1024
    rep movsd
#if PV
    mov eax, pt_high2                           # PV: still ordinary frames: direct writes
    call pv_machine_address
    or eax, PTE_P | PTE_W
    mov dword ptr [page_dir2 + 4 * (HIGH_VA >> 22)], eax
    mov eax, FRAME_B | PTE_P | PTE_W
    call pv_machine_pte
    mov dword ptr [pt_high2], eax
#else
    mov eax, pt_high2
    or eax, PTE_P | PTE_W
    mov dword ptr [page_dir2 + 4 * (HIGH_VA >> 22)], eax
    mov dword ptr [pt_high2], FRAME_B | PTE_P | PTE_W
#endif
    mov dword ptr [FRAME_A], 0xAAAAAAAA
    mov dword ptr [FRAME_B], 0xBBBBBBBB
    mov eax, dword ptr [HIGH_VA]                # address space 1: frame A
    mov edx, page_dir2
    WRITE_CR3(edx)
    mov ecx, dword ptr [HIGH_VA]                # address space 2: frame B
    mov edx, page_dir
    WRITE_CR3(edx)
    mov edx, dword ptr [HIGH_VA]                # back in 1
    CHECK_EQ("address space 1 maps 0xC0000000 to frame A", eax, 0xAAAAAAAA)
    CHECK_EQ("after mov cr3 to space 2, 0xC0000000 maps to frame B", ecx, 0xBBBBBBBB)
    CHECK_EQ("after mov cr3 back to space 1, frame A again", edx, 0xAAAAAAAA)

    # --- PTE change + invlpg -------------------------------------------------------------------------
    mov dword ptr [FRAME_C], 0xCCCCCCCC
    mov eax, dword ptr [HIGH_VA]                # make sure the old translation is in the TLB
#if PV
    mov edi, pt_high                            # PV: a validated update (mmu_update)
    mov eax, FRAME_C | PTE_P | PTE_W
    call pv_machine_pte
    call pv_set_pte
#else
    mov dword ptr [pt_high], FRAME_C | PTE_P | PTE_W
#endif
    mov eax, HIGH_VA
    INVLPG(eax)
    mov eax, dword ptr [HIGH_VA]
    CHECK_EQ("after a PTE change and invlpg the new frame is visible", eax, 0xCCCCCCCC)
#if PV
    mov edi, pt_high
    mov eax, FRAME_A | PTE_P | PTE_W
    call pv_machine_pte
    call pv_set_pte
#else
    mov dword ptr [pt_high], FRAME_A | PTE_P | PTE_W
#endif
    mov eax, HIGH_VA
    INVLPG(eax)

    # --- 4 MiB pages -------------------------------------------------------------------------------------
    mov dword ptr [BIG_VA + 0x3FF004], 0x55B16B16
    CHECK_EQ("a 4 MiB page (CR4.PSE, PDE.PS) maps 0xE03FF004 to physical 0x7FF004", dword ptr [BIG_PA + 0x3FF004], 0x55B16B16)
    mov eax, dword ptr [page_dir + 4 * (BIG_VA >> 22)]
    and eax, PTE_A | PTE_D
    CHECK_EQ("the CPU sets A and D in a 4 MiB PDE it writes through", eax, PTE_A | PTE_D)

    # --- CR0.WP: ring 0 may not write a read-only page --------------------------------------------------
    mov dword ptr [pf_count], 0
    mov eax, dword ptr [RO_PAGE]                # reading is fine
    CHECK_EQ("reading a read-only page does not fault", dword ptr [pf_count], 0)
    mov dword ptr [RO_PAGE + 4], 0x66600666     # #PF; the handler makes the page writable; retry
    CHECK_EQ("a ring-0 write to a read-only page with CR0.WP = 1 raises #PF", dword ptr [pf_count], 1)
    CHECK_EQ("#PF error code for a ring-0 write to a present read-only page is 3", dword ptr [pf_error], PF_P | PF_W)
    CHECK_EQ("#PF sets CR2 to the read-only address", dword ptr [pf_cr2], RO_PAGE + 4)
    CHECK_EQ("the write is retried once the page is writable", dword ptr [RO_PAGE + 4], 0x66600666)
    ret

# pf_handler: ebx = trap frame. Not present: map the next pool frame at CR2's page. Present
# (a protection fault): make the page writable. Then invalidate the TLB entry and return, so
# that the faulting instruction is executed again.
pf_handler:
    inc dword ptr [pf_count]
    cmp dword ptr [pf_count], PF_LIMIT
    ja isr_unexpected
    READ_CR2
    mov dword ptr [pf_cr2], eax
    mov edx, dword ptr [ebx + FRAME_ERROR]
    mov dword ptr [pf_error], edx
    READ_CR3(edi)
    and edi, 0xFFFFF000
    call pte_address                    # eax = &PTE for CR2
    test edx, PF_P
    jnz pf_make_writable
    mov edx, dword ptr [pf_next_frame]
    add dword ptr [pf_next_frame], 0x1000
    or edx, PTE_P | PTE_W
#if PV
    mov edi, eax                        # PV: mmu_update, with the frame's machine address
    mov eax, edx
    call pv_machine_pte
    call pv_set_pte
#else
    mov dword ptr [eax], edx
#endif
    jmp pf_flush
pf_make_writable:
#if PV
    mov edi, eax
    mov eax, dword ptr [edi]
    or eax, PTE_W
    call pv_set_pte
#else
    or dword ptr [eax], PTE_W
#endif
pf_flush:
    mov eax, dword ptr [pf_cr2]
    INVLPG(eax)
    ret

.data
.align 4
pf_count:      .long 0
pf_cr2:        .long 0
pf_error:      .long 0xFFFFFFFF
pf_next_frame: .long DEMAND_POOL

.bss
.align 4096
pt_high:   .zero 4096
pt_demand: .zero 4096
page_dir2: .zero 4096
pt_high2:  .zero 4096
