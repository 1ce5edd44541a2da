"""netdemo's second driver (guests/include/e1000.inc) on the 82540EM model: every CPU mode, both peers,
QEMU's console for the same peer (`-device e1000`), the trace, the capture, and the completion-order
experiment end to end: the same slow destination stalls the e1000 ring and not the virtqueue."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from cpuvirt.runner import run_guest
from cpuvirt.toolchain.build import build_guest
from cpuvirt.virtio.completion import SlowDestination
from cpuvirt.virtio.setup import DeviceSpec
from tests.qemu import assert_same_console_as_qemu, qemu_available

LOOPBACK = [DeviceSpec("e1000")]
USER = [DeviceSpec("e1000", peer="user")]
QEMU_E1000 = ["-netdev", "user,id=n0", "-device", "e1000,netdev=n0"]
_native: dict = {}


def native(devices=LOOPBACK, cmdline="quiet"):
    key = (tuple(devices), cmdline)
    if key not in _native:
        _native[key] = run_guest("netdemo", cmdline=cmdline, devices=devices)
    return _native[key]


@pytest.mark.parametrize("mode", ["native", "trap", "full", "hw"])
def test_every_mode_passes_with_the_native_console(mode):
    res = run_guest("netdemo", mode, cmdline="quiet", devices=LOOPBACK)
    assert (res.outcome, res.status) == ("exit", 0), res.console.decode()[-400:]
    assert b"FAIL" not in res.console and res.console == native().console
    assert b"PASS e1000 found on PCI bus 0" in res.console
    assert b"PASS loopback peer: every frame came back unchanged" in res.console
    assert b"PASS DD came back in ring order" in res.console
    d, = res.devices
    assert d["name"] == "e1000" and d["tx_frames"] == d["rx_frames"] == 303 and d["needs_reset"] == 0
    assert d["interrupts"] > 0


def test_against_the_user_peer_the_burst_is_one_tdt_write_per_ring_full():
    res = native(USER)
    assert res.status == 0 and b"peer: 10.0.2.2 is at 52:55:0a:00:02:02" in res.console
    assert b"descriptors used in all: 304" in res.console
    d, = res.devices
    assert d["tx_frames"] == 303 and d["rx_frames"] == 2 and d["notifications"] < 10


def test_virtio_net_is_still_preferred_when_both_are_present():
    res = run_guest("netdemo", cmdline="quiet", devices=[DeviceSpec("e1000"), DeviceSpec("virtio-net")])
    assert res.status == 0 and b"netdemo: virtio-net at 00:03.0" in res.console and b"e1000" not in res.console


requires_qemu = pytest.mark.skipif(not qemu_available(), reason="qemu-system-i386 is not on PATH")


@requires_qemu
@pytest.mark.parametrize("cmdline", ["", "quiet"])
def test_console_equals_qemus_e1000_with_the_same_peer(cmdline, tmp_path):
    image = tmp_path / "netdemo.bin"
    image.write_bytes(build_guest("netdemo"))
    console = assert_same_console_as_qemu(image, USER, QEMU_E1000, cmdline, timeout=90)
    assert b"PASS the peer answered the ping" in console
    assert (b"burst frame" in console) == (cmdline == "")


def events_of(path):
    return [json.loads(line) for line in path.read_text().splitlines()[1:-1]]


def test_trace_shows_the_doorbell_the_ring_and_the_read_to_clear_icr(tmp_path):
    path = tmp_path / "t.jsonl"
    res = run_guest("netdemo", cmdline="quiet", devices=USER, trace_path=str(path))
    assert res.status == 0
    story = [(e["kind"], e["reason"]) for e in events_of(path) if e["kind"] in ("pci", "e1000")]
    first = {k: story.index(k) for k in (("pci", "CONFIG_READ"), ("e1000", "RCTL"), ("e1000", "TCTL"),
                                         ("e1000", "TDT"), ("e1000", "TX"), ("e1000", "RX"),
                                         ("e1000", "INTERRUPT"))}
    assert list(first.values()) == sorted(first.values()), first
    after = [e for e in events_of(path) if e["kind"] == "e1000"]
    irq = next(n for n, e in enumerate(after) if e["reason"] == "INTERRUPT")
    assert after[irq + 1]["reason"] == "ICR_READ" and "RXT0" in after[irq + 1]["detail"]["icr"]
    assert after[irq + 1]["action"] == "ICR cleared, INTx deasserted"
    tdt = next(e for e in events_of(path) if e["reason"] == "TDT")
    assert tdt["insn"].startswith("mov dword ptr [ebx + ecx], eax") and tdt["detail"]["tdt"] == 1


@pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark is not installed")
def test_tshark_reads_the_e1000_capture(tmp_path):
    pcap = tmp_path / "f.pcap"
    assert run_guest("netdemo", cmdline="quiet", devices=USER, pcap_path=str(pcap)).status == 0
    lines = subprocess.run(["tshark", "-r", str(pcap)], capture_output=True, text=True, timeout=60).stdout.splitlines()
    assert len(lines) == 305                                   # 303 sent, 2 received
    assert "Who has 10.0.2.2? Tell 10.0.2.15" in lines[0] and "10.0.2.2 is at 52:55:0a:00:02:02" in lines[1]
    assert "Echo (ping) reply" in lines[3] and " 1514 " in lines[4]


# -- the completion-order experiment, end to end ------------------------------------------------------------
SLOW = SlowDestination(10, 50)          # every 10th frame 50 virtual us late


def completions(kind, tmp_path):
    path = tmp_path / f"{kind}.jsonl"
    res = run_guest("netdemo", cmdline="quiet", devices=[DeviceSpec(kind, peer="user", slow=SLOW)], trace_path=str(path))
    assert res.status == 0 and b"FAIL" not in res.console, res.console.decode()[-400:]
    return res, [e["detail"] for e in events_of(path) if e["kind"] == "completion"]


def test_e1000_ring_completes_in_order_behind_slow_frames(tmp_path):
    res, done = completions("e1000", tmp_path)
    assert res.console == native(USER).console                 # the guest sees the same frames, later
    frames = [d["frame"] for d in done]
    assert frames == sorted(frames) and len(frames) == 303     # the ring never completes out of order
    assert all(d["overtook"] == 0 for d in done)
    behind = [d for d in done if not d["slow"] and d["latency_ns"] >= 50_000]
    assert behind                                              # fast frames that waited for a slow one


def test_virtqueue_returns_later_frames_first_behind_the_same_slow_frames(tmp_path):
    _, done = completions("virtio-net", tmp_path)
    frames = [d["frame"] for d in done]
    assert sorted(frames) == list(range(1, 305)) and frames != sorted(frames)
    assert any(d["overtook"] for d in done)
    assert all(d["latency_ns"] == 0 for d in done if not d["slow"])   # nobody waits for a slow frame
    assert all(d["latency_ns"] >= 50_000 for d in done if d["slow"])


def cli(*args):
    return subprocess.run([sys.executable, "-m", "cpuvirt", *args], capture_output=True, text=True, timeout=120)


def test_cli_e1000_summary_line():
    p = cli("run", "netdemo", "--device", "e1000,peer=user", "--append", "quiet")
    assert p.returncode == 0, p.stderr
    assert "e1000 00:02.0 52:54:00:12:34:56: tx 303 frames (0 dropped), rx 2 (0 dropped)" in p.stderr
    assert "0 ring errors" in p.stderr


@pytest.mark.parametrize("spec,message", [
    ("e1000,backend=vhost", "the e1000 has no virtio backends"),
    ("e1000,slow=3", "slow=3: want N:K"),
    ("e1000,slow=0:10", "N >= 1"),
    ("virtio-net,backend=vhost,slow=2:10", "slow= is modelled by the userspace device model only"),
    ("e1000,mac=01:00:00:00:00:01", "multicast"),
])
def test_cli_bad_e1000_specifications_are_one_line_and_status_2(spec, message):
    p = cli("run", "hello", "--device", spec)
    assert p.returncode == 2 and message in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr


@requires_qemu
def test_pci_header_and_bar_sizes_equal_qemus(test_guest):
    """tests/guests/pciprobe.S dumps the headers and BAR size masks: byte-identical with QEMU's e1000,
    alone and behind a virtio-net (the firmware's BAR assignment, biggest first, across both)."""
    image = test_guest("pciprobe")
    for specs, extra in (([DeviceSpec("e1000")], QEMU_E1000),
                         ([DeviceSpec("virtio-net"), DeviceSpec("e1000")],
                          ["-netdev", "user,id=n1", "-device", "virtio-net-pci,netdev=n1,disable-modern=on"]
                          + QEMU_E1000)):
        assert b"0x100e8086" in assert_same_console_as_qemu(image, specs, extra)


def test_the_drivers_ring_order_check_catches_a_device_that_completes_out_of_order(monkeypatch):
    """The PASS line about ring order is not free: a (deliberately wrong) e1000 that writes DD for the
    frames behind a slow one first, as a virtqueue would return them, makes netdemo FAIL it."""
    from cpuvirt.virtio import e1000 as E
    from cpuvirt.virtio.completion import TxCompletions

    real_take, real_done = TxCompletions.take, E.E1000._tx_done

    def take_without_stalling(self):
        number, _ = real_take(self)
        return number, 0

    def done_out_of_order(self, ring, head, indices, frame, number, taken_at):
        if number is None or not self.slow_frame(number):
            return real_done(self, ring, head, indices, frame, number, taken_at)
        real_done(self, ring, head, [(i, cmd & ~E.TXD_CMD_RS) for i, cmd in indices], frame, number, taken_at)

        def late():
            for i, _ in indices:
                at = ring.desc_address(i) + 12
                self.ram.write(at, bytes((self.ram.read(at, 1)[0] | E.TXD_STAT_DD,)))
        self.completions.timer.at(self.now() + 50_000, late)

    monkeypatch.setattr(TxCompletions, "take", take_without_stalling)
    monkeypatch.setattr(E.E1000, "_tx_done", done_out_of_order)
    monkeypatch.setattr(E.E1000, "slow_frame", lambda self, n: n % 10 == 0, raising=False)
    res = run_guest("netdemo", cmdline="quiet", devices=[DeviceSpec("e1000", peer="user", slow=SLOW)])
    assert b"FAIL DD came back in ring order" in res.console and res.status == 1
