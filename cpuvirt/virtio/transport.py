"""Legacy (transitional) virtio over PCI: the I/O-BAR register block, the status state machine, the ISR,
and MSI-X (virtio 1.x specification 4.1.4.8 "Legacy Interfaces: A Note on PCI Device Layout"; Linux
uapi/linux/virtio_pci.h; QEMU hw/virtio/virtio-pci.c for what a guest observes).

BAR0 (I/O, 32 bytes as QEMU sizes it for virtio-net), little-endian:

    0  device features (R32)    4  driver features (RW32)   8  queue PFN (RW32)
    12 queue size (R16)         14 queue select (RW16)      16 queue notify (W16)
    18 device status (RW8)      19 ISR status (R8, read clears it and lowers INTx)
    20 config vector (RW16)     22 queue vector (RW16)      -- only while MSI-X is enabled
    20 or 24: the device-specific configuration (virtio-net: MAC, status)

BAR1 (memory, 4 KiB): the MSI-X table at 0 and the pending-bit array at 0x800, as QEMU's
msix_init_exclusive_bar lays them out; the MSI-X capability is at config offset 0x40.

The initialisation order (spec 3.1.1, legacy variant) is enforced: features, queue set-up and
vectors are accepted only after ACKNOWLEDGE | DRIVER and before DRIVER_OK. Breaking it, or breaking a
ring, sets DEVICE_NEEDS_RESET (64) and raises a configuration-change interrupt; the device then does
nothing until the driver writes status 0. Every step and every error is reported to `trace`.
"""

from __future__ import annotations

import abc
import struct
from typing import TYPE_CHECKING, Any, Protocol

from cpuvirt.machine.pci import CAP_ID_MSIX, PciFunction
from cpuvirt.virtio.virtqueue import GuestRam, RingError, SplitQueue, legacy_bytes

if TYPE_CHECKING:
    from cpuvirt.virtio.cacheline import CacheLineModel

# Register offsets (virtio_pci.h)
HOST_FEATURES, GUEST_FEATURES, QUEUE_PFN, QUEUE_NUM, QUEUE_SEL, QUEUE_NOTIFY = 0, 4, 8, 12, 14, 16
STATUS, ISR, MSI_CONFIG_VECTOR, MSI_QUEUE_VECTOR = 18, 19, 20, 22
CONFIG_OFF, CONFIG_OFF_MSIX = 20, 24
NO_VECTOR = 0xFFFF

# Device status bits (spec 2.1)
ACKNOWLEDGE, DRIVER, DRIVER_OK, FEATURES_OK, DEVICE_NEEDS_RESET, FAILED = 1, 2, 4, 8, 64, 128
ISR_QUEUE, ISR_CONFIG = 1, 2

# Transport feature bits (spec 6)
F_NOTIFY_ON_EMPTY, F_ANY_LAYOUT, F_INDIRECT_DESC, F_EVENT_IDX, F_BAD_FEATURE = 24, 27, 28, 29, 30

VIRTIO_VENDOR = 0x1AF4
IO_BAR_SIZE = 32
ROM_SIZE = 0x40000  # QEMU's virtio-net option ROM (iPXE) BAR: sized, assigned, not decoded here
MSIX_BAR_SIZE = 4096
MSIX_PBA_OFFSET = 0x800
MSIX_CAP = 0x40
MSIX_ENABLE, MSIX_FUNCTION_MASK = 0x8000, 0x4000
MSIX_VECTOR_MASKED = 1

_STATUS_NAMES = (
    (ACKNOWLEDGE, "ACKNOWLEDGE"),
    (DRIVER, "DRIVER"),
    (FEATURES_OK, "FEATURES_OK"),
    (DRIVER_OK, "DRIVER_OK"),
    (DEVICE_NEEDS_RESET, "DEVICE_NEEDS_RESET"),
    (FAILED, "FAILED"),
)


def status_text(status: int) -> str:
    return "|".join(n for b, n in _STATUS_NAMES if status & b) or "0 (reset)"


class QueueState:
    """A queue as the transport sees it: its size, its page, its MSI-X vector, its ring once set up."""

    __slots__ = ("index", "size", "pfn", "vector", "ring")

    def __init__(self, index: int, size: int):
        self.index, self.size = index, size
        self.pfn, self.vector = 0, NO_VECTOR
        self.ring: SplitQueue | None = None


class _IoRegion:
    """BAR0's accesses go to the transport's legacy registers."""

    def __init__(self, transport: "VirtioPciLegacy"):
        self.t = transport

    def read(self, offset: int, size: int) -> int:
        return self.t.io_read(offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        self.t.io_write(offset, size, value)


class _MsixRegion:
    """BAR1: the MSI-X table (16 bytes per vector: address low, high, data, vector control) and PBA."""

    def __init__(self, transport: "VirtioPciLegacy"):
        self.t = transport

    def read(self, offset: int, size: int) -> int:
        t = self.t
        if offset < 16 * t.nvectors:
            return int.from_bytes(t.msix_table[offset : offset + size], "little")
        if MSIX_PBA_OFFSET <= offset < MSIX_PBA_OFFSET + 8:
            pba = t.msix_pending.to_bytes(8, "little")
            at = offset - MSIX_PBA_OFFSET
            return int.from_bytes(pba[at : at + size], "little")
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        t = self.t
        if offset < 16 * t.nvectors:
            t.msix_table[offset : offset + size] = (value & ((1 << 8 * size) - 1)).to_bytes(size, "little")
            t.msix_unmasked(offset // 16)


class DeviceTransport(Protocol):
    """What a device's data path calls on the transport it is plugged into: VirtioPciLegacy here, or
    the worker side of a vhost / vhost-user backend (vhost.py, vhost_user_backend.py)."""

    queues: list[Any]  # by queue index, each with its `ring` (a SplitQueue once set up)

    @property
    def live(self) -> bool: ...
    def trace(self, reason: str, detail: dict, action: str) -> None: ...
    def queue_interrupt(self, index: int) -> None: ...
    def broken(self, why: str) -> None: ...


class VirtioDevice(abc.ABC):
    """What a virtio device type gives the transport (virtio-net: net.py): each type must say its feature
    bits and serve its configuration space; the rest are optional hooks."""

    transport: DeviceTransport  # set by the transport when the device is plugged in

    name = "virtio"
    pci_device_id = 0
    virtio_id = 0
    class_code = 0
    queue_sizes: tuple[int, ...] = ()
    nvectors = 1

    @abc.abstractmethod
    def host_features(self) -> int: ...

    @abc.abstractmethod
    def read_config(self, offset: int, size: int) -> int: ...

    def write_config(self, offset: int, size: int, value: int) -> None: ...
    def notify(self, queue: int) -> None: ...
    def reset(self) -> None: ...
    def activate(self) -> None: ...


class VirtioPciLegacy(PciFunction):
    """A legacy virtio PCI function carrying one `VirtioDevice`."""

    def __init__(self, device: VirtioDevice, ram: GuestRam, trace=None):
        super().__init__(
            device.name,
            VIRTIO_VENDOR,
            device.pci_device_id,
            device.class_code,
            subsystem_vendor=VIRTIO_VENDOR,
            subsystem=device.virtio_id,
            int_pin=1,
        )
        self.device = device
        self.ram = ram
        self.trace = trace or (lambda reason, detail, action: None)
        device.transport = self
        self.nvectors = device.nvectors
        self.add_bar(0, True, IO_BAR_SIZE, _IoRegion(self))
        self.add_bar(1, False, MSIX_BAR_SIZE, _MsixRegion(self))
        self.add_rom_bar(ROM_SIZE)
        # MSI-X capability (PCI 3.0 6.8.2): message control (table size - 1), table BIR 1 offset 0,
        # PBA BIR 1 offset 0x800. Only the enable and function-mask bits are writable.
        body = struct.pack("<HII", self.nvectors - 1, 1, MSIX_PBA_OFFSET | 1)
        self.add_capability(CAP_ID_MSIX, body, b"\x00\xc0" + bytes(8), MSIX_CAP)
        self.msix_table = bytearray(16 * self.nvectors)
        for v in range(self.nvectors):
            self.msix_table[16 * v + 12] = MSIX_VECTOR_MASKED
        self.msix_pending = 0
        self.cachelines: CacheLineModel | None = None  # in the measurement mode
        self.counters = {"notifications": 0, "interrupts": 0, "needs_reset": 0, "ignored_notifications": 0}
        self._reset_state()

    # -- state -----------------------------------------------------------------------------------------
    def _reset_state(self) -> None:
        self.device_status = 0
        self.guest_features = 0
        self.queue_sel = 0
        self.isr = 0
        self.config_vector = NO_VECTOR
        self.queues = [QueueState(i, n) for i, n in enumerate(self.device.queue_sizes)]
        self.set_intx(False)

    @property
    def msix_enabled(self) -> bool:
        return bool(self.config[MSIX_CAP + 3] & (MSIX_ENABLE >> 8))

    def has(self, bit: int) -> bool:
        return bool(self.guest_features >> bit & 1)

    def queue(self, index: int) -> QueueState | None:
        return self.queues[index] if 0 <= index < len(self.queues) else None

    def broken(self, why: str) -> None:
        """The driver broke a rule: DEVICE_NEEDS_RESET and a configuration-change interrupt (spec 2.1.2)."""
        if self.device_status & DEVICE_NEEDS_RESET:
            return
        self.counters["needs_reset"] += 1
        self.device_status |= DEVICE_NEEDS_RESET
        stop = getattr(self.device, "stop", None)
        if stop is not None:  # a vhost backend gives the rings back
            stop()
        self.trace(
            "DEVICE_NEEDS_RESET",
            {"device": self.name, "why": why},
            "device stopped until the driver resets it (status 0)",
        )
        self._interrupt(ISR_CONFIG, self.config_vector)

    @property
    def live(self) -> bool:
        return bool(self.device_status & DRIVER_OK) and not self.device_status & DEVICE_NEEDS_RESET

    # -- the register block ----------------------------------------------------------------------------
    def io_read(self, offset: int, size: int) -> int:
        config_off = CONFIG_OFF_MSIX if self.msix_enabled else CONFIG_OFF
        if offset >= config_off:
            return self.device.read_config(offset - config_off, size)
        q = self.queue(self.queue_sel)
        if offset == HOST_FEATURES:
            value = self.device.host_features()
        elif offset == GUEST_FEATURES:
            value = self.guest_features
        elif offset == QUEUE_PFN:
            value = q.pfn if q else 0
        elif offset == QUEUE_NUM:
            value = q.size if q else 0
        elif offset == QUEUE_SEL:
            value = self.queue_sel
        elif offset == STATUS:
            value = self.device_status
        elif offset == ISR:
            value = self.isr
            self.isr = 0  # read-to-clear, and the INTx line falls (spec 4.1.4.5)
            self.set_intx(False)
            self.trace(
                "ISR_READ",
                {"device": self.name, "isr": value},
                "ISR cleared, INTx deasserted" if value else "nothing pending",
            )
        elif offset == MSI_CONFIG_VECTOR and self.msix_enabled:
            value = self.config_vector
        elif offset == MSI_QUEUE_VECTOR and self.msix_enabled:
            value = q.vector if q else NO_VECTOR
        else:
            value = 0
        return value & ((1 << 8 * size) - 1)

    def io_write(self, offset: int, size: int, value: int) -> None:
        config_off = CONFIG_OFF_MSIX if self.msix_enabled else CONFIG_OFF
        if offset >= config_off:
            self.device.write_config(offset - config_off, size, value)
            return
        if offset == STATUS:
            self._write_status(value & 0xFF)
        elif offset == QUEUE_NOTIFY:
            self._notify(value & 0xFFFF)
        elif offset == QUEUE_SEL:
            self.queue_sel = value & 0xFFFF
            self.trace(
                "QUEUE_SELECT",
                {
                    "queue": self.queue_sel,
                    "size": self.queues[self.queue_sel].size if self.queue(self.queue_sel) else 0,
                },
                "selected" if self.queue(self.queue_sel) else "no such queue: its size reads 0",
            )
        elif offset == GUEST_FEATURES:
            self._write_features(value & 0xFFFFFFFF)
        elif offset == QUEUE_PFN:
            self._write_pfn(value & 0xFFFFFFFF)
        elif offset == MSI_CONFIG_VECTOR and self.msix_enabled:
            self.config_vector = self._vector(value & 0xFFFF)
            self.trace("CONFIG_VECTOR", {"vector": self.config_vector}, "set")
        elif offset == MSI_QUEUE_VECTOR and self.msix_enabled:
            q = self.queue(self.queue_sel)
            if q is not None:
                q.vector = self._vector(value & 0xFFFF)
                self.trace(
                    "QUEUE_VECTOR",
                    {"queue": q.index, "vector": q.vector},
                    "set" if q.vector != NO_VECTOR else "no vector: this queue does not interrupt",
                )
        # writes to read-only registers (features, size, ISR) are ignored

    def _vector(self, value: int) -> int:
        """A vector past the table reads back NO_VECTOR (spec 4.1.5.1.2: the device refuses it)."""
        return value if value < self.nvectors else NO_VECTOR

    def _setting_up(self, what: str) -> bool:
        """Feature and queue set-up writes belong between DRIVER and DRIVER_OK (spec 3.1.1)."""
        st = self.device_status
        if st & DEVICE_NEEDS_RESET:
            return False
        if not st & ACKNOWLEDGE or not st & DRIVER or st & DRIVER_OK:
            self.broken(
                f"{what} written with status {status_text(st)}: allowed only after "
                "ACKNOWLEDGE|DRIVER and before DRIVER_OK"
            )
            return False
        return True

    def _write_status(self, value: int) -> None:
        old = self.device_status
        if value == 0:
            self.trace(
                "STATUS", {"device": self.name, "status": "0 (reset)"}, "device reset: queues and features cleared"
            )
            self.device.reset()
            self._reset_state()
            return
        if old & DEVICE_NEEDS_RESET:
            self.trace("STATUS", {"status": status_text(value)}, "ignored: the device needs a reset first")
            return
        step = value & ~old
        if value & ~old & DRIVER and not value & ACKNOWLEDGE:
            self.device_status = value
            self.broken("DRIVER set without ACKNOWLEDGE")
            return
        if step & DRIVER_OK and not (value & ACKNOWLEDGE and value & DRIVER):
            self.device_status = value
            self.broken("DRIVER_OK set before ACKNOWLEDGE|DRIVER")
            return
        if old & ~value & (ACKNOWLEDGE | DRIVER | DRIVER_OK):
            self.device_status = value
            self.broken(f"status bits cleared without a reset ({status_text(old)} -> {status_text(value)})")
            return
        self.device_status = value
        action = {
            ACKNOWLEDGE: "the driver has seen the device",
            DRIVER: "the driver knows how to drive it",
            DRIVER_OK: "the driver is ready: the device is live",
            FAILED: "the driver gave up",
        }
        said = [a for b, a in action.items() if step & b]
        self.trace("STATUS", {"device": self.name, "status": status_text(value)}, "; ".join(said) or "no change")
        if step & DRIVER_OK:
            self.device.activate()

    def _write_features(self, value: int) -> None:
        if not self._setting_up("driver features"):
            return
        offered = self.device.host_features()
        if value & ~offered:
            self.broken(f"driver features {value:#x} include bits the device did not offer ({value & ~offered:#x})")
            return
        self.guest_features = value
        self.trace(
            "FEATURES",
            {
                "offered": f"{offered:#x}",
                "accepted": f"{value:#x}",
                "names": feature_names(value, getattr(self.device, "feature_names", {})),
            },
            "negotiated",
        )

    def _write_pfn(self, pfn: int) -> None:
        q = self.queue(self.queue_sel)
        if q is None:
            self.trace("QUEUE_PFN", {"queue": self.queue_sel, "pfn": f"{pfn:#x}"}, "ignored: no such queue")
            return
        if pfn == 0:
            q.pfn, q.ring = 0, None
            self.trace("QUEUE_PFN", {"queue": q.index, "pfn": "0x0"}, "queue released")
            return
        if not self._setting_up(f"queue {q.index} PFN"):
            return
        try:
            ring = SplitQueue.legacy(
                self.ram, q.size, pfn, event_idx=self.has(F_EVENT_IDX), indirect=self.has(F_INDIRECT_DESC)
            )
        except RingError as e:
            self.broken(f"queue {q.index} PFN {pfn:#x}: {e}")
            return
        q.pfn, q.ring = pfn, ring
        if self.cachelines is not None:
            self.cachelines.add_ring(ring.desc, ring.used + 6 + 8 * q.size)
        self.trace(
            "QUEUE_PFN",
            {
                "queue": q.index,
                "pfn": f"{pfn:#x}",
                "size": q.size,
                "desc": f"{ring.desc:#x}",
                "avail": f"{ring.avail:#x}",
                "used": f"{ring.used:#x}",
                "bytes": legacy_bytes(q.size),
            },
            "ring set up: descriptor table, available ring, used ring",
        )

    def _notify(self, index: int) -> None:
        self.counters["notifications"] += 1
        q = self.queue(index)
        why = None
        if q is None:
            why = "no such queue"
        elif q.ring is None:
            why = "the queue was never set up"
        elif not self.live:
            why = "the device needs a reset" if self.device_status & DEVICE_NEEDS_RESET else "DRIVER_OK not set yet"
        elif not self.bus_master:
            why = "bus mastering is off in the PCI command register: the device may not touch memory"
        if why is not None or q is None or q.ring is None:
            self.counters["ignored_notifications"] += 1
            self.trace("NOTIFY", {"queue": index}, f"ignored: {why}")
            return
        self.trace(
            "NOTIFY",
            {"queue": index, "avail_idx": q.ring.avail_idx(), "last_avail": q.ring.last_avail},
            "the device walks the available ring",
        )
        self.device.notify(index)

    # -- interrupts ------------------------------------------------------------------------------------
    def queue_interrupt(self, index: int, path: str | None = None) -> None:
        """A used-buffer interrupt; `path` names a registered injector it came through (irqfd, call)."""
        q = self.queues[index]
        self._interrupt(ISR_QUEUE, q.vector, queue=index, path=path)

    def config_interrupt(self, path: str | None = None) -> None:
        """The configuration changed (link status): ISR bit 1 or the config vector."""
        self._interrupt(ISR_CONFIG, self.config_vector, path=path)

    def _interrupt(self, isr_bit: int, vector: int, queue: int | None = None, path: str | None = None) -> None:
        """Used-buffer or configuration-change notification (spec 4.1.4.5): MSI-X when enabled,
        otherwise the ISR bit and INTx (level: it stays up until the driver reads the ISR)."""
        self.counters["interrupts"] += 1
        what: dict[str, object] = {"queue": queue} if queue is not None else {"config": True}
        if path is not None:
            what["path"] = path
        if self.msix_enabled:
            if vector == NO_VECTOR:
                self.trace("INTERRUPT", {**what, "via": "MSI-X", "vector": "NO_VECTOR"}, "suppressed: no vector")
                return
            self._msix_send(vector, what)
            return
        self.isr |= isr_bit
        self.set_intx(True)
        self.trace(
            "INTERRUPT",
            {**what, "via": "INTx", "isr": self.isr, "irq": self.config[0x3C]},
            "INTx asserted (level) until the driver reads the ISR",
        )

    def _msix_send(self, vector: int, what: dict) -> None:
        entry = self.msix_table[16 * vector : 16 * vector + 16]
        addr_lo, addr_hi, data, control = struct.unpack("<IIII", entry)
        masked = control & MSIX_VECTOR_MASKED or self.config[MSIX_CAP + 3] & (MSIX_FUNCTION_MASK >> 8)
        if masked:
            self.msix_pending |= 1 << vector
            self.trace("INTERRUPT", {**what, "via": "MSI-X", "vector": vector}, "masked: pending bit set")
            return
        self.msix_pending &= ~(1 << vector)
        delivered = self.bus.platform.send_msi(addr_lo | addr_hi << 32, data) if self.bus else False
        self.trace(
            "INTERRUPT",
            {**what, "via": "MSI-X", "vector": vector, "address": f"{addr_lo:#x}", "data": f"{data:#x}"},
            f"message to the local APIC: CPU vector {data & 0xFF:#x}"
            if delivered
            else "message went nowhere (not an APIC address or destination)",
        )

    def msix_unmasked(self, vector: int) -> None:
        """A table write: if the vector is now unmasked with its bit pending, send it (PCI 3.0 6.8.2.9)."""
        if vector < self.nvectors and self.msix_pending >> vector & 1:
            control = struct.unpack_from("<I", self.msix_table, 16 * vector + 12)[0]
            if not control & MSIX_VECTOR_MASKED:
                self._msix_send(vector, {"pending": True})

    def update_mappings(self) -> None:
        super().update_mappings()
        moved = getattr(getattr(self, "device", None), "bars_moved", None)
        if moved is not None:  # registered notifiers follow BAR0
            moved()

    def write_config(self, offset: int, size: int, value: int) -> None:
        was = self.msix_enabled
        super().write_config(offset, size, value)
        if was != self.msix_enabled:
            if self.msix_enabled:
                self.set_intx(False)  # MSI-X replaces INTx (PCI 3.0 6.8.2)
            self.trace(
                "MSIX",
                {"device": self.name, "enabled": self.msix_enabled},
                "MSI-X on: registers 20/22 are the vectors, config moves to 24"
                if self.msix_enabled
                else "MSI-X off: INTx, config at 20",
            )


def feature_names(bits: int, names: dict) -> str:
    table = {
        F_NOTIFY_ON_EMPTY: "NOTIFY_ON_EMPTY",
        F_ANY_LAYOUT: "ANY_LAYOUT",
        F_INDIRECT_DESC: "INDIRECT_DESC",
        F_EVENT_IDX: "EVENT_IDX",
        F_BAD_FEATURE: "BAD_FEATURE",
        **names,
    }
    return ",".join(table.get(b, str(b)) for b in range(32) if bits >> b & 1) or "none"
