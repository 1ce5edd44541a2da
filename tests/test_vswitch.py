"""cpuvirt vswitch (cpuvirt/net/switch.py): learning, its vhost-user ports serving cpuvirt and QEMU,
its UDP uplink for QEMU's -netdev dgram, its pcap. Every process started here is stopped here."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

from cpuvirt.net.switch import Port, Switch
from cpuvirt.runner import run_guest
from cpuvirt.toolchain.build import build_guest
from cpuvirt.virtio.setup import DeviceSpec
from tests.qemu import qemu_available, run_under_qemu
from tests.procs import start_cpuvirt, stop

requires_qemu = pytest.mark.skipif(not qemu_available(), reason="qemu-system-i386 is not on PATH")


class _Sink(Port):
    kind = "sink"

    def __init__(self, n):
        super().__init__(n, f"sink{n}")
        self.got = []

    def send(self, frame):
        self.got.append(frame)


def _frame(dst, src):
    return bytes.fromhex(dst) + bytes.fromhex(src) + b"\x08\x00" + bytes(46)


def test_the_switch_learns_and_stops_flooding():
    sw = Switch()
    a, b, c = _Sink(1), _Sink(2), _Sink(3)
    for p in (a, b, c):
        sw.add(p)
    sw.input(a, _frame("ffffffffffff", "020000000001"))        # broadcast: flooded, a learnt
    assert (len(a.got), len(b.got), len(c.got)) == (0, 1, 1)
    sw.input(b, _frame("020000000001", "020000000002"))        # to a: only a, b learnt
    assert (len(a.got), len(b.got), len(c.got)) == (1, 1, 1)
    sw.input(a, _frame("020000000002", "020000000001"))        # to b: only b
    assert (len(a.got), len(b.got), len(c.got)) == (1, 2, 1)
    sw.input(c, _frame("020000000009", "020000000003"))        # unknown: flooded, never back to c
    assert (len(a.got), len(b.got), len(c.got)) == (2, 3, 1)
    sw.input(c, b"short")
    assert sw.counters["dropped"] == 1


def _free_udp_port():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.fixture
def switch(tmp_path):
    """A switch with a vhost-user port, a UDP uplink and the user-network services port."""
    sock = str(tmp_path / "vm1.sock")
    mine, theirs = _free_udp_port(), _free_udp_port()
    pcap = tmp_path / "switch.pcap"
    proc = start_cpuvirt(["vswitch", "--port", f"vhost-user:{sock}", "--port", f"udp:{mine}:{theirs}",
                          "--port", "user", "--pcap", str(pcap)], [sock], "switch")
    try:
        yield {"sock": sock, "udp": (mine, theirs), "pcap": pcap, "stop": lambda: stop(proc), "proc": proc}
    finally:
        stop(proc)


def _reference(image):
    return run_guest(str(image), cmdline="quiet", devices=[DeviceSpec("virtio-net", peer="user")]).console


def test_a_cpuvirt_guest_through_the_switch(switch, tmp_path):
    image = tmp_path / "netdemo.bin"
    image.write_bytes(build_guest("netdemo"))
    res = run_guest(str(image), cmdline="quiet",
                    devices=[DeviceSpec("virtio-net", backend="vhost-user", socket=switch["sock"])])
    assert res.status == 0 and res.console == _reference(image)
    switch["stop"]()
    if shutil.which("tshark"):
        out = subprocess.run(["tshark", "-r", str(switch["pcap"])], capture_output=True, text=True, timeout=60).stdout
        assert "Who has 10.0.2.2? Tell 10.0.2.15" in out and "Echo (ping) reply" in out
        assert len(out.splitlines()) == 306                    # 304 sent, 2 answered, each recorded once


@requires_qemu
def test_qemu_joins_the_switch_as_a_vhost_user_frontend(switch, tmp_path):
    image = tmp_path / "netdemo.bin"
    image.write_bytes(build_guest("netdemo"))
    extra = ["-m", "32", "-object", "memory-backend-memfd,id=mem,size=32M,share=on", "-numa", "node,memdev=mem",
             "-chardev", f"socket,id=c0,path={switch['sock']}", "-netdev", "vhost-user,id=n0,chardev=c0",
             "-device", "virtio-net-pci,netdev=n0,disable-modern=on", "-append", "quiet"]
    out, status = run_under_qemu(image, timeout=60, extra=extra)
    assert status == 1 and out == _reference(image), out.decode()[-400:]
    assert switch["proc"].poll() is None


@requires_qemu
def test_qemu_on_netdev_dgram_reaches_the_switch_through_the_uplink(switch, tmp_path):
    image = tmp_path / "netdemo.bin"
    image.write_bytes(build_guest("netdemo"))
    mine, theirs = switch["udp"]
    extra = ["-netdev", f"dgram,id=n0,local.type=inet,local.host=127.0.0.1,local.port={theirs},"
                        f"remote.type=inet,remote.host=127.0.0.1,remote.port={mine}",
             "-device", "virtio-net-pci,netdev=n0,disable-modern=on", "-append", "quiet"]
    out, status = run_under_qemu(image, timeout=60, extra=extra)
    assert status == 1 and out == _reference(image), out.decode()[-400:]


def test_a_bad_port_is_one_line_and_status_2():
    r = subprocess.run([sys.executable, "-m", "cpuvirt", "vswitch", "--port", "tap:eth0"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--port tap:eth0" in r.stderr


# -- two netdemo guests talking through the switch (netdemo's peer roles, guests/include/netpeer.inc) ---
PINGER_MAC, ANSWER_MAC = "52:54:00:00:00:01", "52:54:00:00:00:02"


def _start_switch(ports, pcap=None):
    return start_cpuvirt(["vswitch", *sum((["--port", p] for p in ports), []), *(["--pcap", str(pcap)] if pcap else [])],
                         [p.split(":", 1)[1] for p in ports], "switch")


def _nic(backend, mac, path):
    if backend == "vhost-user":
        return f"virtio-net,mac={mac},backend=vhost-user,socket={path}"
    return f"virtio-net,mac={mac},peer=unix:{path},backend={backend}"


def _qemu_vhost_user(image, mac, sock, role):
    """QEMU itself as the vhost-user frontend of a switch port (docs/virtio.md)."""
    from tests.qemu import qemu_command
    return qemu_command(image, ["-object", "memory-backend-memfd,id=mem,size=32M,share=on", "-numa", "node,memdev=mem",
                                "-chardev", f"socket,id=c0,path={sock}", "-netdev", "vhost-user,id=n0,chardev=c0",
                                "-device", f"virtio-net-pci,netdev=n0,disable-modern=on,mac={mac}",
                                "-append", f"role={role}"])


def exchange(image, backend, tmp_path, mode="native", pinger_trace=None, qemu=None, pcap=None):
    """A switch with two ports, an answering netdemo (a process), a pinging one; returns the pinger's
    (console, status) and the answerer's console. `qemu` = "answer" or "ping": that side is QEMU, as a
    vhost-user frontend (statuses are then QEMU's: (v << 1) | 1)."""
    kind = "vhost-user" if backend == "vhost-user" else "unix"
    a, b = str(tmp_path / f"{backend}-a.sock"), str(tmp_path / f"{backend}-b.sock")
    switch = _start_switch([f"{kind}:{a}", f"{kind}:{b}"], pcap)
    answerer = None
    try:
        cmd = (_qemu_vhost_user(image, ANSWER_MAC, b, "answer") if qemu == "answer" else
               [sys.executable, "-m", "cpuvirt", "run", str(image), "--mode", mode,
                "--device", _nic(backend, ANSWER_MAC, b), "--append", "role=answer"])
        answerer = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        seen = b""
        while not seen.endswith(b"answer: waiting for frames\n"):       # the answerer is ready to receive
            line = answerer.stdout.readline()
            assert line, f"the answering guest ended early: {seen.decode()[-300:]}"
            seen += line
        if qemu == "ping":
            p = subprocess.run(_qemu_vhost_user(image, PINGER_MAC, a, "ping"), stdin=subprocess.DEVNULL,
                               capture_output=True, timeout=60)
            pinger = (p.stdout, p.returncode)
        else:
            mac = bytes.fromhex(PINGER_MAC.replace(":", ""))
            dev = (DeviceSpec("virtio-net", mac=mac, backend="vhost-user", socket=a) if backend == "vhost-user" else
                   DeviceSpec("virtio-net", mac=mac, peer=f"unix:{a}", backend=backend))
            r = run_guest(str(image), mode, cmdline="role=ping", devices=[dev], trace_path=pinger_trace)
            pinger = (r.console, r.status)
        out, err = answerer.communicate(timeout=60)
        assert answerer.returncode == (1 if qemu == "answer" else 0), err.decode()[-400:]
        return pinger, seen + out
    finally:
        if answerer is not None and answerer.poll() is None:
            answerer.kill()
            answerer.wait()
        stop(switch)


@pytest.fixture(scope="module")
def netdemo_image(tmp_path_factory):
    image = tmp_path_factory.mktemp("netdemo") / "netdemo.bin"
    image.write_bytes(build_guest("netdemo"))
    return image


def test_two_guests_exchange_frames_under_each_backend_with_identical_output(netdemo_image, tmp_path):
    consoles = {}
    for backend in ("userspace", "vhost", "vhost-user"):
        (ping, status), answer = exchange(netdemo_image, backend, tmp_path, pcap=tmp_path / f"{backend}.pcap")
        assert status == 0, ping.decode()[-600:]
        consoles[backend] = (ping, answer)
    ping, answer = consoles["userspace"]
    assert all(c == (ping, answer) for c in consoles.values()), "the consoles differ between backends"
    text = ping.decode()
    assert "ARP reply: 10.0.2.16 is at 52:54:00:00:00:02" in text
    assert "rx 98 bytes, sum 0x5453: ICMP echo reply from 10.0.2.16" in text
    assert text.count("test frame back from the peer, unchanged") == 2 and "FAIL" not in text
    answered = answer.decode()
    assert "ARP request: who has 10.0.2.16? tell 10.0.2.15" in answered and "ICMP echo reply to 10.0.2.15" in answered
    assert answered.count("test frame returned to its sender") == 2 and "FAIL" not in answered
    if shutil.which("tshark"):                     # the switch saw the eight frames, once each
        for backend in consoles:
            out = subprocess.run(["tshark", "-r", str(tmp_path / f"{backend}.pcap")], capture_output=True, text=True,
                                 timeout=60).stdout
            assert "Who has 10.0.2.16? Tell 10.0.2.15" in out and "Echo (ping) reply" in out, out
            assert len(out.splitlines()) == 8, out


def test_the_exchange_is_deterministic_run_to_run(netdemo_image, tmp_path):
    """Frames from the switch enter a guest only while its vCPU waits in hlt (userspace and vhost
    backends): the pinger's console and its whole trace are the same in two runs."""
    runs = []
    for n in range(2):
        trace = tmp_path / f"ping{n}.jsonl"
        (ping, _), answer = exchange(netdemo_image, "userspace", tmp_path, pinger_trace=str(trace))
        lines = trace.read_text().splitlines()[:-1]                  # the footer holds wall time
        runs.append((ping, answer, lines))
    assert runs[0] == runs[1]


@requires_qemu
@pytest.mark.parametrize("qemu_side", ["answer", "ping"])
def test_a_qemu_guest_and_a_cpuvirt_guest_exchange_frames(netdemo_image, tmp_path, qemu_side):
    """QEMU as a vhost-user frontend on one switch port, cpuvirt on the other: each side's console is
    the one it prints opposite a cpuvirt guest."""
    (tmp_path / "ref").mkdir()
    (ping_ref, _), answer_ref = exchange(netdemo_image, "vhost-user", tmp_path / "ref")
    (ping, status), answer = exchange(netdemo_image, "vhost-user", tmp_path, qemu=qemu_side)
    assert status == (1 if qemu_side == "ping" else 0), ping.decode()[-600:]
    assert ping == ping_ref and answer == answer_ref


# -- robustness: a port that cannot take frames never blocks the switch --------------------------------
def test_a_full_unix_port_drops_and_counts_and_never_blocks(tmp_path):
    """A tap-like peer that stops reading: once its socket queue is full, frames for it are dropped
    and counted at once; the other ports still get theirs."""
    from cpuvirt.net.switch import UnixPort
    sw = Switch()
    port = UnixPort(1, "unix", str(tmp_path / "p.sock"))
    sink = _Sink(2)
    sw.add(port)
    sw.add(sink)
    peer = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    peer.bind(str(tmp_path / "peer.sock"))
    peer.sendto(b"", str(tmp_path / "p.sock"))              # the peer says where it is ...
    port.ready(port.sock)
    t0 = time.monotonic()
    for n in range(2000):                                    # ... and never reads again
        sw.input(sink, _frame("ffffffffffff", "0200000000%02x" % (n % 200)))
    assert time.monotonic() - t0 < 5
    assert port.counters["dropped"] > 0 and port.counters["out"] + port.counters["dropped"] == 2000
    peer.close()                                             # the peer disappears: still no block, no error
    sw.input(sink, _frame("ffffffffffff", "020000000001"))
    assert port.counters["out"] + port.counters["dropped"] == 2001
    port.close()


def test_a_vhost_user_port_with_no_receive_buffer_backlogs_then_drops(tmp_path):
    """A VM that posts no receive buffer: the port keeps 256 frames (the backlog) and drops the rest,
    counted, without waiting for the VM."""
    from cpuvirt.net.switch import VhostUserPort
    from cpuvirt.virtio.net import BACKLOG
    from cpuvirt.virtio.vhost import MemoryTable, MemRegion
    from cpuvirt.virtio.vhost_user_backend import Connection
    from cpuvirt.virtio.virtqueue import legacy_layout
    sw = Switch()
    port = VhostUserPort(1, "vhost-user", str(tmp_path / "vm.sock"))
    sink = _Sink(2)
    sw.add(port)
    sw.add(sink)
    a, b = socket.socketpair()
    mem = bytearray(1 << 16)
    conn = Connection(a, None, sw.log)
    conn.table = MemoryTable([MemRegion(0, len(mem), memoryview(mem))])
    conn.regions = [(0, len(mem), 0x10000000, 0, _NoMap())]
    v = conn.vrings[0]
    desc, avail, used = legacy_layout(8, 1)
    v.num, v.enabled, v.addr = 8, True, (0x10000000 + desc, 0x10000000 + used, 0x10000000 + avail)
    conn._start(v)                                           # a receive ring with nothing posted
    conn.net.backend = _PortPeerFor(port)
    port.conn = conn
    t0 = time.monotonic()
    for n in range(BACKLOG + 50):
        sw.input(sink, _frame("ffffffffffff", "020000000002"))
    assert time.monotonic() - t0 < 5
    assert port.counters["out"] == BACKLOG and port.counters["dropped"] == 50
    assert conn.net.counters["rx_dropped"] == 50
    port.close()
    b.close()


class _NoMap:
    def close(self):
        pass


class _PortPeerFor:
    def __init__(self, port):
        self.port = port

    def transmit(self, frame):
        self.port.switch.input(self.port, frame)


def test_a_guest_waiting_for_frames_sees_the_switch_die(netdemo_image, tmp_path):
    """The switch (its vhost-user backend) is killed while the answering guest waits in hlt: the wait
    wakes on the socket's end, the link goes down, netdemo reports it and ends; nothing hangs."""
    a, b = str(tmp_path / "a.sock"), str(tmp_path / "b.sock")
    switch = _start_switch([f"vhost-user:{a}", f"vhost-user:{b}"])
    answerer = subprocess.Popen([sys.executable, "-m", "cpuvirt", "run", str(netdemo_image), "--device",
                                 _nic("vhost-user", ANSWER_MAC, b), "--append", "role=answer"],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        seen = b""
        while not seen.endswith(b"answer: waiting for frames\n"):
            line = answerer.stdout.readline()
            assert line, seen.decode()[-300:]
            seen += line
        switch.kill()
        switch.wait()
        out, err = answerer.communicate(timeout=30)
        assert answerer.returncode == 1, err.decode()[-300:]
        assert b"FAIL link: the device reports link down" in out
    finally:
        if answerer.poll() is None:
            answerer.kill()
            answerer.wait()
        stop(switch)


def test_a_malformed_message_closes_only_that_port_connection(tmp_path):
    """A frontend that sends garbage to a switch port loses its connection; the switch goes on and the
    port takes the next frontend."""
    from cpuvirt.virtio import vhost_user as vu
    a, b = str(tmp_path / "a.sock"), str(tmp_path / "b.sock")
    switch = _start_switch([f"vhost-user:{a}", f"vhost-user:{b}"])
    try:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        s.connect(a)
        s.sendall(vu.HEADER.pack(vu.SET_VRING_NUM, 0x1, 8) + vu.STATE.pack(7, 256))    # no ring 7
        assert s.recv(64) == b""                                                      # closed, no reply
        s.close()
        for path in (a, b):                                                            # both ports still serve
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(10)
            s.connect(path)
            vu.send_message(s, vu.GET_FEATURES)
            request, flags, _body, _fds = vu.recv_message(s)
            assert (request, flags) == (vu.GET_FEATURES, vu.VERSION | vu.FLAG_REPLY)
            s.close()
        assert switch.poll() is None
    finally:
        stop(switch)


@requires_qemu
def test_a_qemu_guest_on_netdev_dgram_answers_a_cpuvirt_guest(netdemo_image, tmp_path):
    """The third check: a QEMU guest with its own emulated virtio-net on -netdev dgram (the switch's
    UDP uplink) answers a cpuvirt guest on a unix port; both consoles are the cpuvirt pair's."""
    from tests.qemu import qemu_command
    (tmp_path / "ref").mkdir()
    (ping_ref, _), answer_ref = exchange(netdemo_image, "userspace", tmp_path / "ref")
    mine, theirs = _free_udp_port(), _free_udp_port()
    a = str(tmp_path / "a.sock")
    switch = subprocess.Popen([sys.executable, "-m", "cpuvirt", "vswitch", "--port", f"unix:{a}",
                               "--port", f"udp:{mine}:{theirs}"])
    answerer = None
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(a):
            assert switch.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        answerer = subprocess.Popen(qemu_command(netdemo_image, [
            "-netdev", f"dgram,id=n0,local.type=inet,local.host=127.0.0.1,local.port={theirs},"
                       f"remote.type=inet,remote.host=127.0.0.1,remote.port={mine}",
            "-device", f"virtio-net-pci,netdev=n0,disable-modern=on,mac={ANSWER_MAC}", "-append", "role=answer"]),
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        seen = b""
        while not seen.endswith(b"answer: waiting for frames\n"):
            line = answerer.stdout.readline()
            assert line, seen.decode()[-300:]
            seen += line
        mac = bytes.fromhex(PINGER_MAC.replace(":", ""))
        r = run_guest(str(netdemo_image), cmdline="role=ping", devices=[DeviceSpec("virtio-net", mac=mac, peer=f"unix:{a}")])
        out, _ = answerer.communicate(timeout=60)
        assert answerer.returncode == 1 and r.status == 0, r.console.decode()[-400:]
        assert r.console == ping_ref and seen + out == answer_ref
    finally:
        if answerer is not None and answerer.poll() is None:
            answerer.kill()
            answerer.wait()
        stop(switch)
