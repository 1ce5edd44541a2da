"""Port 0x80, the POST diagnostic port: firmware writes progress codes here and kernels
write to it for a short I/O delay. Writes are ignored; reads give 0xFF (QEMU's ioport80,
measured under QEMU)."""

from __future__ import annotations

POST_PORT = 0x80


class PostPort:
    def read(self, port: int, size: int) -> int:
        return 0xFF

    def write(self, port: int, size: int, value: int) -> None:
        pass
