"""Where a virtio-net device's frames go: the peers of the userspace backend.

The interface is narrow on purpose (frames in, frames out), so that other backends (a vhost-style
one, a switch) plug in the same way: `attach(deliver)` gives the backend the device's receive
function, `transmit(frame)` hands it one frame the guest sent.

- `Loopback`: every frame comes straight back to the guest, unchanged.
- `UnixPeer` (`peer=unix:PATH`): a tap-like port of `cpuvirt vswitch`, one frame per datagram on a
  Unix datagram socket. Frames from it are taken only while the vCPU is halted (`take_external`, through
  Machine.wait_external), so a guest running code never sees a frame arrive under it.
- `UserNet`: the two services of QEMU's user-mode network (libslirp) that a guest can check without
  a real network: the virtual host 10.0.2.2 (MAC 52:55:0a:00:02:02) answers ARP requests for its
  address and ICMP echo requests to it, with the frames libslirp builds (arp.c arp_input,
  ip_icmp.c icmp_reflect, ip_output.c: TTL 255, IP id from a counter). Everything else is dropped
  and counted, as slirp drops what it cannot forward.
"""

from __future__ import annotations

import abc
import socket
import struct

ETH_P_IP, ETH_P_ARP = 0x0800, 0x0806
SLIRP_HOST_IP = bytes((10, 0, 2, 2))
SLIRP_DNS_IP = bytes((10, 0, 2, 3))
SLIRP_NETWORK, SLIRP_NETMASK = bytes((10, 0, 2, 0)), bytes((255, 255, 255, 0))
SLIRP_HOST_MAC_PREFIX = bytes((0x52, 0x55))  # slirp's special_ethaddr; the last 4 bytes are the IP


def inet_checksum(data: bytes) -> int:
    """RFC 1071: the ones' complement of the ones' complement sum of 16-bit words."""
    if len(data) & 1:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


class Backend(abc.ABC):
    """The other end of a NIC: frames the guest sent go to `transmit`; frames for the guest go to the
    `deliver` callback the device attached."""

    def attach(self, deliver) -> None:
        self.deliver = deliver

    @abc.abstractmethod
    def transmit(self, frame: bytes) -> None:
        """A frame the guest sent."""

    def wait_fds(self) -> list:
        """Host descriptors a halted vCPU waits on for frames from outside (none: frames come only as
        answers to what the guest sent)."""
        return []

    def take_external(self) -> None:
        """A descriptor of wait_fds() is ready: deliver what came."""

    def close(self) -> None:
        pass


class Loopback(Backend):
    """Echo every frame back to the guest."""

    name = "loopback"

    def transmit(self, frame: bytes) -> None:
        self.deliver(frame)


class UserNet(Backend):
    """The ARP and ICMP-echo answers of QEMU's `-netdev user` for its virtual host 10.0.2.2 (and DNS 10.0.2.3)."""

    name = "user"

    def __init__(self):
        self.ip_id = 0
        self.dropped = 0

    def transmit(self, frame: bytes) -> None:
        if len(frame) < 14:
            self.dropped += 1
            return
        ethertype = struct.unpack_from("!H", frame, 12)[0]
        reply = None
        if ethertype == ETH_P_ARP:
            reply = self._arp(frame)
        elif ethertype == ETH_P_IP:
            reply = self._icmp_echo(frame)
        if reply is None:
            self.dropped += 1
        else:
            self.deliver(reply)

    @staticmethod
    def _host_mac(ip: bytes) -> bytes:
        return SLIRP_HOST_MAC_PREFIX + ip

    def _arp(self, frame: bytes) -> bytes | None:
        if len(frame) < 42:
            return None
        hrd, pro, hln, pln, op = struct.unpack_from("!HHBBH", frame, 14)
        sha, sip, tip = frame[22:28], frame[28:32], frame[38:42]  # (the target MAC, 32:38, is unknown in a request)
        if (hrd, pro, hln, pln, op) != (1, ETH_P_IP, 6, 4, 1) or tip == sip:
            return None
        if tip not in (SLIRP_HOST_IP, SLIRP_DNS_IP):
            return None
        mac = self._host_mac(tip)
        reply = frame[6:12] + mac + struct.pack("!HHHBBH", ETH_P_ARP, 1, ETH_P_IP, 6, 4, 2) + mac + tip + sha + sip
        return reply.ljust(64, b"\0")  # slirp sends a 64-byte buffer, zero-padded

    def _icmp_echo(self, frame: bytes) -> bytes | None:
        ip = frame[14:]
        if len(ip) < 20 or ip[0] >> 4 != 4:
            return None
        ihl = (ip[0] & 0xF) * 4
        total = struct.unpack_from("!H", ip, 2)[0]
        if ihl < 20 or total < ihl + 8 or total > len(ip) or ip[9] != 1 or inet_checksum(ip[:ihl]):
            return None
        if ip[16:20] not in (SLIRP_HOST_IP, SLIRP_DNS_IP) or ip[ihl] != 8:
            return None
        icmp = bytearray(ip[ihl:total])
        if inet_checksum(bytes(icmp)):
            return None
        icmp[0] = 0  # ECHOREPLY
        struct.pack_into("!H", icmp, 2, 0)
        struct.pack_into("!H", icmp, 2, inet_checksum(bytes(icmp)))
        header = bytearray(ip[:20])  # options are stripped (icmp_reflect)
        header[0] = 0x45
        struct.pack_into("!H", header, 2, 20 + len(icmp))
        struct.pack_into("!H", header, 4, self.ip_id)
        self.ip_id = (self.ip_id + 1) & 0xFFFF
        struct.pack_into("!H", header, 6, struct.unpack_from("!H", header, 6)[0] & 0x4000)  # keep DF only
        header[8] = 255  # MAXTTL
        header[12:16], header[16:20] = ip[16:20], ip[12:16]
        struct.pack_into("!H", header, 10, 0)
        struct.pack_into("!H", header, 10, inet_checksum(bytes(header)))
        dst_mac = frame[6:12]
        return dst_mac + self._host_mac(ip[16:20]) + struct.pack("!H", ETH_P_IP) + bytes(header) + bytes(icmp)


class UnixPeer(Backend):
    """One frame per datagram to a `cpuvirt vswitch` `unix:PATH` port. The socket is autobound (an
    abstract address), and an empty datagram at start tells the switch where to send frames."""

    name = "unix"

    def __init__(self, path: str):
        self.path = path
        self.dropped = 0
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            self.sock.bind("")  # Linux autobind: an abstract address the switch can answer
            self.sock.connect(path)
            self.sock.setblocking(False)
            self.sock.send(b"")  # hello: the switch learns this port's peer address
        except OSError as e:
            self.sock.close()
            raise ValueError(
                f"peer=unix:{path}: {e.strerror or e} (is `cpuvirt vswitch --port unix:{path}` running?)"
            ) from None

    def transmit(self, frame: bytes) -> None:
        try:
            self.sock.send(frame)
        except OSError:  # the switch is gone or its queue is full: the frame is lost
            self.dropped += 1

    def wait_fds(self) -> list:
        return [self.sock.fileno()] if self.sock.fileno() >= 0 else []

    def take_external(self) -> None:
        while True:
            try:
                frame = self.sock.recv(65535 + 14 + 1)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            if frame:
                self.deliver(frame)

    def close(self) -> None:
        self.sock.close()


PEERS = {"loopback": Loopback, "user": UserNet}


def make_peer(name: str) -> Backend:
    """`loopback`, `user` or `unix:PATH` -> a peer; ValueError for anything else."""
    if name.startswith("unix:") and len(name) > 5:
        return UnixPeer(name[5:])
    if name in PEERS:
        return PEERS[name]()
    raise ValueError(f"unknown peer {name!r} (known: {', '.join(PEERS)}, unix:PATH)")
