"""`cpuvirt vswitch`: a learning Ethernet switch process, OVS-DPDK style.

Ports (`--port`, repeatable, numbered from 1 in command-line order):
- `vhost-user:SOCKET`: the switch is the vhost-user backend of one VM (cpuvirt's
  `--device virtio-net,backend=vhost-user,socket=SOCKET` or QEMU's `-netdev vhost-user`): it maps the
  VM's RAM and serves its rings itself (cpuvirt/virtio/vhost_user_backend.py);
- `unix:PATH`: a tap-like Unix datagram socket bound at PATH, one frame per datagram; frames go back to
  the address that last sent one (an empty datagram only says where that is: cpuvirt's
  `--device virtio-net,peer=unix:PATH` sends one at start);
- `udp:LOCAL_PORT:REMOTE_PORT`: an uplink on 127.0.0.1 compatible with QEMU's `-netdev dgram,`
  `local.type=inet,local.host=127.0.0.1,local.port=REMOTE_PORT,`
  `remote.type=inet,remote.host=127.0.0.1,remote.port=LOCAL_PORT` (one UDP datagram per frame);
- `user`: the services of QEMU's user network (10.0.2.2 answers ARP and ping, as backend.py's
  UserNet) as a port of the switch.

Learning: a frame's source address is learnt on its input port; a unicast frame to a learnt address
goes to that port only, anything else floods every other port. A frame is never sent back where it
came from. A port that cannot take a frame (no receive buffer and a full backlog, a peer gone) drops
it and counts it; the switch never blocks on a port. `--pcap FILE` records every frame the switch
receives, once, time-stamped with the host clock.
"""

from __future__ import annotations

import abc
import os
import select
import signal
import socket
import sys
import time
from typing import TYPE_CHECKING

from cpuvirt.errors import CpuvirtError
from cpuvirt.virtio.backend import Backend, UserNet
from cpuvirt.virtio.pcap import PcapWriter
from cpuvirt.virtio.vhost_user import ProtocolError

if TYPE_CHECKING:
    from cpuvirt.virtio.vhost_user_backend import Connection

MAX_FRAME = 65535 + 14


class Port(abc.ABC):
    kind = "?"
    switch: Switch  # the switch it is plugged into (Switch.add), before any traffic

    def __init__(self, number: int, spec: str):
        self.number, self.spec = number, spec
        self.counters = {"in": 0, "out": 0, "dropped": 0}

    def fds(self) -> list:
        return []

    def ready(self, fd) -> None:
        pass

    @abc.abstractmethod
    def send(self, frame: bytes) -> None:
        """A frame the switch forwards out of this port."""

    def close(self) -> None:
        pass


class _PortPeer(Backend):
    """What a vhost-user connection's data path sees as its peer: the switch."""

    def __init__(self, port: "VhostUserPort"):
        self.port = port

    def transmit(self, frame: bytes) -> None:
        self.port.switch.input(self.port, frame)


class VhostUserPort(Port):
    kind = "vhost-user"

    def __init__(self, number: int, spec: str, path: str):
        super().__init__(number, spec)
        self.path = path
        if os.path.exists(path):
            os.unlink(path)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(1)
        self.conn: Connection | None = None

    def fds(self) -> list:
        if self.conn is None:
            return [self.listener]
        return [self.conn.sock] + [v.kick for v in self.conn.vrings if v.kick is not None]

    def ready(self, fd) -> None:
        from cpuvirt.virtio.vhost_user_backend import Connection

        if fd is self.listener:
            sock, _ = self.listener.accept()
            self.conn = Connection(sock, _PortPeer(self), self.switch.log)
            self.switch.log(f"port {self.number} ({self.spec}): frontend connected", verbose=True)
            return
        conn = self.conn
        if conn is None:  # a listener's fd is the only one without a connection
            return
        try:
            if fd is conn.sock:
                conn.handle()
            else:
                conn.serve_pending()
        except ProtocolError as e:
            self.switch.log(
                f"port {self.number} ({self.spec}): connection closed: {e}",
                verbose=str(e) == "the peer closed the connection",
            )
            conn.close()
            self.conn = None

    def send(self, frame: bytes) -> None:
        if self.conn is None or self.conn.side.queues[0].ring is None:
            self.counters["dropped"] += 1
            return
        before = self.conn.net.counters["rx_dropped"]
        self.conn.net.receive(frame)
        if self.conn.net.counters["rx_dropped"] != before:
            self.counters["dropped"] += 1
        else:
            self.counters["out"] += 1

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.listener.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass


class _DatagramPort(Port):
    def __init__(self, number: int, spec: str, sock: socket.socket, peer=None):
        super().__init__(number, spec)
        self.sock, self.peer = sock, peer
        self.sock.setblocking(False)

    def fds(self) -> list:
        return [self.sock]

    def ready(self, fd) -> None:
        try:
            frame, addr = self.sock.recvfrom(MAX_FRAME + 1)
        except BlockingIOError:
            return
        if addr:
            self.peer = addr
        if not frame:  # an empty datagram: a peer saying where it is (UnixPeer)
            self.switch.log(f"port {self.number} ({self.spec}): peer at {addr!r}", verbose=True)
            return
        self.switch.input(self, frame)

    def send(self, frame: bytes) -> None:
        if self.peer is None:
            self.counters["dropped"] += 1
            return
        try:
            self.sock.sendto(frame, self.peer)
            self.counters["out"] += 1
        except OSError:  # the peer is gone, or its queue is full: never block the switch
            self.counters["dropped"] += 1

    def close(self) -> None:
        self.sock.close()


class UnixPort(_DatagramPort):
    kind = "unix"

    def __init__(self, number: int, spec: str, path: str):
        if os.path.exists(path):
            os.unlink(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(path)
        self.path = path
        super().__init__(number, spec, sock)

    def close(self) -> None:
        super().close()
        try:
            os.unlink(self.path)
        except OSError:
            pass


class UdpPort(_DatagramPort):
    kind = "udp"

    def __init__(self, number: int, spec: str, local: int, remote: int):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", local))
        super().__init__(number, spec, sock, ("127.0.0.1", remote))


class UserPort(Port):
    kind = "user"

    def __init__(self, number: int, spec: str):
        super().__init__(number, spec)
        self.net = UserNet()
        self.net.attach(lambda frame: self.switch.input(self, frame))

    def send(self, frame: bytes) -> None:
        self.counters["out"] += 1
        self.net.transmit(frame)


def parse_port(number: int, spec: str) -> Port:
    kind, _, rest = spec.partition(":")
    try:
        if kind == "vhost-user" and rest:
            return VhostUserPort(number, spec, rest)
        if kind == "unix" and rest:
            return UnixPort(number, spec, rest)
        if kind == "udp":
            local, remote = (int(x) for x in rest.split(":"))
            if not (0 < local < 65536 and 0 < remote < 65536):
                raise ValueError
            return UdpPort(number, spec, local, remote)
        if kind == "user" and not rest:
            return UserPort(number, spec)
    except ValueError:
        pass
    except OSError as e:
        raise CpuvirtError(f"--port {spec}: {e.strerror}") from None
    raise CpuvirtError(f"--port {spec}: want vhost-user:SOCKET, unix:PATH, udp:LOCAL_PORT:REMOTE_PORT or user")


class Switch:
    def __init__(self, pcap: PcapWriter | None = None, verbose: bool = False):
        self.ports: list[Port] = []
        self.table: dict[bytes, Port] = {}
        self.pcap, self.verbose = pcap, verbose
        self.counters = {"frames": 0, "flooded": 0, "dropped": 0}

    def add(self, port: Port) -> None:
        port.switch = self
        self.ports.append(port)

    def log(self, text: str, verbose: bool = False) -> None:
        if verbose and not self.verbose:
            return
        print(f"vswitch: {text}", file=sys.stderr, flush=True)

    def input(self, port: Port, frame: bytes) -> None:
        port.counters["in"] += 1
        if len(frame) < 14:
            self.counters["dropped"] += 1
            return
        self.counters["frames"] += 1
        if self.pcap is not None:
            self.pcap.record("in", frame)
        dst, src = frame[:6], frame[6:12]
        if not src[0] & 1:
            self.table[bytes(src)] = port
        out = self.table.get(bytes(dst)) if not dst[0] & 1 else None
        if out is port:
            return  # the destination is behind the port it came from
        if out is not None:
            out.send(frame)
            return
        self.counters["flooded"] += 1
        for p in self.ports:
            if p is not port:
                p.send(frame)

    def serve(self) -> None:
        while True:
            owners = {}
            for p in self.ports:
                for fd in p.fds():
                    owners[fd] = p
            ready, _, _ = select.select(list(owners), [], [])
            for fd in ready:
                owners[fd].ready(fd)

    def close(self) -> None:
        for p in self.ports:
            p.close()
        if self.pcap is not None:
            self.pcap.close()


def main(port_specs, pcap_path: str | None = None, verbose: bool = False) -> int:
    if not port_specs:
        raise CpuvirtError("vswitch: give at least one --port")
    pcap = None
    if pcap_path is not None:
        try:
            pcap = PcapWriter(pcap_path, time.time_ns)
        except OSError as e:
            raise CpuvirtError(f"--pcap {pcap_path}: {e.strerror}") from None
    switch = Switch(pcap, verbose)
    try:
        for n, spec in enumerate(port_specs, 1):
            switch.add(parse_port(n, spec))
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        for p in switch.ports:
            switch.log(f"port {p.number}: {p.spec}", verbose=True)
        switch.serve()
    finally:
        switch.close()
    return 0
