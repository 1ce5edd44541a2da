# description: reads guest-physical memory beyond its RAM (hw: an EPT violation, emulated as unassigned memory: all-ones)
#include "kernel.inc"
.text
main:
    mov eax, dword ptr [0x7000000]      # 112 MiB: outside the 32 MiB of RAM
    ret
