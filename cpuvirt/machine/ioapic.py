"""The I/O APIC at guest-physical 0xFEC00000: ISA interrupt lines -> the local APIC.

Follows the Intel 82093AA I/O APIC data sheet (order 290566): two directly addressed registers,
IOREGSEL (offset 0x00, the index) and IOWIN (offset 0x10, the 32-bit window), and behind them
IOAPICID (index 0x00, ID in bits 27:24), IOAPICVER (0x01: maximum redirection entry 23 in bits 23:16,
version 0x11), IOAPICARB (0x02, reads the ID) and 24 redirection-table entries (0x10 + 2n low dword,
0x11 + 2n high dword):

    bits 7:0 vector, 10:8 delivery mode, 11 destination mode (0 physical, 1 logical),
    12 delivery status (read-only, 0: delivery is instantaneous), 13 polarity, 14 remote IRR
    (read-only), 15 trigger mode (1 level), 16 mask, 63:56 destination.

Every entry starts masked. An edge-triggered pin latches a request on a rising edge and sends it
once; a level-triggered pin sends while its line is high and its remote IRR is clear, sets remote IRR,
and is sent again after the local APIC's EOI of that vector if the line is still high.

Where the data sheet and QEMU 7.2 (`hw/intc/ioapic.c`, the reference machine) differ, QEMU is
followed, since guests are checked against it: a request latched on a masked edge-triggered pin is
kept and sent when the pin is unmasked (the data sheet drops it); the 8-bit destination field is
compared whole (the data sheet uses bits 59:56 in physical mode). Not modelled: QEMU's version 0x20
EOI register (offset 0x40; the version read here is the 82093AA's 0x11, the value SeaBIOS writes in
the MP table), polarity inversion (lines are active high, as every ISA line here is), and the
ExtINT, SMI and INIT delivery modes (requests in those modes are dropped; NMI is delivered).

Accesses: IOREGSEL takes byte and dword writes (low byte); IOWIN is 32-bit (a narrower read gives
the low bits, a narrower write is ignored); anything else in the page reads 0 and ignores writes.
The I/O APIC never calls the CPU: requests go to `deliver(vector, level, dest, logical, mode)`,
the machine's path into the local APIC.
"""

from __future__ import annotations

from typing import Callable

IOAPIC_BASE_GPA = 0xFEC00000
IOAPIC_SIZE = 0x1000
IOAPIC_ID = 0  # what QEMU's I/O APIC reports with one CPU (its MP entry says so too)
IOAPIC_VERSION = 0x11  # 82093AA
PINS = 24

IOREGSEL, IOWIN = 0x00, 0x10
REG_ID, REG_VER, REG_ARB, REG_TABLE = 0x00, 0x01, 0x02, 0x10

RTE_VECTOR = 0xFF
RTE_DELIVERY_MODE = 0x700
RTE_DEST_LOGICAL = 1 << 11
RTE_DELIVERY_STATUS = 1 << 12
RTE_POLARITY_LOW = 1 << 13
RTE_REMOTE_IRR = 1 << 14
RTE_LEVEL = 1 << 15
RTE_MASKED = 1 << 16
_RTE_WRITABLE = 0xFF00000000000000 | 0x1AFFF  # everything but delivery status and remote IRR

DM_FIXED, DM_LOWEST, DM_SMI, DM_NMI, DM_INIT, DM_EXTINT = 0, 1, 2, 4, 5, 7

Deliver = Callable[[int, bool, int, bool, int], None]


def isa_irq_to_pin(irq: int) -> int:
    """The I/O APIC input an ISA IRQ line drives: IRQ 0 (the PIT) goes to pin 2, as on QEMU's pc
    machine and in its MP table (the "IRQ0 override"); the others to the pin of their number."""
    return 2 if irq == 0 else irq


class IoApic:
    def __init__(self, deliver: Deliver, on_change: Callable[[], None] | None = None):
        self._deliver = deliver
        self.on_change = on_change or (lambda: None)
        self.id = IOAPIC_ID
        self.regsel = 0
        self.redirection = [RTE_MASKED] * PINS
        self.irr = 0  # requests waiting to be sent, bit n = pin n
        self.lines = 0  # input levels, bit n = pin n

    # -- input pins ----------------------------------------------------------------------------------
    def set_irq(self, pin: int, level: bool) -> None:
        """A device drives input `pin` high or low."""
        bit = 1 << pin
        was = self.lines & bit
        if level:
            self.lines |= bit
        else:
            self.lines &= ~bit
        entry = self.redirection[pin]
        if entry & RTE_LEVEL:
            if level:
                self.irr |= bit
            else:
                self.irr &= ~bit
        elif level and not was:
            self.irr |= bit  # a rising edge latches one request
        else:
            return
        self._service()

    def eoi(self, vector: int) -> None:
        """The local APIC ended a level-triggered interrupt of `vector`: clear the remote IRR of
        the entries sending it, and send again where the line is still high."""
        changed = False
        for pin, entry in enumerate(self.redirection):
            if entry & RTE_REMOTE_IRR and entry & RTE_VECTOR == vector:
                self.redirection[pin] = entry & ~RTE_REMOTE_IRR
                changed = True
        if changed:
            self._service()

    def _service(self) -> None:
        """Send every latched request whose entry is unmasked (and, when level-triggered, whose
        previous interrupt has been EOIed)."""
        pending = self.irr
        sent = False
        while pending:
            pin = (pending & -pending).bit_length() - 1
            pending &= pending - 1
            entry = self.redirection[pin]
            if entry & RTE_MASKED:
                continue
            level = bool(entry & RTE_LEVEL)
            if level:
                if entry & RTE_REMOTE_IRR:
                    continue
                self.redirection[pin] = entry | RTE_REMOTE_IRR
            else:
                self.irr &= ~(1 << pin)
            mode = (entry & RTE_DELIVERY_MODE) >> 8
            if mode in (DM_FIXED, DM_LOWEST, DM_NMI):
                self._deliver(entry & RTE_VECTOR, level, entry >> 56, bool(entry & RTE_DEST_LOGICAL), mode)
                sent = True
        if sent:
            self.on_change()

    # -- the register window (MMIO device interface) ----------------------------------------------
    def read(self, offset: int, size: int) -> int:
        if offset == IOREGSEL:
            return self.regsel
        if offset != IOWIN:
            return 0
        value = self._read_indirect(self.regsel)
        return value & ((1 << (8 * size)) - 1)

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == IOREGSEL:
            self.regsel = value & 0xFF
        elif offset == IOWIN and size == 4:
            self._write_indirect(self.regsel, value & 0xFFFFFFFF)

    def _read_indirect(self, index: int) -> int:
        if index == REG_ID or index == REG_ARB:
            return self.id << 24
        if index == REG_VER:
            return ((PINS - 1) << 16) | IOAPIC_VERSION
        pin, high = divmod(index - REG_TABLE, 2)
        if 0 <= pin < PINS:
            entry = self.redirection[pin]
            return entry >> 32 if high else entry & 0xFFFFFFFF
        return 0

    def _write_indirect(self, index: int, value: int) -> None:
        if index == REG_ID:
            self.id = (value >> 24) & 0xF
            return
        pin, high = divmod(index - REG_TABLE, 2)
        if not 0 <= pin < PINS:
            return  # version, arbitration and unknown indexes are read-only
        old = self.redirection[pin]
        new = (value << 32) | (old & 0xFFFFFFFF) if high else (old & ~0xFFFFFFFF) | value
        new = (new & _RTE_WRITABLE) | (old & RTE_REMOTE_IRR)
        if not new & RTE_LEVEL:
            new &= ~RTE_REMOTE_IRR
        self.redirection[pin] = new
        bit = 1 << pin
        if new & RTE_LEVEL:  # a level entry requests while its line is high
            self.irr = self.irr | bit if self.lines & bit else self.irr & ~bit
        if self.irr & bit:
            self._service()

    def pin_unmasked(self, pin: int) -> bool:
        return not self.redirection[pin] & RTE_MASKED
