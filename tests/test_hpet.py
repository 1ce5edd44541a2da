"""The HPET (machine/hpet.py): the register model against the specification's rules and QEMU's
choices where it leaves room, checked on a fake clock; the machine's wiring (legacy replacement
takes IRQ 0 from the 8254); and tests/guests/hpet.S in every mode, whose console must be QEMU's."""
from __future__ import annotations

import pytest

from cpuvirt.machine.hpet import (
    HPET_BASE_GPA,
    HPET_CFG,
    HPET_COUNTER,
    HPET_STATUS,
    HPET_TIMER0,
    Hpet,
)
from cpuvirt.machine.machine import Machine
from cpuvirt.runner import run_guest
from tests.conftest import requires_qemu
from tests.hostile import build

TSC_HZ = 1_000_000_000  # 10 cycles per HPET tick
ENABLE, LEGACY = 1, 2
LEVEL, INT_ENB, PERIODIC, VAL_SET, MODE32, FSB_EN = 0x2, 0x4, 0x8, 0x40, 0x100, 0x4000


def CONF(n):
    return HPET_TIMER0 + 0x20 * n


def CMP(n):
    return HPET_TIMER0 + 0x20 * n + 8


class Rig:
    """An HPET on a clock the test moves, recording what it does to its lines."""

    def __init__(self):
        self.t = 0
        self.lines: list[tuple[int, bool]] = []
        self.msis: list[tuple[int, int]] = []
        self.h = Hpet(now=lambda: self.t, tsc_hz=TSC_HZ, set_gsi=lambda g, lv: self.lines.append((g, lv)),
                      send_msi=lambda a, d: self.msis.append((a, d)))

    def w(self, off, value, size=4):
        self.h.write(off, size, value)

    def w64(self, off, value):
        self.w(off + 4, value >> 32)
        self.w(off, value & 0xFFFFFFFF)

    def r(self, off, size=4):
        return self.h.read(off, size)

    def run_to(self, t):
        """Advance the clock to t, stopping at each deadline on the way as the machine does."""
        while (d := self.h.next_deadline()) is not None and d <= t:
            self.t = max(self.t, d)
            self.h.update()
        self.t = t
        self.h.update()

    def pulses(self, gsi):
        return sum(1 for g, lv in self.lines if g == gsi and lv)


def test_the_counter_runs_at_100_mhz_only_while_enabled():
    g = Rig()
    g.w(HPET_COUNTER, 0x500)
    g.t = 12345
    assert g.r(HPET_COUNTER) == 0x500
    g.w(HPET_CFG, ENABLE)
    g.t += 1000
    assert g.r(HPET_COUNTER) == 0x500 + 100
    g.w(HPET_COUNTER, 0)                     # ignored while it runs
    assert g.r(HPET_COUNTER) == 0x500 + 100
    g.w(HPET_CFG, 0)
    g.t += 10**6
    assert g.r(HPET_COUNTER) == 0x500 + 100 and g.h.next_deadline() is None


def test_a_periodic_timer_fires_every_period_at_exact_deadlines():
    g = Rig()
    g.w(HPET_CFG, LEGACY)
    g.w(CONF(0), PERIODIC | VAL_SET | INT_ENB)
    g.w64(CMP(0), 0)                         # (high half first: clears VAL_SET) comparator and period 0
    g.w(CONF(0), PERIODIC | VAL_SET | INT_ENB)
    g.w(CMP(0), 1000)                        # comparator 1000, period 1000
    g.w(HPET_CFG, LEGACY | ENABLE)
    deadlines = []
    for _ in range(4):
        d = g.h.next_deadline()
        deadlines.append(d)
        g.t = d
        g.h.update()
    assert deadlines == [10_000, 20_000, 30_000, 40_000]
    assert g.pulses(0) == 4 and g.r(CMP(0)) == 5000
    g.t = 95_000                             # five periods late: one interrupt, the comparator ahead
    g.h.update()
    assert g.pulses(0) == 5 and g.r(CMP(0)) == 10_000


def test_a_periodic_comparator_catches_up_in_bounded_time():
    """A hostile guest's 1-tick period left running for 2^40 ticks with its interrupt off: the comparator
    catches up at once when read (a loop per period would take hours of host time)."""
    import time
    g = Rig()
    g.w(CONF(0), PERIODIC | VAL_SET)
    g.w64(CMP(0), 1)
    g.w(CONF(0), PERIODIC | VAL_SET)
    g.w(CMP(0), 1)                           # comparator 1, period 1
    g.w(HPET_CFG, ENABLE)
    g.t = (1 << 40) * 10 + 5
    start = time.process_time()
    assert g.r(CMP(0)) | g.r(CMP(0) + 4) << 32 == (1 << 40) + 1      # the next tick after the counter
    assert time.process_time() - start < 1.0
    assert g.pulses(0) == 0                  # its interrupt is off


def test_a_one_shot_fires_once_and_a_past_comparator_one_tick_later():
    g = Rig()
    g.w(HPET_CFG, ENABLE)
    g.w(CONF(2), INT_ENB | (2 << 9))
    g.w64(CMP(2), 300)
    g.run_to(10**6)
    assert g.pulses(2) == 1
    g.w64(CMP(2), 5)                         # behind the counter (now 100,000): QEMU fires it next tick
    assert g.h.next_deadline() == g.t + 10
    g.run_to(g.t + 10)
    assert g.pulses(2) == 2


def test_a_32_bit_one_shot_also_fires_at_the_wrap():
    g = Rig()
    g.w64(HPET_COUNTER, 0xFFFFFF00)
    g.w(CONF(2), INT_ENB | MODE32 | (2 << 9))
    g.w(CMP(2), 0x80)                        # after the low half wraps
    g.w(HPET_CFG, ENABLE)
    g.run_to(0xFF * 10)                      # the wrap: 0xFFFFFFFF -> 0 (QEMU's rule)
    assert g.pulses(2) == 1
    g.run_to((0x100 + 0x80) * 10)
    assert g.pulses(2) == 2
    assert g.r(CMP(2) + 4) == 0              # the comparator's high half reads 0 in 32-bit mode


def test_level_triggered_sets_gintr_sta_until_written_with_1():
    g = Rig()
    g.w(HPET_CFG, ENABLE)
    g.w(CONF(2), LEVEL | INT_ENB | (2 << 9))
    g.w64(CMP(2), 50)
    g.run_to(1000)
    assert g.r(HPET_STATUS) == 4 and g.lines[-1] == (2, True)
    g.w(HPET_STATUS, 0)                      # writing 0 changes nothing
    assert g.r(HPET_STATUS) == 4
    g.w(HPET_STATUS, 4)
    assert g.r(HPET_STATUS) == 0 and g.lines[-1] == (2, False)


def test_routes_legacy_replacement_and_fsb():
    g = Rig()
    g.w(HPET_CFG, ENABLE | LEGACY)
    g.w(CONF(0), INT_ENB)
    g.w64(CMP(0), 10)
    g.w(CONF(1), INT_ENB)
    g.w64(CMP(1), 20)
    g.w(CONF(2), INT_ENB | (17 << 9))        # outside the advertised routes: not modelled
    g.w64(CMP(2), 30)
    g.run_to(1000)
    assert g.pulses(0) == 1 and g.pulses(8) == 1 and g.pulses(17) == 0
    g.w(CONF(2), INT_ENB | FSB_EN)
    g.w(CMP(2) + 8 + 4, 0xFEE00000)          # Tn_FSB_INT_ADDR
    g.w(CMP(2) + 8, 0x41)                    # Tn_FSB_INT_VAL: vector 0x41
    g.w64(CMP(2), 200)
    g.run_to(3000)
    assert g.msis == [(0xFEE00000, 0x41)] and g.h.interrupts == 3


def test_narrow_accesses_read_and_merge_into_the_register():
    g = Rig()
    assert g.r(0x0, 1) == 0x01 and g.r(0x2, 2) == 0x8086 and g.r(0x4, 4) == 10_000_000
    g.w(CONF(1) + 1, 0x01, size=1)           # bit 8: 32-bit mode, through a byte write
    assert g.r(CONF(1)) == 0x130


def test_legacy_replacement_disconnects_the_8254():
    m = Machine(4)
    m.pic.master.imr = 0xFE
    assert m.next_timer_deadline() == m.pit.next_deadline()
    m.mmio.write(HPET_BASE_GPA + HPET_CFG, 4, LEGACY)
    assert m.hpet.legacy and m.next_timer_deadline() is None
    m.clock.advance(m.pit.next_deadline() + 1)
    m.pit.update()
    assert m.pending_interrupt() is None
    m.mmio.write(HPET_BASE_GPA + HPET_CFG, 4, 0)
    m.clock.advance(m.pit.next_deadline() - m.clock.now + 1)
    m.pit.update()
    assert m.pending_interrupt() is not None          # the 8254's IRQ 0 reaches the 8259 again


MODES = ("native", "hw", "trap", "full")


@pytest.mark.parametrize("mode", MODES)
def test_the_hpet_guest_passes_in_every_mode(tmp_path, mode):
    r = run_guest(str(build("hpet", tmp_path)), mode)
    assert (r.outcome, r.status) == ("exit", 0), (r.message, r.console.decode()[-600:])
    assert b"FAIL" not in r.console and r.console.count(b"PASS") == 25


@requires_qemu
def test_the_hpet_guest_prints_what_qemu_prints(tmp_path):
    from tests.qemu import run_under_qemu
    image = build("hpet", tmp_path)
    out, code = run_under_qemu(image)
    assert code == 1 and out == run_guest(str(image)).console
