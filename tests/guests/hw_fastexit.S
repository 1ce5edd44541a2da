# description: many cpuid, rdtsc, pause, invlpg, mov from CR2/CR3 and mov to CR0/CR3/CR4 (as kvm-unit-tests' vmexit and eventinj do), interleaved with exits only Python takes (port I/O, rdmsr, a CR0 write that changes a host-owned bit): hw answers the first kind in C, and every result must be the Python path's
#include "kernel.inc"
#include "paging.inc"
.text
main:
    mov esi, page_table_low
    mov edi, page_dir
    mov eax, PTE_P | PTE_W
    call paging_identity_4m
    mov eax, page_dir
    call paging_enable
    xor ebp, ebp                        # checksum of every cpuid answer
    mov edi, 3000                       # iterations
fx_loop:
    mov eax, edi
    and eax, 7                          # leaves 0-7: some in the model's table, some not
    cmp eax, 5
    jb fx_leaf
    or eax, 0x80000000
fx_leaf:
    mov ecx, edi
    cpuid
    xor ebp, eax
    rol ebp, 3
    xor ebp, ebx
    xor ebp, ecx
    xor ebp, edx
    pause                               # no PAUSE exiting: nothing to do
    rdtsc                               # no RDTSC exiting: the virtual clock
    xor ebp, eax
    mov eax, cr0                        # CR0.WP and CR4.PGE are guest-owned: no exit
    xor eax, CR0_WP
    mov cr0, eax
    xor eax, CR0_WP
    mov cr0, eax
    mov eax, cr3                        # a CR3 load: no exit without CR3-load exiting (EPT)
    mov cr3, eax
    invlpg [edi]                        # no INVLPG exiting: nothing to do
    mov eax, cr2                        # a CR2 read never exits
    mov eax, cr4
    xor eax, 0x80
    mov cr4, eax
    xor eax, 0x80
    mov cr4, eax
    test edi, 63
    jnz fx_next
    mov eax, ebp                        # an I/O exit (the UART) now and then
    call print_hex32
    mov al, 10
    call putc
    mov ecx, 0x1B                       # IA32_APIC_BASE: an MSR exit
    rdmsr
    mov eax, cr0                        # CR0.MP is host-owned: a CR_ACCESS exit each way
    xor eax, 2
    mov cr0, eax
    xor eax, 2
    mov cr0, eax
fx_next:
    dec edi
    jnz fx_loop
    mov eax, ebp
    call print_hex32
    mov al, 10
    call putc
    PASS("cpuid and CR writes")
    ret
