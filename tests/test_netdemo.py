"""netdemo, the bundled virtio-net driver: every CPU mode, both interrupt kinds, both peers, QEMU's
console for the same peer, the pcap tshark reads, the trace a student reads, the command line."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from cpuvirt.runner import run_guest
from cpuvirt.toolchain.build import build_guest
from cpuvirt.virtio.setup import DeviceSpec
from tests.guest_args import QEMU_VIRTIO_NET
from tests.qemu import assert_same_console_as_qemu, qemu_available

LOOPBACK = [DeviceSpec("virtio-net")]
USER = [DeviceSpec("virtio-net", peer="user")]
_native: dict = {}


def native(devices=LOOPBACK, cmdline="quiet"):
    key = (tuple(devices), cmdline)
    if key not in _native:
        _native[key] = run_guest("netdemo", cmdline=cmdline, devices=devices)
    return _native[key]


@pytest.mark.parametrize("cmdline", ["quiet", "quiet msix"])
@pytest.mark.parametrize("mode", ["native", "trap", "full", "hw"])
def test_every_mode_passes_with_the_native_console(mode, cmdline):
    res = run_guest("netdemo", mode, cmdline=cmdline, devices=LOOPBACK)
    assert (res.outcome, res.status) == ("exit", 0), res.console.decode()[-400:]
    assert b"FAIL" not in res.console
    assert res.console == native(cmdline=cmdline).console
    assert b"PASS loopback peer: every frame came back unchanged" in res.console
    assert (b"interrupts: MSI-X" in res.console) == ("msix" in cmdline)
    d, = res.devices
    assert d["tx_frames"] == d["rx_frames"] == 304 and d["interrupts"] > 0 and d["needs_reset"] == 0


def test_without_the_device_netdemo_fails_cleanly():
    res = run_guest("netdemo")
    assert res.status == 1 and b"FAIL virtio-net on PCI bus 0" in res.console


def test_the_burst_is_batched_against_the_user_peer():
    """Nobody answers the burst: the driver fills the ring and kicks once per ring-full (EVENT_IDX)."""
    res = native(USER)
    assert res.status == 0 and b"peer: 10.0.2.2 is at 52:55:0a:00:02:02" in res.console
    d, = res.devices
    assert d["tx_frames"] == 304 and d["rx_frames"] == 2 and d["notifications"] < 10


requires_qemu = pytest.mark.skipif(not qemu_available(), reason="qemu-system-i386 is not on PATH")


@requires_qemu
@pytest.mark.parametrize("cmdline", ["", "msix"])
def test_console_equals_qemus_with_the_same_peer(cmdline, tmp_path):
    image = tmp_path / "netdemo.bin"
    image.write_bytes(build_guest("netdemo"))
    console = assert_same_console_as_qemu(image, USER, QEMU_VIRTIO_NET, cmdline, timeout=60)
    assert b"tx 60 bytes" in console                     # the per-frame lines are compared too


@pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark is not installed")
def test_tshark_reads_the_capture(tmp_path):
    pcap = tmp_path / "f.pcap"
    res = run_guest("netdemo", cmdline="quiet", devices=USER, pcap_path=str(pcap))
    assert res.status == 0
    out = subprocess.run(["tshark", "-r", str(pcap)], capture_output=True, text=True, timeout=60).stdout
    lines = out.splitlines()
    assert len(lines) == 306                                  # 304 sent, 2 received
    assert "Who has 10.0.2.2? Tell 10.0.2.15" in lines[0]
    assert "10.0.2.2 is at 52:55:0a:00:02:02" in lines[1]
    assert "Echo (ping) request" in lines[2] and "Echo (ping) reply" in lines[3] and "ttl=255" in lines[3]
    assert " 1514 " in lines[4] and sum(" 60 " in line for line in lines) == 300


def test_pcap_is_deterministic_and_well_formed(tmp_path):
    a, b = tmp_path / "a.pcap", tmp_path / "b.pcap"
    for path in (a, b):
        run_guest("netdemo", cmdline="quiet", devices=LOOPBACK, pcap_path=str(path))
    data = a.read_bytes()
    assert data == b.read_bytes()
    assert data[:4] == bytes.fromhex("d4c3b2a1") and int.from_bytes(data[20:24], "little") == 1
    count, off = 0, 24
    while off < len(data):
        incl = int.from_bytes(data[off + 8:off + 12], "little")
        off += 16 + incl
        count += 1
    assert off == len(data) and count == 608                  # every frame out and back


def test_trace_tells_the_story_top_to_bottom(tmp_path):
    path = tmp_path / "t.jsonl"
    run_guest("netdemo", cmdline="quiet", devices=USER, trace_path=str(path))
    events = [json.loads(line) for line in path.read_text().splitlines()[1:-1]]
    story = [(e["kind"], e["reason"]) for e in events if e["kind"] in ("pci", "virtio")]
    first = {k: story.index(k) for k in (("pci", "CONFIG_READ"), ("virtio", "STATUS"), ("virtio", "FEATURES"),
                                         ("virtio", "QUEUE_PFN"), ("virtio", "NOTIFY"), ("virtio", "TX"),
                                         ("virtio", "RX"), ("virtio", "INTERRUPT"), ("virtio", "ISR_READ"))}
    assert list(first.values()) == sorted(first.values()), first
    status = [e["detail"]["status"] for e in events if e["reason"] == "STATUS"]
    assert status == ["0 (reset)", "ACKNOWLEDGE", "ACKNOWLEDGE|DRIVER", "ACKNOWLEDGE|DRIVER|DRIVER_OK"]
    notify = next(e for e in events if e["reason"] == "NOTIFY")
    assert notify["insn"].startswith("out dx, ax") and notify["detail"]["queue"] == 0


@pytest.mark.parametrize("mode,kind", [("native", "io"), ("trap", "trap"), ("full", "callout"), ("hw", "vmexit")])
def test_each_mode_shows_its_own_notify_path(mode, kind, tmp_path):
    path = tmp_path / "t.jsonl"
    run_guest("netdemo", mode, cmdline="quiet", devices=USER, trace_path=str(path))
    events = [json.loads(line) for line in path.read_text().splitlines()[1:-1]]
    for n, e in enumerate(events):
        if e["reason"] == "NOTIFY":
            near = events[max(0, n - 2):n + 2]
            assert any(x["kind"] == kind and x["eip"] == e["eip"] and x is not e for x in near), near
            break
    else:
        pytest.fail("no NOTIFY event")


def test_hw_io_bitmap_lets_every_port_but_the_notify_register_through():
    """With use_io_bitmaps and only BAR0 + 16 in the bitmap, the kicks are the only I/O exits."""
    res = run_guest("netdemo", "hw", cmdline="quiet", devices=USER, mode_options={"vmx": ["io_bitmap=0xc010"]})
    assert res.status == 0 and res.console == native(USER).console
    io_exits = {name: count for name, _, count, _, _ in res.exit_stats}.get("IO_INSTRUCTION")
    assert io_exits == res.devices[0]["notifications"] == 7


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "cpuvirt", *args], capture_output=True, text=True, timeout=120,
                          cwd=cwd)


def test_cli_device_and_pcap(tmp_path):
    pcap = tmp_path / "f.pcap"
    p = cli("run", "netdemo", "--device", "virtio-net", "--pcap", str(pcap), "--append", "quiet")
    assert p.returncode == 0, p.stderr
    assert "PASS loopback peer" in p.stdout
    assert "virtio-net 00:02.0 52:54:00:12:34:56: tx 304 frames" in p.stderr
    assert pcap.stat().st_size > 24
    trace = tmp_path / "t.jsonl"
    assert cli("run", "netdemo", "--device", "virtio-net,peer=user,mac=52:54:00:00:00:01", "--append", "quiet",
               "--trace", str(trace), "-q").returncode == 0
    shown = cli("trace", "show", str(trace), "--kind", "virtio").stdout
    kinds = {line.split()[3] for line in shown.splitlines() if line.split() and line.split()[0].isdigit()}
    assert "DRIVER_OK" in shown and "NOTIFY" in shown and kinds == {"virtio"}


def test_cli_compare_with_a_device_shows_the_kick_site_in_both_modes():
    p = cli("compare", "netdemo", "--modes", "native,hw", "--device", "virtio-net,peer=user", "--append", "quiet")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    at = next(i for i, line in enumerate(lines) if "virtio TX x304" in line)   # native's row of the kick site
    site = lines[at - 1]
    block = " ".join(lines[at:at + 4])
    assert "out dx, ax" in site and "io out x" in block and "VM exit IO_INSTRUCTION x" in block


@pytest.mark.parametrize("args,message", [
    (["--device", "virtio-blk"], "unknown device 'virtio-blk'"),
    (["--device", "virtio-net,mac=52:54"], "bad MAC address"),
    (["--device", "virtio-net,peer=tap"], "unknown peer 'tap'"),
    (["--pcap", "x.pcap"], "--pcap needs a --device"),
    (["--device", "virtio-net", "--pcap", "/nonexistent/dir/f.pcap"], "--pcap /nonexistent/dir/f.pcap"),
])
def test_cli_bad_device_input_is_one_line_and_status_2(args, message):
    p = cli("run", "hello", *args)
    assert p.returncode == 2 and message in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
