# description: exits (port I/O, cpuid, mov to and from CR0/CR3) run from code whose guest mapping changes between them: a window whose PTEs are remapped to other frames (with and without invlpg), an instruction crossing a page boundary, code ending where the next page is not present or maps a frame outside RAM, runs with CR0.WP clear and through a 4 MiB page (CR4.PSE toggled), and a read through a page table outside RAM; prints a checksum of every value read
#
# Under hw without EPT the hypervisor reads the guest's code at each exit and intercept (to decode it, to check
# an intercepted instruction's bytes): in C over the guest's tables or in Python through the shadow. Every
# value the guest reads goes into the checksum it prints, so a difference in what either read shows.
#include "kernel.inc"
#include "paging.inc"

WIN = 0x00400000                        # PDE 1: the window sp_pt maps
OUTSIDE = 0xF0000000                    # a guest-physical frame outside RAM
ROUNDS = 64

.text
main:
    push ebx
    push esi
    push edi
    push ebp
    mov esi, page_table_low
    mov edi, page_dir
    mov eax, PTE_P | PTE_W
    call paging_identity_4m
    mov eax, sp_pt
    or eax, PTE_P | PTE_W
    mov dword ptr [page_dir + 4], eax   # PDE 1: the window
    mov dword ptr [page_dir + 12], OUTSIDE | PTE_P | PTE_W   # PDE 3: a page table outside RAM
    mov eax, page_dir
    call paging_enable
    xor ebp, ebp                        # checksum
    xor esi, esi                        # round
sp_loop:
    # Phase a: the window maps sp_a, and sp_a_pad + the page after it (the crossing snippet); invlpg each.
    mov eax, sp_a
    or eax, PTE_P | PTE_W
    mov dword ptr [sp_pt], eax
    mov eax, sp_a_pad
    or eax, PTE_P | PTE_W
    mov dword ptr [sp_pt + 4], eax
    add eax, 0x1000
    mov dword ptr [sp_pt + 8], eax
    invlpg [WIN]
    invlpg [WIN + 0x1000]
    invlpg [WIN + 0x2000]
    call sp_run_both
    # Phase b: other frames behind the same linear pages (no invlpg), the third page not present.
    mov eax, sp_b
    or eax, PTE_P | PTE_W
    mov dword ptr [sp_pt], eax
    mov eax, sp_b_pad
    or eax, PTE_P | PTE_W
    mov dword ptr [sp_pt + 4], eax
    mov dword ptr [sp_pt + 8], 0
    call sp_run_both
    # Phase c: the third page maps a frame outside RAM (the edge snippet's decode window reaches it).
    mov dword ptr [sp_pt + 8], OUTSIDE | PTE_P | PTE_W
    invlpg [WIN + 0x2000]
    call sp_run_both
    mov eax, dword ptr [0x00C00010]     # through the page table outside RAM: all ones
    xor ebp, eax
    test esi, 7
    jnz sp_no_wp
    mov eax, cr0                        # WP is host-owned without EPT: an exit each way
    and eax, ~CR0_WP
    mov cr0, eax
    call sp_run_both
    mov eax, cr0
    or eax, CR0_WP
    mov cr0, eax
sp_no_wp:
    mov eax, esi
    and eax, 7
    cmp eax, 3
    jne sp_no_pse
    mov eax, cr4                        # PSE is host-owned without EPT: an exit each way
    or eax, CR4_PSE
    mov cr4, eax
    mov dword ptr [page_dir + 8], PDE_PS | PTE_P | PTE_W   # PDE 2: 8 MiB.. -> 0.. by a 4 MiB page
    mov eax, sp_b
    add eax, 0x00800000
    push ebx
    call eax
    pop ebx
    xor ebp, eax
    rol ebp, 5
    mov dword ptr [page_dir + 8], 0
    invlpg [0x00800000]
    mov eax, cr4
    and eax, ~CR4_PSE
    mov cr4, eax
sp_no_pse:
    inc esi
    cmp esi, ROUNDS
    jb sp_loop
    mov eax, ebp
    call print_hex32
    call newline
    PASS("code read at exits through changing mappings")
    pop ebp
    pop edi
    pop esi
    pop ebx
    ret

# The window's first page at WIN, then its edge (WIN + 0x1FF0): their results into the checksum.
sp_run_both:
    push ebx
    mov eax, WIN
    call eax
    xor ebp, eax
    rol ebp, 3
    mov eax, WIN + 0x1FF0
    call eax
    xor ebp, eax
    rol ebp, 7
    pop ebx
    ret

# Position-independent snippets (run at WIN): port I/O, cpuid, CR0/CR3 reads and CR0 writes.
.balign 4096
sp_a:
    mov eax, 0x11
    out POST_PORT, al
    in al, 0x21
    mov edx, eax
    xor eax, eax
    cpuid
    xor eax, edx
    mov ecx, cr0
    xor ecx, 8                          # CR0.TS: guest-owned, no exit
    mov cr0, ecx
    xor ecx, 8
    mov cr0, ecx
    xor eax, ecx
    mov ecx, cr3                        # CR3-store exiting without EPT
    xor eax, ecx
    ret
.balign 4096
sp_a_pad:
    .zero 0xFF0
    # 0xFF0: mov ecx, cr0; 11 nops; mov cr0, ecx across the page boundary; in; out; mov ecx, cr3; ret
    .byte 0x0F, 0x20, 0xC1
    .byte 0x90, 0x90, 0x90, 0x90, 0x90, 0x90, 0x90, 0x90, 0x90, 0x90, 0x90
    .byte 0x0F, 0x22, 0xC1
    .byte 0xE4, 0x21, 0xE6, 0x80
    .byte 0x0F, 0x20, 0xD9, 0x31, 0xC8, 0x83, 0xC0, 0x01, 0xC3
.balign 4096
sp_b:
    mov eax, 0x22
    out POST_PORT, al
    in al, 0x21
    add eax, 0x5555
    mov edx, eax
    mov eax, 1
    cpuid
    xor eax, edx
    mov ecx, cr0
    xor ecx, 8
    mov cr0, ecx
    xor ecx, 8
    mov cr0, ecx
    xor eax, ecx
    ret
.balign 4096
sp_b_pad:
    .zero 0xFF0
    # 0xFF0, 16 bytes to the page's end: mov ecx, cr0; mov cr0, ecx; in al, 0x21; out 0x80, al;
    # mov ecx, cr3; xor eax, ecx; ret
    .byte 0x0F, 0x20, 0xC1, 0x0F, 0x22, 0xC1, 0xE4, 0x21, 0xE6, 0x80, 0x0F, 0x20, 0xD9, 0x31, 0xC8, 0xC3
.balign 4096
    .zero 4096

.bss
.align 4096
sp_pt:
    .zero 4096
