"""The split virtqueue, device side (virtio 1.x specification 2.7; Linux uapi/linux/virtio_ring.h).

Pure: guest memory is reached only through a `GuestRam`, which refuses any access outside guest RAM
(a device-range or unbacked address included), so a hostile ring can never make the host touch
anything it was not given. Every rule the driver can break raises `RingError` with the reason; the
transport then sets DEVICE_NEEDS_RESET (QEMU's virtio_error does the same). Walking a chain is
bounded by the queue size, so a looping chain ends with an error, never a hang.

Legacy layout (spec 2.7.2 "Legacy Interfaces"): at the page the driver wrote to the PFN register,
the descriptor table (16 bytes x N), the available ring (flags, idx, ring[N], used_event), padding
to the next 4096 boundary, then the used ring (flags, idx, {id, len}[N], avail_event).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

DESC_F_NEXT, DESC_F_WRITE, DESC_F_INDIRECT = 1, 2, 4
AVAIL_F_NO_INTERRUPT = 1
USED_F_NO_NOTIFY = 1
LEGACY_ALIGN = 4096
MAX_QUEUE_SIZE = 32768

_DESC = struct.Struct("<QIHH")


class GuestMemoryError(Exception):
    """A device access to guest-physical memory outside RAM."""


class RingError(Exception):
    """The driver broke a rule of the ring: the device needs a reset."""


class GuestRam:
    """Guest-physical RAM as a bus-mastering device reaches it: 0 .. size - 1, nothing else, and for
    writes not the frames `refusal(gpa, size) -> reason | None` names (para's typed frames)."""

    __slots__ = ("size", "_read", "_write", "_refusal")

    def __init__(self, size: int, read, write, refusal=None):
        self.size, self._read, self._write, self._refusal = size, read, write, refusal

    def check(self, gpa: int, length: int) -> None:
        if gpa < 0 or length < 0 or gpa + length > self.size:
            raise GuestMemoryError(f"{gpa:#x}+{length:#x} is outside guest RAM (0..{self.size - 1:#x})")

    def check_writable(self, gpa: int, length: int) -> None:
        self.check(gpa, length)
        if self._refusal is not None:
            why = self._refusal(gpa, length)
            if why is not None:
                raise GuestMemoryError(f"{gpa:#x}+{length:#x}: {why}")

    def read(self, gpa: int, length: int) -> bytes:
        self.check(gpa, length)
        return self._read(gpa, length) if length else b""

    def write(self, gpa: int, data: bytes) -> None:
        self.check_writable(gpa, len(data))
        if data:
            self._write(gpa, bytes(data))

    def u16(self, gpa: int) -> int:
        return struct.unpack("<H", self.read(gpa, 2))[0]

    def put_u16(self, gpa: int, value: int) -> None:
        self.write(gpa, struct.pack("<H", value & 0xFFFF))


@dataclass
class Chain:
    """One descriptor chain the driver made available: its head, and its buffers in order as
    (guest-physical address, length, device-writable)."""

    head: int
    buffers: list
    indirect: bool = False

    @property
    def readable(self) -> int:
        return sum(n for _, n, w in self.buffers if not w)

    @property
    def writable(self) -> int:
        return sum(n for _, n, w in self.buffers if w)


def legacy_layout(size: int, pfn: int) -> tuple[int, int, int]:
    """(descriptor table, available ring, used ring) addresses of a legacy queue at page `pfn`."""
    desc = pfn << 12
    avail = desc + 16 * size
    used = (avail + 6 + 2 * size + LEGACY_ALIGN - 1) & ~(LEGACY_ALIGN - 1)
    return desc, avail, used


def legacy_bytes(size: int) -> int:
    """Bytes a legacy queue of `size` entries occupies from its first page."""
    _, avail, used = legacy_layout(size, 0)
    return used + 6 + 8 * size


def need_event(event: int, new: int, old: int) -> bool:
    """vring_need_event (spec 2.7.7.2 / 2.7.10): has the index crossed `event` going from old to new?"""
    return (new - event - 1) & 0xFFFF < (new - old) & 0xFFFF


class SplitQueue:
    """The device's view of one split virtqueue: what it has consumed and what it has returned."""

    def __init__(
        self,
        mem: GuestRam,
        size: int,
        desc: int,
        avail: int,
        used: int,
        event_idx: bool = False,
        indirect: bool = False,
    ):
        if size < 1 or size > MAX_QUEUE_SIZE or size & (size - 1):
            raise RingError(f"queue size {size} is not a power of two up to {MAX_QUEUE_SIZE}")
        self.mem, self.size = mem, size
        self.desc, self.avail, self.used = desc, avail, used
        self.event_idx, self.indirect = event_idx, indirect
        try:
            mem.check(desc, 16 * size)
            mem.check(avail, 6 + 2 * size)
            mem.check_writable(used, 6 + 8 * size)
        except GuestMemoryError as e:
            raise RingError(f"ring outside guest RAM: {e}") from None
        self.last_avail = 0  # free-running: the next available entry to consume
        self.used_idx = 0  # free-running: the next used entry to fill
        self.signalled_used = 0  # used index at the last interrupt (EVENT_IDX)

    @classmethod
    def legacy(cls, mem: GuestRam, size: int, pfn: int, **features) -> "SplitQueue":
        return cls(mem, size, *legacy_layout(size, pfn), **features)

    # -- the available side ------------------------------------------------------------------------
    def avail_idx(self) -> int:
        return self._u16(self.avail + 2)

    def pending(self) -> int:
        """Chains made available and not yet consumed; more than the queue holds is a broken ring."""
        n = (self.avail_idx() - self.last_avail) & 0xFFFF
        if n > self.size:
            raise RingError(
                f"available index {self.avail_idx()} is {n} entries ahead of the device's "
                f"{self.last_avail & 0xFFFF}, more than the queue size {self.size}"
            )
        return n

    def pop(self) -> Chain | None:
        """The next available chain, or None; with EVENT_IDX, tells the driver how far we got."""
        if not self.pending():
            return None
        head = self._u16(self.avail + 4 + 2 * (self.last_avail % self.size))
        chain = self._walk(head)
        self.last_avail = (self.last_avail + 1) & 0xFFFF
        if self.event_idx:
            self._put_u16(self.used + 4 + 8 * self.size, self.last_avail)  # avail_event
        return chain

    def _walk(self, head: int) -> Chain:
        if head >= self.size:
            raise RingError(f"chain head {head} is outside the descriptor table (size {self.size})")
        buffers: list = []
        table, limit, index, indirect = self.desc, self.size, head, False
        seen = 0
        seen_writable = False
        while True:
            seen += 1
            if seen > limit:
                raise RingError(f"descriptor chain from head {head} is longer than its table ({limit}): a loop")
            addr, length, flags, nxt = _DESC.unpack(self._read(table + 16 * index, 16))
            if flags & DESC_F_INDIRECT:
                if not self.indirect:
                    raise RingError(f"descriptor {index} is INDIRECT but VIRTIO_F_INDIRECT_DESC was not negotiated")
                if indirect:
                    raise RingError("an indirect table refers to another indirect table")
                if flags & DESC_F_NEXT:
                    raise RingError(f"descriptor {index} sets both INDIRECT and NEXT")
                if length == 0 or length % 16 or length // 16 > MAX_QUEUE_SIZE:
                    raise RingError(f"indirect table length {length} is not a multiple of 16 in (0, 512 KiB]")
                self._check_buffer(addr, length, index)
                table, limit, index, indirect, seen = addr, length // 16, 0, True, 0
                continue
            writable = bool(flags & DESC_F_WRITE)
            self._check_buffer(addr, length, index, writable)
            if seen_writable and not writable:
                raise RingError(f"descriptor {index} is device-readable after a device-writable one")
            seen_writable |= writable
            buffers.append((addr, length, writable))
            if not flags & DESC_F_NEXT:
                return Chain(head, buffers, indirect)
            if nxt >= limit:
                raise RingError(f"descriptor {index} points to next {nxt}, outside its table ({limit})")
            index = nxt

    def _check_buffer(self, addr: int, length: int, index: int, writable: bool = False) -> None:
        try:
            if writable:
                self.mem.check_writable(addr, length)
            else:
                self.mem.check(addr, length)
        except GuestMemoryError as e:
            raise RingError(f"descriptor {index}: buffer {e}") from None

    # -- the used side -----------------------------------------------------------------------------
    def push(self, head: int, written: int) -> None:
        """Return a chain to the driver with `written` bytes written into its device-writable part."""
        slot = self.used + 4 + 8 * (self.used_idx % self.size)
        try:
            self.mem.write(slot, struct.pack("<II", head, written))
        except GuestMemoryError as e:  # the ring's frame changed type since it was set up
            raise RingError(str(e)) from None
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        self._put_u16(self.used + 2, self.used_idx)

    def should_interrupt(self) -> bool:
        """After pushes: does the driver want an interrupt (spec 2.7.10)? EVENT_IDX: only when the
        used index crossed used_event since the last interrupt; otherwise unless NO_INTERRUPT."""
        if self.event_idx:
            used_event = self._u16(self.avail + 4 + 2 * self.size)
            fire = need_event(used_event, self.used_idx, self.signalled_used)
        else:
            fire = not self._u16(self.avail) & AVAIL_F_NO_INTERRUPT
        self.signalled_used = self.used_idx
        return fire

    def buffer_read(self, chain: Chain, limit: int) -> bytes:
        """The device-readable bytes of a chain, at most `limit`."""
        out = bytearray()
        for addr, length, writable in chain.buffers:
            if writable or len(out) >= limit:
                continue
            out += self.mem.read(addr, min(length, limit - len(out)))
        return bytes(out)

    def buffer_write(self, chain: Chain, data: bytes) -> int:
        """Scatter `data` over the chain's device-writable buffers; returns the bytes written."""
        done = 0
        for addr, length, writable in chain.buffers:
            if not writable or done >= len(data):
                continue
            n = min(length, len(data) - done)
            try:
                self.mem.write(addr, data[done : done + n])
            except GuestMemoryError as e:  # checked when the chain was walked; typed since
                raise RingError(str(e)) from None
            done += n
        return done

    # -- guest memory ------------------------------------------------------------------------------
    def _read(self, gpa: int, n: int) -> bytes:
        try:
            return self.mem.read(gpa, n)
        except GuestMemoryError as e:
            raise RingError(str(e)) from None

    def _u16(self, gpa: int) -> int:
        return struct.unpack("<H", self._read(gpa, 2))[0]

    def _put_u16(self, gpa: int, value: int) -> None:
        try:
            self.mem.put_u16(gpa, value)
        except GuestMemoryError as e:
            raise RingError(str(e)) from None
