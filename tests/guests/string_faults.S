# description: string instructions that fault on fresh pages: rep stosd over 16 pages, rep stosb from an odd address over 3, lodsd and repne scasb reading pages not touched yet
#
# Under shadow paging each first touch of a page is a hidden fault, under hw --no-ept a #PF exit whose
# qualification is the exact address (EDI or ESI as it is when the access faults): tests/test_hw_shadow_peek.py
# compares the one cpu/_delivery.c decodes (delivery_fault_linear) with x86/faultaddr.py's. xv6's memset is
# rep stosd: half of its usertests' #PF exits under --no-ept.
#include "kernel.inc"
#include "paging.inc"

#define AREA 0x00200000                 // 20 fresh pages: 2 MiB and up, inside the identity-mapped 4 MiB

.text
main:
    PAGING_IDENTITY_4M_ON(PTE_P | PTE_W)
    cld

    mov edi, AREA                       # 16 pages of 0x5A5A5A5A
    mov eax, 0x5A5A5A5A
    mov ecx, 16 * 1024
    rep stosd
    CHECK_EQ("rep stosd filled 16 pages", dword ptr [AREA + 16 * 4096 - 4], 0x5A5A5A5A)

    mov edi, AREA + 16 * 4096 + 1       # 3 pages less a byte of 0x11, from an odd address
    mov al, 0x11
    mov ecx, 3 * 4096 - 1
    rep stosb
    CHECK_EQ("rep stosb from an odd address", dword ptr [AREA + 19 * 4096 - 4], 0x11111111)

    mov esi, AREA + 19 * 4096           # lodsd from a page not touched yet
    lodsd
    CHECK_EQ("lodsd read a fresh page", eax, 0)

    mov edi, AREA + 20 * 4096 - 8       # repne scasb for a byte that is not there, into a fresh page
    mov al, 0x33
    mov ecx, 16
    repne scasb
    CHECK_EQ("repne scasb scanned 16 bytes", edi, AREA + 20 * 4096 + 8)
    PASS("string instructions on fresh pages")
    ret
