# description: hostile GDT: lgdt to a table outside RAM, then a segment load / an interrupt / a fault
#include "kernel.inc"
#define OUTSIDE 0xF0000000

.text
main:
    lgdt [bad_gdtr]
#if VARIANT == 1
    mov ax, 0x10
    mov ds, ax
#elif VARIANT == 2
    int 0x30
#elif VARIANT == 3
    xor edx, edx
    xor eax, eax
    div edx
#else
    mov eax, dword ptr [0xF8000000]
    mov ax, 0x10
    mov ss, ax
#endif
    FAIL("hostile GDT", "went on")
    ret

.data
bad_gdtr:
    .word 0xFF
    .long OUTSIDE
