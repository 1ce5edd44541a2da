"""The PS/2 keyboard controller (Intel 8042) at ports 0x60 (data) and 0x64 (status / command),
present and empty: no key is ever pressed, no mouse is attached.

A kernel that polls or takes IRQ 1 reads the status register (bit 0, output buffer full, is what
it tests) and must find nothing there: with no controller at all the port reads 0xFF and such a
kernel sees an endless stream of phantom bytes (xv6's console does). The status value is QEMU's
after SeaBIOS has run its self-test: system flag (bit 2), last write was a command (bit 3),
keyboard not inhibited (bit 4). Commands written to 0x64 are accepted and ignored, but for the
reset line: 0xFE pulses it, and 0xD1 (write output port) followed by a data byte with bit 0 clear
holds it; both call `on_reset(why)` (machine/reset.py). 0xD0 (read output port) puts the output
port, 0xCF as QEMU reports it after SeaBIOS (measured: reset line and A20 high, the bits QEMU keeps
at 1), in the data register. The data port reads the last byte the controller produced, 0 until then.
"""

from __future__ import annotations

DATA_PORT, STATUS_PORT = 0x60, 0x64
STATUS_OUTPUT_FULL = 0x01
STATUS_SYSTEM = 0x04
STATUS_COMMAND = 0x08
STATUS_UNLOCKED = 0x10


CMD_READ_OUTPUT, CMD_WRITE_OUTPUT, CMD_PULSE_RESET = 0xD0, 0xD1, 0xFE
OUTPUT_PORT = 0xCF


class I8042:
    def __init__(self, on_reset=None):
        self.status = STATUS_SYSTEM | STATUS_COMMAND | STATUS_UNLOCKED
        self.data = 0
        self.on_reset = on_reset
        self._command = None

    def read(self, port: int, size: int) -> int:
        if port == STATUS_PORT:
            return self.status
        self.status &= ~STATUS_OUTPUT_FULL
        return self.data

    def write(self, port: int, size: int, value: int) -> None:
        if port == STATUS_PORT:
            self.status |= STATUS_COMMAND
            self._command = value & 0xFF
            if value == CMD_READ_OUTPUT:
                self.data = OUTPUT_PORT
                self.status |= STATUS_OUTPUT_FULL
            elif value == CMD_PULSE_RESET and self.on_reset is not None:
                self.on_reset("8042 reset pulse (command 0xFE)")
        else:
            self.status &= ~STATUS_COMMAND
            if self._command == CMD_WRITE_OUTPUT and not value & 1 and self.on_reset is not None:
                self.on_reset("8042 output port bit 0 (reset line) cleared")
            self._command = None
