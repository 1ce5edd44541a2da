# description: actions the hypervisor refuses or does not implement, each a stop with status 123 and
# its reason on one line (issue 10, item 10). CASE picks one:
#   1: an x87 load from the local APIC's MMIO page (hw emulates MMIO instructions one by one:
#      not this one; native reads the register and goes on)
#   2: clearing CR0.PE (real mode is not virtualized under deprivileging: trap, full)
#include "kernel.inc"
#ifndef CASE
#define CASE 1
#endif
.text
main:
    PASS("start")
#if CASE == 1
    fild dword ptr [0xFEC00000]         # the I/O APIC's IOREGSEL (the local APIC's reads are virtualized)
    fstp st(0)
    PASS("fild from MMIO")
#elif CASE == 2
    mov eax, cr0
    and eax, ~1
    mov cr0, eax
    FAIL("real mode", "went on after clearing CR0.PE")
#endif
    ret
