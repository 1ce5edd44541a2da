"""How a PC guest asks for a reset: port 0x92's fast reset and the PIIX3's reset control register 0xCF9.

(The 8042's reset line is in i8042.py.) A reset request calls `on_reset(why)`. cpuvirt's reference,
QEMU started with `-no-reboot` (DESIGN.md section 2), powers off at a reset request, so the machine
ends the run there (outcome `reset`, status 125, as for the other reset a PC knows, the triple
fault). Values as QEMU 7.2's hw/i386/port92.c and PIIX3 reset control, and as SeaBIOS leaves them.
"""

from __future__ import annotations

from typing import Callable

PORT92 = 0x92
RCR_PORT = 0xCF9


class Port92:
    """System Control Port A: bit 1 is the A20 gate (always on in pc-lite: the bit is only kept), bit 0
    the fast reset, on its 0 -> 1 transition. Reads what was written; SeaBIOS leaves 0x02 (measured)."""

    def __init__(self, on_reset: Callable[[str], None]):
        self.on_reset = on_reset
        self.outport = 0x02

    def read(self, port: int, size: int) -> int:
        return self.outport

    def write(self, port: int, size: int, value: int) -> None:
        old, self.outport = self.outport, value & 0xFF
        if value & 1 and not old & 1:
            self.on_reset("port 0x92 fast reset")


class ResetControl:
    """The PIIX3's reset control register at 0xCF9, a byte inside the PCI configuration-address port
    (0xCF8-0xCFB): byte accesses to 0xCF9 are the register's, every other access goes to the PCI bus,
    as in QEMU. Bit 2 set resets (bit 1 chooses hard or soft: both end the run); bit 1 is kept."""

    def __init__(self, pci, on_reset: Callable[[str], None]):
        self.pci, self.on_reset = pci, on_reset
        self.rcr = 0

    def read(self, port: int, size: int) -> int:
        if port == RCR_PORT and size == 1:
            return self.rcr
        return self.pci.read(port, size)

    def write(self, port: int, size: int, value: int) -> None:
        if port == RCR_PORT and size == 1:
            self.rcr = value & 2
            if value & 4:
                self.on_reset("reset control register 0xCF9")
            return
        self.pci.write(port, size, value)
