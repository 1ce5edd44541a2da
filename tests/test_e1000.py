"""The 82540EM model (cpuvirt/virtio/e1000.py) without Unicorn: a model driver in Python writes legacy
descriptor rings into a bytearray and moves the tails; the device consumes in order and moves the heads.
Register semantics, head/tail wrap, DD write-back, the in-order stall behind a slow frame (against the
virtqueue, which returns later buffers first), and broken rings as device errors, never host accesses."""
from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cpuvirt.machine.pci import COMMAND
from cpuvirt.virtio.backend import Loopback
from cpuvirt.virtio.completion import DeviceTimer, SlowDestination, TxCompletions
from cpuvirt.virtio.e1000 import (CTRL, EERD, ICR, ICR_RXT0, ICR_TXDW, ICR_TXQE, IMC, IMS, RA, RCTL, RCTL_BAM,
                                  RCTL_EN, RCTL_SECRC, RDBAL, RDH, RDLEN, RDT, STATUS, TCTL, TCTL_EN, TDBAL, TDH,
                                  TDLEN, TDT, TXD_CMD_EOP, TXD_CMD_RS, E1000)
from cpuvirt.virtio.virtqueue import GuestRam

RAM = 4 << 20
MAC = bytes.fromhex("525400123456")
TX_RING, RX_RING, BUFS = 0x10000, 0x20000, 0x100000


class Clock:
    def __init__(self):
        self.ns = 0

    def __call__(self):
        return self.ns


def make(slow=None, backend=None, events=None):
    mem = bytearray(RAM)
    guest = GuestRam(RAM, lambda g, n: bytes(mem[g:g + n]), lambda g, d: mem.__setitem__(slice(g, g + len(d)), d))
    clock = Clock()
    record = events if events is not None else []
    trace = lambda reason, detail, action, kind="e1000", **_: record.append((kind, reason, detail, action))  # noqa: E731
    timer = DeviceTimer(clock)
    completions = TxCompletions("e1000", slow, timer, trace) if slow is not None else None
    nic = E1000(MAC, guest, backend, None, trace, completions, clock)
    nic.write_config(COMMAND, 2, 0x7)                  # memory decoding and bus mastering, as a driver sets
    return nic, mem, clock, timer, record


def tx_setup(nic, n=8):
    nic.reg_write(TDBAL, TX_RING)
    nic.reg_write(TDLEN, 16 * n)
    nic.reg_write(TCTL, TCTL_EN)


def tx_put(mem, i, addr, data, cmd=TXD_CMD_EOP | TXD_CMD_RS):
    mem[addr:addr + len(data)] = data
    struct.pack_into("<QHBBBBH", mem, TX_RING + 16 * i, addr, len(data), 0, cmd, 0, 0, 0)


def tx_status(mem, i):
    return mem[TX_RING + 16 * i + 12]


def frame(n, length=60):
    return b"\xff" * 6 + MAC + b"\x88\xb5" + bytes((n + k) & 0xFF for k in range(length - 14))


def test_pci_identity_is_qemus_82540em():
    nic, *_ = make()
    assert nic.read_config(0, 4) == 0x100E8086 and nic.read_config(8, 4) == 0x02000003
    assert nic.read_config(0x2C, 4) == 0x11001AF4 and nic.config[0x3D] == 1
    assert nic.bars[0].size == 0x20000 and not nic.bars[0].io and nic.bars[1].size == 0x40 and nic.bars[1].io


def test_reset_state_status_mac_in_ra0_and_eerd():
    nic, *_ = make()
    assert nic.reg_read(STATUS) == 0x80080783              # QEMU: FD, LU, 1000 Mb/s, link up
    assert nic.reg_read(CTRL) & 0x40                       # SLU
    assert nic.reg_read(RA).to_bytes(4, "little") + (nic.reg_read(RA + 4) & 0xFFFF).to_bytes(2, "little") == MAC
    assert nic.reg_read(RA + 4) >> 31 == 1                 # address valid
    words = []
    for w in range(3):
        nic.reg_write(EERD, w << 8 | 1)
        v = nic.reg_read(EERD)
        assert v & 0x10                                    # DONE
        words.append(v >> 16)
    assert b"".join(x.to_bytes(2, "little") for x in words) == MAC
    assert nic.reg_read(TDH) == nic.reg_read(TDT) == nic.reg_read(RDH) == nic.reg_read(RDT) == 0


def test_icr_is_read_to_clear_and_intx_follows_ims():
    nic, mem, *_ = make(backend=Loopback())
    nic.reg_write(IMS, ICR_TXDW)
    tx_setup(nic)
    tx_put(mem, 0, BUFS, frame(0))
    nic.reg_write(TDT, 1)
    assert nic.intx_level                                  # TXDW is enabled and pending
    assert nic.reg_read(ICR) == ICR_TXDW | ICR_TXQE        # both causes are reported ...
    assert nic.reg_read(ICR) == 0 and not nic.intx_level   # ... and the read cleared them: the line fell
    tx_put(mem, 1, BUFS, frame(1))
    nic.reg_write(IMC, ICR_TXDW)                           # masked: the cause is latched, INTx stays low
    nic.reg_write(TDT, 2)
    assert not nic.intx_level and nic.reg_read(ICR) & ICR_TXDW
    assert nic.reg_read(IMS) == 0


def test_tx_consumes_in_order_writes_dd_and_wraps_head_and_tail():
    sent = []

    class Sink(Loopback):
        def transmit(self, f):
            sent.append(f)

    nic, mem, *_ = make(backend=Sink())
    tx_setup(nic, 8)
    tail = 0
    for n in range(20):                                    # 20 frames through 8 descriptors: both wrap
        tx_put(mem, tail, BUFS + 0x800 * tail, frame(n))
        mem[TX_RING + 16 * tail + 12] = 0
        tail = (tail + 1) % 8
        nic.reg_write(TDT, tail)
        assert nic.reg_read(TDH) == tail                   # consumed: the head caught up with the tail
        assert tx_status(mem, (tail - 1) % 8) & 1          # DD written back
    assert sent == [frame(n) for n in range(20)]
    # without RS nothing is written back, but the head still moves
    tx_put(mem, tail, BUFS, frame(99), cmd=TXD_CMD_EOP)
    mem[TX_RING + 16 * tail + 12] = 0
    nic.reg_write(TDT, (tail + 1) % 8)
    assert tx_status(mem, tail) == 0 and nic.reg_read(TDH) == (tail + 1) % 8


def test_a_frame_over_several_descriptors_waits_for_its_eop():
    sent = []

    class Sink(Loopback):
        def transmit(self, f):
            sent.append(f)

    nic, mem, *_ = make(backend=Sink())
    tx_setup(nic)
    data = frame(7, 1514)
    tx_put(mem, 0, BUFS, data[:700], cmd=TXD_CMD_RS)
    tx_put(mem, 1, BUFS + 0x1000, data[700:], cmd=TXD_CMD_RS | TXD_CMD_EOP)
    nic.reg_write(TDT, 1)                                  # the tail cuts the frame: nothing goes yet
    assert sent == [] and nic.reg_read(TDH) == 0 and tx_status(mem, 0) == 0
    nic.reg_write(TDT, 2)
    assert sent == [data] and nic.reg_read(TDH) == 2 and tx_status(mem, 0) & 1 and tx_status(mem, 1) & 1


def rx_setup(nic, mem, n=8, posted=7, rctl=RCTL_EN | RCTL_BAM | RCTL_SECRC):
    nic.reg_write(RDBAL, RX_RING)
    nic.reg_write(RDLEN, 16 * n)
    for i in range(n):
        struct.pack_into("<QHHBBH", mem, RX_RING + 16 * i, BUFS + 0x800 * i, 0, 0, 0, 0, 0)
    nic.reg_write(RCTL, rctl)
    nic.reg_write(RDT, posted)


def test_rx_fills_in_order_pads_short_frames_writes_dd_eop_and_waits_when_full():
    nic, mem, *_ = make()
    nic.reg_write(IMS, ICR_RXT0)
    rx_setup(nic, mem, 8, posted=3)
    for n in range(5):
        nic.receive(frame(n, 42 if n == 0 else 60))
    assert nic.reg_read(RDH) == 3 and len(nic.backlog) == 2        # head == tail: the rest wait
    assert nic.intx_level and nic.reg_read(ICR) & ICR_RXT0
    length, _, status = struct.unpack_from("<HHB", mem, RX_RING + 8)
    assert length == 60 and status & 0x03 == 0x03                  # padded to 60; DD | EOP
    assert bytes(mem[BUFS:BUFS + 42]) == frame(0, 42) and bytes(mem[BUFS + 42:BUFS + 60]) == bytes(18)
    nic.reg_write(RDT, 7)                                          # more descriptors: the backlog drains
    assert nic.reg_read(RDH) == 5 and not nic.backlog
    nic.reg_write(RCTL, RCTL_EN | RCTL_BAM)                        # CRC not stripped: 4 more bytes counted
    nic.receive(frame(9))
    assert struct.unpack_from("<H", mem, RX_RING + 16 * 5 + 8)[0] == 64


def test_rx_filter_takes_our_address_and_broadcast_only():
    nic, mem, *_ = make()
    rx_setup(nic, mem)
    nic.receive(bytes.fromhex("525400999999") + MAC + bytes(50))   # someone else's unicast
    assert nic.reg_read(RDH) == 0 and nic.counters["rx_dropped"] == 1
    nic.receive(MAC + MAC + bytes(50))
    assert nic.reg_read(RDH) == 1


# -- the completion-order experiment ---------------------------------------------------------------------
def test_e1000_completes_strictly_in_order_behind_a_slow_frame():
    """Every 2nd frame of 6 goes to a slow destination: the head stops on frame 2, and frames 3-6 (already
    given to the device) complete only after it. A model that completed them first fails here."""
    events = []
    nic, mem, clock, timer, _ = make(SlowDestination(2, 100), Loopback(), events)
    tx_setup(nic, 8)
    for n in range(6):
        tx_put(mem, n, BUFS + 0x800 * n, frame(n))
    nic.reg_write(TDT, 6)
    assert nic.reg_read(TDH) == 1                          # frame 1 done, the head waits on frame 2
    assert [tx_status(mem, i) & 1 for i in range(6)] == [1, 0, 0, 0, 0, 0]
    clock.ns = 50_000
    timer.update()
    assert nic.reg_read(TDH) == 1
    clock.ns = 100_000
    timer.update()                                         # frame 2 completes: 3 goes, 4 is slow again
    assert nic.reg_read(TDH) == 3 and [tx_status(mem, i) & 1 for i in range(6)] == [1, 1, 1, 0, 0, 0]
    clock.ns = 200_000
    timer.update()
    clock.ns = 300_000
    timer.update()
    assert nic.reg_read(TDH) == 6
    done = [e[2] for e in events if e[1] == "TX_COMPLETE"]
    assert [d["frame"] for d in done] == [1, 2, 3, 4, 5, 6]        # completion order = ring order
    assert all(d["overtook"] == 0 for d in done)
    assert [d["latency_ns"] for d in done] == [0, 100_000, 100_000, 200_000, 200_000, 300_000]


def test_virtqueue_returns_later_buffers_first_behind_the_same_slow_frame():
    """The same traffic through virtio-net: the used ring returns frames 3 and 5 before frame 2."""
    from cpuvirt.virtio.net import VirtioNet
    from cpuvirt.virtio.transport import VirtioPciLegacy
    from tests.test_virtio import Driver, ram
    events = []
    clock = Clock()
    trace = lambda reason, detail, action, kind="virtio", **_: events.append((kind, reason, detail))  # noqa: E731
    timer = DeviceTimer(clock)
    dev = VirtioNet(MAC, Loopback(), None, TxCompletions("virtio-net", SlowDestination(2, 100), timer, trace), clock)
    mem, guest = ram()
    t = VirtioPciLegacy(dev, guest, trace)
    t.write_config(COMMAND, 2, 0x7)
    t.io_write(18, 1, 1)
    t.io_write(18, 1, 3)
    for q, pfn in ((0, 0x10), (1, 0x20)):
        t.io_write(14, 2, q)
        t.io_write(8, 4, pfn)
    t.io_write(18, 1, 7)
    rx, tx = Driver(mem, 256, 0x10), Driver(mem, 256, 0x20)
    for i in range(16):
        rx.put_desc(i, 0x200000 + 0x800 * i, 0x800, 2)
        rx.publish(i)
    t.io_write(16, 2, 0)
    for n in range(6):
        mem[0x100000 + 0x800 * n:0x100000 + 0x800 * n + 70] = bytes(10) + frame(n)
        tx.put_desc(n, 0x100000 + 0x800 * n, 70)
        tx.publish(n)
    t.io_write(16, 2, 1)
    assert [h for h, _ in tx.used_entries()] == [0, 2, 4]         # frames 1, 3, 5 back at once
    clock.ns = 100_000
    timer.update()
    assert [h for h, _ in tx.used_entries()] == [1, 3, 5]         # frames 2, 4, 6: all 100 us late
    done = [e[2] for e in events if e[1] == "TX_COMPLETE"]
    assert [d["frame"] for d in done] == [1, 3, 5, 2, 4, 6]
    assert [d["overtook"] for d in done] == [0, 1, 2, 0, 0, 0]
    assert [d["latency_ns"] for d in done] == [0, 0, 0, 100_000, 100_000, 100_000]


# -- broken rings ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("setup,why", [
    (lambda nic, mem: (nic.reg_write(TDLEN, 0), nic.reg_write(TDT, 1)), "no descriptors"),
    (lambda nic, mem: nic.reg_write(TDT, 9), "past the ring"),
    (lambda nic, mem: (nic.reg_write(TDBAL, RAM - 64), nic.reg_write(TDT, 1)), "outside guest RAM"),
    (lambda nic, mem: (nic.reg_write(TDBAL, 0xFEB00000), nic.reg_write(TDT, 1)), "outside guest RAM"),
    (lambda nic, mem: (struct.pack_into("<QHBBBBH", mem, TX_RING, RAM - 10, 100, 0, 9, 0, 0, 0),
                       nic.reg_write(TDT, 1)), "outside guest RAM"),
    (lambda nic, mem: (struct.pack_into("<QHBBBBH", mem, TX_RING, 1 << 40, 60, 0, 9, 0, 0, 0),
                       nic.reg_write(TDT, 1)), "outside guest RAM"),
])
def test_broken_transmit_rings_stop_the_ring_and_are_counted(setup, why):
    events = []
    nic, mem, *_ = make(backend=Loopback(), events=events)
    tx_setup(nic)
    before = bytes(mem)
    setup(nic, mem)
    errors = [e for e in events if e[1] == "RING_ERROR"]
    assert len(errors) == 1 and why in errors[0][2]["why"] and nic.counters["needs_reset"] == 1
    assert nic.counters["tx_frames"] == 0 and bytes(mem[:TX_RING]) == before[:TX_RING]
    tx_put(mem, 0, BUFS, frame(0))                          # stopped until TCTL is written again
    nic.reg_write(TDLEN, 128)
    nic.reg_write(TDBAL, TX_RING)
    nic.reg_write(TDH, 0)
    nic.reg_write(TDT, 1)
    assert nic.counters["tx_frames"] == 0
    nic.reg_write(TCTL, TCTL_EN)
    assert nic.counters["tx_frames"] == 1


def test_broken_receive_ring_is_a_device_error():
    events = []
    nic, mem, *_ = make(events=events)
    rx_setup(nic, mem)
    struct.pack_into("<Q", mem, RX_RING, RAM - 8)          # a buffer running past the end of RAM
    nic.receive(frame(0))
    assert nic.counters["needs_reset"] == 1 and nic.reg_read(RDH) == 0
    assert any(e[1] == "RING_ERROR" and e[2]["ring"] == "receive" for e in events)


@settings(max_examples=300, deadline=None)
@given(regs=st.lists(st.tuples(st.sampled_from([TDBAL, TDLEN, TDH, TDT, RDBAL, RDLEN, RDH, RDT, TCTL, RCTL, IMS]),
                               st.integers(0, 0xFFFFFFFF)), max_size=12),
       descs=st.binary(min_size=256, max_size=256), frames=st.integers(0, 4))
def test_random_registers_and_descriptors_never_raise_or_touch_memory_outside_ram(regs, descs, frames):
    """Whatever the driver writes, the device raises nothing, ends, and reaches only guest RAM."""
    nic, mem, *_ = make(backend=Loopback())
    reach = []
    orig = nic.ram
    nic.ram = GuestRam(RAM, lambda g, n: (reach.append((g, n)), orig.read(g, n))[1],
                       lambda g, d: (reach.append((g, len(d))), orig.write(g, d)))
    mem[TX_RING:TX_RING + 256] = descs
    tx_setup(nic)
    rx_setup(nic, mem)
    mem[RX_RING:RX_RING + 256] = descs
    for reg, value in regs:
        nic.reg_write(reg, value)
    for n in range(frames):
        nic.receive(frame(n))
    assert all(0 <= g and g + n <= RAM for g, n in reach)


def test_frames_the_device_cannot_take_are_dropped_and_counted():
    sent = []

    class Sink(Loopback):
        def transmit(self, f):
            sent.append(f)

    events = []
    nic, mem, *_ = make(backend=Sink(), events=events)
    tx_setup(nic)
    tx_put(mem, 0, BUFS, b"\x01" * 10)                     # shorter than an Ethernet header
    nic.reg_write(TDT, 1)
    assert sent == [] and nic.counters["tx_dropped"] == 1 and tx_status(mem, 0) & 1 and nic.reg_read(TDH) == 1
    struct.pack_into("<QHBBBBH", mem, TX_RING + 16, BUFS, 60, 0, 0x29, 0, 0, 0)   # CMD.DEXT: not modelled
    nic.reg_write(TDT, 2)
    assert any(e[1] == "RING_ERROR" and "extended" in e[2]["why"] for e in events)
    rx_setup(nic, mem, 8, posted=0)                        # no receive descriptor given
    for n in range(256):
        nic.receive(frame(n))
    assert len(nic.backlog) == 256 and nic.counters["rx_dropped"] == 0
    nic.receive(frame(256))                                # the backlog is full: dropped, RXO
    assert nic.counters["rx_dropped"] == 1 and nic.regs[ICR] & 0x40


def test_rx_drops_what_the_receiver_cannot_take_and_keeps_the_next_frame():
    nic, mem, *_ = make()
    rx_setup(nic, mem, 8, posted=7)
    nic.receive(MAC + MAC + bytes(1600))                   # longer than 1522 without RCTL.LPE
    assert nic.counters["rx_dropped"] == 1 and nic.reg_read(RDH) == 0
    nic.reg_write(RCTL, RCTL_EN | RCTL_SECRC | 1 << 5 | 3 << 16)   # LPE, 256-byte buffers
    nic.receive(MAC + MAC + bytes(2000))                   # needs 8 buffers: more than the ring can ever give
    nic.receive(MAC + MAC + bytes(50))                     # the next frame is not lost with it
    assert nic.counters["rx_dropped"] == 2 and nic.counters["rx_frames"] == 1 and nic.reg_read(RDH) == 1
    nic.receive(frame(5))                                  # broadcast, and RCTL.BAM is now off
    assert nic.counters["rx_dropped"] == 3
    nic.receive(MAC + MAC + bytes(500))                    # 512 bytes over 2 buffers, EOP on the second
    assert nic.counters["rx_frames"] == 2 and nic.reg_read(RDH) == 3
    assert struct.unpack_from("<HHB", mem, RX_RING + 24) == (256, 0, 0x01)          # DD
    assert struct.unpack_from("<HHB", mem, RX_RING + 40) == (256, 0, 0x07)          # DD | EOP | IXSM


def test_rx_ring_with_no_length_is_an_error_once_descriptors_are_given():
    events = []
    nic, mem, *_ = make(events=events)
    rx_setup(nic, mem, 8, posted=0)
    nic.reg_write(RDLEN, 0)
    nic.receive(frame(0))                                  # head == tail: nothing given, the frame waits
    assert nic.counters["needs_reset"] == 0 and len(nic.backlog) == 1
    nic.reg_write(RDT, 3)
    assert nic.counters["needs_reset"] == 1 and "no descriptors" in events[-1][2]["why"]
