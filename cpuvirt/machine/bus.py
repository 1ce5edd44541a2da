"""The I/O-port bus: routes each `in`/`out` to the device that owns the port.

A device is anything with `read(port, size) -> int` and `write(port, size, value)`
(Firecracker's narrow device interface); it knows nothing of the CPU. Dispatch is one dict
lookup, since a port access is on the hot path of I/O-bound guests.
"""

from __future__ import annotations

from typing import Callable, Protocol

_ONES = (0, 0xFF, 0xFFFF, 0xFFFFFF, 0xFFFFFFFF)


class PortDevice(Protocol):
    def read(self, port: int, size: int) -> int: ...
    def write(self, port: int, size: int, value: int) -> None: ...


class PortBus:
    """Ports 0-0xFFFF. An access is routed by its first port.

    Devices have byte-wide registers unless registered with `wide=True` (they then take 2- and
    4-byte accesses themselves, like isa-debug-exit): a wider access to a byte device is split
    into byte accesses to consecutive ports, little-endian, as QEMU's memory core splits them.
    A port nobody registered reads all-ones and ignores writes, as on an ISA bus with nothing
    driving it; `on_unhandled(port, size, is_write, value)` is called the first time each such
    port is touched, and `unhandled_counts[port]` counts every access.
    """

    def __init__(self, on_unhandled: Callable[[int, int, bool, int], None] | None = None):
        self.on_unhandled = on_unhandled
        self.unhandled_counts: dict[int, int] = {}
        self._devices: dict[int, PortDevice] = {}
        self._wide: set[int] = set()
        self._ioeventfds: dict[tuple[int, int, int], Callable[[], None]] = {}

    def add_ioeventfd(self, port: int, size: int, value: int, notifier: Callable[[], None]) -> None:
        """KVM's ioeventfd with datamatch: a write of exactly `size` bytes of `value` to `port` calls
        `notifier` and nothing else (no device `write`). Registered ahead of time by a vhost set-up."""
        self._ioeventfds[(port, size, value)] = notifier

    def remove_ioeventfd(self, port: int, size: int, value: int) -> None:
        self._ioeventfds.pop((port, size, value), None)

    def register(self, first_port: int, count: int, device: PortDevice, wide: bool = False) -> None:
        """Give `device` the ports first_port .. first_port + count - 1."""
        if count < 1 or first_port < 0 or first_port + count > 0x10000:
            raise ValueError(f"bad port range {first_port:#x}+{count}")
        for port in range(first_port, first_port + count):
            if port in self._devices:
                raise ValueError(f"port {port:#x} is already registered to {self._devices[port]!r}")
        for port in range(first_port, first_port + count):
            self._devices[port] = device
            if wide:
                self._wide.add(port)

    def unregister(self, first_port: int, count: int) -> None:
        """Take the ports first_port .. first_port + count - 1 back (a PCI BAR moved or was disabled)."""
        for port in range(first_port, first_port + count):
            self._devices.pop(port, None)
            self._wide.discard(port)

    def read(self, port: int, size: int) -> int:
        device = self._devices.get(port)
        if device is None:
            return self._unhandled(port, size, False, 0)
        if size == 1 or port in self._wide:
            return device.read(port, size)
        value = 0
        for i in range(size):
            value |= self.read((port + i) & 0xFFFF, 1) << (8 * i)
        return value

    def write(self, port: int, size: int, value: int) -> None:
        if self._ioeventfds:
            notifier = self._ioeventfds.get((port, size, value))
            if notifier is not None:
                notifier()
                return
        device = self._devices.get(port)
        if device is None:
            self._unhandled(port, size, True, value)
        elif size == 1 or port in self._wide:
            device.write(port, size, value)
        else:
            for i in range(size):
                self.write((port + i) & 0xFFFF, 1, (value >> (8 * i)) & 0xFF)

    def _unhandled(self, port: int, size: int, is_write: bool, value: int) -> int:
        counts = self.unhandled_counts
        seen = counts.get(port, 0)
        counts[port] = seen + 1
        if not seen and self.on_unhandled is not None:
            self.on_unhandled(port, size, is_write, value)
        return _ONES[size]
