"""The vhost-net placement: rings served by a backend worker the device model only set up.

Linux's vhost-net moves the data path out of QEMU: at DRIVER_OK QEMU hands the kernel the guest's
memory table, each ring's addresses, an eventfd the kernel signals for interrupts (KVM turns it into
an injection: irqfd) and an eventfd KVM signals when the guest writes the notify register
(ioeventfd, a port and value matched ahead of time). After that no kick and no interrupt goes
through QEMU. Here the same four things are handed over (`VhostSetup`):

- `mem`: the memory layout, guest-physical ranges and the host memory behind each;
- `vrings`: per queue, its size, descriptor/available/used addresses and the index to start from;
- `call`: per queue, the injector the worker signals (irqfd: straight to INTx or the MSI-X message);
- `kick`: per queue, the (port, size, value) the port bus matches (ioeventfd: `PortBus.add_ioeventfd`).

The worker (`VhostWorker`) runs the same virtio-net data path as the userspace device (net.py), on
rings it built from the memory table alone. It runs at the kick, on the vCPU's virtual time, so runs
stay deterministic. A ring error goes back through the error channel (vhost's SET_VRING_ERR): the
device model marks DEVICE_NEEDS_RESET. A driver reset (status 0) or a broken device stops the worker
and removes the notifiers; the device model takes the notify register back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from cpuvirt.virtio.net import NET_COUNTERS, RX, TX, VirtioNet, VirtioNetType, read_net_config
from cpuvirt.virtio.transport import F_EVENT_IDX, F_INDIRECT_DESC, QUEUE_NOTIFY, VirtioPciLegacy
from cpuvirt.virtio.virtqueue import GuestMemoryError, GuestRam, RingError, SplitQueue

if TYPE_CHECKING:
    from cpuvirt.virtio.cacheline import CacheLineModel


@dataclass(frozen=True)
class MemRegion:
    """One guest-physical range and the host memory behind it (vhost_memory_region)."""

    gpa: int
    size: int
    host: memoryview  # a writable buffer: the host's view of these bytes


@dataclass(frozen=True)
class Vring:
    """What SET_VRING_NUM/ADDR/BASE carry for one queue (guest-physical here: no IOMMU)."""

    index: int
    num: int
    desc: int
    avail: int
    used: int
    base: int  # the available index to start from (last_avail)


@dataclass
class VhostSetup:
    """The four things the device model hands the backend at DRIVER_OK, and nothing else."""

    mem: list
    vrings: list
    call: dict = field(default_factory=dict)  # queue -> injector()
    kick: dict = field(default_factory=dict)  # queue -> (port, size, value)
    features: int = 0
    error: Callable[[str], None] | None = None  # error channel: error(why)


class MemoryTable:
    """Guest-physical accesses resolved through the memory table only: an address no region covers
    is refused, whatever else the host holds. `dirty(gpa, size)` is vhost's dirty log: told of every
    write, so that hypervisor state derived from guest frames (shadow tables, translations) is dropped."""

    def __init__(self, regions, refusal=None, dirty=None):
        self.regions = sorted(regions, key=lambda r: r.gpa)
        self.size = max((r.gpa + r.size for r in self.regions), default=0)
        self.refusal, self.dirty = refusal, dirty

    def _find(self, gpa: int, n: int) -> tuple[MemRegion, int]:
        for r in self.regions:
            if r.gpa <= gpa and gpa + n <= r.gpa + r.size:
                return r, gpa - r.gpa
        raise GuestMemoryError(f"{gpa:#x}+{n:#x} is in no region of the memory table")

    def read(self, gpa: int, n: int) -> bytes:
        r, off = self._find(gpa, n)
        return bytes(r.host[off : off + n])

    def write(self, gpa: int, data: bytes) -> None:
        r, off = self._find(gpa, len(data))
        r.host[off : off + len(data)] = data
        if self.dirty is not None:
            self.dirty(gpa, len(data))

    def guest_ram(self) -> GuestRam:
        ram = GuestRam(self.size, self.read, self.write, self.refusal)
        return ram


class _WorkerSide:
    """What net.py's data path calls on its transport, answered from the set-up alone."""

    class _Q:
        __slots__ = ("ring",)

        def __init__(self, ring):
            self.ring = ring

    def __init__(self, rings: dict, setup: VhostSetup, trace):
        self.queues = [self._Q(rings.get(i)) for i in range(3)]
        self.setup, self.trace = setup, trace
        self.live = True

    def queue_interrupt(self, index: int) -> None:
        self.setup.call[index]()

    def broken(self, why: str) -> None:
        self.live = False
        if self.setup.error is not None:
            self.setup.error(why)


class VhostWorker:
    """vhost-net's worker: serves the rings from the memory table and ring addresses it was given."""

    def __init__(self, setup: VhostSetup, mem: GuestRam, peer, capture, trace):
        self.setup = setup
        rings = {v.index: self._ring(mem, v, setup.features) for v in setup.vrings}
        self.side = _WorkerSide(rings, setup, trace)
        self.net = VirtioNet(b"\0" * 6, None, capture)
        self.net.transport = self.side
        self.peer = peer
        if peer is not None:
            peer.attach(self.net.receive)
            self.net.backend = peer
        self.kicks = 0

    @staticmethod
    def _ring(mem: GuestRam, v: Vring, features: int) -> SplitQueue:
        ring = SplitQueue(
            mem,
            v.num,
            v.desc,
            v.avail,
            v.used,
            event_idx=bool(features >> F_EVENT_IDX & 1),
            indirect=bool(features >> F_INDIRECT_DESC & 1),
        )
        ring.last_avail = ring.used_idx = ring.signalled_used = v.base
        return ring

    def kick(self, queue: int) -> None:
        self.kicks += 1
        if self.side.live:
            self.net.notify(queue)


class VhostNet(VirtioNetType):
    """virtio-net whose data path is a vhost worker: the device model keeps the registers, the
    configuration space and the set-up; after DRIVER_OK it never sees a kick or a frame."""

    backend_name = "vhost"
    transport: VirtioPciLegacy  # its registers and set-up stay with the guest-side transport

    def __init__(self, mac: bytes, peer, capture, machine):
        self.mac, self.peer, self.capture, self.machine = mac, peer, capture, machine
        self.worker: VhostWorker | None = None
        self.registered: list = []
        self.link_up = True
        self.cachelines: CacheLineModel | None = None  # the worker's accesses are the device side's
        self._base = {**dict.fromkeys(NET_COUNTERS, 0), "notifications": 0}

    @property
    def counters(self) -> dict:
        c = dict(self._base)
        if self.worker is not None:
            for k, v in self.worker.net.counters.items():
                c[k] += v
            c["notifications"] += self.worker.kicks
        return c

    def read_config(self, offset: int, size: int) -> int:
        return read_net_config(self.mac, self.link_up, offset, size)

    def write_config(self, offset: int, size: int, value: int) -> None:
        pass

    def notify(self, queue: int) -> None:
        """Reached only when no notifier matched (a control-queue kick): nothing to do."""
        self.transport.trace("CONTROL", {"queue": queue}, "ignored: VIRTIO_NET_F_CTRL_VQ was not offered")

    # -- set-up and tear-down --------------------------------------------------------------------------
    def activate(self) -> None:
        t = self.transport
        port = t.bars[0].mapped
        setup = VhostSetup(
            mem=[MemRegion(0, self.machine.mem_bytes, self.machine.ram.view[: self.machine.mem_bytes])],
            vrings=[
                Vring(q.index, q.size, q.ring.desc, q.ring.avail, q.ring.used, 0)
                for q in t.queues[:2]
                if q.ring is not None
            ],
            call={q: (lambda q=q: t.queue_interrupt(q, path="irqfd")) for q in (RX, TX)},
            kick={
                q.index: (port + QUEUE_NOTIFY, 2, q.index)
                for q in t.queues[:2]
                if q.ring is not None and port is not None
            },
            features=t.guest_features,
            error=self._error,
        )
        self.start(setup)

    def start(self, setup: VhostSetup) -> None:
        t = self.transport
        mem = MemoryTable(
            setup.mem,
            self.machine.dma_refusal,
            lambda gpa, n: self.machine.mmu.traces.frames and self.machine.mmu.traces.hv_wrote(gpa, gpa, n),
        ).guest_ram()
        if self.cachelines is not None:
            mem = self.cachelines.device_ram(mem)
        try:
            self.worker = VhostWorker(setup, mem, self.peer, self.capture, t.trace)
        except RingError as e:
            t.broken(f"vhost set-up: {e}")
            return
        for q, (port, size, value) in setup.kick.items():
            self.machine.bus.add_ioeventfd(port, size, value, lambda q=q: self._kicked(q))
            self.registered.append((port, size, value))
        t.trace(
            "VHOST_SETUP",
            {
                "regions": [f"{r.gpa:#x}+{r.size:#x}" for r in setup.mem],
                "vrings": [
                    f"{v.index}:num={v.num},desc={v.desc:#x},avail={v.avail:#x},used={v.used:#x},base={v.base}"
                    for v in setup.vrings
                ],
                "kick": [f"{q}:port={p:#x},size={s},value={v}" for q, (p, s, v) in setup.kick.items()],
                "call": sorted(setup.call),
            },
            "memory table, ring addresses, ioeventfds and irqfds handed to the vhost worker",
        )

    def _kicked(self, queue: int) -> None:
        """The ioeventfd matched: the worker runs; the device model's register block is not involved."""
        t = self.transport
        if not t.bus_master:
            t.counters["ignored_notifications"] += 1
            t.trace(
                "NOTIFY",
                {"queue": queue, "via": "ioeventfd"},
                "ignored: bus mastering is off in the PCI command register: the device may not touch memory",
            )
            return
        worker = self.worker
        assert worker is not None  # its ioeventfds are registered once the worker runs
        ring = worker.side.queues[queue].ring
        t.trace(
            "NOTIFY",
            {"queue": queue, "via": "ioeventfd", "avail_idx": ring.avail_idx() if ring and worker.side.live else None},
            "kick matched a registered ioeventfd: the vhost worker walks the ring",
        )
        worker.kick(queue)

    def _error(self, why: str) -> None:
        self.stop()
        self.transport.broken(f"vhost worker: {why}")

    def stop(self) -> None:
        for key in self.registered:
            self.machine.bus.remove_ioeventfd(*key)
        self.registered.clear()
        if self.worker is not None:
            for k, v in self.worker.net.counters.items():
                self._base[k] += v
            self._base["notifications"] += self.worker.kicks
            self.worker = None

    def reset(self) -> None:
        self.stop()

    def wait_fds(self) -> list:
        return self.peer.wait_fds() if self.peer is not None else []

    def take_external(self) -> None:
        """Frames from outside go to the worker's receive path (or are dropped before set-up)."""
        if self.worker is None:
            self.peer.attach(self._drop_unset)
        self.peer.take_external()

    def _drop_unset(self, frame: bytes) -> None:
        self._base["rx_dropped"] += 1

    def close(self) -> None:
        if self.peer is not None:
            self.peer.close()

    def bars_moved(self) -> None:
        """BAR0 moved or stopped decoding: the notifiers follow it (QEMU's memory listener does this)."""
        if self.worker is None:
            return
        for key in self.registered:
            self.machine.bus.remove_ioeventfd(*key)
        self.registered.clear()
        port = self.transport.bars[0].mapped
        if port is not None:
            for q in (v.index for v in self.worker.setup.vrings):
                self.machine.bus.add_ioeventfd(port + QUEUE_NOTIFY, 2, q, lambda q=q: self._kicked(q))
                self.registered.append((port + QUEUE_NOTIFY, 2, q))
