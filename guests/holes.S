# description: Popek-Goldberg litmus test: sensitive but unprivileged instructions (popf, sgdt, sidt, smsw, mov cs, push cs, str, sldt) at ring 0
#
# Each of these instructions reads or changes privileged state yet does not trap at CPL > 0,
# which is why the x86 could not be virtualized by trap-and-emulate alone (Popek & Goldberg 1974;
# Robin & Irvine 2000). The guest runs them at what it believes is CPL 0 and checks that they
# show or change exactly what a real ring 0 would. On hardware, or under a hypervisor that
# handles them (binary translation, paravirtualization, VT-x), every check passes; under a
# deprivileging trap-and-emulate monitor (the guest kernel really at ring 1) they FAIL.
#include "kernel.inc"

.text
main:
    # All 8259 lines are masked (kernel.inc), so turning IF on here lets no interrupt in.

    # --- popf must change IF ------------------------------------------------------------------------
    cli
    pushfd
    or dword ptr [esp], EFLAGS_IF
    popfd                               # IF := 1 through popf
    pushfd
    pop eax
    cli
    and eax, EFLAGS_IF
    CHECK_EQ("popf sets IF: pushf then shows IF = 1", eax, EFLAGS_IF)
    sti
    pushfd
    and dword ptr [esp], ~EFLAGS_IF
    popfd                               # IF := 0 through popf
    pushfd
    pop eax
    cli
    and eax, EFLAGS_IF
    CHECK_EQ("popf clears IF: pushf then shows IF = 0", eax, 0)

    # --- descriptor-table registers ------------------------------------------------------------------
    sgdt [sgdt_buf]
    CHECK_MEM_EQ("sgdt returns the base and limit loaded with lgdt", sgdt_buf, gdtr, 6)
    sidt [sidt_buf]
    CHECK_MEM_EQ("sidt returns the base and limit loaded with lidt", sidt_buf, idtr, 6)

    # --- smsw ------------------------------------------------------------------------------------------
    smsw eax
    and eax, 0xFFFF
    mov edx, cr0
    and edx, 0xFFFF
    CHECK_EQ("smsw equals the low 16 bits of CR0", eax, edx)

    # --- the current privilege level shows in CS -----------------------------------------------------
    xor eax, eax
    mov ax, cs
    CHECK_EQ("mov ax, cs gives the ring-0 code selector 0x08 (RPL 0)", eax, KERNEL_CS)
    push cs
    pop eax
    and eax, 0xFFFF                     # a 32-bit push of a segment register writes 16 bits
    CHECK_EQ("push cs pushes the ring-0 code selector 0x08 (RPL 0)", eax, KERNEL_CS)

    # --- task register and LDT register -----------------------------------------------------------------
    xor eax, eax
    str ax
    CHECK_EQ("str returns the selector loaded with ltr (0x28)", eax, TSS_SEL)
    mov ax, LDT_SEL
    lldt ax
    xor eax, eax
    sldt ax
    CHECK_EQ("sldt returns the selector loaded with lldt (0x30)", eax, LDT_SEL)
    xor eax, eax
    lldt ax
    ret

.data
.align 4
sgdt_buf: .zero 8
sidt_buf: .zero 8
