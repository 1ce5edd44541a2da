# description: Popek-Goldberg litmus test: sensitive but unprivileged instructions (popf, sgdt, sidt, smsw, mov cs, push cs, str, sldt) at ring 0
#
# Each of these instructions reads or changes privileged state yet does not trap at CPL > 0,
# which is why the x86 could not be virtualized by trap-and-emulate alone (Popek & Goldberg 1974;
# Robin & Irvine 2000). The guest runs them at what it believes is CPL 0 and checks that they
# show or change exactly what a real ring 0 would. On hardware, or under a hypervisor that
# handles them (binary translation, paravirtualization, VT-x), every check passes; under a
# deprivileging trap-and-emulate monitor (the guest kernel really at ring 1) they FAIL.
#if PV
#define PARAVIRT 1                      // this guest has a paravirtualized build (guests/include/pvops.inc)
#endif
#include "kernel.inc"

.text
main:
    # All 8259 lines are masked (kernel.inc), so turning IF on here lets no interrupt in.

    # --- popf must change IF ------------------------------------------------------------------------
#if PV
    # PV: IF is evtchn_upcall_mask; popf/pushf are the pvops RESTORE_FL/SAVE_FL (pvops.inc)
    IRQ_DISABLE
    SAVE_FL
    or eax, EFLAGS_IF
    RESTORE_FL                          # IF := 1 through the PV popf
    SAVE_FL
    IRQ_DISABLE
#else
    cli
    pushfd
    or dword ptr [esp], EFLAGS_IF
    popfd                               # IF := 1 through popf
    pushfd
    pop eax
    cli
#endif
    and eax, EFLAGS_IF
    CHECK_EQ("popf sets IF: pushf then shows IF = 1", eax, EFLAGS_IF)
#if PV
    IRQ_ENABLE
    SAVE_FL
    and eax, ~EFLAGS_IF
    RESTORE_FL                          # IF := 0 through the PV popf
    SAVE_FL
    IRQ_DISABLE
#else
    sti
    pushfd
    and dword ptr [esp], ~EFLAGS_IF
    popfd                               # IF := 0 through popf
    pushfd
    pop eax
    cli
#endif
    and eax, EFLAGS_IF
    CHECK_EQ("popf clears IF: pushf then shows IF = 0", eax, 0)

    # --- descriptor-table registers ------------------------------------------------------------------
    SGDT(sgdt_buf)
    CHECK_MEM_EQ("sgdt returns the base and limit loaded with lgdt", sgdt_buf, gdtr, 6)
    SIDT(sidt_buf)
    CHECK_MEM_EQ("sidt returns the base and limit loaded with lidt", sidt_buf, idtr, 6)

    # --- smsw ------------------------------------------------------------------------------------------
    smsw eax                            # PV too: the real machine status word...
    and eax, 0xFFFF
    READ_CR0(edx)                       # ...against the (virtual, under PV) CR0
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
    STR_AX
    CHECK_EQ("str returns the selector loaded with ltr (0x28)", eax, TSS_SEL)
    mov ax, LDT_SEL
    LLDT_AX
    xor eax, eax
    SLDT_AX
    CHECK_EQ("sldt returns the selector loaded with lldt (0x30)", eax, LDT_SEL)
    xor eax, eax
    LLDT_AX
    ret

.data
.align 4
sgdt_buf: .zero 8
sidt_buf: .zero 8
