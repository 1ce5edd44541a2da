"""A vhost-user backend (the device side of the protocol), run as its own process:
`cpuvirt vhost-user-backend --socket PATH [--peer loopback|user]`.

It listens on a Unix socket, serves one frontend at a time (cpuvirt or QEMU's `-netdev vhost-user`),
maps the guest's RAM from the file descriptors SET_MEM_TABLE passes, and runs the same virtio-net data
path as the device model (net.py) on rings it knows only by the addresses it was sent. Guest memory
is reached only through the memory table: an address no region covers is a broken ring, never a read
of anything else. A malformed message closes the connection (and the backend waits for the next
one); a broken ring disables the rings until the frontend sets them up again.

Pending kicks are served before any message is handled, so an acknowledged VRING_KICK means the ring
was walked and the call eventfds were written: the frontend's view of time stays its own.
"""

from __future__ import annotations

import json
import mmap
import os
import select
import signal
import socket
import struct
import sys

from cpuvirt.virtio.backend import PEERS
from cpuvirt.virtio.net import VirtioNet
from cpuvirt.virtio.transport import F_EVENT_IDX, F_INDIRECT_DESC
from cpuvirt.virtio.vhost import MemoryTable, MemRegion
from cpuvirt.virtio.vhost_user import (
    ADDR,
    F_PROTOCOL_FEATURES,
    FLAG_NEED_REPLY,
    FLAG_REPLY,
    GET_FEATURES,
    GET_PROTOCOL_FEATURES,
    GET_QUEUE_NUM,
    GET_VRING_BASE,
    PROTOCOL_F_INBAND_NOTIFICATIONS,
    PROTOCOL_F_MQ,
    PROTOCOL_F_REPLY_ACK,
    REGION,
    REQUEST_NAMES,
    RESET_OWNER,
    SET_FEATURES,
    SET_MEM_TABLE,
    SET_OWNER,
    SET_PROTOCOL_FEATURES,
    SET_VRING_ADDR,
    SET_VRING_BASE,
    SET_VRING_CALL,
    SET_VRING_ENABLE,
    SET_VRING_ERR,
    SET_VRING_KICK,
    SET_VRING_NUM,
    STATE,
    U64,
    VERSION,
    VRING_KICK,
    VRING_NOFD,
    ProtocolError,
    _close_all,
    recv_message,
    send_message,
)
from cpuvirt.virtio.virtqueue import GuestMemoryError, GuestRam, RingError, SplitQueue

FEATURES = 1 << 5 | 1 << 16 | 1 << 28 | 1 << 29 | 1 << F_PROTOCOL_FEATURES  # MAC STATUS INDIRECT EVENT_IDX
PROTOCOL_FEATURES = 1 << PROTOCOL_F_MQ | 1 << PROTOCOL_F_REPLY_ACK | 1 << PROTOCOL_F_INBAND_NOTIFICATIONS
NQUEUES = 2


class _RegionRam(GuestRam):
    """GuestRam whose every access must fall inside one region of the memory table."""

    __slots__ = ("table",)

    def __init__(self, table: MemoryTable):
        super().__init__(table.size, table.read, table.write)
        self.table = table

    def check(self, gpa: int, length: int) -> None:
        if gpa < 0 or length < 0:
            raise GuestMemoryError(f"{gpa:#x}+{length:#x} is not an address range")
        if length:
            self.table._find(gpa, length)


class _ObservedRam(_RegionRam):
    """The measurement mode's RAM: every access to a ring's bytes notes the 64-byte lines it touched
    (and whether it wrote them), for the frontend's cache-line model (virtio/cacheline.py)."""

    __slots__ = ("conn",)

    def __init__(self, table: MemoryTable, conn: "Connection"):
        super().__init__(table)
        self.conn = conn
        read, write = self._read, self._write

        def seen_read(gpa, n):
            conn.note(gpa, n, False)
            return read(gpa, n)

        def seen_write(gpa, data):
            conn.note(gpa, len(data), True)
            write(gpa, data)

        self._read, self._write = seen_read, seen_write


class Vring:
    __slots__ = ("index", "num", "addr", "base", "kick", "call", "err", "enabled", "ring")

    def __init__(self, index: int):
        self.index, self.num, self.base = index, 0, 0
        self.addr: tuple[int, int, int] | None = None  # desc, used, avail (guest-physical)
        self.kick: int | None = None  # eventfds from the frontend
        self.call: int | None = None
        self.err: int | None = None
        self.enabled = False
        self.ring: SplitQueue | None = None


class _Side:
    """What net.py's data path calls on its transport: rings, call eventfds, the log."""

    class _Q:
        __slots__ = ("ring",)

        def __init__(self):
            self.ring = None

    def __init__(self, conn: "Connection"):
        self.conn = conn
        self.queues = [self._Q() for _ in range(3)]
        self.live = True

    def trace(self, reason, detail, action) -> None:
        self.conn.log(f"{reason} {detail} -> {action}", verbose=True)

    def queue_interrupt(self, index: int) -> None:
        fd = self.conn.vrings[index].call
        if fd is not None:
            os.eventfd_write(fd, 1)

    def broken(self, why: str) -> None:
        self.conn.log(f"ring error: {why}; rings disabled until set up again")
        for v in self.conn.vrings:
            v.enabled, v.ring = False, None
            self.queues[v.index].ring = None
            if v.err is not None:
                os.eventfd_write(v.err, 1)


class Connection:
    """One frontend: its memory table, its rings, and the virtio-net data path on them."""

    def __init__(self, sock: socket.socket, peer, log, report_fd: int | None = None):
        self.sock, self.log = sock, log
        self.report_fd = report_fd  # measurement mode: ring lines and counters after each in-band kick
        self.ring_ranges: dict[int, list] = {}
        self.touched: dict[int, bool] = {}
        self.features = 0
        self.protocol_features = 0
        self.regions: list = []  # (gpa, size, user_addr, offset, mmap)
        self.table: MemoryTable | None = None
        self.vrings = [Vring(i) for i in range(NQUEUES)]
        self.side = _Side(self)
        self.net = VirtioNet(b"\0" * 6, None, None)
        self.net.transport = self.side
        self.peer = peer
        if peer is not None:
            peer.attach(self.net.receive)
            self.net.backend = peer

    # -- messages ----------------------------------------------------------------------------------
    def handle(self) -> None:
        """One message; ProtocolError closes the connection."""
        self.serve_pending()
        request, flags, body, fds = recv_message(self.sock)
        if flags & FLAG_REPLY:
            _close_all(fds)
            raise ProtocolError(f"{REQUEST_NAMES.get(request, request)}: a reply where a request was due")
        try:
            reply = self._dispatch(request, body, fds)
        except (struct.error, ValueError) as e:
            _close_all(fds)
            raise ProtocolError(f"{REQUEST_NAMES.get(request, request)}: malformed payload ({e})") from None
        if request == VRING_KICK and self.report_fd is not None:
            self._report()  # before the acknowledgement: the frontend reads it right after
        if reply is not None:
            send_message(self.sock, request, reply, flags=VERSION | FLAG_REPLY)
        elif flags & FLAG_NEED_REPLY and self.protocol_features >> PROTOCOL_F_REPLY_ACK & 1:
            send_message(self.sock, request, U64.pack(0), flags=VERSION | FLAG_REPLY)

    def _need(self, body: bytes, n: int, what: str) -> None:
        if len(body) != n:
            raise ValueError(f"{what} payload is {len(body)} bytes, not {n}")

    def _vring(self, index: int) -> Vring:
        if not 0 <= index < NQUEUES:
            raise ValueError(f"vring {index} does not exist ({NQUEUES} rings)")
        return self.vrings[index]

    def _dispatch(self, request: int, body: bytes, fds: list):
        expects_fd = request in (SET_MEM_TABLE, SET_VRING_KICK, SET_VRING_CALL, SET_VRING_ERR)
        if fds and not expects_fd:
            raise ValueError("file descriptors on a message that takes none")
        if request == GET_FEATURES:
            return U64.pack(FEATURES)
        if request == GET_PROTOCOL_FEATURES:
            return U64.pack(PROTOCOL_FEATURES)
        if request == SET_FEATURES:
            self._need(body, 8, "SET_FEATURES")
            self.features = U64.unpack(body)[0]
            if self.features & ~FEATURES:
                raise ValueError(f"features {self.features:#x} were not offered")
            return None
        if request == SET_PROTOCOL_FEATURES:
            self._need(body, 8, "SET_PROTOCOL_FEATURES")
            value = U64.unpack(body)[0]
            if value & ~PROTOCOL_FEATURES:
                raise ValueError(f"protocol features {value:#x} were not offered")
            self.protocol_features = value
            return None
        if request in (SET_OWNER, RESET_OWNER):
            return None
        if request == GET_QUEUE_NUM:
            return U64.pack(1)
        if request == SET_MEM_TABLE:
            self._set_mem_table(body, fds)
            return None
        if request in (SET_VRING_NUM, SET_VRING_BASE, SET_VRING_ENABLE, GET_VRING_BASE, VRING_KICK):
            self._need(body, 8, REQUEST_NAMES[request])
            index, num = STATE.unpack(body)
            v = self._vring(index)
            if request == SET_VRING_NUM:
                if num < 1 or num > 32768 or num & (num - 1):
                    raise ValueError(f"ring size {num}")
                v.num = num
            elif request == SET_VRING_BASE:
                v.base = num & 0xFFFF
            elif request == SET_VRING_ENABLE:
                v.enabled = bool(num)
                self._start(v)
            elif request == GET_VRING_BASE:
                base = v.ring.last_avail if v.ring is not None else v.base
                v.base, v.ring, v.enabled = base, None, False
                self.side.queues[index].ring = None
                return STATE.pack(index, base)
            else:
                self.serve(index)
            return None
        if request == SET_VRING_ADDR:
            self._need(body, ADDR.size, "SET_VRING_ADDR")
            index, flags, desc, used, avail, log = ADDR.unpack(body)
            self._vring(index).addr = (desc, used, avail)
            self._start(self.vrings[index])
            return None
        if request in (SET_VRING_KICK, SET_VRING_CALL, SET_VRING_ERR):
            self._need(body, 8, REQUEST_NAMES[request])
            value = U64.unpack(body)[0]
            v = self._vring(value & 0xFF)
            nofd = bool(value & VRING_NOFD)
            if len(fds) != (0 if nofd else 1):
                raise ValueError(f"{len(fds)} file descriptors with NOFD={nofd}")
            attr = {SET_VRING_KICK: "kick", SET_VRING_CALL: "call", SET_VRING_ERR: "err"}[request]
            old = getattr(v, attr)
            if old is not None:
                os.close(old)
            setattr(v, attr, None if nofd else fds[0])
            if request == SET_VRING_KICK:
                self._start(v)
            return None
        raise ValueError(f"request {request} is not handled by this backend")

    def _set_mem_table(self, body: bytes, fds: list) -> None:
        if len(body) < 8:
            raise ValueError("memory table shorter than its count")
        n, _pad = struct.unpack_from("<II", body)
        if n < 1 or n > 8 or len(body) != 8 + n * REGION.size or len(fds) != n:
            raise ValueError(f"memory table: {n} regions, {len(body)} bytes, {len(fds)} fds")
        self._unmap()
        regions = []
        for i in range(n):
            gpa, size, user, offset = REGION.unpack_from(body, 8 + i * REGION.size)
            try:
                if size == 0 or os.fstat(fds[i]).st_size < offset + size:
                    raise ValueError(f"region {i} is larger than its file")
                m = mmap.mmap(fds[i], offset + size, flags=mmap.MAP_SHARED)
            finally:
                os.close(fds[i])
            regions.append((gpa, size, user, offset, m))
        self.regions = regions
        self.table = MemoryTable([MemRegion(g, s, memoryview(m)[o : o + s]) for g, s, _u, o, m in regions])
        self.log(f"memory table: {', '.join(f'{g:#x}+{s:#x}' for g, s, *_ in regions)}", verbose=True)

    def _unmap(self) -> None:
        self.table = None
        for v in self.vrings:
            v.ring = None
            self.side.queues[v.index].ring = None
        for *_, m in self.regions:
            try:
                m.close()
            except BufferError:  # a memoryview still refers to it; dropped with the table
                pass
        self.regions = []

    def _gpa_of(self, user: int) -> int:
        for gpa, size, u, _o, _m in self.regions:
            if u <= user < u + size:
                return gpa + (user - u)
        raise RingError(f"ring address {user:#x} is in no region")

    def _start(self, v: Vring) -> None:
        """A ring is live once it has a size, addresses, a kick and the memory table, and is enabled."""
        if not (v.enabled and v.num and v.addr and self.table is not None):
            return
        try:
            desc, used, avail = (self._gpa_of(a) for a in v.addr)
            ram = _RegionRam(self.table) if self.report_fd is None else _ObservedRam(self.table, self)
            ring = SplitQueue(
                ram,
                v.num,
                desc,
                avail,
                used,
                event_idx=bool(self.features >> F_EVENT_IDX & 1),
                indirect=bool(self.features >> F_INDIRECT_DESC & 1),
            )
        except RingError as e:
            self.side.broken(f"vring {v.index}: {e}")
            return
        ring.last_avail = ring.used_idx = ring.signalled_used = v.base
        self.ring_ranges[v.index] = [
            (desc, desc + 16 * v.num),
            (avail, avail + 6 + 2 * v.num),
            (used, used + 6 + 8 * v.num),
        ]
        v.ring = ring
        self.side.queues[v.index].ring = ring
        self.side.live = True

    # -- the measurement mode's report ----------------------------------------------------------------
    def note(self, gpa: int, n: int, write: bool) -> None:
        end = gpa + n
        for ranges in self.ring_ranges.values():
            for lo, hi in ranges:
                if gpa < hi and end > lo:
                    for line in range(max(gpa, lo) >> 6, ((min(end, hi) - 1) >> 6) + 1):
                        self.touched[line] = self.touched.get(line, False) or write

    def _report(self) -> None:
        """One JSON line: the ring lines touched since the last report, in first-touch order, with
        whether each was written, and the data path's counters."""
        record = {"lines": [[line, w] for line, w in self.touched.items()], "counters": self.net.counters}
        self.touched = {}
        if self.report_fd is None:
            return
        try:
            os.write(self.report_fd, (json.dumps(record) + "\n").encode())
        except OSError:
            self.report_fd = None

    # -- the data path --------------------------------------------------------------------------------
    def serve(self, index: int) -> None:
        if self.vrings[index].ring is not None:
            self.net.notify(index)

    def serve_pending(self) -> None:
        """Kicks that arrived on eventfds are served before the next message is looked at."""
        for v in self.vrings:
            if v.kick is None:
                continue
            try:
                os.eventfd_read(v.kick)
            except BlockingIOError:
                continue
            self.serve(v.index)

    def close(self) -> None:
        for v in self.vrings:
            for fd in (v.kick, v.call, v.err):
                if fd is not None:
                    os.close(fd)
            v.kick = v.call = v.err = None
        self._unmap()
        self.sock.close()


def serve(
    socket_path: str,
    peer_name: str = "loopback",
    verbose: bool = False,
    once: bool = False,
    report_fd: int | None = None,
) -> int:
    """Listen on `socket_path` and serve frontends one after another until SIGTERM."""
    quiet = not verbose

    def say(text: str, verbose: bool = False) -> None:
        if verbose and quiet:
            return
        print(f"vhost-user-backend: {text}", file=sys.stderr, flush=True)

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        if os.path.exists(socket_path):
            os.unlink(socket_path)
        listener.bind(socket_path)
    except OSError as e:
        print(f"cpuvirt vhost-user-backend: {socket_path}: {e.strerror}", file=sys.stderr)
        return 2
    listener.listen(1)
    try:
        while True:
            sock, _ = listener.accept()
            conn = Connection(sock, PEERS[peer_name](), say, report_fd)
            try:
                while True:
                    fds: list[socket.socket | int] = [sock] + [v.kick for v in conn.vrings if v.kick is not None]
                    ready, _, _ = select.select(fds, [], [])
                    if sock in ready:
                        conn.handle()
                    else:
                        conn.serve_pending()
            except ProtocolError as e:
                say(f"connection closed: {e}", verbose=str(e) == "the peer closed the connection")
            finally:
                conn.close()
            if once:
                return 0
    finally:
        listener.close()
        try:
            os.unlink(socket_path)
        except OSError:
            pass
