"""virtio-net, legacy (virtio 1.x specification 5.1; Linux uapi/linux/virtio_net.h).

Queue 0 receives, queue 1 transmits; queue 2 is the control queue, which exists (64 entries, as in
QEMU) but does nothing, since VIRTIO_NET_F_CTRL_VQ is not offered. Every frame on either queue is preceded by
the 10-byte legacy `virtio_net_hdr` (flags, gso_type, hdr_len, gso_size, csum_start, csum_offset;
no num_buffers without MRG_RXBUF). Offered features: MAC (5), STATUS (16), INDIRECT_DESC (28),
EVENT_IDX (29); no checksum or segmentation offload, so the header the device writes is all zeros
and the one it reads is ignored.

This is the userspace backend of QEMU's style: on each transmit notification the device model walks
the ring, copies each frame out and hands it to the peer (`Backend.transmit`); frames from the peer
(`receive`) are copied into the receive buffers the driver posted. A frame that cannot be delivered
(no buffer posted yet) waits in a bounded backlog, flushed when the driver posts buffers (a receive
notification), as QEMU's net queue does. Frames the device cannot take are dropped and counted;
broken rings set DEVICE_NEEDS_RESET (transport.py).
"""

from __future__ import annotations

import struct

from cpuvirt.virtio.transport import F_EVENT_IDX, F_INDIRECT_DESC, VirtioDevice
from cpuvirt.virtio.virtqueue import RingError

F_MAC, F_STATUS, F_MRG_RXBUF, F_CTRL_VQ = 5, 16, 15, 17
NET_S_LINK_UP = 1
HDR_LEN = 10
RX, TX, CTRL = 0, 1, 2
QUEUE_SIZE = 256  # QEMU's default rx_queue_size and tx_queue_size
CTRL_QUEUE_SIZE = 64
MAX_FRAME = 65535 + 14  # what QEMU's virtio-net accepts at most (an IP datagram in Ethernet)
BACKLOG = 256  # frames waiting for receive buffers, at most
DEFAULT_MAC = bytes.fromhex("525400123456")  # QEMU's default NIC address, 52:54:00:12:34:56


def parse_mac(text: str) -> bytes:
    parts = text.split(":")
    if len(parts) != 6 or not all(len(p) == 2 for p in parts):
        raise ValueError(f"bad MAC address {text!r} (want xx:xx:xx:xx:xx:xx)")
    try:
        mac = bytes(int(p, 16) for p in parts)
    except ValueError:
        raise ValueError(f"bad MAC address {text!r} (want xx:xx:xx:xx:xx:xx)") from None
    if mac[0] & 1:
        raise ValueError(f"MAC address {text} is a multicast address")
    return mac


def mac_text(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def read_net_config(mac: bytes, link_up: bool, offset: int, size: int) -> int:
    """A read of struct virtio_net_config (virtio 5.1.4): the MAC, then the status word (link up);
    bytes past it read 0. Every virtio-net backend's device shares this layout."""
    config = mac + struct.pack("<H", NET_S_LINK_UP if link_up else 0)
    return int.from_bytes(config[offset : offset + size].ljust(size, b"\0"), "little")


NET_COUNTERS = (
    "tx_frames",
    "tx_bytes",
    "rx_frames",
    "rx_bytes",
    "tx_dropped",
    "rx_dropped",
    "copies",
    "interrupts_suppressed",
)
"""What a virtio-net device counts (the summary's `virtio` line); a vhost device adds its kicks."""


class VirtioNetType(VirtioDevice):
    """What every virtio-net looks like to the guest, whichever backend serves its rings (this
    module's device model, vhost.py, vhost_user.py): one PCI identity, queue layout and feature set."""

    name = "virtio-net"
    pci_device_id = 0x1000  # transitional virtio-net
    virtio_id = 1  # subsystem device ID: network card
    class_code = 0x020000  # network controller, Ethernet
    queue_sizes = (QUEUE_SIZE, QUEUE_SIZE, CTRL_QUEUE_SIZE)
    nvectors = 4  # as QEMU's virtio-net-pci: 2 * queue pairs + 2 (config, control)
    feature_names = {F_MAC: "MAC", F_STATUS: "STATUS", F_MRG_RXBUF: "MRG_RXBUF", F_CTRL_VQ: "CTRL_VQ"}

    def host_features(self) -> int:
        return 1 << F_MAC | 1 << F_STATUS | 1 << F_INDIRECT_DESC | 1 << F_EVENT_IDX


class VirtioNet(VirtioNetType):
    def __init__(self, mac: bytes = DEFAULT_MAC, backend=None, capture=None, completions=None, now=lambda: 0):
        self.mac = mac
        self.backend = backend
        self.capture = capture  # callback(direction, frame): the pcap writer
        self.completions = completions  # completion.TxCompletions (a slow destination), or None
        self.now = now
        self.backlog: list[bytes] = []
        self.counters = dict.fromkeys(NET_COUNTERS, 0)
        if backend is not None:
            backend.attach(self.receive)

    def read_config(self, offset: int, size: int) -> int:
        return read_net_config(self.mac, True, offset, size)

    def write_config(self, offset: int, size: int, value: int) -> None:
        """The MAC is read-only here (QEMU lets a legacy driver write it; no driver needs to)."""

    def reset(self) -> None:
        self.backlog.clear()
        if self.completions is not None:
            self.completions.forget()  # chains in flight go with the rings

    def wait_fds(self) -> list:
        return self.backend.wait_fds() if self.backend is not None else []

    def take_external(self) -> None:
        self.backend.take_external()

    def close(self) -> None:
        if self.backend is not None:
            self.backend.close()

    def activate(self) -> None:
        pass

    def _trace(self, reason: str, detail: dict, action: str) -> None:
        self.transport.trace(reason, detail, action)

    def _drop(self, counter: str, why: str, detail: dict) -> None:
        self.counters[counter] += 1
        self._trace("DROP", {**detail, "why": why, counter: self.counters[counter]}, "frame dropped and counted")

    # -- transmit ---------------------------------------------------------------------------------------
    def notify(self, queue: int) -> None:
        t = self.transport
        try:
            if queue == TX:
                self._transmit(t.queues[TX].ring)
            elif queue == RX:
                self._flush_backlog()
            else:
                self._trace("CONTROL", {"queue": queue}, "ignored: VIRTIO_NET_F_CTRL_VQ was not offered")
        except RingError as e:
            t.broken(f"queue {queue}: {e}")

    def _transmit(self, ring) -> None:
        sent = 0
        while True:
            chain = ring.pop()
            if chain is None:
                break
            data = ring.buffer_read(chain, HDR_LEN + MAX_FRAME + 1)
            self.counters["copies"] += 1  # the frame out of guest RAM
            detail = {
                "queue": TX,
                "head": chain.head,
                "descriptors": len(chain.buffers),
                "indirect": chain.indirect,
                "bytes": len(data),
            }
            if self.completions is not None and HDR_LEN + 14 <= len(data) <= HDR_LEN + MAX_FRAME:
                number, delay = self.completions.take()
                if delay:  # a slow destination: this chain is returned later, the next ones now
                    when = self.now()
                    self.completions.timer.at(
                        when + delay,
                        lambda c=chain, d=data, n=number, w=when, r=ring, dt=detail: self._complete_late(
                            r, c, d, n, w, dt
                        ),
                    )
                    continue
                self.completions.complete(number, chain.head, self.now(), "returned in the used ring")
            ring.push(chain.head, 0)
            sent += 1
            self._send(ring, data, detail)
        if sent:
            self._used_update(TX, ring)

    def _send(self, ring, data: bytes, detail: dict) -> None:
        if len(data) < HDR_LEN:
            self._drop("tx_dropped", f"shorter than the {HDR_LEN}-byte virtio_net_hdr", detail)
            return
        frame = data[HDR_LEN:]
        if len(frame) > MAX_FRAME:
            self._drop("tx_dropped", f"frame longer than {MAX_FRAME} bytes", detail)
            return
        if len(frame) < 14:
            self._drop("tx_dropped", "shorter than an Ethernet header", detail)
            return
        self.counters["tx_frames"] += 1
        self.counters["tx_bytes"] += len(frame)
        self._trace(
            "TX",
            {**detail, "frame": len(frame), "used_idx": ring.used_idx},
            "frame copied out to the peer; descriptor returned in the used ring",
        )
        if self.capture is not None:
            self.capture("out", frame)
        if self.backend is not None:
            self.backend.transmit(frame)

    def _complete_late(self, ring, chain, data: bytes, number: int, taken_at: int, detail: dict) -> None:
        """A slow destination took the frame: its chain goes back now, after later ones (used ring order)."""
        t = self.transport
        if t.queues[TX].ring is not ring or not t.live:
            return  # the driver reset the device meanwhile
        self.completions.complete(number, chain.head, taken_at, "returned in the used ring")
        try:
            ring.push(chain.head, 0)
            self._send(ring, data, detail)
            self._used_update(TX, ring)
        except RingError as e:
            t.broken(f"queue {TX}: {e}")

    def _used_update(self, queue: int, ring) -> None:
        if ring.should_interrupt():
            self.transport.queue_interrupt(queue)
        else:
            self.counters["interrupts_suppressed"] += 1
            self._trace(
                "INTERRUPT",
                {"queue": queue, "used_idx": ring.used_idx},
                "suppressed by the driver (NO_INTERRUPT or used_event)",
            )

    # -- receive ----------------------------------------------------------------------------------------
    def receive(self, frame: bytes) -> None:
        """A frame from the peer for the guest."""
        t = self.transport
        if t is None or not t.live or t.queues[RX].ring is None:
            self._drop("rx_dropped", "the driver has not set the device up", {"frame": len(frame)})
            return
        if len(self.backlog) >= BACKLOG:
            self._drop(
                "rx_dropped", f"no receive buffer and the backlog is full ({BACKLOG} frames)", {"frame": len(frame)}
            )
            return
        self.backlog.append(bytes(frame))
        try:
            self._flush_backlog()
        except RingError as e:
            t.broken(f"queue {RX}: {e}")

    def _flush_backlog(self) -> None:
        t = self.transport
        ring = t.queues[RX].ring
        if ring is None or not t.live:
            return
        delivered = 0
        while self.backlog:
            chain = ring.pop()
            if chain is None:
                break
            frame = self.backlog.pop(0)
            detail = {"queue": RX, "head": chain.head, "descriptors": len(chain.buffers), "frame": len(frame)}
            if chain.readable:
                raise RingError(f"receive chain {chain.head} has device-readable buffers")
            if chain.writable < HDR_LEN + len(frame):
                ring.push(chain.head, 0)
                delivered += 1
                self._drop(
                    "rx_dropped",
                    f"receive buffers hold {chain.writable} bytes, the frame needs {HDR_LEN + len(frame)}",
                    detail,
                )
                continue
            written = ring.buffer_write(chain, bytes(HDR_LEN) + frame)
            self.counters["copies"] += 1  # the frame into guest RAM
            ring.push(chain.head, written)
            delivered += 1
            self.counters["rx_frames"] += 1
            self.counters["rx_bytes"] += len(frame)
            self._trace(
                "RX",
                {**detail, "written": written, "used_idx": ring.used_idx},
                "frame copied into the posted buffer; used ring updated",
            )
            if self.capture is not None:
                self.capture("in", frame)
        if delivered:
            self._used_update(RX, ring)
