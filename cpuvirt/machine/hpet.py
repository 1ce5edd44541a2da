"""The HPET (IA-PC HPET specification 1.0a) at 0xFED00000, as on QEMU's pc machine: a 64-bit main
counter at 100 MHz and three comparators, each one-shot or periodic, 32- or 64-bit, edge or level.

What a guest reads at reset is QEMU 7.2's, read back from its pc machine by tests/guests/hpet.S:
GCAP_ID 0x00989680_8086A201 (revision 1, three timers, a 64-bit counter, legacy replacement
capable, vendor 0x8086, a 10 ns period), each timer's Tn_CONF_CAP 0x00000004_00000030 (periodic and
64-bit capable, interrupt route capability: I/O APIC input 2 only), comparators all ones. No timer
advertises FSB (MSI) delivery, as QEMU's default, but Tn_FSB_EN_CNF is writable there and honoured:
a timer with it set writes Tn_FSB_INT_VAL to Tn_FSB_INT_ADDR (an MSI to the local APIC) instead of
driving a line, and so it does here.

Routing: in legacy replacement mode (GEN_CONF.LEG_RT_CNF) timer 0 drives IRQ 0 and timer 1 IRQ 8,
and the 8254 no longer reaches IRQ 0 (Machine gates it); otherwise timer n drives the global system
interrupt its Tn_INT_ROUTE_CNF names, which for GSI 0-15 is the ISA line (the 8259 input and the
I/O APIC pin, IRQ 0 on pin 2), as QEMU wires it. Routes 16-31 are outside the advertised capability
and not modelled (QEMU inverts their polarity for the ICH's PIRQ pins): such a timer interrupts
nothing. Edge-triggered timers pulse their line; level-triggered ones set their GINTR_STA bit and hold
the line high until the guest writes 1 to that bit.

Where the specification leaves room, QEMU's behaviour is followed: a comparator written at or below
the counter fires one tick later; a 32-bit one-shot timer also fires when the counter's low half
wraps; a periodic comparator advances by whole periods past the counter when it fires (lost periods
are not replayed, as for the 8254); a timer whose comparator is all ones is not armed when the HPET
is enabled. Writes to the main counter while it runs are ignored. Narrow (1- and 2-byte) accesses
read or merge into the 4-byte register that holds them.

Time is virtual: the counter is `base + (now - epoch) * 100 MHz // tsc_hz`, integer math, so a run is
reproducible; `next_deadline()` gives the TSC time of the next interrupt an enabled timer makes.
"""

from __future__ import annotations

from typing import Callable

HPET_BASE_GPA = 0xFED00000
HPET_SIZE = 0x1000  # QEMU decodes 0x400 bytes; the rest of the page reads 0
HPET_HZ = 100_000_000
HPET_CLK_PERIOD_FS = 10_000_000
HPET_NUM_TIMERS = 3

# General registers (offsets)
HPET_ID = 0x000  # GCAP_ID
HPET_CFG = 0x010  # GEN_CONF
HPET_STATUS = 0x020  # GINTR_STA
HPET_COUNTER = 0x0F0  # MAIN_CNT
HPET_TIMER0 = 0x100  # timer n at 0x100 + 0x20 * n
HPET_TN_CFG, HPET_TN_CMP, HPET_TN_ROUTE = 0x0, 0x8, 0x10

HPET_CFG_ENABLE = 0x1
HPET_CFG_LEGACY = 0x2

HPET_TN_TYPE_LEVEL = 1 << 1
HPET_TN_ENABLE = 1 << 2
HPET_TN_PERIODIC = 1 << 3
HPET_TN_PERIODIC_CAP = 1 << 4
HPET_TN_SIZE_CAP = 1 << 5
HPET_TN_SETVAL = 1 << 6
HPET_TN_32BIT = 1 << 8
HPET_TN_INT_ROUTE_SHIFT = 9
HPET_TN_INT_ROUTE_MASK = 0x1F << HPET_TN_INT_ROUTE_SHIFT
HPET_TN_FSB_ENABLE = 1 << 14
HPET_TN_CFG_WRITE_MASK = (
    HPET_TN_TYPE_LEVEL
    | HPET_TN_ENABLE
    | HPET_TN_PERIODIC
    | HPET_TN_SETVAL
    | HPET_TN_32BIT
    | HPET_TN_INT_ROUTE_MASK
    | HPET_TN_FSB_ENABLE
)
HPET_TN_INT_ROUTE_CAP = 1 << 2  # I/O APIC input 2 only, as QEMU's pc

CAPABILITIES = (
    HPET_CLK_PERIOD_FS << 32
    | 0x8086 << 16  # vendor
    | 1 << 15  # LEG_RT_CAP
    | 1 << 13  # COUNT_SIZE_CAP: 64-bit
    | (HPET_NUM_TIMERS - 1) << 8
    | 0x01  # revision
)

_M32, _M64 = 0xFFFFFFFF, 0xFFFFFFFFFFFFFFFF
LEGACY_GSI = (0, 8)  # timers 0 and 1 in legacy replacement mode: IRQ 0 (the 8254's) and IRQ 8 (the RTC's)
ISA_LINES = 16


class HpetTimer:
    __slots__ = ("index", "config", "cmp", "period", "fsb", "fire", "wrap")

    def __init__(self, index: int):
        self.index = index
        self.config = HPET_TN_INT_ROUTE_CAP << 32 | HPET_TN_SIZE_CAP | HPET_TN_PERIODIC_CAP
        self.cmp = _M64
        self.period = 0
        self.fsb = 0
        self.fire: int | None = None  # main-counter tick of the next match (or 32-bit wrap)
        self.wrap = False  # that tick is the low half's wrap, not the comparator

    @property
    def periodic(self) -> bool:
        return bool(self.config & HPET_TN_PERIODIC)

    @property
    def is32(self) -> bool:
        return bool(self.config & HPET_TN_32BIT)


class Hpet:
    def __init__(
        self,
        now: Callable[[], int],
        tsc_hz: int,
        set_gsi: Callable[[int, bool], None],
        send_msi: Callable[[int, int], object] | None = None,
    ):
        self.now = now
        self.tsc_hz = tsc_hz
        self._set_gsi = set_gsi
        self._send_msi = send_msi
        self.config = 0
        self.isr = 0
        self._base = 0  # counter value at `_epoch` (the counter while stopped)
        self._epoch = 0
        self.timers = [HpetTimer(i) for i in range(HPET_NUM_TIMERS)]
        self.interrupts = 0  # interrupts raised, for the run summary's device line and tests

    # -- the main counter -------------------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        return bool(self.config & HPET_CFG_ENABLE)

    @property
    def legacy(self) -> bool:
        return bool(self.config & HPET_CFG_LEGACY)

    def counter(self) -> int:
        if not self.enabled:
            return self._base
        return (self._base + (self.now() - self._epoch) * HPET_HZ // self.tsc_hz) & _M64

    def _tsc_of(self, tick: int) -> int:
        """The first TSC time at which the counter reads `tick` or more."""
        return self._epoch + -(-(tick - self._base) * self.tsc_hz // HPET_HZ)

    def next_deadline(self) -> int | None:
        """TSC time of the next interrupt: timers whose interrupt is enabled only (the others' comparators
        are brought up to date when the guest looks at them)."""
        if not self.enabled:
            return None
        ticks = [t.fire for t in self.timers if t.fire is not None and t.config & HPET_TN_ENABLE]
        return self._tsc_of(min(ticks)) if ticks else None

    def update(self) -> None:
        """Fire every timer whose tick has come, in tick order (one interrupt per timer per call, as
        the 8254's edges)."""
        if not self.enabled:
            return
        now = self.counter()
        for t in sorted((t for t in self.timers if t.fire is not None and t.fire <= now), key=lambda t: t.fire or 0):
            self._expire(t, now)

    def _expire(self, t: HpetTimer, now: int) -> None:
        if t.periodic and t.period:
            mask = _M32 if t.is32 else _M64
            behind = ((now & mask) - t.cmp) & mask  # the counter at or past the comparator by this much
            if behind <= mask >> 1:  # whole periods past it, at once: a guest's 1-tick period costs no loop
                t.cmp = (t.cmp + (behind // t.period + 1) * t.period) & mask
            self._arm(t, now)
        elif t.wrap:
            t.wrap = False
            t.fire = now + self._diff(t, now)
        else:
            t.fire = None
        self._raise(t)

    def _diff(self, t: HpetTimer, now: int) -> int:
        """Ticks from `now` to the comparator; one if it is not ahead (QEMU's rule)."""
        if t.is32:
            d = (t.cmp - now) & _M32
            return d if 0 < d < 1 << 31 else 1
        d = (t.cmp - now) & _M64
        return d if 0 < d < 1 << 63 else 1

    def _arm(self, t: HpetTimer, now: int) -> None:
        d = self._diff(t, now)
        t.wrap = False
        if t.is32 and not t.periodic:
            to_wrap = _M32 - (now & _M32)
            if to_wrap < d:
                d, t.wrap = to_wrap, True
        t.fire = now + d

    # -- interrupts ------------------------------------------------------------------------------
    def _gsi(self, t: HpetTimer) -> int | None:
        if self.legacy and t.index < 2:
            return LEGACY_GSI[t.index]
        route = (t.config & HPET_TN_INT_ROUTE_MASK) >> HPET_TN_INT_ROUTE_SHIFT
        return route if route < ISA_LINES else None

    def _raise(self, t: HpetTimer) -> None:
        if not t.config & HPET_TN_ENABLE:
            return
        if t.config & HPET_TN_FSB_ENABLE:
            if self._send_msi is not None:
                self.interrupts += 1
                self._send_msi(t.fsb >> 32, t.fsb & _M32)
            return
        gsi = self._gsi(t)
        if gsi is None:
            return
        self.interrupts += 1
        if t.config & HPET_TN_TYPE_LEVEL:
            self.isr |= 1 << t.index
            self._set_gsi(gsi, True)
        else:
            self._set_gsi(gsi, True)
            self._set_gsi(gsi, False)

    def _lower(self, t: HpetTimer) -> None:
        if self.isr & 1 << t.index:
            self.isr &= ~(1 << t.index)
            gsi = self._gsi(t)
            if gsi is not None:
                self._set_gsi(gsi, False)

    # -- registers -------------------------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        self.update()
        word = offset & ~3
        value = self._read32(word)
        shift = (offset & 3) * 8
        return (value >> shift) & ((1 << (8 * size)) - 1)

    def write(self, offset: int, size: int, value: int) -> None:
        self.update()
        word = offset & ~3
        if size < 4:
            shift = (offset & 3) * 8
            mask = ((1 << (8 * size)) - 1) << shift
            value = (self._read32(word) & ~mask) | ((value << shift) & mask)
        self._write32(word, value & _M32)

    def _read32(self, word: int) -> int:
        high, reg = word & 4, word & ~7
        if reg == HPET_ID:
            value = CAPABILITIES
        elif reg == HPET_CFG:
            value = self.config
        elif reg == HPET_STATUS:
            value = self.isr
        elif reg == HPET_COUNTER:
            value = self.counter()
        elif HPET_TIMER0 <= reg < HPET_TIMER0 + 0x20 * HPET_NUM_TIMERS:
            t = self.timers[(reg - HPET_TIMER0) >> 5]
            value = {HPET_TN_CFG: t.config, HPET_TN_CMP: t.cmp, HPET_TN_ROUTE: t.fsb}.get(reg & 0x1F, 0)
        else:
            value = 0
        return (value >> 32 if high else value) & _M32

    def _write32(self, word: int, value: int) -> None:
        high, reg = bool(word & 4), word & ~7
        if reg == HPET_CFG and not high:
            self._write_config(value)
        elif reg == HPET_STATUS and not high:
            for t in self.timers:
                if value & self.isr & 1 << t.index:
                    self._lower(t)
        elif reg == HPET_COUNTER:
            if not self.enabled:  # a running counter is not written
                self._base = (self._base & _M32) | value << 32 if high else (self._base & ~_M32) | value
        elif HPET_TIMER0 <= reg < HPET_TIMER0 + 0x20 * HPET_NUM_TIMERS:
            t = self.timers[(reg - HPET_TIMER0) >> 5]
            field = reg & 0x1F
            if field == HPET_TN_CFG and not high:
                self._write_timer_config(t, value)
            elif field == HPET_TN_CMP:
                self._write_comparator(t, value, high)
            elif field == HPET_TN_ROUTE:
                t.fsb = (t.fsb & _M32) | value << 32 if high else (t.fsb & ~_M32) | value

    def _write_config(self, value: int) -> None:
        old, new = self.config, value & (HPET_CFG_ENABLE | HPET_CFG_LEGACY)
        if old & HPET_CFG_ENABLE and not new & HPET_CFG_ENABLE:
            self._base = self.counter()
            for t in self.timers:
                t.fire = None
        self.config = new
        if new & HPET_CFG_ENABLE and not old & HPET_CFG_ENABLE:
            self._epoch = self.now()
            for t in self.timers:
                if t.cmp != _M64:
                    self._arm(t, self._base)
        if (old ^ new) & HPET_CFG_LEGACY:  # the lines change hands (Machine asks `legacy` for the 8254's)
            self._set_gsi(0, False)
            self._set_gsi(8, False)

    def _write_timer_config(self, t: HpetTimer, value: int) -> None:
        old = t.config
        if old & HPET_TN_TYPE_LEVEL and not value & HPET_TN_TYPE_LEVEL or not value & HPET_TN_ENABLE:
            self._lower(t)
        t.config = (old & ~HPET_TN_CFG_WRITE_MASK) | (value & HPET_TN_CFG_WRITE_MASK)
        if t.is32:
            t.cmp &= _M32
            t.period &= _M32
        if self.enabled:
            self._arm(t, self.counter())

    def _write_comparator(self, t: HpetTimer, value: int, high: bool) -> None:
        if high and t.is32:
            return
        if not t.periodic or t.config & HPET_TN_SETVAL:
            t.cmp = (t.cmp & _M32) | value << 32 if high else (t.cmp & ~_M32) | value
        if t.periodic:
            if t.is32:
                value = min(value, _M32 >> 1)
            t.period = (t.period & _M32) | value << 32 if high else (t.period & ~_M32) | value
        t.config &= ~HPET_TN_SETVAL
        if self.enabled:
            self._arm(t, self.counter())
