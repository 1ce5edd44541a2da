"""The devices xv6 needs, without xv6: I/O APIC, MP tables, CMOS RTC, i8042, VGA CRTC, COM1 receive
and scripted input. The MP tables are read back by a parser written from the MP specification's
layout (chapter 4), not from the builder's code."""
from __future__ import annotations

import datetime
import struct

import pytest

from cpuvirt.machine.apic import LocalApic
from cpuvirt.machine.i8042 import I8042
from cpuvirt.machine.ioapic import IoApic
from cpuvirt.machine.machine import Machine
from cpuvirt.machine.rtc import CmosRtc
from cpuvirt.machine.serial_input import ScriptedInput
from cpuvirt.machine.uart import Uart16550
from cpuvirt.machine.vga import VgaCrtc

SEL, WIN = 0x00, 0x10


class Clock:
    def __init__(self):
        self.t = 0

    def __call__(self):
        return self.t


# -- I/O APIC ------------------------------------------------------------------------------------------
def ioapic_with_log():
    sent = []
    io = IoApic(deliver=lambda v, level, dest, logical, mode: sent.append((v, level, dest, logical, mode)))
    return io, sent


def rte_write(io, pin, low, high=0):
    io.write(SEL, 4, 0x10 + 2 * pin + 1)
    io.write(WIN, 4, high)
    io.write(SEL, 4, 0x10 + 2 * pin)
    io.write(WIN, 4, low)


def rte_read(io, pin):
    io.write(SEL, 4, 0x10 + 2 * pin)
    low = io.read(WIN, 4)
    io.write(SEL, 4, 0x10 + 2 * pin + 1)
    return low | io.read(WIN, 4) << 32


def test_ioapic_identification_registers_as_xv6_reads_them():
    io, _ = ioapic_with_log()
    io.write(SEL, 4, 0x01)
    assert (io.read(WIN, 4) >> 16) & 0xFF == 23          # xv6: maxintr = (ver >> 16) & 0xFF
    assert io.read(WIN, 4) & 0xFF == 0x11
    io.write(SEL, 4, 0x00)
    assert io.read(WIN, 4) >> 24 == 0                    # must equal the MP table's I/O APIC ID
    for pin in range(24):
        assert rte_read(io, pin) == 1 << 16, "every entry starts masked"


def test_ioapic_edge_pin_sends_once_per_rising_edge_to_its_destination():
    io, sent = ioapic_with_log()
    rte_write(io, 4, 0x24, 0 << 24)                      # xv6 ioapicenable(IRQ_COM1, cpu 0)
    io.set_irq(4, True)
    io.set_irq(4, True)                                  # no new edge
    assert sent == [(0x24, False, 0, False, 0)]
    io.set_irq(4, False)
    io.set_irq(4, True)
    assert len(sent) == 2
    assert rte_read(io, 4) & (1 << 14 | 1 << 12) == 0     # remote IRR and delivery status stay 0


def test_ioapic_masked_edge_is_held_until_unmasked_as_in_qemu():
    io, sent = ioapic_with_log()
    rte_write(io, 1, 0x10021)                            # masked
    io.set_irq(1, True)
    assert sent == []
    rte_write(io, 1, 0x21)
    assert sent == [(0x21, False, 0, False, 0)]


def test_ioapic_level_pin_waits_for_eoi_and_resends_while_high():
    io, sent = ioapic_with_log()
    rte_write(io, 9, 0x8000 | 0x39)                      # level triggered
    io.set_irq(9, True)
    assert sent == [(0x39, True, 0, False, 0)]
    assert rte_read(io, 9) & (1 << 14), "remote IRR is set while the interrupt is in service"
    io.set_irq(9, True)
    assert len(sent) == 1
    io.eoi(0x39)
    assert len(sent) == 2, "still high after the EOI: sent again"
    io.set_irq(9, False)
    io.eoi(0x39)
    assert len(sent) == 2 and not rte_read(io, 9) & (1 << 14)


def test_ioapic_read_only_bits_and_narrow_accesses():
    io, _ = ioapic_with_log()
    rte_write(io, 3, 0xFFFFFFFF, 0xFFFFFFFF)
    assert rte_read(io, 3) == 0xFF000000_0001AFFF
    io.write(SEL, 4, 0x10 + 6)
    io.write(WIN, 2, 0)                                  # narrow writes to IOWIN are ignored
    assert rte_read(io, 3) & 0xFFFF == 0xAFFF
    io.write(SEL, 1, 0x01)
    assert io.read(SEL, 1) == 0x01 and io.read(WIN, 1) == 0x11


def test_local_apic_takes_io_apic_messages_for_itself_only_and_reports_level_eoi():
    apic = LocalApic(now=lambda: 0)
    apic.spiv = 0x1FF
    eois = []
    apic.on_level_eoi = eois.append
    apic.receive(0x30, False, dest=1, logical=False)     # APIC ID 1 is not here
    assert apic.pending_vector() is None
    apic.receive(0x31, True, dest=0, logical=False)
    assert apic.pending_vector() == 0x31
    assert apic.acknowledge() == 0x31
    apic.write(0xB0, 4, 0)
    assert eois == [0x31]
    apic.receive(0x32, False, dest=0xFF, logical=True)
    assert apic.acknowledge() == 0x32
    apic.write(0xB0, 4, 0)
    assert eois == [0x31], "an edge-triggered vector's EOI does not reach the I/O APIC"


def test_com1_receive_interrupt_reaches_the_cpu_through_the_io_apic():
    m = Machine(4)
    m.pic.master.imr = 0xFF                              # xv6 masks the 8259s
    io = m.ioapic
    rte_write(io, 4, 0x24)
    m.uart.write(0x3F9, 1, 0x01)                          # IER: received data available
    assert m.pending_interrupt() is None
    m.uart.feed(b"x")
    assert m.uart.read(0x3FD, 1) & 1 and m.uart.read(0x3FA, 1) & 0x0F == 0x04
    assert m.pending_interrupt() == 0x24
    assert m.acknowledge_interrupt() == 0x24
    assert m.uart.read(0x3F8, 1) == ord("x")
    assert m.uart.read(0x3FA, 1) & 0x0F == 0x01 and not m.uart.read(0x3FD, 1) & 1


def test_com1_interrupt_goes_to_the_8259_for_guests_that_use_it():
    m = Machine(4)
    m.pic.write(0x21, 1, 0xEF)                           # unmask IRQ 4 only
    m.uart.write(0x3F9, 1, 0x01)
    m.uart.feed(b"y")
    assert m.pending_interrupt() == 0x08 + 4             # SeaBIOS's master base


# -- MP tables, read as the MP specification lays them out ---------------------------------------------
def parse_mp(read):
    """Find and check the MP floating pointer and configuration table (MP spec 1.4, 4.1-4.3),
    searching as the spec and xv6's mpsearch do: EBDA's first KiB, base memory's last KiB, then the
    BIOS ROM area, on 16-byte boundaries."""
    ebda = struct.unpack("<H", read(0x40E, 2))[0] << 4
    base_kib = struct.unpack("<H", read(0x413, 2))[0]
    for lo, n in ((ebda, 1024), (base_kib * 1024 - 1024, 1024), (0xF0000, 0x10000)):
        blob = read(lo, n)
        for off in range(0, n, 16):
            if blob[off:off + 4] == b"_MP_" and sum(blob[off:off + 16]) & 0xFF == 0:
                fp = blob[off:off + 16]
                break
        else:
            continue
        break
    else:
        raise AssertionError("no MP floating pointer")
    phys, length, rev, _, feat1, feat2 = struct.unpack_from("<IBBBBB", fp, 4)
    assert length == 1 and rev in (1, 4) and feat1 == 0
    hdr = read(phys, 44)
    assert hdr[:4] == b"PCMP"
    total, = struct.unpack_from("<H", hdr, 4)
    table = read(phys, total)
    assert sum(table) & 0xFF == 0, "configuration table checksum"
    entry_count, lapic = struct.unpack_from("<HI", table, 34)
    entries, off = [], 44
    sizes = {0: 20, 1: 8, 2: 8, 3: 8, 4: 8}
    for _ in range(entry_count):
        kind = table[off]
        entries.append(table[off:off + sizes[kind]])
        off += sizes[kind]
    assert off == total
    return fp, lapic, entries, feat2


def test_mp_tables_describe_one_cpu_one_io_apic_and_the_isa_interrupts():
    m = Machine(8)
    for gpa, blob in m.bios_tables():
        m.write_gpa(gpa, blob)
    _, lapic, entries, feat2 = parse_mp(m.read_gpa)
    assert lapic == 0xFEE00000 and not feat2 & 0x80, "virtual-wire mode, no IMCR"
    cpus = [e for e in entries if e[0] == 0]
    assert len(cpus) == 1
    _, apic_id, apic_ver, flags, sig, features = struct.unpack_from("<BBBBII", cpus[0])
    assert (apic_id, apic_ver, flags) == (0, 0x14, 3)
    assert (sig, features) == m.cpuid(1)[0::3]
    buses = [e[2:8] for e in entries if e[0] == 1]
    assert buses == [b"ISA   "]
    ioapics = [struct.unpack_from("<BBBBI", e) for e in entries if e[0] == 2]
    assert ioapics == [(2, m.ioapic.id, 0x11, 1, 0xFEC00000)]
    ints = {e[5]: e[7] for e in entries if e[0] == 3}
    assert ints[0] == 2 and ints[4] == 4 and ints[1] == 1 and 2 not in ints
    lints = sorted((e[1], e[6], e[7]) for e in entries if e[0] == 4)
    assert lints == [(1, 0xFF, 1), (3, 0, 0)], "NMI on LINT1 of every CPU, ExtINT on LINT0"
    assert entries[0][0] == 0, "processor entries come first"


# -- CMOS RTC ------------------------------------------------------------------------------------------
def cmos(rtc, reg):
    rtc.write(0x70, 1, reg)
    return rtc.read(0x71, 1)


def test_rtc_shows_a_fixed_date_in_bcd_and_runs_on_virtual_time():
    clk = Clock()
    rtc = CmosRtc(now=clk, mem_bytes=64 << 20)
    assert [cmos(rtc, r) for r in (0, 2, 4, 7, 8, 9, 0x32)] == [0, 0, 0, 1, 1, 0, 0x20]
    assert cmos(rtc, 6) == 7                              # 2000-01-01 was a Saturday (1 = Sunday)
    clk.t = 3_725 * 10**9 + 5                             # 1 h 2 min 5 s later
    assert [cmos(rtc, r) for r in (0, 2, 4)] == [0x05, 0x02, 0x01]
    rtc.write(0x70, 1, 0x8B)                              # bit 7 is the NMI mask, not the index
    rtc.write(0x71, 1, 0x06)                              # binary, 24-hour
    assert cmos(rtc, 0) == 5 and cmos(rtc, 9) == 0


def test_rtc_update_in_progress_flag_is_deterministic_and_writes_set_the_clock():
    clk = Clock()
    rtc = CmosRtc(now=clk, mem_bytes=64 << 20, base=datetime.datetime(2024, 2, 29, 23, 59, 59))
    assert not cmos(rtc, 0x0A) & 0x80
    clk.t = 10**9 - 1000
    assert cmos(rtc, 0x0A) & 0x80, "UIP during the last 244 us of the second"
    clk.t = 10**9
    assert [cmos(rtc, r) for r in (0, 2, 4, 7, 8, 9)] == [0, 0, 0, 1, 3, 0x24]
    rtc.write(0x70, 1, 0x04)
    rtc.write(0x71, 1, 0x12)                              # 12 o'clock
    assert cmos(rtc, 4) == 0x12 and cmos(rtc, 7) == 1


def test_rtc_cmos_memory_size_bytes():
    rtc = CmosRtc(now=lambda: 0, mem_bytes=256 << 20)
    assert cmos(rtc, 0x15) | cmos(rtc, 0x16) << 8 == 640
    assert cmos(rtc, 0x17) | cmos(rtc, 0x18) << 8 == 0xFFFF   # capped, as QEMU does
    assert cmos(rtc, 0x34) | cmos(rtc, 0x35) << 8 == (256 - 16) * 16
    assert rtc.read(0x70, 1) == 0xFF


# -- i8042, CRTC ---------------------------------------------------------------------------------------
def test_i8042_is_present_and_empty():
    k = I8042()
    assert not k.read(0x64, 1) & 1 and k.read(0x64, 1) != 0xFF
    k.write(0x64, 1, 0xAA)
    assert not k.read(0x64, 1) & 1


def test_vga_crtc_keeps_the_cursor_position_xv6_reads_back():
    crtc = VgaCrtc()
    crtc.write(0x3D4, 1, 14)
    assert crtc.read(0x3D5, 1) == 0
    crtc.write(0x3D5, 1, 0x07)
    crtc.write(0x3D4, 1, 15)
    crtc.write(0x3D5, 1, 0xD0)
    crtc.write(0x3D4, 1, 14)
    assert crtc.read(0x3D5, 1) << 8 == 0x700 and crtc.read(0x3D4, 1) == 14


def test_machine_ports_for_the_new_devices_answer():
    m = Machine(4)
    assert m.bus.read(0x64, 1) == 0x1C
    m.bus.write(0x3D4, 1, 14)
    assert m.bus.read(0x3D5, 1) == 0
    m.bus.write(0x70, 1, 0x0D)
    assert m.bus.read(0x71, 1) == 0x80
    assert not m.bus.unhandled_counts


# -- scripted input ------------------------------------------------------------------------------------
def test_scripted_input_paces_bytes_by_the_guest_reading_them():
    clk = Clock()
    uart = Uart16550(on_output=lambda b: None)
    src = ScriptedInput(b"ab", uart, clk, gap=100)
    assert src.deadline() == 100
    assert not src.update()                               # not due yet
    clk.t = 100
    assert src.update() and list(uart.rx) == [ord("a")]
    clk.t = 10_000
    assert src.deadline() is None and not src.update(), "the receiver still holds a byte"
    assert uart.read(0x3F8, 1) == ord("a")
    assert src.deadline() == 10_100
    clk.t = 10_100
    assert src.update() and uart.read(0x3F8, 1) == ord("b")
    assert src.deadline() is None


def test_scripted_input_with_a_prompt_sends_lines_after_it_and_finishes():
    clk = Clock()
    uart = Uart16550(on_output=lambda b: None)
    src = ScriptedInput(b"x\n", uart, clk, prompt=b"$ ", gap=10)
    done = []
    src.on_finished = lambda: done.append(clk.t)
    clk.t = 50
    assert src.deadline() is None, "nothing before the first prompt"
    for b in b"init\n$ ":
        src.console_output(b)
    assert src.deadline() == 60
    clk.t = 60
    src.update()
    uart.read(0x3F8, 1)
    clk.t = 70
    src.update()
    assert uart.read(0x3F8, 1) == 0x0A and src.deadline() is None
    for b in b"x\n$":
        src.console_output(b)
    assert not done
    src.console_output(ord(" "))
    assert done == [70]


def test_scripted_input_is_an_interrupt_source_on_the_machine_timeline():
    m = Machine(4)
    src = ScriptedInput(b"k", m.uart, lambda: m.clock.now, gap=500)
    m.attach_input(src)
    assert m.next_timer_deadline() == 500
    m.clock.now = 500
    m.update_timers()
    assert list(m.uart.rx) == [ord("k")]


@pytest.mark.parametrize("bad", [b"", b"\x00"])
def test_scripted_input_of_any_bytes_is_accepted(bad):
    uart = Uart16550(on_output=lambda b: None)
    src = ScriptedInput(bad, uart, lambda: 10**6)
    src.update()
    assert list(uart.rx) == list(bad[:1])


def test_a_pipe_is_read_only_when_the_guest_listens_and_its_bytes_are_paced_the_same():
    clk = Clock()
    uart = Uart16550(on_output=lambda b: None)
    chunks = [b"ab", b"c", b""]
    reads = []

    def more():
        reads.append(1)
        return chunks.pop(0)

    src = ScriptedInput(b"", uart, clk, gap=10, more=more)
    clk.t = 1000
    assert src.deadline() is None and not src.update() and not reads, "a guest that does not listen: no read"
    uart.write(0x3F9, 1, 0x01)                                # IER: received data available
    got = []
    for _ in range(10):
        d = src.deadline()
        if d is None:
            break
        clk.t = max(clk.t, d)
        if src.update():
            got.append(uart.read(0x3F8, 1))
    assert bytes(got) == b"abc" and src.at_end and len(reads) == 3


def test_cpuvirt_run_does_not_wait_on_a_pipe_the_guest_never_reads():
    import subprocess
    import sys
    p = subprocess.Popen([sys.executable, "-m", "cpuvirt", "run", "hello", "-q"], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        status = p.wait(timeout=120)          # stdin stays open: never written, never closed
    finally:
        if p.poll() is None:
            p.kill()
        p.stdin.close()
    assert status == 0, p.stderr.read()
    assert b"hello" in p.stdout.read().lower()


@pytest.mark.parametrize("mode,opts", [("native", None), ("trap", None), ("full", None),
                                       ("hw", {"vmx": [], "ept": True}), ("hw", {"vmx": [], "ept": False})],
                         ids=["native", "trap", "full", "hw-ept", "hw-noept"])
def test_typed_bytes_reach_a_guest_through_the_io_apic_in_every_mode(test_guest, mode, opts):
    from cpuvirt.runner import run_guest
    path = str(test_guest("ioapic_uart"))
    res = run_guest(path, mode, input_data=b"abc", mode_options=opts, max_insns=50_000_000)
    assert (res.outcome, res.status) == ("exit", 0), (res.message, res.console.decode())
    assert b"FAIL" not in res.console
    again = run_guest(path, mode, input_data=b"abc", mode_options=opts, max_insns=50_000_000)
    assert (again.console, again.icount) == (res.console, res.icount), "reproducible"
    nothing = run_guest(path, mode, mode_options=opts, max_insns=50_000_000)
    assert nothing.outcome == "halted", "with nothing typed, the guest waits for ever"


def test_cli_input_file_feeds_com1_as_run_guest_does_and_bad_input_options_are_one_line(test_guest, tmp_path):
    """`run --input FILE` is input_data=FILE's bytes (the same console); a missing file, an empty
    prompt, and compare's prompt without a file are bad input: one line, status 2, nothing run."""
    import subprocess
    import sys

    from cpuvirt.runner import run_guest
    path = str(test_guest("ioapic_uart"))
    script = tmp_path / "typed.txt"
    script.write_bytes(b"abc")
    cli = subprocess.run([sys.executable, "-m", "cpuvirt", "run", path, "--input", str(script), "-q"],
                         capture_output=True, stdin=subprocess.DEVNULL, timeout=120)
    assert cli.returncode == 0, cli.stderr.decode()
    assert cli.stdout == run_guest(path, input_data=b"abc").console
    for args in (["run", path, "--input", str(tmp_path / "missing.txt")],
                 ["run", path, "--input", str(script), "--input-prompt", ""],
                 ["compare", path, "--modes", "native,trap", "--input-prompt", "$ "]):
        bad = subprocess.run([sys.executable, "-m", "cpuvirt", *args], capture_output=True,
                             stdin=subprocess.DEVNULL, timeout=60)
        err = bad.stderr.decode()
        assert bad.returncode == 2 and err.count("\n") == 1 and "--input" in err, (args, err)
