"""The PS/2 keyboard controller (Intel 8042) at ports 0x60 (data) and 0x64 (status / command),
present and empty: no key is ever pressed, no mouse is attached.

A kernel that polls or takes IRQ 1 reads the status register (bit 0, output buffer full, is what
it tests) and must find nothing there: with no controller at all the port reads 0xFF and such a
kernel sees an endless stream of phantom bytes (xv6's console does). The status value is QEMU's
after SeaBIOS has run its self-test: system flag (bit 2), last write was a command (bit 3),
keyboard not inhibited (bit 4). Commands written to 0x64 are accepted and ignored (the reset pulse
0xFE included); the data port reads the last byte the controller produced, 0 here.
"""
from __future__ import annotations

DATA_PORT, STATUS_PORT = 0x60, 0x64
STATUS_OUTPUT_FULL = 0x01
STATUS_SYSTEM = 0x04
STATUS_COMMAND = 0x08
STATUS_UNLOCKED = 0x10


class I8042:
    def __init__(self):
        self.status = STATUS_SYSTEM | STATUS_COMMAND | STATUS_UNLOCKED
        self.data = 0

    def read(self, port: int, size: int) -> int:
        return self.status if port == STATUS_PORT else self.data

    def write(self, port: int, size: int, value: int) -> None:
        if port == STATUS_PORT:
            self.status |= STATUS_COMMAND
        else:
            self.status &= ~STATUS_COMMAND
