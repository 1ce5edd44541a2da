"""The vhost backend (cpuvirt/virtio/vhost.py): the same guest output as the userspace device model,
kicks consumed by registered ioeventfds, interrupts through irqfds, hostile rings still contained."""
from __future__ import annotations

import json

import pytest

from cpuvirt.machine.bus import PortBus
from cpuvirt.runner import run_guest
from cpuvirt.virtio.setup import DeviceSpec, parse_device
from cpuvirt.errors import CpuvirtError
from tests.test_virtio import HOSTILE_CONSOLE

USER = DeviceSpec("virtio-net", peer="user")
VHOST_USER_PEER = DeviceSpec("virtio-net", peer="user", backend="vhost")


def _virtio_events(path):
    with open(path) as f:
        return [e for e in map(json.loads, f) if e.get("kind") == "virtio"]


@pytest.mark.parametrize("mode", ["native", "trap", "full", "hw"])
@pytest.mark.parametrize("cmdline", ["quiet", "quiet msix"])
def test_vhost_gives_the_userspace_console(mode, cmdline):
    ours = run_guest("netdemo", mode, cmdline=cmdline, devices=[VHOST_USER_PEER])
    ref = run_guest("netdemo", mode, cmdline=cmdline, devices=[USER])
    assert (ours.outcome, ours.status) == ("exit", 0), ours.console.decode()[-300:]
    assert ours.console == ref.console
    d, = ours.devices
    assert d["tx_frames"] == 304 and d["rx_frames"] == 2 and d["notifications"] >= 1


def test_kicks_take_the_ioeventfd_and_interrupts_the_irqfd(tmp_path):
    vh, us = tmp_path / "vh.jsonl", tmp_path / "us.jsonl"
    run_guest("netdemo", cmdline="quiet", devices=[VHOST_USER_PEER], trace_path=str(vh))
    run_guest("netdemo", cmdline="quiet", devices=[USER], trace_path=str(us))
    ev, ref = _virtio_events(vh), _virtio_events(us)
    kicks = [e for e in ev if e["reason"] == "NOTIFY"]
    assert kicks and all(e["detail"].get("via") == "ioeventfd" for e in kicks)
    assert not any(e["detail"].get("via") == "ioeventfd" for e in ref if e["reason"] == "NOTIFY")
    irqs = [e for e in ev if e["reason"] == "INTERRUPT" and "isr" in e["detail"]]
    assert irqs and all(e["detail"]["path"] == "irqfd" for e in irqs)
    setup, = [e for e in ev if e["reason"] == "VHOST_SETUP"]
    assert setup["detail"]["regions"] == ["0x0+0x2000000"] and len(setup["detail"]["vrings"]) == 2
    # the frames themselves are the same, in the same order
    frames = lambda evs: [(e["reason"], e["detail"]["frame"]) for e in evs if e["reason"] in ("TX", "RX")]
    assert frames(ev) == frames(ref)


def test_vhost_trace_is_deterministic(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    for p in (a, b):
        run_guest("netdemo", cmdline="quiet", devices=[VHOST_USER_PEER], trace_path=str(p))
    strip = lambda p: [l for l in p.read_text().splitlines() if '"wall' not in l]
    assert strip(a) == strip(b)


@pytest.mark.parametrize("mode", ["native", "hw"])
def test_a_hostile_driver_is_contained_under_vhost(mode, test_guest):
    res = run_guest(str(test_guest("virtio_hostile")), mode, devices=[DeviceSpec("virtio-net", backend="vhost")])
    assert (res.outcome, res.status) == ("exit", 0), res.message
    assert res.console == HOSTILE_CONSOLE
    assert res.devices[0]["needs_reset"] == 6


def test_ioeventfd_matches_port_size_and_value_only():
    hits, writes = [], []

    class Dev:
        def read(self, port, size):
            return 0

        def write(self, port, size, value):
            writes.append((port, size, value))

    bus = PortBus()
    bus.register(0xC000, 32, Dev(), wide=True)
    bus.add_ioeventfd(0xC010, 2, 1, lambda: hits.append(1))
    bus.write(0xC010, 2, 1)
    bus.write(0xC010, 2, 0)
    bus.write(0xC010, 4, 1)
    assert hits == [1] and writes == [(0xC010, 2, 0), (0xC010, 4, 1)]
    bus.remove_ioeventfd(0xC010, 2, 1)
    bus.write(0xC010, 2, 1)
    assert hits == [1] and writes[-1] == (0xC010, 2, 1)


def test_backend_option_is_checked():
    assert parse_device("virtio-net,backend=vhost").backend == "vhost"
    with pytest.raises(CpuvirtError, match="unknown backend"):
        parse_device("virtio-net,backend=kernel")
    with pytest.raises(CpuvirtError, match="socket= is for"):
        parse_device("virtio-net,socket=/tmp/x")


# -- vhost-user: a backend process on a Unix socket ----------------------------------------------------
VHU = DeviceSpec("virtio-net", peer="user", backend="vhost-user")


@pytest.mark.parametrize("mode", ["native", "hw"])
def test_vhost_user_gives_the_userspace_console(mode):
    ours = run_guest("netdemo", mode, cmdline="quiet", devices=[VHU])
    ref = run_guest("netdemo", mode, cmdline="quiet", devices=[USER])
    assert (ours.outcome, ours.status) == ("exit", 0), ours.console.decode()[-300:]
    assert ours.console == ref.console
    d, = ours.devices
    assert d["tx_frames"] == 304 and d["rx_frames"] == 2


def test_vhost_user_trace_is_deterministic_and_kicks_go_to_the_process(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    for p in (a, b):
        run_guest("netdemo", cmdline="quiet msix", devices=[VHU], trace_path=str(p))
    strip = lambda p: [l for l in p.read_text().splitlines() if '"wall' not in l]
    assert strip(a) == strip(b)
    ev = _virtio_events(a)
    kicks = [e for e in ev if e["reason"] == "NOTIFY"]
    assert kicks and all(e["detail"]["via"] == "vhost-user" for e in kicks)
    irqs = [e for e in ev if e["reason"] == "INTERRUPT" and "vector" in e["detail"]]
    assert irqs and all(e["detail"]["path"] == "call eventfd" for e in irqs)


def test_a_hostile_driver_is_contained_under_vhost_user(test_guest):
    res = run_guest(str(test_guest("virtio_hostile")), devices=[DeviceSpec("virtio-net", backend="vhost-user")])
    assert (res.outcome, res.status) == ("exit", 0), res.message
    assert res.console == HOSTILE_CONSOLE


import os
import signal
import socket
import subprocess
import sys

from cpuvirt.virtio import vhost_user as vu
from tests.procs import start_cpuvirt, stop  # noqa: E402


def _start_backend(tmp_path, peer="user"):
    path = str(tmp_path / "backend.sock")
    return start_cpuvirt(["vhost-user-backend", "--socket", path, "--peer", peer], [path], "backend"), path


def test_killing_the_backend_turns_the_link_down_and_the_guest_goes_on(tmp_path):
    """The backend is killed (and reaped) when the guest prints its ARP line: the next kick finds the
    socket closed, the device reports link down with a configuration interrupt, netdemo reads the
    status and ends with its FAIL line instead of waiting for ever."""
    proc, path = _start_backend(tmp_path)
    try:
        out = bytearray()

        def console(byte):
            out.append(byte)
            if out.endswith(b"\n") and out.splitlines()[-1].startswith(b"peer: 10.0.2.2") and proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait(5)

        trace = tmp_path / "t.jsonl"
        res = run_guest("netdemo", cmdline="quiet", console=console, trace_path=str(trace),
                        devices=[DeviceSpec("virtio-net", peer="user", backend="vhost-user", socket=path)])
    finally:
        stop(proc)
    assert (res.outcome, res.status) == ("exit", 1), res.message
    assert res.console.endswith(b"FAIL link: the device reports link down (config status bit 0 clear): "
                                b"no reply can come\n")
    ev = _virtio_events(trace)
    down = [i for i, e in enumerate(ev) if e["reason"] == "LINK_DOWN"]
    assert len(down) == 1
    assert ev[down[0] + 1]["reason"] == "INTERRUPT" and ev[down[0] + 1]["detail"]["isr"] == 2


def test_a_malformed_message_closes_the_connection_and_the_backend_serves_the_next(tmp_path):
    proc, path = _start_backend(tmp_path)
    try:
        for bad in (vu.HEADER.pack(vu.GET_FEATURES, 0x2, 0),                  # version 2
                    vu.HEADER.pack(vu.GET_FEATURES, 0x1, 1 << 20),            # payload of a megabyte
                    vu.HEADER.pack(vu.SET_VRING_NUM, 0x1, 4) + b"\0" * 4,     # a state payload of 4 bytes
                    vu.HEADER.pack(vu.SET_VRING_NUM, 0x1, 8) + vu.STATE.pack(7, 256),   # no ring 7
                    vu.HEADER.pack(999, 0x1, 0)):                             # no such request
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(10)
            s.connect(path)
            s.sendall(bad)
            assert s.recv(64) == b"", bad                 # closed without a reply
            s.close()
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        s.connect(path)
        vu.send_message(s, vu.GET_FEATURES)
        request, flags, body, fds = vu.recv_message(s)
        assert (request, flags) == (vu.GET_FEATURES, vu.VERSION | vu.FLAG_REPLY)
        assert vu.U64.unpack(body)[0] >> vu.F_PROTOCOL_FEATURES & 1
        s.close()
        assert proc.poll() is None
    finally:
        stop(proc)


def test_vhost_user_refuses_pcap_with_one_line(tmp_path):
    with pytest.raises(CpuvirtError, match="never pass through cpuvirt"):
        run_guest("netdemo", devices=[VHU], pcap_path=str(tmp_path / "x.pcap"))


from tests.qemu import qemu_available, run_under_qemu  # noqa: E402
from cpuvirt.toolchain.build import build_guest  # noqa: E402


@pytest.mark.skipif(not qemu_available(), reason="qemu-system-i386 is not on PATH")
def test_qemu_as_frontend_of_cpuvirts_backend_process(tmp_path):
    """QEMU's -netdev vhost-user drives cpuvirt's backend process (guest RAM a shared memfd): its
    netdemo prints what cpuvirt's netdemo prints with the user peer in-process."""
    image = tmp_path / "netdemo.bin"
    image.write_bytes(build_guest("netdemo"))
    proc, path = _start_backend(tmp_path)
    try:
        extra = ["-m", "32", "-object", "memory-backend-memfd,id=mem,size=32M,share=on", "-numa", "node,memdev=mem",
                 "-chardev", f"socket,id=c0,path={path}", "-netdev", "vhost-user,id=n0,chardev=c0",
                 "-device", "virtio-net-pci,netdev=n0,disable-modern=on", "-append", "quiet"]
        theirs, status = run_under_qemu(image, timeout=60, extra=extra)
        assert proc.poll() is None                      # QEMU's exit closed the connection, nothing else
    finally:
        stop(proc)
    ours = run_guest(str(image), cmdline="quiet", devices=[USER])
    assert status == 1, theirs.decode()[-400:]
    assert theirs == ours.console
    assert b"rx 64 bytes, sum 0xba07: ARP reply from 10.0.2.2" in theirs


def test_a_socket_nobody_listens_on_is_one_line_and_status_2(tmp_path):
    r = subprocess.run([sys.executable, "-m", "cpuvirt", "run", "netdemo", "--device",
                        f"virtio-net,backend=vhost-user,socket={tmp_path / 'none.sock'}"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "No such file" in r.stderr


def test_vhost_user_is_refused_under_para():
    """A backend process cannot honour direct paging's typed frames: para refuses it up front."""
    with pytest.raises(CpuvirtError, match="refused in para mode"):
        run_guest("netdemo", "para", devices=[VHU])


# -- the vhost-user backend's data path on random rings, with guest RAM only partly shared ----------------
def test_fuzz_the_vhost_user_backend_reaches_only_the_shared_regions():
    """Random descriptor tables and available rings served by the backend process's data path
    (vhost_user_backend.Connection) over a memory table of two regions with a hole between them:
    nothing escapes as an exception, every broken ring is signalled on the ring's error eventfd, the
    hole is never read or written (its bytes are not handed over at all: any access there would be an
    error, which must come back as a ring error), and writes land only in used rings and receive
    buffers."""
    import random
    import socket
    import struct

    from cpuvirt.virtio.backend import Loopback
    from cpuvirt.virtio.transport import F_EVENT_IDX, F_INDIRECT_DESC
    from cpuvirt.virtio.vhost import MemoryTable, MemRegion
    from cpuvirt.virtio.vhost_user_backend import Connection
    from cpuvirt.virtio.virtqueue import DESC_F_WRITE, legacy_layout

    rng = random.Random(5)
    ram_size, hole = 1 << 19, (0x38000, 0x40000)
    user = 0x7F0000000000
    outcomes = {"ok": 0, "broken": 0}
    for round_ in range(600):
        size = rng.choice((4, 8, 16))
        mem = bytearray(ram_size)
        view = memoryview(mem)
        regions = [(0, hole[0]), (hole[1], ram_size - hole[1])]
        a, b = socket.socketpair()
        conn = Connection(a, Loopback(), lambda *args, **kw: None)
        try:
            conn.table = MemoryTable([MemRegion(g, n, view[g:g + n]) for g, n in regions])
            conn.regions = [(g, n, user + g, 0, _NoMap()) for g, n in regions]
            conn.features = rng.choice((0, 1 << F_INDIRECT_DESC, 1 << F_EVENT_IDX | 1 << F_INDIRECT_DESC))
            errfds = []
            for q, pfn in ((0, 0x10), (1, 0x20)):
                v = conn.vrings[q]
                desc, avail, used = legacy_layout(size, pfn)
                v.num, v.enabled, v.addr = size, True, (user + desc, user + used, user + avail)
                v.err = os.eventfd(0, os.EFD_NONBLOCK)
                errfds.append(v.err)
                conn._start(v)
                for i in range(size):
                    addr = rng.choice((0x40000 + rng.randrange(0x10000), hole[0] + rng.randrange(0x8000),
                                       rng.randrange(1 << 64), hole[0] - rng.randrange(64), 0x30000 + rng.randrange(64) * 16))
                    flags = rng.randrange(8) if rng.random() < 0.7 else rng.randrange(1 << 16)
                    length = rng.choice((0, 14, 60, 2000, rng.randrange(1 << 32)))
                    struct.pack_into("<QIHH", mem, desc + 16 * i, addr, length, flags, rng.randrange(size + 2))
                for i in range(size):
                    struct.pack_into("<H", mem, avail + 4 + 2 * i, rng.randrange(size + 1))
                idx = rng.randrange(size + 2) if rng.random() < 0.9 else rng.randrange(1 << 16)
                struct.pack_into("<H", mem, avail + 2, idx)
            mem[0x30000:0x30000 + 1024] = rng.randbytes(1024)
            before = bytes(mem)
            conn.serve(1)                                           # transmit; loopback: receive too
            conn.serve(0)
            broken = any(_read_eventfd(fd) for fd in errfds)
            outcomes["broken" if broken else "ok"] += 1
            assert mem[hole[0]:hole[1]] == before[hole[0]:hole[1]]
            allowed = [(legacy_layout(size, p)[2], legacy_layout(size, p)[2] + 6 + 8 * size) for p in (0x10, 0x20)]
            rx_desc = legacy_layout(size, 0x10)[0]
            for i in range(size):
                addr, n, f, _ = struct.unpack_from("<QIHH", before, rx_desc + 16 * i)
                if f & DESC_F_WRITE:
                    allowed.append((addr, addr + n))
            diff = [i for i in range(ram_size) if before[i] != mem[i]] if before != mem else []
            assert all(any(lo <= i < hi for lo, hi in allowed) for i in diff), (round_, hex(diff[0]))
        finally:
            conn.close()
            b.close()
    assert outcomes["ok"] > 50 and outcomes["broken"] > 50, outcomes


class _NoMap:
    """Stands for a region's mmap (the test hands the backend views of a bytearray)."""

    def close(self):
        pass


def _read_eventfd(fd):
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0
