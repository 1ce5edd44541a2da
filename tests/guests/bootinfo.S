# description: prints the kernel command line and every module's string and size from multiboot_info
#include "kernel.inc"

.text
main:
    mov ebx, dword ptr [boot_info]
    mov esi, cmdline_text
    call puts
    mov esi, dword ptr [ebx + 16]
    call puts
    call newline
    mov ecx, dword ptr [ebx + 20]       # mods_count
    mov edi, dword ptr [ebx + 24]       # mods_addr
bootinfo_module:
    test ecx, ecx
    jz bootinfo_done
    mov esi, module_text
    call puts
    mov esi, dword ptr [edi + 8]
    call puts
    mov esi, size_text
    call puts
    mov eax, dword ptr [edi + 4]
    sub eax, dword ptr [edi]
    call print_dec
    mov esi, first_text
    call puts
    mov esi, dword ptr [edi]
    mov al, byte ptr [esi]
    call print_hex8
    call newline
    add edi, 16
    dec ecx
    jmp bootinfo_module
bootinfo_done:
    ret

.data
cmdline_text: .asciz "cmdline="
module_text:  .asciz "module="
size_text:    .asciz " size="
first_text:   .asciz " first byte="
