# description: page 0 and the top of RAM are usable; unbacked guest-physical memory reads all-ones; the APIC answers by MMIO
#include "kernel.inc"

#define UNBACKED    0xFEB00000          // in the PCI hole, below the I/O APIC: no device there
#define APIC_VER    0xFEE00030

.text
main:
    mov dword ptr [0], 0x12345678
    mov eax, dword ptr [0]
    CHECK_EQ("page 0 is usable RAM", eax, 0x12345678)
    # the last dword of RAM: mem_upper (KiB above 1 MiB) + 1 MiB + the 128 KiB the firmware keeps
    mov ebx, dword ptr [boot_info]
    mov edi, dword ptr [ebx + 8]
    shl edi, 10
    add edi, 0x100000 + 0x20000 - 4
    mov dword ptr [edi], 0xCAFEF00D
    mov eax, dword ptr [edi]
    CHECK_EQ("the last dword of RAM is usable", eax, 0xCAFEF00D)
    mov eax, dword ptr [UNBACKED]
    CHECK_EQ("unbacked guest-physical memory reads all-ones", eax, 0xFFFFFFFF)
    mov dword ptr [UNBACKED + 0x10], 0
    mov eax, dword ptr [UNBACKED + 0x10]
    CHECK_EQ("and ignores writes", eax, 0xFFFFFFFF)
    mov eax, dword ptr [APIC_VER]
    CHECK_EQ("the local APIC answers at 0xFEE00000", eax, 0x00050014)
    ret
