"""`--device` specifications and putting the devices on a machine's PCI bus (QEMU's `-device` order)."""

from __future__ import annotations

from dataclasses import dataclass

from cpuvirt.errors import CpuvirtError
from cpuvirt.virtio.backend import PEERS, make_peer
from cpuvirt.virtio.completion import DeviceTimer, SlowDestination, TxCompletions
from cpuvirt.virtio.e1000 import E1000
from cpuvirt.virtio.net import DEFAULT_MAC, VirtioNet, VirtioNetType, parse_mac
from cpuvirt.virtio.pcap import PcapWriter
from cpuvirt.virtio.transport import VirtioPciLegacy
from cpuvirt.virtio.vhost import VhostNet
from cpuvirt.virtio.vhost_user import VhostUserNet
from cpuvirt.virtio.virtqueue import GuestRam

DEVICE_TYPES = ("virtio-net", "e1000")
BACKENDS = ("userspace", "vhost", "vhost-user")


@dataclass(frozen=True)
class DeviceSpec:
    kind: str
    mac: bytes | None = None
    peer: str = "loopback"
    backend: str = "userspace"
    socket: str | None = None  # vhost-user: a backend already listening there (else one is started)
    cachelines: bool = False  # measurement mode: the cache-line model of the rings (cacheline.py)
    slow: SlowDestination | None = None  # every N-th frame K virtual us late (completion.py)

    def as_dict(self) -> dict:
        d: dict[str, object] = {"device": self.kind, "peer": self.peer}
        if self.backend != "userspace":
            d["backend"] = self.backend
        if self.mac is not None:
            d["mac"] = ":".join(f"{b:02x}" for b in self.mac)
        if self.cachelines:
            d["cachelines"] = True
        if self.slow is not None:
            d["slow"] = self.slow.text()
        return d


def parse_device(text: str) -> DeviceSpec:
    """`virtio-net[,mac=52:54:00:12:34:56][,peer=loopback|user|unix:PATH][,backend=userspace|vhost|vhost-user]
    [,socket=PATH][,cachelines=on][,slow=N:K]` or `e1000[,mac=...][,peer=loopback|user][,slow=N:K]`
    -> DeviceSpec, or CpuvirtError."""
    kind, *options = text.split(",")
    if kind not in DEVICE_TYPES:
        raise CpuvirtError(f"--device {text}: unknown device {kind!r} (known: {', '.join(DEVICE_TYPES)})")
    mac, peer, backend, socket, cachelines, slow = None, "loopback", "userspace", None, False, None
    for option in options:
        key, eq, value = option.partition("=")
        if not eq or not value:
            raise CpuvirtError(f"--device {text}: option {option!r} is not KEY=VALUE")
        if key == "mac":
            try:
                mac = parse_mac(value)
            except ValueError as e:
                raise CpuvirtError(f"--device {text}: {e}") from None
        elif key == "peer":
            if value not in PEERS and not (value.startswith("unix:") and len(value) > 5):
                raise CpuvirtError(f"--device {text}: unknown peer {value!r} (known: {', '.join(PEERS)}, unix:PATH)")
            peer = value
        elif key == "backend":
            if value not in BACKENDS:
                raise CpuvirtError(f"--device {text}: unknown backend {value!r} (known: {', '.join(BACKENDS)})")
            backend = value
        elif key == "socket":
            socket = value
        elif key == "cachelines":
            if value not in ("on", "off"):
                raise CpuvirtError(f"--device {text}: cachelines= takes on or off")
            cachelines = value == "on"
        elif key == "slow":
            try:
                slow = SlowDestination.parse(value)
            except ValueError as e:
                raise CpuvirtError(f"--device {text}: {e}") from None
        else:
            raise CpuvirtError(
                f"--device {text}: unknown option {key!r} (known: mac, peer, backend, socket, cachelines, slow)"
            )
    if backend == "vhost-user" and peer.startswith("unix:"):
        raise CpuvirtError(
            f"--device {text}: a vhost-user NIC joins a switch through its vhost-user port "
            "(socket=PATH), not peer=unix:"
        )
    if socket is not None and backend != "vhost-user":
        raise CpuvirtError(f"--device {text}: socket= is for backend=vhost-user")
    if cachelines and socket is not None:
        raise CpuvirtError(
            f"--device {text}: cachelines=on needs the ring accesses of a backend cpuvirt starts "
            "itself (it reports them); one listening on socket= cannot be observed"
        )
    if kind == "e1000" and (backend != "userspace" or socket is not None or cachelines):
        raise CpuvirtError(
            f"--device {text}: the e1000 has no virtio backends or virtqueues (backend=, socket=, "
            "cachelines= are for virtio-net)"
        )
    if kind == "e1000" and peer.startswith("unix:"):
        raise CpuvirtError(
            f"--device {text}: the e1000 joins the loopback or user peer; switch ports (unix:) are for virtio-net"
        )
    if slow is not None and backend != "userspace":
        raise CpuvirtError(f"--device {text}: slow= is modelled by the userspace device model only")
    return DeviceSpec(kind, mac, peer, backend, socket, cachelines, slow)


def attach_devices(machine, specs, trace=None, pcap_path: str | None = None):
    """Add each device to the PCI bus in order (slots 2, 3, ...); returns (transports, pcap writer).

    Without mac=, NIC n gets QEMU's default address with n added to the last byte
    (qemu_macaddr_default_if_unset). `trace(reason, detail, action)` receives the device events.
    """
    pcap = None
    if pcap_path is not None:
        if not specs:
            raise CpuvirtError("--pcap needs a --device virtio-net to capture")
        try:
            pcap = PcapWriter(pcap_path, lambda: machine.clock.now)
        except OSError as e:
            raise CpuvirtError(f"--pcap {pcap_path}: {e.strerror}") from None
    if pcap is not None and any(spec.backend == "vhost-user" for spec in specs):
        pcap.close()
        raise CpuvirtError(
            "--pcap: frames of a vhost-user NIC never pass through cpuvirt; capture them on the "
            "backend (cpuvirt vswitch --pcap)"
        )
    transports: list[VirtioPciLegacy | E1000] = []
    try:
        _attach(machine, specs, trace, pcap, transports)
    except BaseException:
        for t in transports:
            close = getattr(t.device, "close", None)
            if close is not None:
                close()
        raise
    return transports, pcap


def _attach(machine, specs, trace, pcap, transports) -> None:
    ram = GuestRam(machine.mem_bytes, machine.read_gpa, machine.dma_write, machine.dma_refusal)
    trace = trace or (lambda reason, detail, action, kind="virtio", mmio=None: None)
    for n, spec in enumerate(specs):
        mac = spec.mac or DEFAULT_MAC[:5] + bytes(((DEFAULT_MAC[5] + n) & 0xFF,))
        capture = pcap.record if pcap else None
        completions = None
        if spec.slow is not None:
            timer = DeviceTimer(lambda: machine.clock.now)
            machine.add_device_timer(timer)
            completions = TxCompletions(spec.kind, spec.slow, timer, trace)
        if spec.kind == "e1000":
            nic = E1000(mac, ram, PEERS[spec.peer](), capture, trace, completions, lambda: machine.clock.now)
            machine.pci.add(nic)
            transports.append(nic)
            continue
        device: VirtioNetType
        if spec.backend == "vhost-user":
            device = VhostUserNet(mac, spec.peer, spec.socket, capture, machine, cachelines=spec.cachelines)
        else:
            try:
                peer = make_peer(spec.peer)
            except ValueError as e:
                raise CpuvirtError(f"--device: {e}") from None
            if spec.backend == "vhost":
                device = VhostNet(mac, peer, capture, machine)
            else:
                device = VirtioNet(mac, peer, capture, completions, lambda: machine.clock.now)
        transport = VirtioPciLegacy(device, ram, trace)
        if spec.cachelines:  # measurement mode: who moves which ring line
            from cpuvirt.virtio.cacheline import CacheLineModel

            model = transport.cachelines = CacheLineModel(transport.counters)
            model.watch_cpu(machine.uc)
            transport.ram = model.device_ram(ram)
            if isinstance(device, (VhostNet, VhostUserNet)):  # the device side is in a worker / process
                device.cachelines = model
        machine.pci.add(transport)
        machine.external.append(device)  # a halted vCPU waits on its sockets (Machine.wait_external)
        transports.append(transport)
