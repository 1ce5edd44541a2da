"""The firmware's MP tables and BIOS data area words, as SeaBIOS leaves them under QEMU.

Intel MultiProcessor Specification 1.4, chapter 4: an MP floating pointer structure (16 bytes,
"_MP_", on a 16-byte boundary in the BIOS ROM area 0xF0000-0xFFFFF) pointing to an MP configuration
table (a 44-byte "PCMP" header, then entries: processor 20 bytes, bus, I/O APIC, I/O interrupt
assignment and local interrupt assignment 8 bytes each). Kernels that were written for SMP PCs
(xv6, older Linux) find it by the spec's search order (section 4: the first KiB of the EBDA, whose
segment is the BDA word at 0x40E; else the last KiB of base memory, BDA word 0x413 in KiB; else
0xF0000-0xFFFFF), so the BDA words are written too, with SeaBIOS's values.

Read back from QEMU 7.2 + SeaBIOS 1.16 (`-m 512 -smp 1`, memory dumped through the monitor): floating
pointer at 0xF5BA0, spec revision 4, no IMCR (virtual-wire mode), table at 0xF5BB0, OEM "BOCHSCPU",
product "0.1", local APIC at 0xFEE00000; one processor (APIC ID 0, version 0x14, enabled + BSP,
CPUID signature and feature flags); buses PCI 0 and ISA 1; an I/O APIC (ID 0, version 0x11, enabled,
0xFEC00000); ISA IRQ 0 on pin 2 and the other ISA IRQs on their own pins (5, 9, 10, 11 are left to PCI
there); ExtINT on LINT0 and NMI on LINT1. BDA: EBDA segment 0x9FC0, base memory 639 KiB.

pc-lite has no PCI bus, so its table lists only the ISA bus (bus ID 0) and all 15 ISA IRQs (IRQ 2,
the 8259 cascade, has none, as under SeaBIOS); the processor entry carries cpuvirt's own CPUID.
"""

from __future__ import annotations

import struct

from cpuvirt.machine.apic import APIC_BASE_GPA
from cpuvirt.machine.apic import VERSION as LAPIC_VERSION
from cpuvirt.machine.ioapic import IOAPIC_BASE_GPA, IOAPIC_ID, IOAPIC_VERSION, isa_irq_to_pin

FLOATING_POINTER_GPA = 0xF5BA0
CONFIG_TABLE_GPA = 0xF5BB0
BDA_EBDA_SEGMENT = 0x40E
BDA_BASE_MEMORY_KIB = 0x413
EBDA_SEGMENT = 0x9FC0
BASE_MEMORY_KIB = 639

SPEC_REVISION = 4
OEM_ID = b"BOCHSCPU"
PRODUCT_ID = b"0.1         "
ISA_BUS_ID = 0

# Entry types (MP spec 4.3) and their fields.
PROCESSOR, BUS, IO_APIC, IO_INTERRUPT, LOCAL_INTERRUPT = 0, 1, 2, 3, 4
CPU_ENABLED, CPU_BSP = 1, 2
IOAPIC_ENABLED = 1
INT_VECTORED, INT_NMI, INT_SMI, INT_EXTINT = 0, 1, 2, 3
ALL_LOCAL_APICS = 0xFF


def _checksummed(data: bytearray, at: int) -> bytes:
    """Set byte `at` so that all bytes of `data` sum to 0 modulo 256 (MP spec 4.1, 4.2)."""
    data[at] = (-sum(data)) & 0xFF
    return bytes(data)


def config_table(cpu_signature: int, cpu_features: int, isa_irqs=range(16)) -> bytes:
    """The MP configuration table: header and base entries (spec 4.2, 4.3)."""
    entries = [
        struct.pack(
            "<BBBBII8x", PROCESSOR, 0, LAPIC_VERSION & 0xFF, CPU_ENABLED | CPU_BSP, cpu_signature, cpu_features
        ),
        struct.pack("<BB6s", BUS, ISA_BUS_ID, b"ISA   "),
        struct.pack("<BBBBI", IO_APIC, IOAPIC_ID, IOAPIC_VERSION, IOAPIC_ENABLED, IOAPIC_BASE_GPA),
    ]
    for irq in isa_irqs:
        if irq == 2:
            continue  # the 8259 cascade: not a device interrupt
        entries.append(
            struct.pack("<BBHBBBB", IO_INTERRUPT, INT_VECTORED, 0, ISA_BUS_ID, irq, IOAPIC_ID, isa_irq_to_pin(irq))
        )
    entries.append(struct.pack("<BBHBBBB", LOCAL_INTERRUPT, INT_EXTINT, 0, ISA_BUS_ID, 0, 0, 0))
    entries.append(struct.pack("<BBHBBBB", LOCAL_INTERRUPT, INT_NMI, 0, ISA_BUS_ID, 0, ALL_LOCAL_APICS, 1))
    body = b"".join(entries)
    header = struct.pack(
        "<4sHBB8s12sIHHIHBB",
        b"PCMP",
        44 + len(body),
        SPEC_REVISION,
        0,
        OEM_ID,
        PRODUCT_ID,
        0,
        0,
        len(entries),
        APIC_BASE_GPA,
        0,
        0,
        0,
    )
    return _checksummed(bytearray(header + body), 7)


def floating_pointer(table_gpa: int) -> bytes:
    """The MP floating pointer structure (spec 4.1): one 16-byte paragraph, feature bytes 0
    (a configuration table is present; IMCRP clear: virtual-wire mode, no IMCR to program)."""
    return _checksummed(bytearray(struct.pack("<4sIBBBB4x", b"_MP_", table_gpa, 1, SPEC_REVISION, 0, 0)), 10)


def firmware_blobs(cpu_signature: int, cpu_features: int) -> list[tuple[int, bytes]]:
    """(guest-physical address, bytes) to write before the kernel starts: BDA words, MP tables."""
    return [
        (BDA_EBDA_SEGMENT, struct.pack("<H", EBDA_SEGMENT)),
        (BDA_BASE_MEMORY_KIB, struct.pack("<H", BASE_MEMORY_KIB)),
        (FLOATING_POINTER_GPA, floating_pointer(CONFIG_TABLE_GPA)),
        (CONFIG_TABLE_GPA, config_table(cpu_signature, cpu_features)),
    ]
