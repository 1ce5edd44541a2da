"""pc-lite devices as plain Python objects: bus, 16550, 8259A pair, 8254, debug-exit, POST, VGA."""

from __future__ import annotations

import pytest

from cpuvirt.machine.bus import PortBus
from cpuvirt.machine.debug_exit import DebugExit
from cpuvirt.machine.pic import Pic8259Pair
from cpuvirt.machine.pit import PIT_HZ, Pit8254
from cpuvirt.machine.post import PostPort
from cpuvirt.machine.uart import Uart16550
from cpuvirt.machine.vga import render_text


# --- PortBus --------------------------------------------------------------------------------

class Recorder:
    def __init__(self, value=0x5A):
        self.value = value
        self.log = []

    def read(self, port, size):
        self.log.append(("r", port, size))
        return self.value

    def write(self, port, size, value):
        self.log.append(("w", port, size, value))


def test_bus_dispatches_by_port():
    bus = PortBus()
    a, b = Recorder(1), Recorder(2)
    bus.register(0x10, 2, a)
    bus.register(0x12, 1, b)
    assert (bus.read(0x11, 1), bus.read(0x12, 1)) == (1, 2)
    bus.write(0x10, 1, 7)
    assert a.log == [("r", 0x11, 1), ("w", 0x10, 1, 7)]


def test_bus_unhandled_ports_read_all_ones_and_are_reported_once():
    seen = []
    bus = PortBus(on_unhandled=lambda *args: seen.append(args))
    assert (bus.read(0x300, 1), bus.read(0x300, 2), bus.read(0x300, 4)) == (0xFF, 0xFFFF,
                                                                            0xFFFFFFFF)
    bus.write(0x300, 1, 9)
    bus.write(0x301, 2, 0x1234)
    assert seen == [(0x300, 1, False, 0), (0x301, 2, True, 0x1234)]
    assert bus.unhandled_counts == {0x300: 4, 0x301: 1}


def test_bus_splits_wide_accesses_to_byte_devices():
    bus = PortBus()
    dev = Recorder(0xAB)
    bus.register(0x40, 2, dev)
    assert bus.read(0x40, 2) == 0xABAB
    bus.write(0x40, 2, 0x1234)
    assert dev.log[2:] == [("w", 0x40, 1, 0x34), ("w", 0x41, 1, 0x12)]
    assert bus.read(0x41, 2) == 0xFFAB                     # 0x42 is nobody's
    wide = Recorder(0x11223344)
    bus.register(0xF4, 4, wide, wide=True)
    assert bus.read(0xF4, 4) == 0x11223344
    assert wide.log == [("r", 0xF4, 4)]


def test_bus_refuses_double_registration():
    bus = PortBus()
    bus.register(0x20, 2, Recorder())
    with pytest.raises(ValueError):
        bus.register(0x21, 1, Recorder())


# --- UART -----------------------------------------------------------------------------------

def make_uart():
    out = []
    irqs = []
    uart = Uart16550(out.append, raise_irq=lambda n: irqs.append(("raise", n)),
                     lower_irq=lambda n: irqs.append(("lower", n)))
    return uart, out, irqs


def test_uart_polling_output():
    uart, out, _ = make_uart()
    assert uart.read(0x3FD, 1) == 0x60                     # THR empty, transmitter empty
    for ch in b"hi\n":
        uart.write(0x3F8, 1, ch)
    assert bytes(out) == b"hi\n"


def test_uart_reset_values_as_qemu_shows_them():
    uart, _, _ = make_uart()
    regs = [uart.read(0x3F8 + i, 1) for i in range(1, 7)]
    assert regs == [0x00, 0x01, 0x00, 0x08, 0x60, 0xB0]    # IER IIR LCR MCR LSR MSR


def test_uart_dlab_selects_the_divisor_latch():
    uart, out, _ = make_uart()
    uart.write(0x3FB, 1, 0x80)
    uart.write(0x3F8, 1, 0x03)
    uart.write(0x3F9, 1, 0x00)
    assert (uart.read(0x3F8, 1), uart.read(0x3F9, 1), uart.divisor) == (3, 0, 3)
    uart.write(0x3FB, 1, 0x03)
    assert uart.read(0x3FB, 1) == 0x03 and uart.read(0x3F9, 1) == 0
    uart.write(0x3F8, 1, ord("x"))
    assert out == [ord("x")]


def test_uart_fifo_bits_and_scratch():
    uart, _, _ = make_uart()
    uart.write(0x3FA, 1, 0xC7)
    assert uart.read(0x3FA, 1) == 0xC1                     # 16550A: FIFOs on, no interrupt
    uart.write(0x3FF, 1, 0x5A)
    assert uart.read(0x3FF, 1) == 0x5A


def test_uart_input_queue_and_loopback():
    uart, out, _ = make_uart()
    uart.feed(b"ab")
    assert uart.read(0x3FD, 1) == 0x61
    assert (uart.read(0x3F8, 1), uart.read(0x3F8, 1)) == (ord("a"), ord("b"))
    assert uart.read(0x3FD, 1) == 0x60 and uart.read(0x3F8, 1) == 0
    uart.write(0x3FC, 1, 0x1E)                             # the usual driver probe
    uart.write(0x3F8, 1, 0xAE)
    assert uart.read(0x3F8, 1) == 0xAE and out == []
    assert uart.read(0x3FE, 1) == 0xD0                     # RTS->CTS, OUT1->RI, OUT2->DCD


def test_uart_interrupts():
    uart, out, irqs = make_uart()
    uart.write(0x3F9, 1, 0x02)                             # THR-empty interrupt on
    assert irqs == [("raise", 4)] and uart.read(0x3FA, 1) == 0x02
    assert irqs[-1] == ("lower", 4)                        # reading IIR=THRI clears it
    uart.write(0x3F8, 1, ord("z"))                         # each byte: a new edge
    assert out == [ord("z")] and irqs == [("raise", 4), ("lower", 4), ("raise", 4)]
    uart.write(0x3F9, 1, 0x03)
    uart.feed(b"q")
    assert uart.read(0x3FA, 1) == 0x04                     # received data outranks THRE
    uart.read(0x3F8, 1)
    assert uart.read(0x3FA, 1) == 0x02


# --- PIC ------------------------------------------------------------------------------------

def init_pic(pic, master=0x20, slave=0x28, icw4=0x01):
    for port, value in ((0x20, 0x11), (0x21, master), (0x21, 0x04), (0x21, icw4),
                        (0xA0, 0x11), (0xA1, slave), (0xA1, 0x02), (0xA1, icw4)):
        pic.write(port, 1, value)


def irr_isr(pic, base=0x20):
    pic.write(base, 1, 0x0A)
    irr = pic.read(base, 1)
    pic.write(base, 1, 0x0B)
    isr = pic.read(base, 1)
    return irr, isr


def test_pic_power_on_state_is_qemu_reset():
    pic = Pic8259Pair()
    assert pic.read(0x21, 1) == 0 and pic.read(0xA1, 1) == 0
    assert pic.pending_vector() is None
    pic.raise_irq(0)
    assert pic.pending_vector() == 0x00                    # vector base 0 before ICW2


def test_pic_init_sequence_sets_vector_bases():
    pic = Pic8259Pair()
    init_pic(pic)
    pic.raise_irq(1)
    assert pic.pending_vector() == 0x21
    assert pic.acknowledge() == 0x21
    assert irr_isr(pic) == (0x00, 0x02)


def test_pic_priority_in_service_blocks_lower_and_eoi_releases():
    pic = Pic8259Pair()
    init_pic(pic)
    pic.raise_irq(3)
    pic.raise_irq(1)
    assert pic.acknowledge() == 0x21                       # IR1 outranks IR3
    assert pic.pending_vector() is None                    # IR3 waits behind IR1 in service
    pic.raise_irq(0)
    assert pic.pending_vector() == 0x20                    # IR0 outranks IR1: nests
    assert pic.acknowledge() == 0x20
    pic.write(0x20, 1, 0x20)                               # non-specific EOI ends IR0
    assert irr_isr(pic) == (0x08, 0x02)
    pic.write(0x20, 1, 0x20)
    assert pic.acknowledge() == 0x23


def test_pic_specific_eoi():
    pic = Pic8259Pair()
    init_pic(pic)
    pic.raise_irq(5)
    pic.acknowledge()
    pic.write(0x20, 1, 0x60 | 4)                           # EOI for IR4: nothing there
    assert irr_isr(pic)[1] == 0x20
    pic.write(0x20, 1, 0x60 | 5)
    assert irr_isr(pic)[1] == 0x00


def test_pic_masking():
    pic = Pic8259Pair()
    init_pic(pic)
    pic.write(0x21, 1, 0x02)
    pic.raise_irq(1)
    assert pic.pending_vector() is None and irr_isr(pic)[0] == 0x02
    pic.write(0x21, 1, 0x00)
    assert pic.pending_vector() == 0x21


def test_pic_edge_triggered_latch():
    pic = Pic8259Pair()
    init_pic(pic)
    pic.raise_irq(0)
    pic.acknowledge()
    pic.write(0x20, 1, 0x20)
    pic.raise_irq(0)                                       # still high: no new edge
    assert pic.pending_vector() is None
    pic.lower_irq(0)
    pic.raise_irq(0)
    assert pic.pending_vector() == 0x20
    pic.lower_irq(0)                                       # latched until INTA, as in QEMU
    assert pic.pending_vector() == 0x20


def test_pic_cascade_through_ir2():
    pic = Pic8259Pair()
    init_pic(pic)
    pic.raise_irq(12)
    assert pic.pending_vector() == 0x2C
    assert pic.acknowledge() == 0x2C
    assert irr_isr(pic, 0x20) == (0x00, 0x04)
    assert irr_isr(pic, 0xA0) == (0x00, 0x10)
    pic.raise_irq(3)
    assert pic.pending_vector() is None                    # IR2 in service outranks IR3
    pic.raise_irq(1)
    assert pic.pending_vector() == 0x21                    # IR1 outranks IR2: nests
    pic.lower_irq(1)
    pic.acknowledge()
    pic.write(0x20, 1, 0x20)                               # EOI IR1
    pic.write(0xA0, 1, 0x20)                               # EOI slave IR4, then master IR2
    assert pic.pending_vector() is None
    pic.write(0x20, 1, 0x20)
    assert pic.pending_vector() == 0x23


def test_pic_auto_eoi():
    pic = Pic8259Pair()
    init_pic(pic, icw4=0x03)
    pic.raise_irq(1)
    assert pic.acknowledge() == 0x21
    assert irr_isr(pic) == (0, 0)


def test_pic_spurious_irq7_and_irq15():
    pic = Pic8259Pair()
    init_pic(pic)
    assert pic.acknowledge() == 0x27                       # nothing pending at INTA
    assert irr_isr(pic) == (0, 0)                          # spurious IR7 sets no ISR bit
    pic.raise_irq(12)                                      # master latches IR2 ...
    pic.write(0xA1, 1, 0x10)                               # ... then the slave masks IR12
    assert pic.pending_vector() == 0x2F
    assert pic.acknowledge() == 0x2F
    assert irr_isr(pic, 0x20)[1] == 0x04 and irr_isr(pic, 0xA0)[1] == 0x00


def test_pic_poll_command():
    pic = Pic8259Pair()
    init_pic(pic)
    pic.raise_irq(6)
    pic.write(0x20, 1, 0x0C)
    assert pic.read(0x20, 1) == 0x86
    assert irr_isr(pic) == (0x00, 0x40)
    pic.write(0x20, 1, 0x0C)
    assert pic.read(0x20, 1) == 0x00


def test_pic_rotate_on_nonspecific_eoi():
    pic = Pic8259Pair()
    init_pic(pic)
    pic.raise_irq(0)
    pic.acknowledge()
    pic.write(0x20, 1, 0xA0)                               # rotate: IR0 becomes lowest
    pic.lower_irq(0)
    pic.raise_irq(0)
    pic.raise_irq(3)
    assert pic.pending_vector() == 0x23


def test_pic_bios_setup_matches_seabios():
    pic = Pic8259Pair()
    pic.bios_setup()
    assert (pic.read(0x21, 1), pic.read(0xA1, 1)) == (0xB8, 0x8E)
    pic.raise_irq(0)
    assert pic.pending_vector() == 0x08
    pic.raise_irq(8)
    pic.acknowledge()
    pic.write(0x20, 1, 0x20)
    assert pic.acknowledge() == 0x70


# --- PIT ------------------------------------------------------------------------------------

class Clock:
    def __init__(self):
        self.t = 0

    def __call__(self):
        return self.t


def make_pit(tsc_hz=1_000_000_000):
    clock = Clock()
    edges = []
    pit = Pit8254(clock, tsc_hz, lambda n: edges.append(("raise", n)),
                  lambda n: edges.append(("lower", n)))
    return pit, clock, edges


def program(pit, mode, count, access=3):
    pit.write(0x43, 1, (access << 4) | (mode << 1))
    if access in (1, 3):
        pit.write(0x40, 1, count & 0xFF)
    if access in (2, 3):
        pit.write(0x40, 1, count >> 8)


def ceil_div(a, b):
    return -(-a // b)


@pytest.mark.parametrize("mode", [2, 3])
def test_pit_100hz_period_deadlines(mode):
    pit, clock, edges = make_pit()
    program(pit, mode, 11932)                               # 1193182 / 11932 = 99.998 Hz
    assert pit.next_deadline() == 10_000_151 == ceil_div(11932 * 10**9, PIT_HZ)
    clock.t = 10_000_150
    pit.update()
    assert edges == []
    clock.t = 10_000_151
    pit.update()
    assert edges == [("lower", 0), ("raise", 0)]           # one rising edge on IRQ 0
    assert pit.next_deadline() == ceil_div(2 * 11932 * 10**9, PIT_HZ)
    pit.update()
    assert len(edges) == 2


def test_pit_coalesces_missed_periods_into_one_edge():
    pit, clock, edges = make_pit()
    program(pit, 2, 11932)
    clock.t = 55_000_000                                    # 5.5 periods later
    pit.update()
    assert edges == [("lower", 0), ("raise", 0)]
    assert pit.next_deadline() == ceil_div(6 * 11932 * 10**9, PIT_HZ)


def test_pit_mode0_fires_once():
    pit, clock, edges = make_pit(PIT_HZ)                    # one TSC cycle per PIT tick
    program(pit, 0, 1000)
    assert pit.next_deadline() == 1000
    clock.t = 5000
    pit.update()
    assert pit.next_deadline() is None and len(edges) == 2
    clock.t = 70000
    pit.update()
    assert len(edges) == 2


def test_pit_counter_reads_and_latch():
    pit, clock, _ = make_pit(PIT_HZ)
    program(pit, 2, 1000)
    clock.t = 300
    pit.write(0x43, 1, 0x00)                                # latch channel 0
    clock.t = 450
    assert pit.read(0x40, 1) | pit.read(0x40, 1) << 8 == 700   # the latched count
    assert pit.read(0x40, 1) | pit.read(0x40, 1) << 8 == 550   # live again
    clock.t = 1300
    assert pit.read(0x40, 1) | pit.read(0x40, 1) << 8 == 700   # mode 2 reloads
    assert pit.read(0x43, 1) == 0


def test_pit_mode3_counts_down_by_two():
    pit, clock, _ = make_pit(PIT_HZ)
    program(pit, 3, 1000)
    clock.t = 100
    assert pit.read(0x40, 1) | pit.read(0x40, 1) << 8 == 800


def test_pit_lobyte_and_hibyte_access():
    pit, clock, _ = make_pit(PIT_HZ)
    program(pit, 2, 0x80, access=1)
    assert pit.next_deadline() == 0x80
    assert pit.read(0x40, 1) == 0x80 and pit.read(0x40, 1) == 0x80
    program(pit, 2, 0x1200, access=2)
    assert pit.next_deadline() == 0x1200
    clock.t = 0x100
    assert pit.read(0x40, 1) == 0x11


def test_pit_reload_zero_is_65536():
    pit, _, _ = make_pit(PIT_HZ)
    program(pit, 2, 0)
    assert pit.next_deadline() == 65536


def test_pit_waits_for_count_after_control_word():
    pit, clock, edges = make_pit(PIT_HZ)
    program(pit, 2, 100)
    pit.write(0x43, 1, 0x34)
    assert pit.next_deadline() is None
    clock.t = 1000
    pit.update()
    assert edges == []
    pit.write(0x40, 1, 50)
    pit.write(0x40, 1, 0)
    assert pit.next_deadline() == 1050


def test_pit_power_on_and_bios_state():
    pit, clock, _ = make_pit(PIT_HZ)
    assert pit.next_deadline() == 65536                     # QEMU reset: mode 3, 18.2 Hz
    clock.t = 10
    pit.bios_setup()
    pit.write(0x43, 1, 0xE2)                                # read back status of counter 0
    assert pit.read(0x40, 1) == 0x34                        # as read under QEMU + SeaBIOS
    assert pit.next_deadline() == 10 + 65536


def test_pit_channel2_counts_without_irq():
    pit, clock, edges = make_pit(PIT_HZ)
    pit.write(0x43, 1, 0xB0)                                # channel 2, lo/hi, mode 0
    pit.write(0x42, 1, 0x00)
    pit.write(0x42, 1, 0x10)
    clock.t = 0x100
    assert pit.read(0x42, 1) | pit.read(0x42, 1) << 8 == 0xF00
    clock.t = 0x20000
    pit.update()
    assert edges[-2:] == [("lower", 0), ("raise", 0)]       # only channel 0's reset period
    assert len(edges) == 2


# --- debug-exit, POST, VGA ------------------------------------------------------------------

def test_debug_exit_stores_value_and_reads_zero():
    codes = []
    dev = DebugExit(codes.append)
    bus = PortBus()
    bus.register(0xF4, 4, dev, wide=True)
    bus.write(0xF4, 4, 0x1_0021)
    assert dev.value == 0x1_0021 and codes == [0x21]
    assert bus.read(0xF4, 1) == 0 and bus.read(0xF4, 4) == 0


def test_post_port():
    post = PostPort()
    post.write(0x80, 1, 0x12)
    assert post.read(0x80, 1) == 0xFF


def test_vga_render():
    assert render_text(bytes(4000)) == ""
    assert render_text(b" \x07" * 2000) == ""
    buf = bytearray(4000)
    for i, ch in enumerate(b"Hello, VGA   "):
        buf[2 * (80 * 2 + i)] = ch
        buf[2 * (80 * 2 + i) + 1] = 0x1F
    buf[2 * (80 * 4)] = 0x01
    buf[2 * (80 * 4) + 2] = 0xC9
    buf[2 * (80 * 4) + 4] = 0xFF
    buf[2 * (80 * 4) + 6] = ord("!")
    assert render_text(bytes(buf)) == "Hello, VGA\n\n\u263a\u2554 !"
