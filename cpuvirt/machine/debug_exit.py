"""isa-debug-exit: the port a guest writes to end the machine with a status.

QEMU's `-device isa-debug-exit,iobase=0xf4,iosize=0x04` exits QEMU with status (v << 1) | 1
when the guest writes v; cpuvirt's status is v itself (DESIGN.md section 6). Reads return 0,
as QEMU's debug_exit_read does (measured: `inb`/`inl` of 0xF4 under QEMU read 0).
"""

from __future__ import annotations

from typing import Callable

DEBUG_EXIT_PORT = 0xF4
DEBUG_EXIT_SIZE = 4


class DebugExit:
    """Ports 0xF4-0xF7, taking 1-, 2- and 4-byte writes (register it with `wide=True`).

    A write stores the value in `value` and calls `on_exit(value & 0xFF)`, the low byte being
    what a process exit status can carry. The machine is to stop after the writing instruction.
    """

    def __init__(self, on_exit: Callable[[int], None]):
        self.on_exit = on_exit
        self.value: int | None = None

    def read(self, port: int, size: int) -> int:
        return 0

    def write(self, port: int, size: int, value: int) -> None:
        self.value = value
        self.on_exit(value & 0xFF)
