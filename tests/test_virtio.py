"""The split virtqueue and the legacy virtio-net device, without Unicorn: a model driver in Python writes
rings into a bytearray, the device model consumes them. Every way a driver can break the rules has a
defined outcome (DEVICE_NEEDS_RESET, or the frame dropped and counted), and random ring contents
never make the device raise, hang, or write outside the used ring."""
from __future__ import annotations

import random
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cpuvirt.runner import run_guest
from cpuvirt.virtio.backend import Loopback, UserNet, inet_checksum
from cpuvirt.virtio.setup import DeviceSpec
from cpuvirt.virtio.net import HDR_LEN, VirtioNet
from cpuvirt.virtio.transport import (DEVICE_NEEDS_RESET, F_EVENT_IDX, F_INDIRECT_DESC, ISR_CONFIG,
                                      VirtioPciLegacy)
from cpuvirt.virtio.virtqueue import (DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, GuestRam, RingError,
                                      SplitQueue, legacy_layout, need_event)

RAM = 4 << 20
MAC = bytes.fromhex("525400123456")


def ram(size=RAM):
    mem = bytearray(size)
    return mem, GuestRam(size, lambda g, n: bytes(mem[g:g + n]), lambda g, d: mem.__setitem__(slice(g, g + len(d)), d))


class Driver:
    """A minimal legacy driver for one queue: descriptors and avail ring written as the spec lays them out."""

    def __init__(self, mem, size, pfn):
        self.mem, self.size = mem, size
        self.desc, self.avail, self.used = legacy_layout(size, pfn)
        self.avail_idx = self.used_seen = 0

    def put_desc(self, i, addr, length, flags=0, nxt=0, table=None):
        struct.pack_into("<QIHH", self.mem, (self.desc if table is None else table) + 16 * i, addr, length, flags, nxt)

    def publish(self, head):
        struct.pack_into("<H", self.mem, self.avail + 4 + 2 * (self.avail_idx % self.size), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        struct.pack_into("<H", self.mem, self.avail + 2, self.avail_idx)

    def used_entries(self):
        idx = struct.unpack_from("<H", self.mem, self.used + 2)[0]
        out = []
        while self.used_seen != idx:
            out.append(struct.unpack_from("<II", self.mem, self.used + 4 + 8 * (self.used_seen % self.size)))
            self.used_seen = (self.used_seen + 1) & 0xFFFF
        return out


# -- the ring against the model driver -----------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(size=st.sampled_from([2, 4, 8, 16]),
       frames=st.lists(st.tuples(st.binary(min_size=0, max_size=300), st.integers(1, 3)), min_size=1, max_size=60))
def test_device_reads_back_every_chain_the_driver_made_in_order_across_wraps(size, frames):
    mem, guest = ram()
    drv = Driver(mem, size, 0x10)
    q = SplitQueue.legacy(guest, size, 0x10)
    data_base, next_desc, free = 0x100000, 0, size
    for n, (payload, parts) in enumerate(frames):
        parts = min(parts, size)
        if free < parts:                               # the device consumes and returns everything
            while (chain := q.pop()) is not None:
                q.push(chain.head, 0)
            free = size
            assert len(drv.used_entries()) > 0
        cuts = sorted({0, len(payload), *[len(payload) * k // parts for k in range(1, parts)]})
        pieces = [payload[a:b] for a, b in zip(cuts, cuts[1:])] or [b""]
        head = next_desc
        for k, piece in enumerate(pieces):
            addr = data_base + 0x1000 * (n % 64) + 0x200 * k
            mem[addr:addr + len(piece)] = piece
            i = next_desc
            next_desc = (next_desc + 1) % size
            drv.put_desc(i, addr, len(piece), DESC_F_NEXT if k < len(pieces) - 1 else 0, next_desc)
        free -= len(pieces)
        drv.publish(head)
        chain = q.pop()
        assert chain.head == head and len(chain.buffers) == len(pieces)
        assert q.buffer_read(chain, 1 << 20) == payload
        # put it back as unconsumed for the batch logic above: push now, the driver sees it in order
        q.push(chain.head, len(payload))
        assert drv.used_entries() == [(head, len(payload))]
        free += len(pieces)


@given(event=st.integers(0, 0xFFFF), old=st.integers(0, 0xFFFF), step=st.integers(0, 300))
def test_need_event_is_crossing_the_event_index(event, old, step):
    """vring_need_event against its meaning: some index in [old, new) equals event (mod 2^16)."""
    new = (old + step) & 0xFFFF
    assert need_event(event, new, old) == any((old + k) & 0xFFFF == event for k in range(step))


def test_event_idx_device_publishes_avail_event_and_honours_used_event():
    mem, guest = ram()
    drv = Driver(mem, 8, 0x10)
    q = SplitQueue.legacy(guest, 8, 0x10, event_idx=True)
    for i in range(3):
        drv.put_desc(i, 0x100000, 16, DESC_F_WRITE)
        drv.publish(i)
    struct.pack_into("<H", mem, drv.avail + 4 + 2 * 8, 2)      # used_event: interrupt once used passes 2
    for expect in (False, False, True):
        chain = q.pop()
        q.push(chain.head, 0)
        assert q.should_interrupt() is expect
    assert struct.unpack_from("<H", mem, drv.used + 4 + 8 * 8)[0] == 3     # avail_event = consumed


def test_indirect_table_is_walked_when_negotiated():
    mem, guest = ram()
    drv = Driver(mem, 8, 0x10)
    table = 0x200000
    drv.put_desc(0, 0x100000, 10, DESC_F_NEXT, 1, table=table)
    drv.put_desc(1, 0x100100, 20, 0, 0, table=table)
    drv.put_desc(5, table, 32, DESC_F_INDIRECT)
    drv.publish(5)
    chain = SplitQueue.legacy(guest, 8, 0x10, indirect=True).pop()
    assert chain.indirect and chain.buffers == [(0x100000, 10, False), (0x100100, 20, False)]


# -- the rules a driver can break: ring level ---------------------------------------------------------------
def broken_ring(setup, size=8, **features):
    mem, guest = ram()
    drv = Driver(mem, size, 0x10)
    setup(drv, mem)
    with pytest.raises(RingError) as e:
        q = SplitQueue.legacy(guest, size, 0x10, **features)
        q.pop()
    return str(e.value)


@pytest.mark.parametrize("name,setup,match,features", [
    ("buffer outside RAM", lambda d, m: (d.put_desc(0, RAM - 8, 64), d.publish(0)), "outside guest RAM", {}),
    ("buffer in the APIC's page", lambda d, m: (d.put_desc(0, 0xFEE00000, 4), d.publish(0)), "outside guest RAM", {}),
    ("address beyond 4 GiB", lambda d, m: (d.put_desc(0, 1 << 40, 4), d.publish(0)), "outside guest RAM", {}),
    ("chain loops", lambda d, m: (d.put_desc(0, 0x1000, 4, DESC_F_NEXT, 1), d.put_desc(1, 0x1000, 4, DESC_F_NEXT, 0),
                                  d.publish(0)), "loop", {}),
    ("next outside the table", lambda d, m: (d.put_desc(0, 0x1000, 4, DESC_F_NEXT, 9), d.publish(0)), "outside its table", {}),
    ("head outside the table", lambda d, m: d.publish(8), "head 8", {}),
    ("avail idx ahead of the queue", lambda d, m: struct.pack_into("<H", m, d.avail + 2, 9), "ahead", {}),
    ("readable after writable", lambda d, m: (d.put_desc(0, 0x1000, 4, DESC_F_WRITE | DESC_F_NEXT, 1),
                                              d.put_desc(1, 0x1000, 4), d.publish(0)), "readable after", {}),
    ("indirect not negotiated", lambda d, m: (d.put_desc(0, 0x2000, 16, DESC_F_INDIRECT), d.publish(0)),
     "not negotiated", {}),
    ("indirect and next", lambda d, m: (d.put_desc(0, 0x2000, 16, DESC_F_INDIRECT | DESC_F_NEXT, 1), d.publish(0)),
     "both INDIRECT and NEXT", {"indirect": True}),
    ("indirect length", lambda d, m: (d.put_desc(0, 0x2000, 15, DESC_F_INDIRECT), d.publish(0)), "multiple of 16",
     {"indirect": True}),
    ("nested indirect", lambda d, m: (d.put_desc(0, 0x2000, 16, DESC_F_INDIRECT),
                                      d.put_desc(0, 0x3000, 16, DESC_F_INDIRECT, table=0x2000), d.publish(0)),
     "another indirect", {"indirect": True}),
    ("indirect table loops", lambda d, m: (d.put_desc(0, 0x2000, 32, DESC_F_INDIRECT),
                                           d.put_desc(0, 0x1000, 4, DESC_F_NEXT, 1, table=0x2000),
                                           d.put_desc(1, 0x1000, 4, DESC_F_NEXT, 0, table=0x2000), d.publish(0)),
     "loop", {"indirect": True}),
])
def test_each_broken_ring_rule_is_a_ring_error(name, setup, match, features):
    assert match in broken_ring(setup, **features)


def test_ring_outside_ram_is_refused_at_set_up():
    _, guest = ram()
    with pytest.raises(RingError, match="outside guest RAM"):
        SplitQueue.legacy(guest, 256, (RAM >> 12) - 1)


# -- the device: transport + virtio-net ----------------------------------------------------------------------
class Rig:
    """A virtio-net transport over a bytearray RAM, driven register by register like a guest."""

    def __init__(self, peer=None, features=None):
        self.mem, guest = ram()
        self.events = []
        self.dev = VirtioNet(MAC, peer or Loopback())
        self.t = VirtioPciLegacy(self.dev, guest, lambda r, d, a: self.events.append((r, d, a)))
        self.t.write_config(4, 2, 0x7)                          # I/O, memory, bus master
        self.features = self.dev.host_features() if features is None else features

    def out(self, reg, value, size=4):
        self.t.io_write(reg, size, value)

    def inp(self, reg, size=4):
        return self.t.io_read(reg, size)

    def init(self, rx_pfn=0x10, tx_pfn=0x20, driver_ok=True):
        for status in (0, 1, 3):
            self.out(18, status, 1)
        self.out(4, self.features)
        for q, pfn in ((0, rx_pfn), (1, tx_pfn)):
            self.out(14, q, 2)
            self.out(8, pfn)
        if driver_ok:
            self.out(18, 7, 1)
        self.rx = Driver(self.mem, 256, rx_pfn)
        self.tx = Driver(self.mem, 256, tx_pfn)

    @property
    def status(self):
        return self.inp(18, 1)

    def reasons(self):
        return [r for r, _, _ in self.events]

    def send(self, frame, slot=0, addr=0x100000):
        self.mem[addr:addr + HDR_LEN + len(frame)] = bytes(HDR_LEN) + frame
        self.tx.put_desc(slot, addr, HDR_LEN + len(frame))
        self.tx.publish(slot)
        self.out(16, 1, 2)

    def post_rx(self, slot, length=2048, addr=None):
        addr = 0x200000 + 0x1000 * slot if addr is None else addr
        self.rx.put_desc(slot, addr, length, DESC_F_WRITE)
        self.rx.publish(slot)
        return addr


ARP = bytes.fromhex("ffffffffffff525400123456080600010800060400015254001234560a00020f0000000000000a000202")


def test_init_sequence_is_traced_step_by_step_and_loopback_echoes():
    r = Rig()
    r.init()
    assert r.status == 7
    assert r.reasons()[:4] == ["STATUS", "STATUS", "STATUS", "FEATURES"]
    assert r.reasons().count("QUEUE_PFN") == 2
    buf = r.post_rx(0)
    r.out(16, 0, 2)
    r.send(ARP)
    assert r.tx.used_entries() == [(0, 0)]
    assert r.rx.used_entries() == [(0, HDR_LEN + len(ARP))]
    assert bytes(r.mem[buf:buf + HDR_LEN]) == bytes(HDR_LEN) and bytes(r.mem[buf + HDR_LEN:buf + HDR_LEN + 42]) == ARP
    assert r.inp(19, 1) == 1 and r.inp(19, 1) == 0              # ISR: used buffer, then read-cleared
    assert {"NOTIFY", "TX", "RX", "INTERRUPT"} <= set(r.reasons())


def test_user_peer_answers_arp_and_ping_like_slirp():
    r = Rig(UserNet())
    r.init()
    r.post_rx(0)
    r.post_rx(1)
    r.out(16, 0, 2)
    r.send(ARP)
    (head, n), = r.rx.used_entries()
    reply = bytes(r.mem[0x200000 + HDR_LEN:0x200000 + n])
    assert len(reply) == 64 and reply[:6] == MAC and reply[6:12] == bytes.fromhex("52550a000202")
    assert reply[20:22] == b"\x00\x02" and reply[28:32] == bytes((10, 0, 2, 2))
    icmp = bytes.fromhex("0800") + b"\0\0" + bytes.fromhex("4e440001") + b"x" * 8
    icmp = icmp[:2] + struct.pack("!H", inet_checksum(icmp)) + icmp[4:]
    ip = bytearray(bytes.fromhex("45000024000100004001") + b"\0\0" + bytes((10, 0, 2, 15, 10, 0, 2, 2)))
    ip[10:12] = struct.pack("!H", inet_checksum(bytes(ip)))
    r.send(bytes.fromhex("52550a000202") + MAC + b"\x08\x00" + bytes(ip) + icmp, slot=1, addr=0x110000)
    (head, n), = r.rx.used_entries()
    pong = bytes(r.mem[0x201000 + HDR_LEN:0x201000 + n])
    assert pong[34] == 0 and pong[22] == 255 and pong[26:30] == bytes((10, 0, 2, 2))
    assert inet_checksum(pong[14:34]) == 0 and inet_checksum(pong[34:]) == 0
    r.send(b"\xff" * 6 + MAC + b"\x88\xb5" + b"z" * 46, slot=2, addr=0x120000)     # nobody answers
    assert r.rx.used_entries() == [] and r.dev.backend.dropped == 1


def needs_reset(r, why):
    assert r.status & DEVICE_NEEDS_RESET, r.events
    assert any(reason == "DEVICE_NEEDS_RESET" and why in d["why"] for reason, d, _ in r.events), r.events
    assert r.t.isr & ISR_CONFIG                                  # a configuration-change interrupt
    assert r.t.counters["needs_reset"] == 1


def test_pfn_outside_ram_needs_reset():
    r = Rig()
    r.init(tx_pfn=RAM >> 12, driver_ok=False)
    needs_reset(r, "outside guest RAM")


def test_descriptor_outside_ram_needs_reset_and_then_nothing_moves_until_reset():
    r = Rig()
    r.init()
    r.tx.put_desc(0, RAM - 4, 64)
    r.tx.publish(0)
    r.out(16, 1, 2)
    needs_reset(r, "outside guest RAM")
    r.out(16, 1, 2)
    assert r.events[-1][2].startswith("ignored: the device needs a reset")
    r.out(18, 7, 1)
    assert r.status & DEVICE_NEEDS_RESET                        # only a reset clears it
    r.out(18, 0, 1)
    assert r.status == 0 and r.t.queues[1].ring is None
    r.init()
    assert r.status == 7


@pytest.mark.parametrize("steps,why", [
    ([(18, 1), (18, 3), (18, 7), (4, 0x20)], "driver features written with status"),        # after DRIVER_OK
    ([(18, 1), (14, 0), (8, 0x10)], "queue 0 PFN written with status ACKNOWLEDGE"),          # before DRIVER
    ([(18, 4)], "DRIVER_OK set before"),
    ([(18, 2)], "DRIVER set without ACKNOWLEDGE"),
    ([(18, 1), (18, 3), (4, 1 << 15)], "did not offer"),                                     # MRG_RXBUF
    ([(18, 1), (18, 3), (18, 1)], "cleared without a reset"),
])
def test_wrong_initialisation_order_needs_reset(steps, why):
    r = Rig()
    r.out(18, 0, 1)
    for reg, value in steps:
        r.out(reg, value, 1 if reg == 18 else 4 if reg in (4, 8) else 2)
    needs_reset(r, why)


def test_notify_of_a_queue_never_set_up_or_absent_is_ignored_and_counted():
    r = Rig()
    for status in (0, 1, 3, 7):
        r.out(18, status, 1)
    r.out(16, 1, 2)
    r.out(16, 7, 2)
    assert r.t.counters["ignored_notifications"] == 2
    assert [a for x, _, a in r.events if x == "NOTIFY"] == ["ignored: the queue was never set up",
                                                            "ignored: no such queue"]
    assert not r.status & DEVICE_NEEDS_RESET


def test_notify_without_bus_mastering_is_ignored():
    r = Rig()
    r.init()
    r.t.write_config(4, 2, 0x3)
    r.send(ARP)
    assert r.tx.used_entries() == [] and "bus mastering" in r.events[-1][2]


def test_frame_larger_than_the_receive_buffer_is_dropped_and_counted():
    r = Rig()
    r.init()
    r.post_rx(0, length=HDR_LEN + 20)
    r.send(ARP)
    assert r.rx.used_entries() == [(0, 0)]                      # the buffer comes back empty
    assert r.dev.counters["rx_dropped"] == 1 and r.dev.counters["rx_frames"] == 0
    assert not r.status & DEVICE_NEEDS_RESET


def test_short_transmit_chains_are_dropped_and_counted():
    r = Rig()
    r.init()
    r.tx.put_desc(0, 0x100000, 6)                               # shorter than the header
    r.tx.publish(0)
    r.tx.put_desc(1, 0x100000, HDR_LEN + 5)                     # shorter than an Ethernet header
    r.tx.publish(1)
    r.out(16, 1, 2)
    assert r.tx.used_entries() == [(0, 0), (1, 0)]
    assert r.dev.counters["tx_dropped"] == 2 and not r.status & DEVICE_NEEDS_RESET


def test_receive_chain_with_a_readable_buffer_needs_reset():
    r = Rig()
    r.init()
    r.rx.put_desc(0, 0x200000, 2048)                            # not device-writable
    r.rx.publish(0)
    r.send(ARP)
    needs_reset(r, "device-readable")


def test_backlog_waits_for_buffers_and_is_bounded():
    r = Rig()
    r.init()
    for i in range(300):
        r.dev.receive(ARP)
    assert len(r.dev.backlog) == 256 and r.dev.counters["rx_dropped"] == 44
    r.post_rx(0)
    r.out(16, 0, 2)
    assert r.rx.used_entries() == [(0, HDR_LEN + len(ARP))] and len(r.dev.backlog) == 255


def test_msix_vectors_and_config_offset():
    r = Rig()
    from cpuvirt.virtio.transport import MSIX_CAP
    assert r.inp(20, 4) == int.from_bytes(MAC[:4], "little")   # config at 20 without MSI-X
    r.t.write_config(MSIX_CAP + 2, 2, 0x8000)
    assert r.inp(24, 4) == int.from_bytes(MAC[:4], "little")   # ... at 24 with it
    r.init()
    r.out(14, 0, 2)
    r.out(22, 0, 2)
    assert r.inp(22, 2) == 0
    r.out(22, 9, 2)
    assert r.inp(22, 2) == 0xFFFF                               # past the table: NO_VECTOR
    r.out(22, 0, 2)
    r.post_rx(0)
    r.send(ARP)                                                 # vector 0 is masked: pending bit
    assert r.t.msix_pending & 1 and r.t.isr == 0
    assert any(a == "masked: pending bit set" for _, _, a in r.events)


# -- fuzz: random ring contents ------------------------------------------------------------------------------
def test_fuzz_random_rings_never_escape_the_ring_rules():
    """A few thousand rounds of random descriptor tables and available rings: every notification ends
    in a defined outcome, and the device writes nothing but the used rings and the receive buffers."""
    rng = random.Random(11)
    fuzz_ram = 1 << 19
    outcomes = {"ok": 0, "reset": 0}
    for round_ in range(3000):
        size = rng.choice((4, 8, 16))
        mem, guest = ram(fuzz_ram)
        dev = VirtioNet(MAC, Loopback())
        t = VirtioPciLegacy(dev, guest)
        t.write_config(4, 2, 7)
        for status in (0, 1, 3):
            t.io_write(18, 1, status)
        t.queues[0].size = t.queues[1].size = size              # small queues: more collisions
        t.io_write(4, 4, rng.choice((0, 1 << F_INDIRECT_DESC, 1 << F_EVENT_IDX | 1 << F_INDIRECT_DESC)))
        for q, pfn in ((0, 0x10), (1, 0x20)):
            t.io_write(14, 2, q)
            t.io_write(8, 4, pfn)
        t.io_write(18, 1, 7)
        assert t.device_status == 7
        for pfn in (0x10, 0x20):
            desc, avail, used = legacy_layout(size, pfn)
            for i in range(size):
                addr = rng.choice((0x40000 + rng.randrange(0x10000), rng.randrange(1 << 64), fuzz_ram - rng.randrange(64),
                                   0x30000 + rng.randrange(64) * 16))
                flags = rng.randrange(8) if rng.random() < 0.7 else rng.randrange(1 << 16)
                length = rng.choice((0, 14, 60, 2000, rng.randrange(1 << 32)))
                struct.pack_into("<QIHH", mem, desc + 16 * i, addr, length, flags, rng.randrange(size + 2))
            for i in range(size):
                struct.pack_into("<H", mem, avail + 4 + 2 * i, rng.randrange(size + 1))
            idx = rng.randrange(size + 2) if rng.random() < 0.9 else rng.randrange(1 << 16)
            struct.pack_into("<H", mem, avail + 2, idx)
        mem[0x30000:0x30000 + 1024] = rng.randbytes(1024)        # indirect tables point here
        before = bytes(mem)
        t.io_write(16, 2, 1)                                      # transmit; loopback: receive too
        t.io_write(16, 2, 0)
        outcomes["reset" if t.device_status & DEVICE_NEEDS_RESET else "ok"] += 1
        allowed = [(legacy_layout(size, p)[2], legacy_layout(size, p)[2] + 6 + 8 * size) for p in (0x10, 0x20)]
        rx_desc = legacy_layout(size, 0x10)[0]
        for i in range(size):
            a, n, f, _ = struct.unpack_from("<QIHH", before, rx_desc + 16 * i)
            if f & DESC_F_WRITE:
                allowed.append((a, a + n))
        for page in range(0, fuzz_ram, 4096):
            if before[page:page + 4096] != mem[page:page + 4096]:
                diff = [i for i in range(page, page + 4096) if before[i] != mem[i]]
                assert all(any(lo <= i < hi for lo, hi in allowed) for i in diff), (round_, hex(diff[0]))
    assert outcomes["ok"] > 100 and outcomes["reset"] > 100, outcomes


# -- DMA and the hypervisor's own bookkeeping ----------------------------------------------------------------
def test_device_writes_tell_the_owners_of_traced_frames():
    """A device writing into a write-traced frame (a shadowed page table, translated code) is a store the
    guest's page-table traces never see: its owners are told, as for the hypervisor's own stores."""
    from cpuvirt.machine.machine import Machine
    m = Machine(8)
    seen = []
    m.mmu.traces.trace_frame(0x5000, "test", lambda tw: seen.append((tw.gpa, tw.size, tw.done)))
    m.dma_write(0x5008, b"abcd")
    m.dma_write(0x7000, b"abcd")                                # not traced: nobody told
    assert seen == [(0x5008, 4, True)] and m.read_gpa(0x5008, 4) == b"abcd"


def test_para_typed_frames_are_never_written_by_a_device(monkeypatch):
    """Under direct paging the guest's page tables, GDT and hypercall page are safe only because
    nothing writes them unvalidated: a receive buffer posted over one makes the device need a reset
    and leaves the frame untouched (Xen keeps such frames out of a device's IOMMU mappings)."""
    import cpuvirt.virtio.setup as setup
    from cpuvirt.memory.direct import L1, DirectPaging
    captured = []
    real = setup.attach_devices

    def spy(machine, *args, **kwargs):
        captured.append(machine)
        return real(machine, *args, **kwargs)

    monkeypatch.setattr(setup, "attach_devices", spy)
    res = run_guest("hello", "para", devices=[DeviceSpec("virtio-net")])
    assert res.status == 0
    m = captured[0]
    paging = m.mmu.strategy
    assert isinstance(paging, DirectPaging) and m.mmu.dma_guard == paging.dma_refusal
    hypercall_frames = [p for p in range(paging.nr_pages) if paging.count[p] and paging.type[p] == 5]
    assert hypercall_frames and m.dma_refusal(hypercall_frames[0] << 12, 4) is not None

    # the device itself, over a machine whose frame 0x300 is an L1 table
    from cpuvirt.machine.machine import Machine
    m = Machine(8)
    paging = DirectPaging(m.mmu, 2048, m.ram.hpa)
    paging.type[0x300], paging.count[0x300] = L1, 1
    m.mmu.dma_guard = paging.dma_refusal
    (t,), _ = setup.attach_devices(m, [DeviceSpec("virtio-net")])
    t.write_config(4, 2, 7)
    for status in (0, 1, 3):
        t.io_write(18, 1, status)
    for q, pfn in ((0, 0x10), (1, 0x20)):
        t.io_write(14, 2, q)
        t.io_write(8, 4, pfn)
    t.io_write(18, 1, 7)
    rx, tx = Driver(bytearray(), 256, 0x10), Driver(bytearray(), 256, 0x20)
    desc = struct.pack("<QIHH", 0x300000, 2048, DESC_F_WRITE, 0)
    m.write_gpa(rx.desc, desc)
    m.write_gpa(rx.avail + 4, b"\0\0")
    m.write_gpa(rx.avail + 2, b"\1\0")
    before = m.read_gpa(0x300000, 4096)
    t.device.receive(ARP)
    assert t.device_status & DEVICE_NEEDS_RESET and m.read_gpa(0x300000, 4096) == before
    assert t.counters["needs_reset"] == 1


HOSTILE_CONSOLE = b"""descriptor at the APIC page: status 0x47
looping chain: status 0x47
available index ahead: status 0x47
buffer past the end of RAM: status 0x47
queue PFN beyond RAM: status 0x43
kick of a queue never set up: status 0x07
DRIVER_OK right after reset: status 0x44
PASS the device survived every broken ring
"""


@pytest.mark.parametrize("mode", ["native", "trap", "full", "hw"])
def test_a_hostile_driver_meets_the_defined_outcomes_in_every_mode(mode, test_guest):
    """tests/guests/virtio_hostile.S breaks the rules one after the other from inside a guest: each
    case ends in DEVICE_NEEDS_RESET (0x40) or an ignored kick, and the run ends normally."""
    res = run_guest(str(test_guest("virtio_hostile")), mode, devices=[DeviceSpec("virtio-net")])
    assert (res.outcome, res.status) == ("exit", 0), res.message
    assert res.console == HOSTILE_CONSOLE
    d, = res.devices
    assert d["needs_reset"] == 6 and d["ignored_notifications"] >= 1
