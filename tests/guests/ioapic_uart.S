# description: bytes typed into COM1 (scripted input) arrive as interrupts through the I/O APIC, as xv6 takes them
#include "kernel.inc"
#define IOAPIC      0xFEC00000
#define IOWIN       0xFEC00010
#define LAPIC_EOI   0xFEE000B0
#define VEC_COM1    0x24
.text
main:
    SET_HANDLER(VEC_COM1, com1_irq)
    mov al, 0xFF                        # the 8259s masked, as xv6's picinit leaves them
    out PIC1_DATA, al
    out PIC2_DATA, al
    mov dword ptr [IOAPIC], 1
    mov eax, dword ptr [IOWIN]
    CHECK_EQ("I/O APIC version register: 24 pins, version 0x11", eax, 0x00170011)
    mov dword ptr [IOAPIC], 0x18        # pin 4 (COM1): low dword starts masked
    mov eax, dword ptr [IOWIN]
    CHECK_EQ("redirection entry 4 starts masked", eax, 0x10000)
    mov dword ptr [IOAPIC], 0x19
    mov dword ptr [IOWIN], 0            # destination: APIC ID 0
    mov dword ptr [IOAPIC], 0x18
    mov dword ptr [IOWIN], VEC_COM1     # edge, active high, fixed, unmasked
    mov dx, COM1_IER
    mov al, 1                           # received data available
    out dx, al
wait_input:
    sti
    hlt                                 # woken by the byte's interrupt
    cli
    cmp dword ptr [count], 3
    jb wait_input
    CHECK_EQ("three bytes came by interrupt", dword ptr [count], 3)
    CHECK_EQ("in the order typed", dword ptr [bytes], 0x00636261)
    mov dx, COM1_IER
    xor al, al
    out dx, al
    ret
com1_irq:
    mov dx, COM1_LSR
    in al, dx
    test al, 1
    jz com1_done
    mov dx, COM1
    in al, dx
    mov ecx, dword ptr [count]
    mov byte ptr [bytes + ecx], al
    inc dword ptr [count]
    jmp com1_irq
com1_done:
    mov dword ptr [LAPIC_EOI], 0
    ret
.data
count: .long 0
bytes: .long 0
