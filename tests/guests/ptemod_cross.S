# description: a store into a page table that crosses into the next linear page, which maps another frame
#
# The C paths that emulate a guest kernel's store into a page table the shadow traces (trap's fill hook,
# modes/_trapfast.c; hw --no-ept's #PF exit, modes/hw/_fastexit.c) take a store only inside one page: the
# store here starts in the page directory's last bytes, seen through an alias whose next linear page maps a
# plain data frame (not the page directory's neighbour, the page table), so its last two bytes belong there.
# Python's emulation (x86/emulate.py through Mmu.write_linear) writes each part through its own page; a C
# path that wrote the store at the first part's guest-physical address would change the page table's first
# entry instead. The data frame's word and the page table's first entry are summed into a checksum that
# must be native's (tests/test_ptemod_c.py, tests/test_hw_pf_c.py).
#include "kernel.inc"
#include "paging.inc"

#define ROUNDS      24
#define ALIAS       0x00380000          // the page directory's frame, seen here
#define NEXT        0x00381000          // ... and the linear page after it: DATA's frame
#define DATA        0x00390000
#define PTE(p)      page_table_low + 4 * (p >> 12)

.text
main:
    PAGING_IDENTITY_4M_ON(PTE_P | PTE_W)
    mov eax, page_dir
    or eax, PTE_P | PTE_W
    mov dword ptr [PTE(ALIAS)], eax
    mov dword ptr [PTE(NEXT)], DATA | PTE_P | PTE_W
    invlpg [ALIAS]
    invlpg [NEXT]
    mov dword ptr [DATA], 0x00005678
    xor esi, esi                        # the checksum
    mov ecx, ROUNDS
cross:
    # bytes 0xFFE-0xFFF of the page directory (PDE 1023's high half: 0, left 0) and DATA's bytes 0-1 (the count)
    mov eax, ecx
    shl eax, 16
    xor dword ptr [ALIAS + 0xFFE], eax
    add esi, dword ptr [DATA]
    add esi, dword ptr [page_table_low]  # the first PTE, which a store made at the wrong frame would change
    rol esi, 3
    dec ecx
    jnz cross
    mov eax, dword ptr [page_dir + 0xFFC]
    add esi, eax
    mov eax, esi
    call print_hex32
    call newline
    PASS("page-crossing page-table store")
    ret
