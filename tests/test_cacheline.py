"""The cache-line model of the rings (cpuvirt/virtio/cacheline.py) and DPDK's fixed available-ring
mapping in netdemo (`fixed`)."""
from __future__ import annotations

import pytest

from cpuvirt.errors import CpuvirtError
from cpuvirt.runner import run_guest
from cpuvirt.virtio.cacheline import DEVICE, DRIVER, CacheLineModel
from cpuvirt.virtio.setup import DeviceSpec, parse_device


def test_a_line_moves_only_when_the_other_side_wrote_it_last():
    c = {}
    m = CacheLineModel(c)
    m.add_ring(0x1000, 0x1100)
    m.touch(DRIVER, 0x1000, 16, True)           # first write: nobody else had it
    m.touch(DRIVER, 0x1010, 16, True)
    assert c == {"cachelines_to_driver": 0, "cachelines_to_device": 0}
    m.touch(DEVICE, 0x1008, 2, False)           # the device reads the driver's line: one transfer
    m.touch(DEVICE, 0x1030, 4, False)           # same line, still valid in the device's cache
    assert c["cachelines_to_device"] == 1
    m.touch(DRIVER, 0x1000, 4, True)            # the driver writes its own (shared) line: no transfer
    m.touch(DEVICE, 0x1000, 4, False)           # ... but the device's copy is gone
    assert c["cachelines_to_device"] == 2
    m.touch(DEVICE, 0x103E, 4, True)            # spans lines 0x1000 and 0x1040 (never written: free)
    m.touch(DRIVER, 0x1040, 2, False)           # the driver reads what the device wrote
    m.touch(DRIVER, 0x1000, 2, False)
    assert c == {"cachelines_to_driver": 2, "cachelines_to_device": 2}
    m.touch(DEVICE, 0x2000, 64, True)           # outside the rings: not modelled
    m.touch(DRIVER, 0x2000, 64, False)
    assert c["cachelines_to_driver"] == 2


def _lines(cmdline):
    r = run_guest("netdemo", cmdline=cmdline, devices=[DeviceSpec("virtio-net", cachelines=True)])
    assert r.outcome == "exit" and r.status == 0, r.message
    d = r.devices[0]
    return d["tx_frames"], d["cachelines_to_driver"], d["cachelines_to_device"]


def test_the_fixed_mapping_saves_the_device_the_available_ring_lines():
    """Loopback peer, one frame per kick: with slot i holding descriptor i, the driver never rewrites
    the available ring's entries, so the device keeps those lines; the used ring is unchanged."""
    frames, to_driver, to_device = _lines("bench single")
    frames_f, to_driver_f, to_device_f = _lines("bench fixed")
    assert frames == frames_f == 302
    assert to_driver_f == to_driver
    assert to_device - to_device_f > frames            # more than a line per frame (both rings' slots)


def test_cachelines_need_a_backend_cpuvirt_started():
    with pytest.raises(CpuvirtError, match="cachelines"):
        parse_device("virtio-net,backend=vhost-user,socket=/tmp/x.sock,cachelines=on")
    assert parse_device("virtio-net,backend=vhost-user,cachelines=on").cachelines


def test_a_vhost_user_process_reports_the_same_lines_as_the_device_model():
    """The backend process notes the ring lines its data path touched and reports them after each
    in-band kick: the model then counts what it counts for the in-process device model."""
    def lines(backend):
        r = run_guest("netdemo", cmdline="bench fixed burst=60",
                      devices=[DeviceSpec("virtio-net", backend=backend, cachelines=True)])
        assert r.status == 0, r.message
        d = r.devices[0]
        return d["cachelines_to_driver"], d["cachelines_to_device"], d["copies"], d["interrupts_suppressed"]
    userspace, remote = lines("userspace"), lines("vhost-user")
    assert remote[0] == userspace[0] and abs(remote[1] - userspace[1]) <= 1      # (the first receive kick)
    assert remote[2:] == userspace[2:] and remote[2] > 0
