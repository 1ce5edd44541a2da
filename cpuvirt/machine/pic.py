"""The PC's two cascaded 8259A interrupt controllers (master 0x20/0x21, slave 0xA0/0xA1).

Follows the Intel 8259A data sheet (Programmable Interrupt Controller, order 231468):
initialization command words ICW1-ICW4, operation command words OCW1 (mask), OCW2 (EOI and
rotation), OCW3 (register read select, poll, special mask), fully nested priority with
rotation, and the INTA sequence that moves a request from IRR to ISR. Where the data sheet
leaves room, QEMU's i8259 is followed, since QEMU is cpuvirt's reference machine. ICW1's LTIM
bit (level mode) is accepted and ignored, as QEMU ignores it; the trigger mode of each IRQ is
the PIIX3's edge/level control register instead (ELCR, ports 0x4D0/0x4D1, as QEMU's i8259 has
it): a level-triggered request follows its line and stays in the IRR after INTA while the line
is high (PCI INTx, shared and level-sensitive).
"""

from __future__ import annotations

MASTER_BASE = 0x20
SLAVE_BASE = 0xA0
ELCR_PORT = 0x4D0  # ELCR1 (IRQ 0-7), ELCR2 (IRQ 8-15) at 0x4D1
ELCR_MASK = (0xF8, 0xDE)  # IRQ 0, 1, 2 and 8, 13 are always edge-triggered (QEMU's elcr_mask)
CASCADE_IRQ = 2
SPURIOUS_IRQ = 7

# What SeaBIOS leaves programmed before it jumps to a Multiboot kernel under QEMU; the vector
# bases are SeaBIOS's BIOS_HWIRQ0_VECTOR / BIOS_HWIRQ8_VECTOR, the masks were read back by a
# probe kernel (IRQ 0, 1, 2, 6 and 8, 12, 13, 14 unmasked).
BIOS_MASTER_VECTOR = 0x08
BIOS_SLAVE_VECTOR = 0x70
BIOS_MASTER_IMR = 0xB8
BIOS_SLAVE_IMR = 0x8E


def _priority(s: "Pic8259", bits: int) -> int:
    """Rank (0 = highest) of the highest-priority bit set in `bits`, 8 when none: IR
    `priority_add` ranks first (data sheet, "Rotation")."""
    if not bits:
        return 8
    add = s.priority_add
    p = 0
    while not bits & (1 << ((p + add) & 7)):
        p += 1
    return p


class Pic8259:
    """One 8259A. Power-on state is QEMU's reset: vector base 0, nothing masked."""

    def __init__(self, is_master: bool):
        self.is_master = is_master
        self.line = 0  # levels of IR0-7 last seen, for edge detection
        self.elcr = 0  # level-triggered IRs (not touched by ICW1, as in QEMU)
        self.reset()

    def reset(self) -> None:
        """What ICW1 does (data sheet, "Initialization Command Words"): clear IMR, ISR and the
        edge latches, priority back to IR0 highest, read select IRR, special mask off."""
        self.irr = 0
        self.isr = 0
        self.imr = 0
        self.line = 0
        self.priority_add = 0
        self.vector_base = 0
        self.read_isr = False
        self.poll = False
        self.special_mask = False
        self.init_state = 0  # next data-port write: 0 OCW1, 1 ICW2, 2 ICW3, 3 ICW4
        self.icw4_needed = False
        self.single = False
        self.auto_eoi = False
        self.rotate_on_auto_eoi = False
        self.special_fully_nested = False

    def best_irq(self) -> int:
        """The IR this chip would signal now, or -1: the highest-priority unmasked request
        that outranks every in-service IR (special mask mode: only unmasked in-service IRs
        block; special fully nested mode: the cascade input of a master never blocks)."""
        rank = _priority(self, self.irr & ~self.imr)
        if rank == 8:
            return -1
        isr = self.isr
        if self.special_mask:
            isr &= ~self.imr
        if self.special_fully_nested and self.is_master:
            isr &= ~(1 << CASCADE_IRQ)
        if rank < _priority(self, isr):
            return (rank + self.priority_add) & 7
        return -1

    def intack(self, irq: int) -> None:
        """One INTA: IRR -> ISR, or with AEOI no ISR bit (and rotation if asked)."""
        bit = 1 << irq
        if self.auto_eoi:
            if self.rotate_on_auto_eoi:
                self.priority_add = (irq + 1) & 7
        else:
            self.isr |= bit
        if not self.elcr & bit:
            self.irr &= ~bit  # a level-triggered request stays while its line is high

    def write_command(self, value: int) -> None:
        if value & 0x10:  # ICW1
            self.reset()
            self.init_state = 1
            self.icw4_needed = bool(value & 0x01)
            self.single = bool(value & 0x02)
        elif value & 0x08:  # OCW3
            if value & 0x04:
                self.poll = True
            if value & 0x02:
                self.read_isr = bool(value & 0x01)
            if value & 0x40:
                self.special_mask = bool(value & 0x20)
        else:  # OCW2
            cmd = value >> 5
            if cmd in (0, 4):  # set / clear rotate in AEOI mode
                self.rotate_on_auto_eoi = cmd == 4
            elif cmd in (1, 5):  # non-specific EOI (5: and rotate)
                rank = _priority(self, self.isr)
                if rank != 8:
                    irq = (rank + self.priority_add) & 7
                    self.isr &= ~(1 << irq)
                    if cmd == 5:
                        self.priority_add = (irq + 1) & 7
            elif cmd == 3:  # specific EOI
                self.isr &= ~(1 << (value & 7))
            elif cmd == 6:  # set priority: IR value & 7 becomes lowest
                self.priority_add = (value + 1) & 7
            elif cmd == 7:  # specific EOI and rotate
                irq = value & 7
                self.isr &= ~(1 << irq)
                self.priority_add = (irq + 1) & 7

    def write_data(self, value: int) -> None:
        state = self.init_state
        if state == 0:  # OCW1
            self.imr = value
        elif state == 1:  # ICW2: T7-T3 of the vector
            self.vector_base = value & 0xF8
            if not self.single:
                self.init_state = 2
            else:
                self.init_state = 3 if self.icw4_needed else 0
        elif state == 2:  # ICW3: cascade wiring, fixed on a PC
            self.init_state = 3 if self.icw4_needed else 0
        else:  # ICW4
            self.special_fully_nested = bool(value & 0x10)
            self.auto_eoi = bool(value & 0x02)
            self.init_state = 0

    def read_port(self, command_port: bool) -> int:
        if self.poll:
            # Poll command (data sheet, "The Poll Command"): the read is the INTA.
            self.poll = False
            irq = self.best_irq()
            if irq < 0:
                return 0
            self.intack(irq)
            return 0x80 | irq
        if command_port:
            return self.isr if self.read_isr else self.irr
        return self.imr

    def set_line(self, irq: int, high: bool) -> None:
        bit = 1 << irq
        if self.elcr & bit:  # level-triggered: IRR follows the line
            if high:
                self.irr |= bit
                self.line |= bit
            else:
                self.irr &= ~bit
                self.line &= ~bit
        elif high:
            if not self.line & bit:
                self.irr |= bit  # rising edge: latch the request
            self.line |= bit
        else:
            self.line &= ~bit  # IRR stays latched until INTA (QEMU)


class Pic8259Pair:
    """Master and slave 8259A cascaded on the master's IR2, as in every PC.

    Devices call `raise_irq(n)` / `lower_irq(n)` for ISA IRQ n (0-15) to drive its line: a
    request is latched on a rising edge and stays latched until acknowledged, even if the line
    falls again (QEMU's behaviour; the data sheet wants IR held until INTA). `pending_vector()`
    is what the CPU would receive now, `acknowledge()` performs the INTA cycle.
    """

    def __init__(self) -> None:
        self.master = Pic8259(is_master=True)
        self.slave = Pic8259(is_master=False)
        self.intr = False  # the master's INT output to the CPU

    def bios_setup(self) -> None:
        """Leave the pair as SeaBIOS does under QEMU: vectors 0x08 and 0x70, ICW4 8086 mode,
        IMR 0xB8 / 0x8E. Call it to reproduce the state a QEMU guest starts in."""
        for _chip, port, vector, cascade, imr in (
            (self.master, MASTER_BASE, BIOS_MASTER_VECTOR, 0x04, BIOS_MASTER_IMR),
            (self.slave, SLAVE_BASE, BIOS_SLAVE_VECTOR, 0x02, BIOS_SLAVE_IMR),
        ):
            for p, v in ((port, 0x11), (port + 1, vector), (port + 1, cascade), (port + 1, 0x01), (port + 1, imr)):
                self.write(p, 1, v)

    def bios_setup_elcr(self, levels: tuple[int, ...]) -> None:
        """SeaBIOS (pciinit.c, piix_isa_bridge_setup) makes the PCI IRQs level-triggered."""
        for irq in levels:
            chip = self.master if irq < 8 else self.slave
            chip.elcr |= (1 << (irq & 7)) & ELCR_MASK[irq >= 8]

    def read_elcr(self, port: int, size: int) -> int:
        return (self.master if port == ELCR_PORT else self.slave).elcr

    def write_elcr(self, port: int, size: int, value: int) -> None:
        index = port != ELCR_PORT
        (self.slave if index else self.master).elcr = value & ELCR_MASK[index]
        self._update()

    def raise_irq(self, irq: int) -> None:
        if irq < 8:
            self.master.set_line(irq, True)
        else:
            self.slave.set_line(irq - 8, True)
        self._update()

    def lower_irq(self, irq: int) -> None:
        if irq < 8:
            self.master.set_line(irq, False)
        else:
            self.slave.set_line(irq - 8, False)
        self._update()

    def pending_vector(self) -> int | None:
        """The vector an INTA would return now, or None when INT is low."""
        if not self.intr:
            return None
        master = self.master
        irq = master.best_irq()
        if irq == CASCADE_IRQ and not master.single:
            irq2 = self.slave.best_irq()
            return self.slave.vector_base + (irq2 if irq2 >= 0 else SPURIOUS_IRQ)
        return master.vector_base + irq

    def acknowledge(self) -> int:
        """The INTA cycle (data sheet, "Interrupt Sequence"): the highest-priority request
        goes from IRR to ISR and its vector is returned. If none is left (the request went
        away), the chip answers IR7 without setting ISR: the spurious vector base + 7; for
        the slave, the master still marks IR2 in service."""
        master = self.master
        irq = master.best_irq()
        if irq < 0:
            vector = master.vector_base + SPURIOUS_IRQ
        else:
            if irq == CASCADE_IRQ and not master.single:
                slave = self.slave
                irq2 = slave.best_irq()
                if irq2 >= 0:
                    slave.intack(irq2)
                else:
                    irq2 = SPURIOUS_IRQ
                vector = slave.vector_base + irq2
            else:
                vector = master.vector_base + irq
            master.intack(irq)
        self._update()
        return vector

    def read(self, port: int, size: int) -> int:
        chip = self.master if port < SLAVE_BASE else self.slave
        if chip.poll:
            value = chip.read_port(not port & 1)
            self._update()
            return value
        return chip.read_port(not port & 1)

    def write(self, port: int, size: int, value: int) -> None:
        chip = self.master if port < SLAVE_BASE else self.slave
        value &= 0xFF
        if port & 1:
            chip.write_data(value)
        else:
            chip.write_command(value)
        self._update()

    def _update(self) -> None:
        """Propagate the slave's INT to master IR2, then recompute the master's INT."""
        if not self.master.single:
            self.master.set_line(CASCADE_IRQ, self.slave.best_irq() >= 0)
        self.intr = self.master.best_irq() >= 0
