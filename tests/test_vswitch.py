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
    proc = subprocess.Popen([sys.executable, "-m", "cpuvirt", "vswitch", "--port", f"vhost-user:{sock}",
                             "--port", f"udp:{mine}:{theirs}", "--port", "user", "--pcap", str(pcap)])
    deadline = time.monotonic() + 10
    while not os.path.exists(sock):
        assert proc.poll() is None and time.monotonic() < deadline, "the switch did not start"
        time.sleep(0.02)

    def stop():
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    try:
        yield {"sock": sock, "udp": (mine, theirs), "pcap": pcap, "stop": stop, "proc": proc}
    finally:
        stop()


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
