"""The 8254 programmable interval timer (ports 0x40-0x43), channel 0 wired to IRQ 0.

Follows the Intel 8254 data sheet (order 231164): control word (SC, RW, M, BCD), read-back
command, counter latch command, lobyte / hibyte / lobyte-then-hibyte access, reload value 0
meaning 65536. Counter values and the OUT bit in status follow QEMU's i8254, cpuvirt's reference.

Time is virtual: `now()` gives the current virtual time in TSC cycles and PIT time is
`now() * 1193182 // tsc_hz` ticks, integer math only, so a run is reproducible. Channel 0
signals IRQ 0 on each rising edge of OUT: once per period in modes 2 and 3, once at terminal
count in modes 0 and 4; modes 1 and 5 need a gate trigger the PC never gives channel 0, so
they never fire. Channels 1 and 2 count but drive nothing; channel 2's gate (port 0x61) is
not modelled, so it always counts. BCD counting is not modelled (counts are binary), as in QEMU.
"""

from __future__ import annotations

from typing import Callable

PIT_HZ = 1_193_182
"""The 8254's input clock on a PC: 14.31818 MHz / 12."""

PIT_BASE = 0x40
PIT_CONTROL = 0x43
PIT_IRQ = 0

_LSB, _MSB, _WORD = 1, 2, 3  # RW field of the control word
_WORD_HI = 4  # second byte of a lobyte-then-hibyte transfer


class PitChannel:
    """One counter. `load_tick` is the PIT time at which `count` was loaded."""

    __slots__ = (
        "mode",
        "mode_bits",
        "rw",
        "bcd",
        "count",
        "load_tick",
        "null_count",
        "read_state",
        "write_state",
        "write_latch",
        "latched",
        "latch_state",
        "status",
    )

    def __init__(self, load_tick: int):
        # QEMU's reset: mode 3, reload 65536, counting from power-on.
        self.mode = self.mode_bits = 3
        self.rw = _WORD
        self.bcd = 0
        self.count = 0x10000
        self.load_tick = load_tick
        self.null_count = False
        self.read_state = self.write_state = _WORD
        self.write_latch = 0
        self.latched = 0
        self.latch_state = 0  # 0: no count latched, else the read state of the latched count
        self.status = -1  # -1: no status latched

    def counter(self, tick: int) -> int:
        """The count register now (QEMU pit_get_count; mode 3 counts down by two)."""
        d = tick - self.load_tick
        mode, count = self.mode, self.count
        if mode == 2:
            value = count - d % count
        elif mode == 3:
            value = count - (2 * d) % count
        else:
            value = count - d
        return value & 0xFFFF

    def out(self, tick: int) -> int:
        """The OUT pin as QEMU's pit_get_out computes it (for the read-back status byte)."""
        d = tick - self.load_tick
        mode, count = self.mode, self.count
        if mode == 0:
            return int(d >= count)
        if mode == 1:
            return int(d < count)
        if mode == 2:
            return int(d % count == 0 and d != 0)
        if mode == 3:
            return int(d % count < (count + 1) >> 1)
        return int(d == count)

    def latch_count(self, tick: int) -> None:
        """Counter latch command: a second latch before the first is read is ignored."""
        if not self.latch_state:
            self.latched = self.counter(tick)
            self.latch_state = self.rw

    def latch_status(self, tick: int) -> None:
        if self.status < 0:
            self.status = (
                self.out(tick) << 7 | int(self.null_count) << 6 | self.rw << 4 | self.mode_bits << 1 | self.bcd
            )

    def read(self, tick: int) -> int:
        if self.status >= 0:
            value, self.status = self.status, -1
            return value
        state = self.latch_state
        if state:
            if state == _WORD:
                self.latch_state = _MSB
                return self.latched & 0xFF
            self.latch_state = 0
            return self.latched >> 8 if state == _MSB else self.latched & 0xFF
        state = self.read_state
        value = self.counter(tick)
        if state == _WORD:
            self.read_state = _WORD_HI
            return value & 0xFF
        if state == _WORD_HI:
            self.read_state = _WORD
            return value >> 8
        return value >> 8 if state == _MSB else value & 0xFF

    def write_count(self, value: int) -> int | None:
        """A data-port write; returns the new reload value once it is complete, else None."""
        state = self.write_state
        if state == _WORD:
            self.write_latch = value
            self.write_state = _WORD_HI
            return None
        if state == _WORD_HI:
            self.write_state = _WORD
            value = self.write_latch | value << 8
        elif state == _MSB:
            value <<= 8
        return value or 0x10000

    def control(self, value: int) -> None:
        """A control word with RW != 0: new mode; the counter waits for its count."""
        self.rw = (value >> 4) & 3
        self.read_state = self.write_state = self.rw
        self.mode_bits = (value >> 1) & 7
        self.mode = self.mode_bits & 3 if self.mode_bits >= 6 else self.mode_bits
        self.bcd = value & 1
        self.null_count = True
        self.latch_state = 0
        self.status = -1


class Pit8254:
    """The three counters behind ports 0x40-0x43, channel 0 driving IRQ 0.

    `update()` raises IRQ 0 if a channel-0 edge is due: one edge per call even when several
    periods have passed, as a real edge-triggered line whose interrupt has not been taken
    latches one request; the lost ticks are not replayed. Each edge is `lower_irq(0)` then
    `raise_irq(0)`, a low-to-high transition for the 8259A's edge detector. `next_deadline()`
    is the TSC time of the next edge, for the machine to schedule its next `update()`.
    Power-on state is QEMU's reset (channel 0 in mode 3 with count 65536: 18.2 Hz);
    `bios_setup()` gives what SeaBIOS leaves (mode 2, count 65536).
    """

    def __init__(
        self, now: Callable[[], int], tsc_hz: int, raise_irq: Callable[[int], None], lower_irq: Callable[[int], None]
    ):
        if tsc_hz <= 0:
            raise ValueError("tsc_hz must be positive")
        self.now = now
        self.tsc_hz = tsc_hz
        self._raise = raise_irq
        self._lower = lower_irq
        tick = self._tick()
        self.channels = (PitChannel(tick), PitChannel(tick), PitChannel(tick))
        self._edge: int | None = None  # PIT tick of channel 0's next rising edge
        self._deadline: int | None = None  # the same in TSC cycles
        self._arm()

    def bios_setup(self) -> None:
        """Program channel 0 as SeaBIOS leaves it under QEMU (status read back: 0x34)."""
        self.write(PIT_CONTROL, 1, 0x34)
        self.write(PIT_BASE, 1, 0)
        self.write(PIT_BASE, 1, 0)

    def pit_time(self) -> int:
        """PIT ticks elapsed since virtual time 0."""
        return self.now() * PIT_HZ // self.tsc_hz

    _tick = pit_time

    def next_deadline(self) -> int | None:
        return self._deadline

    def update(self) -> None:
        deadline = self._deadline
        if deadline is None or self.now() < deadline:
            return
        ch = self.channels[0]
        if ch.mode in (2, 3):
            tick = self._tick()
            periods = (tick - ch.load_tick) // ch.count + 1
            self._set_edge(ch.load_tick + periods * ch.count)
        else:
            self._set_edge(None)
        self._lower(PIT_IRQ)
        self._raise(PIT_IRQ)

    def read(self, port: int, size: int) -> int:
        index = port - PIT_BASE
        if index == 3:
            return 0  # the control word register is write-only; QEMU reads 0
        return self.channels[index].read(self._tick())

    def write(self, port: int, size: int, value: int) -> None:
        index = port - PIT_BASE
        value &= 0xFF
        if index == 3:
            self._control(value)
            return
        ch = self.channels[index]
        count = ch.write_count(value)
        if count is None:
            return
        tick = self._tick()
        ch.count = count
        ch.load_tick = tick
        ch.null_count = False
        if index == 0:
            self._arm()

    def _control(self, value: int) -> None:
        select = value >> 6
        tick = self._tick()
        if select == 3:
            # Read-back command (8254 data sheet): bit 5 clear latches counts, bit 4 clear
            # latches status, bits 1-3 select counters 0-2.
            for i, ch in enumerate(self.channels):
                if value & (2 << i):
                    if not value & 0x20:
                        ch.latch_count(tick)
                    if not value & 0x10:
                        ch.latch_status(tick)
            return
        ch = self.channels[select]
        if not value & 0x30:
            ch.latch_count(tick)
            return
        ch.control(value)
        if select == 0:
            self._set_edge(None)

    def _arm(self) -> None:
        """Channel 0 has a new count: its first edge is one period (or the terminal count) on."""
        ch = self.channels[0]
        if ch.mode in (0, 2, 3, 4):
            self._set_edge(ch.load_tick + ch.count)
        else:
            self._set_edge(None)

    def _set_edge(self, edge: int | None) -> None:
        self._edge = edge
        # The first TSC time t with t * PIT_HZ // tsc_hz >= edge.
        self._deadline = None if edge is None else -(-edge * self.tsc_hz // PIT_HZ)
