"""A cache-line model of virtqueue memory: how many 64-byte lines move between the driver's CPU and
the backend's for each frame (a measurement mode: `--device virtio-net,...,cachelines=on`).

On a real host the driver (a vCPU) and the backend (a vhost thread, a DPDK core) run on different
cores, and every ring line one side wrote and the other then reads or writes crosses between their
caches. The model keeps, for each line of each ring (descriptor table, available ring, used ring),
the side that last wrote it and the sides holding a valid copy (MESI reduced to what counts here):
an access by a side that holds no valid copy of a line the other side wrote is one transfer; a write
leaves only the writer holding the line. Lines no one has written yet cost nothing (first touches
are not transfers). Frame buffers are not modelled: each byte of a frame crosses once whatever the
ring layout.

The driver's accesses come from an engine memory hook on each ring, added when the driver sets the ring
up (the engine reports host-physical addresses, so guest paging and the mode's memory virtualization
do not matter; the counts equal those of one hook over all of RAM set before the guest starts): a
Python call per guest load or store in a ring, which is why this is a measurement mode, off by default.
The device's accesses come from the GuestRam the ring code reads and writes through. A vhost-user backend
process started by cpuvirt reports the ring lines its data path touched (and whether it wrote them)
after each in-band kick, before acknowledging it (`vhost-user-backend --report-fd`); one started by
someone else (`socket=`) cannot be observed.
"""

from __future__ import annotations

from unicorn import UC_HOOK_MEM_READ, UC_HOOK_MEM_WRITE, UC_MEM_WRITE

from cpuvirt.memory.p2m import RAM_HPA
from cpuvirt.virtio.virtqueue import GuestRam

LINE_SHIFT = 6  # 64-byte lines
DRIVER, DEVICE = 0, 1


class CacheLineModel:
    KEYS = ("cachelines_to_driver", "cachelines_to_device")

    def __init__(self, counters: dict):
        self.rings: list[tuple[int, int]] = []  # [lo, hi) guest-physical ranges
        self.owner: dict[int, int] = {}  # line -> the side that last wrote it
        self.holders: dict[int, int] = {}  # line -> bit mask of sides with a valid copy
        self.counters = counters  # the NIC's counters: the two KEYS are added
        self.uc = None
        self._hooks: list = []
        for key in self.KEYS:
            counters[key] = 0

    def add_ring(self, lo: int, hi: int) -> None:
        self.rings.append((lo, hi))
        if self.uc is not None:
            self._hooks.append(
                self.uc.hook_add(
                    UC_HOOK_MEM_READ | UC_HOOK_MEM_WRITE, self._hook, begin=RAM_HPA + lo, end=RAM_HPA + hi - 1
                )
            )

    def touch(self, side: int, gpa: int, size: int, write: bool) -> None:
        end = gpa + size
        for lo, hi in self.rings:
            if gpa < hi and end > lo:
                break
        else:
            return
        bit = 1 << side
        for line in range(max(gpa, lo) >> LINE_SHIFT, ((min(end, hi) - 1) >> LINE_SHIFT) + 1):
            held = self.holders.get(line, 0)
            if not held & bit and self.owner.get(line, side) != side:
                self.counters[self.KEYS[side]] += 1
            if write:
                self.owner[line] = side
                self.holders[line] = bit
            else:
                self.holders[line] = held | bit

    def device_lines(self, lines) -> None:
        """A backend process's report: [line, written] for each ring line its data path touched during
        one kick, in first-touch order (vhost_user_backend.Connection._report). While the device runs
        the driver is stopped at its kick, so applying the lines then keeps the order of the accesses."""
        bit = 1 << DEVICE
        for line, written in lines:
            if not any(lo >> LINE_SHIFT <= line <= (hi - 1) >> LINE_SHIFT for lo, hi in self.rings):
                continue
            held = self.holders.get(line, 0)
            if not held & bit and self.owner.get(line, DEVICE) != DEVICE:
                self.counters[self.KEYS[DEVICE]] += 1
            if written:
                self.owner[line] = DEVICE
                self.holders[line] = bit
            else:
                self.holders[line] = held | bit

    # -- where the accesses come from ----------------------------------------------------------------
    def watch_cpu(self, uc) -> None:
        """The driver side: guest loads and stores in the rings, through an engine memory hook per ring
        (the engine reports host-physical addresses, after the TLB: guest RAM sits at RAM_HPA)."""

        def hook(_uc, access, address, size, _value, _data):
            self.touch(DRIVER, address - RAM_HPA, size, access == UC_MEM_WRITE)

        self._hook = hook  # the engine keeps only a pointer: hold the callable
        self.uc = uc

    def device_ram(self, ram: GuestRam) -> GuestRam:
        """The device side: the same RAM, every access told to the model first."""
        read, write = ram._read, ram._write

        def seen_read(gpa, n):
            self.touch(DEVICE, gpa, n, False)
            return read(gpa, n)

        def seen_write(gpa, data):
            self.touch(DEVICE, gpa, len(data), True)
            write(gpa, data)

        return GuestRam(ram.size, seen_read, seen_write, ram._refusal)
