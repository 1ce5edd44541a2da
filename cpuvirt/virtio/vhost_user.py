"""vhost-user: the wire protocol (QEMU docs/interop/vhost-user.rst) and cpuvirt's frontend.

A message is a 12-byte little-endian header (request u32, flags u32, size u32) and `size` bytes of
payload; file descriptors travel beside it as SCM_RIGHTS ancillary data. Flags: version 1 in bits
0-1, REPLY (0x4) on every reply, NEED_REPLY (0x8) asks for an acknowledgement when REPLY_ACK was
negotiated.

The frontend (`VhostUserNet`) keeps the virtio-net registers and configuration space; at DRIVER_OK it
hands a backend process the guest's RAM (one region, a memfd: guest RAM is a shared memfd when this
backend is chosen), each ring's addresses (as host addresses of the frontend, which is what the
protocol carries), a kick eventfd and a call eventfd per ring.

Determinism: a kick must not race the backend. With the protocol features INBAND_NOTIFICATIONS and
REPLY_ACK (the combination the protocol offers for simulations, as Linux's UML time-travel mode
uses it) the frontend sends each kick as a VRING_KICK message with NEED_REPLY; the backend serves the
ring before acknowledging, writing the call eventfd when the driver wants an interrupt; the frontend
reads the call eventfds right after the acknowledgement. Every completion therefore lands at the
guest's notify instruction on virtual time, whatever the host's scheduling. A backend that does not
offer both features gets eventfd kicks only, and its completions are taken at the next kick (the run is then
not deterministic; the trace says which mode was negotiated).

The backend dying (EOF, reset, a broken pipe) turns the link down: net config STATUS loses
LINK_UP, a configuration interrupt tells the driver, and later kicks are ignored and counted.
"""

from __future__ import annotations

import json
import os
import select
import socket
import struct
import subprocess
import sys
import tempfile
import time
from typing import TYPE_CHECKING

from cpuvirt.errors import CpuvirtError
from cpuvirt.virtio.net import RX, TX, VirtioNetType, read_net_config
from cpuvirt.virtio.transport import QUEUE_NOTIFY, VirtioPciLegacy

if TYPE_CHECKING:
    from cpuvirt.virtio.cacheline import CacheLineModel

# Requests (front-end to back-end), vhost-user.rst "Front-end message types"
GET_FEATURES, SET_FEATURES, SET_OWNER, RESET_OWNER, SET_MEM_TABLE = 1, 2, 3, 4, 5
SET_LOG_BASE, SET_LOG_FD = 6, 7
SET_VRING_NUM, SET_VRING_ADDR, SET_VRING_BASE, GET_VRING_BASE = 8, 9, 10, 11
SET_VRING_KICK, SET_VRING_CALL, SET_VRING_ERR = 12, 13, 14
GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES, GET_QUEUE_NUM, SET_VRING_ENABLE = 15, 16, 17, 18
VRING_KICK = 35
REQUEST_NAMES = {
    v: k
    for k, v in dict(
        GET_FEATURES=1,
        SET_FEATURES=2,
        SET_OWNER=3,
        RESET_OWNER=4,
        SET_MEM_TABLE=5,
        SET_LOG_BASE=6,
        SET_LOG_FD=7,
        SET_VRING_NUM=8,
        SET_VRING_ADDR=9,
        SET_VRING_BASE=10,
        GET_VRING_BASE=11,
        SET_VRING_KICK=12,
        SET_VRING_CALL=13,
        SET_VRING_ERR=14,
        GET_PROTOCOL_FEATURES=15,
        SET_PROTOCOL_FEATURES=16,
        GET_QUEUE_NUM=17,
        SET_VRING_ENABLE=18,
        SEND_RARP=19,
        NET_SET_MTU=20,
        SET_BACKEND_REQ_FD=21,
        GET_MAX_MEM_SLOTS=36,
        GET_STATUS=40,
        SET_STATUS=39,
        VRING_KICK=35,
    ).items()
}

VERSION, FLAG_REPLY, FLAG_NEED_REPLY = 0x1, 0x4, 0x8
F_PROTOCOL_FEATURES = 30  # VHOST_USER_F_PROTOCOL_FEATURES (a virtio feature bit)
PROTOCOL_F_MQ, PROTOCOL_F_REPLY_ACK, PROTOCOL_F_INBAND_NOTIFICATIONS = 0, 3, 14
VRING_NOFD = 1 << 8  # in KICK/CALL/ERR payloads: no fd accompanies the message
MAX_PAYLOAD = 4096  # larger than any message this code accepts
MAX_FDS = 8  # VHOST_MEMORY_BASELINE_NREGIONS
HEADER = struct.Struct("<III")
U64 = struct.Struct("<Q")
STATE = struct.Struct("<II")  # vhost_vring_state: index, num
ADDR = struct.Struct("<IIQQQQ")  # vhost_vring_addr: index, flags, desc, used, avail, log
REGION = struct.Struct("<QQQQ")  # guest_addr, size, user_addr, mmap_offset


class ProtocolError(Exception):
    """A malformed message, or the peer went away: the connection is closed."""


def send_message(sock: socket.socket, request: int, payload: bytes = b"", fds=(), flags: int = VERSION) -> None:
    data = HEADER.pack(request, flags, len(payload)) + payload
    try:
        if fds:
            socket.send_fds(sock, [data], list(fds))
        else:
            sock.sendall(data)
    except OSError as e:
        raise ProtocolError(f"send {REQUEST_NAMES.get(request, request)}: {e.strerror or e}") from None


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        try:
            chunk = sock.recv(n - len(out))
        except OSError as e:
            raise ProtocolError(f"receive: {e.strerror or e}") from None
        if not chunk:
            raise ProtocolError("the peer closed the connection")
        out += chunk
    return bytes(out)


def recv_message(sock: socket.socket) -> tuple[int, int, bytes, list]:
    """(request, flags, payload, fds); ProtocolError for a bad header, an oversized payload or EOF."""
    try:
        data, fds, _flags, _addr = socket.recv_fds(sock, HEADER.size, MAX_FDS)
    except OSError as e:
        raise ProtocolError(f"receive: {e.strerror or e}") from None
    if not data:
        raise ProtocolError("the peer closed the connection")
    if len(data) < HEADER.size:
        data += _recv_exact(sock, HEADER.size - len(data))
    request, flags, size = HEADER.unpack(data)
    if flags & 0x3 != VERSION:
        _close_all(fds)
        raise ProtocolError(f"message {request}: version {flags & 3}, not 1")
    if size > MAX_PAYLOAD:
        _close_all(fds)
        raise ProtocolError(f"message {request}: payload of {size} bytes")
    return request, flags, _recv_exact(sock, size) if size else b"", fds


def _close_all(fds) -> None:
    for fd in fds:
        os.close(fd)


class VhostUserNet(VirtioNetType):
    """virtio-net whose rings are served by a vhost-user backend process."""

    backend_name = "vhost-user"
    transport: VirtioPciLegacy  # its registers and set-up stay with the guest-side transport
    CONNECT_TIMEOUT = 10.0
    REPLY_TIMEOUT = 10.0

    def __init__(self, mac: bytes, peer: str, socket_path: str | None, capture, machine, cachelines: bool = False):
        self.mac, self.machine = mac, machine
        self.cachelines: CacheLineModel | None = None  # set by setup.py in the measurement mode
        self.report_fd: int | None = None  # the backend process's reports (measurement mode)
        self.link_up = True
        self.process = None
        self.tmpdir = None
        self.sock: socket.socket | None = None
        self.started: list[int] = []
        self.registered: list = []
        self.kickfd: dict[int, int] = {}
        self.callfd: dict[int, int] = {}
        self.errfd: dict[int, int] = {}
        self.used_seen = {RX: 0, TX: 0}
        self.counters = {
            "tx_frames": 0,
            "rx_frames": 0,
            "tx_dropped": 0,
            "rx_dropped": 0,
            "notifications": 0,
            "calls": 0,
        }
        if socket_path is None:
            self.tmpdir = tempfile.TemporaryDirectory(prefix="cpuvirt-vhu-")
            socket_path = os.path.join(self.tmpdir.name, "backend.sock")
            command = [sys.executable, "-m", "cpuvirt", "vhost-user-backend", "--socket", socket_path, "--peer", peer]
            report_w = None
            if cachelines:  # the process reports its ring lines and counters after each kick
                self.report_fd, report_w = os.pipe()
                os.set_blocking(self.report_fd, False)
                command += ["--report-fd", str(report_w)]
                self.counters.update(copies=0, interrupts_suppressed=0)
            self.process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, pass_fds=(report_w,) if report_w is not None else ()
            )
            if report_w is not None:
                os.close(report_w)
        self.socket_path = socket_path
        try:
            self._connect()
        except CpuvirtError:
            self.close()
            raise
        self._handshake()

    # -- the connection --------------------------------------------------------------------------------
    def _connect(self) -> None:
        deadline = time.monotonic() + self.CONNECT_TIMEOUT
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(self.socket_path)
                self.sock = s
                return
            except OSError as e:
                s.close()
                if self.process is not None and self.process.poll() is not None:
                    raise CpuvirtError(f"vhost-user backend exited with status {self.process.returncode}") from None
                if self.process is None or time.monotonic() > deadline:  # a given socket: no listener, no run
                    raise CpuvirtError(f"vhost-user socket {self.socket_path}: {e.strerror}") from None
                time.sleep(0.02)

    def _call(self, request: int, payload: bytes = b"", fds=(), reply: bool = False, ack: bool = False):
        """Send one message; with `reply` return its payload, with `ack` wait for REPLY_ACK's u64."""
        flags = VERSION | (FLAG_NEED_REPLY if ack else 0)
        sock = self.sock
        assert sock is not None, "a message while the link is down"  # callers check link_up
        send_message(sock, request, payload, fds, flags)
        if not (reply or ack):
            return None
        ready, _, _ = select.select([sock], [], [], self.REPLY_TIMEOUT)
        if not ready:
            raise ProtocolError(f"no reply to {REQUEST_NAMES[request]} in {self.REPLY_TIMEOUT:.0f} s")
        got, rflags, body, fds = recv_message(sock)
        _close_all(fds)
        if got != request or rflags != VERSION | FLAG_REPLY:
            raise ProtocolError(f"reply to {REQUEST_NAMES[request]}: request {got}, flags {rflags:#x}")
        if ack and (len(body) != 8 or U64.unpack(body)[0] != 0):
            raise ProtocolError(f"{REQUEST_NAMES[request]} was refused by the backend")
        return body

    def _handshake(self) -> None:
        try:
            body = self._call(GET_FEATURES, reply=True)
            self.backend_features = U64.unpack(body)[0]
            if not self.backend_features >> F_PROTOCOL_FEATURES & 1:
                raise ProtocolError("the backend does not offer VHOST_USER_F_PROTOCOL_FEATURES")
            proto = U64.unpack(self._call(GET_PROTOCOL_FEATURES, reply=True))[0]
            want = 1 << PROTOCOL_F_REPLY_ACK | 1 << PROTOCOL_F_INBAND_NOTIFICATIONS
            self.protocol_features = proto & want
            self.synchronous = self.protocol_features == want
            self._call(SET_PROTOCOL_FEATURES, U64.pack(self.protocol_features))
            self._call(SET_OWNER)
        except ProtocolError as e:
            self.close()
            raise CpuvirtError(f"vhost-user backend at {self.socket_path}: {e}") from None

    # -- the device --------------------------------------------------------------------------------
    def read_config(self, offset: int, size: int) -> int:
        return read_net_config(self.mac, self.link_up, offset, size)

    def write_config(self, offset: int, size: int, value: int) -> None:
        pass

    def notify(self, queue: int) -> None:
        """A kick no notifier took: the control queue, or any kick once the link is down."""
        t = self.transport
        if not self.link_up:
            t.counters["ignored_notifications"] += 1
            t.trace("NOTIFY", {"queue": queue}, "ignored: the vhost-user backend is gone (link down)")
        else:
            t.trace("CONTROL", {"queue": queue}, "ignored: VIRTIO_NET_F_CTRL_VQ was not offered")

    def activate(self) -> None:
        """DRIVER_OK: SET_FEATURES, SET_MEM_TABLE, then each ring's NUM, BASE, ADDR, KICK, CALL, ENABLE."""
        if not self.link_up:
            return
        t = self.transport
        ram = self.machine.ram
        host = ram.host_address
        try:
            self._call(SET_FEATURES, U64.pack(t.guest_features | 1 << F_PROTOCOL_FEATURES))
            table = struct.pack("<II", 1, 0) + REGION.pack(0, self.machine.mem_bytes, host, 0)
            self._call(SET_MEM_TABLE, table, [ram.fd], ack=True)
            for q in t.queues[:2]:
                if q.ring is None:
                    continue
                r = q.ring
                self.kickfd[q.index] = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
                self.callfd[q.index] = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
                self.errfd[q.index] = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
                self._call(SET_VRING_NUM, STATE.pack(q.index, q.size))
                self._call(SET_VRING_BASE, STATE.pack(q.index, 0))
                self._call(SET_VRING_ADDR, ADDR.pack(q.index, 0, host + r.desc, host + r.used, host + r.avail, r.used))
                self._call(SET_VRING_KICK, U64.pack(q.index), [self.kickfd[q.index]])
                self._call(SET_VRING_CALL, U64.pack(q.index), [self.callfd[q.index]])
                self._call(SET_VRING_ERR, U64.pack(q.index), [self.errfd[q.index]])
                self._call(SET_VRING_ENABLE, STATE.pack(q.index, 1))
                self.started.append(q.index)
                self.used_seen[q.index] = 0
        except ProtocolError as e:
            self._link_down(str(e))
            return
        self._register()
        t.trace(
            "VHOST_USER_SETUP",
            {
                "regions": [f"0x0+{self.machine.mem_bytes:#x}"],
                "vrings": self.started,
                "kicks": "in-band VRING_KICK, acknowledged" if self.synchronous else "eventfd",
            },
            "memory table (memfd), ring addresses, kick and call eventfds sent to the backend process",
        )

    def _register(self) -> None:
        port = self.transport.bars[0].mapped
        if port is None:
            return
        for q in self.started:
            key = (port + QUEUE_NOTIFY, 2, q)
            self.machine.bus.add_ioeventfd(*key, lambda q=q: self._kicked(q))
            self.registered.append(key)

    def _unregister(self) -> None:
        for key in self.registered:
            self.machine.bus.remove_ioeventfd(*key)
        self.registered.clear()

    def bars_moved(self) -> None:
        if self.registered:
            self._unregister()
            self._register()

    def _kicked(self, queue: int) -> None:
        t = self.transport
        self.counters["notifications"] += 1
        if not t.bus_master:
            t.counters["ignored_notifications"] += 1
            t.trace("NOTIFY", {"queue": queue, "via": "ioeventfd"}, "ignored: bus mastering is off")
            return
        t.trace(
            "NOTIFY",
            {"queue": queue, "via": "vhost-user"},
            "kick sent to the backend process"
            + (" (VRING_KICK, waiting for its acknowledgement)" if self.synchronous else " (kick eventfd)"),
        )
        try:
            if self.synchronous:
                self._call(VRING_KICK, STATE.pack(queue, 1), ack=True)
            else:
                os.eventfd_write(self.kickfd[queue], 1)
        except (ProtocolError, OSError) as e:
            self._link_down(str(e))
            return
        if self.report_fd is not None:
            self._take_report()
        self._completions()

    def _take_report(self) -> None:
        """Measurement mode: what the backend process wrote before its acknowledgement (the ring lines
        its data path touched, in order, and its counters) goes to the cache-line model."""
        data = b""
        fd = self.report_fd
        while fd is not None:
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                break
            if not chunk:
                break
            data += chunk
        for line in data.splitlines():
            try:
                record = json.loads(line)
                lines, counters = record["lines"], record["counters"]
            except (ValueError, KeyError, TypeError):
                continue
            if self.cachelines is not None:
                self.cachelines.device_lines(lines)
            for key in ("copies", "interrupts_suppressed"):
                if isinstance(counters.get(key), int):
                    self.counters[key] = counters[key]

    def _completions(self) -> None:
        """After the backend acknowledged: what it completed (used indices) and which calls it made."""
        t = self.transport
        for q in self.started:
            try:
                if os.eventfd_read(self.errfd[q]):
                    t.broken(f"queue {q}: the vhost-user backend signalled a ring error (SET_VRING_ERR eventfd)")
                    return
            except BlockingIOError:
                pass
        for q in self.started:
            ring = t.queues[q].ring
            assert ring is not None  # a started queue has its ring
            used = ring._u16(ring.used + 2)
            n = (used - self.used_seen[q]) & 0xFFFF
            self.used_seen[q] = used
            self.counters["tx_frames" if q == TX else "rx_frames"] += n
            try:
                called = os.eventfd_read(self.callfd[q])
            except BlockingIOError:
                called = 0
            if n:
                t.trace(
                    "USED",
                    {"queue": q, "completed": n, "used_idx": used},
                    "the backend returned buffers in the used ring",
                )
            if called:
                self.counters["calls"] += 1
                t.queue_interrupt(q, path="call eventfd")

    def wait_fds(self) -> list:
        """While the vCPU is halted: the call and error eventfds (another VM's frame written into a
        receive buffer by the switch) and the socket (its end: the backend is gone)."""
        if not self.link_up or self.sock is None or not self.started:
            return []
        return [self.callfd[q] for q in self.started] + [self.errfd[q] for q in self.started] + [self.sock.fileno()]

    def take_external(self) -> None:
        sock = self.sock
        if sock is None:  # only after wait_fds named it: never without a socket
            return
        try:
            ready, _, _ = select.select([sock], [], [], 0)
            if ready:  # no message comes unasked: this is the end of the connection
                data = sock.recv(1, socket.MSG_PEEK)
                self._link_down(
                    "the backend closed the connection" if not data else "the backend sent a message nobody asked for"
                )
                return
        except OSError as e:
            self._link_down(str(e))
            return
        self._completions()

    def _link_down(self, why: str) -> None:
        if not self.link_up:
            return
        self.link_up = False
        self._unregister()
        t = self.transport
        t.trace(
            "LINK_DOWN",
            {"why": why},
            "the vhost-user backend is gone: net config STATUS link down, configuration interrupt",
        )
        if t.live:
            t.config_interrupt(path="link down")
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def reset(self) -> None:
        """Status 0: GET_VRING_BASE stops each ring (QEMU does the same at a device reset)."""
        self._unregister()
        if self.link_up and self.sock is not None:
            try:
                for q in self.started:
                    self._call(GET_VRING_BASE, STATE.pack(q, 0), reply=True)
            except ProtocolError as e:
                self._link_down(str(e))
        self.started.clear()
        self._close_eventfds()

    def stop(self) -> None:
        self.reset()

    def _close_eventfds(self) -> None:
        for fd in list(self.kickfd.values()) + list(self.callfd.values()) + list(self.errfd.values()):
            os.close(fd)
        self.kickfd.clear()
        self.callfd.clear()
        self.errfd.clear()

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        self._close_eventfds()
        if self.report_fd is not None:
            os.close(self.report_fd)
            self.report_fd = None
        if self.process is not None:
            if self.process.poll() is None:
                self.process.terminate()
                try:
                    self.process.wait(5)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
            self.process = None
        if self.tmpdir is not None:
            self.tmpdir.cleanup()
            self.tmpdir = None
