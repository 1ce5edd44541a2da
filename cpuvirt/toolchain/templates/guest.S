# description: @NAME@: a new guest (edit this line: `cpuvirt guests` shows it)
#
# Build and run:   cpuvirt run @NAME@.S [--mode native|trap|full|para|hw]
# Build an image:  cpuvirt build @NAME@.S -o @NAME@.bin      (it boots under qemu-system-i386 -kernel too)
#
# The syntax is keystone's Intel syntax (`mov eax, 5`, not `movl $5, %eax`: that is a build error).
# kernel.inc gives you a stack, a GDT, an IDT and COM1 output, then calls `main`; returning from
# `main` ends the guest with status 0 if every check passed, 1 otherwise.
#
# Paravirtualization: these three lines give this guest a PV build as well (`--mode para` runs it).
# In the PV build every privileged operation of the shared includes is a hypercall (guests/README.md,
# "Paravirtualized builds"); write privileged instructions in `main` through the same macros
# (IRQ_DISABLE, IRQ_ENABLE, READ_CR3...) or inside `#if !PARAVIRT`. Delete the three lines if you
# want a guest for the unmodified modes only.
#if PV
#define PARAVIRT 1
#endif
#include "kernel.inc"

.text
main:
    # A check prints one line: PASS <name>, or FAIL <name>: expected..., got ...
    mov eax, 6
    imul eax, eax, 7
    CHECK_EQ("6 * 7 is 42", eax, 42)

    # Memory: the guest owns RAM from 0 to the size Multiboot reports; the image sits at 1 MiB.
    mov dword ptr [scratch], 0x1234
    CHECK_EQ("a store reads back", dword ptr [scratch], 0x1234)

    PASS("@NAME@ reached the end of main")
    ret

.data
scratch:
    .long 0
