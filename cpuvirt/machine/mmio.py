"""The MMIO bus: routes guest-physical memory accesses in device ranges to the device that owns them.

The port bus's twin (bus.py) for memory-mapped devices. A device is anything with
`read(offset, size) -> int` and `write(offset, size, value)`, `offset` counted from the start of its
range; it knows nothing of the CPU, of Unicorn or of how the access reached it. In native mode the
memory-translation module maps each range's pages to a Unicorn MMIO region whose callbacks call
`MmioBus.read`/`write` (Machine.map_mmio); in hw mode an EPT violation can call the same two methods.

Accesses of 1, 2 and 4 bytes go to the device as they are (a device decides what a narrow access
means: the local APIC, like QEMU's, reads 0 and ignores writes narrower than 4 bytes). A wider one
(an 8-byte `movq`, `fild qword`) is split into 4-byte accesses, low address first.

Guest-physical addresses that are neither RAM nor a device range never reach this bus: the
memory-translation module maps them to the all-ones page and reports each page once
(`unbacked_memory`), as before.
"""

from __future__ import annotations

from typing import Callable, Protocol

_MASK = {1: 0xFF, 2: 0xFFFF, 4: 0xFFFFFFFF}


class MmioDevice(Protocol):
    def read(self, offset: int, size: int) -> int: ...
    def write(self, offset: int, size: int, value: int) -> None: ...


class MmioBus:
    """Guest-physical ranges -> devices.

    `on_access(gpa, size, is_write, value)`, when set, is called after every access (the runner
    records it as an `mmio` trace event); it sees the value read or written.
    """

    def __init__(self, on_access: Callable[[int, int, bool, int], None] | None = None):
        self.on_access = on_access
        self.ranges: list[tuple[int, int, MmioDevice]] = []  # (first gpa, end gpa, device), sorted

    def register(self, gpa: int, size: int, device: MmioDevice) -> None:
        """Give `device` the guest-physical bytes gpa .. gpa + size - 1."""
        if size < 1 or gpa < 0 or gpa + size > 1 << 32:
            raise ValueError(f"bad MMIO range {gpa:#x}+{size:#x}")
        for lo, hi, other in self.ranges:
            if gpa < hi and gpa + size > lo:
                raise ValueError(f"MMIO range {gpa:#x}+{size:#x} overlaps {lo:#x}-{hi - 1:#x} ({other!r})")
        self.ranges.append((gpa, gpa + size, device))
        self.ranges.sort(key=lambda r: r[0])

    def unregister(self, gpa: int) -> None:
        """Remove the range that starts at gpa (a PCI memory BAR moved or was disabled)."""
        self.ranges = [r for r in self.ranges if r[0] != gpa]

    def find(self, gpa: int) -> tuple[int, MmioDevice] | None:
        """(range base, device) of the range holding gpa, or None."""
        for lo, hi, device in self.ranges:
            if lo <= gpa < hi:
                return lo, device
        return None

    def bound(self, base: int) -> tuple[Callable[[int, int], int], Callable[[int, int, int], None]]:
        """read(offset, size) and write(offset, size, value) for the range registered at `base`,
        offsets counted from it: what the engine's MMIO callbacks call, with no range lookup on
        the hot path (a kernel like xv6 reads the local APIC's ID on every spinlock). Same
        behaviour as read()/write() at base + offset."""
        hit = self.find(base)
        if hit is None or hit[0] != base:
            raise ValueError(f"no MMIO range starts at {base:#x}")
        device = hit[1]

        def read(offset: int, size: int) -> int:
            if size > 4:
                return self.read(base + offset, size)
            value = device.read(offset, size)
            if self.on_access is not None:
                self.on_access(base + offset, size, False, value)
            return value

        def write(offset: int, size: int, value: int) -> None:
            if size > 4:
                self.write(base + offset, size, value)
                return
            value &= _MASK.get(size, 0xFFFFFFFF)
            device.write(offset, size, value)
            if self.on_access is not None:
                self.on_access(base + offset, size, True, value)

        return read, write

    def read(self, gpa: int, size: int) -> int:
        if size > 4:
            value = 0
            for i in range(0, size, 4):
                value |= self.read(gpa + i, min(4, size - i)) << (8 * i)
            return value
        hit = self.find(gpa)
        value = _MASK.get(size, 0xFFFFFFFF) if hit is None else hit[1].read(gpa - hit[0], size)
        if self.on_access is not None:
            self.on_access(gpa, size, False, value)
        return value

    def write(self, gpa: int, size: int, value: int) -> None:
        if size > 4:
            for i in range(0, size, 4):
                self.write(gpa + i, min(4, size - i), (value >> (8 * i)) & 0xFFFFFFFF)
            return
        value &= _MASK.get(size, 0xFFFFFFFF)
        hit = self.find(gpa)
        if hit is not None:
            hit[1].write(gpa - hit[0], size, value)
        if self.on_access is not None:
            self.on_access(gpa, size, True, value)
