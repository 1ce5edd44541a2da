"""The local APIC (cpuvirt/machine/apic.py) against the SDM's rules (Vol. 3A chapter 10), without Unicorn.

Where QEMU 7.2 and the SDM differ, the test says which one the model follows (the module docstring
lists the differences).
"""
from __future__ import annotations

import pytest

from cpuvirt.machine import apic as A
from cpuvirt.machine.apic import ApicReservedBits, LocalApic


class Clock:
    def __init__(self):
        self.t = 0

    def __call__(self):
        return self.t


def make(bios=True):
    clock = Clock()
    changes = []
    apic = LocalApic(clock, lambda: changes.append(clock.t))
    if bios:
        apic.bios_setup()
    return apic, clock, changes


def rd(apic, reg):
    return apic.read(reg, 4)


def wr(apic, reg, value):
    apic.write(reg, 4, value)


def self_ipi(apic, vector, mode=A.DM_FIXED):
    wr(apic, A.ICR_LO, 0x40000 | mode << 8 | vector)


def bit_of(apic, base, vector):
    """The vector's bit in the ISR/TMR/IRR register bank starting at base (SDM figure 10-20)."""
    return (rd(apic, base + 0x10 * (vector // 32)) >> (vector % 32)) & 1


# --- state after reset and after the firmware ---------------------------------------------------------

def test_power_up_state_is_the_sdms():
    apic, _, _ = make(bios=False)       # SDM 10.4.7.1
    assert rd(apic, A.ID) == 0 and rd(apic, A.TPR) == 0 and rd(apic, A.PPR) == 0
    assert rd(apic, A.DFR) == 0xFFFFFFFF and rd(apic, A.LDR) == 0
    assert rd(apic, A.SPIV) == 0xFF                       # software-disabled
    assert [rd(apic, A.LVT_TIMER + 0x10 * i) for i in range(6)] == [A.LVT_MASKED] * 6
    assert rd(apic, A.TIMER_INITIAL) == rd(apic, A.TIMER_CURRENT) == rd(apic, A.TIMER_DIVIDE) == 0
    assert apic.read_base_msr() == 0xFEE00900           # base, BSP, global enable


def test_bios_state_is_what_seabios_leaves_under_qemu():
    apic, _, _ = make()
    assert rd(apic, A.SPIV) == 0x1FF
    assert rd(apic, A.LVT_LINT0) == 0x8700 and rd(apic, A.LVT_LINT1) == 0x8400
    assert rd(apic, A.ICR_LO) == 0xC4610
    assert apic.pic_connected()                         # virtual-wire mode


def test_version_and_access_widths():
    apic, _, _ = make()
    assert rd(apic, A.VER) == 0x00050014                # 6 LVT entries, integrated APIC 0x14
    assert apic.read(A.VER, 1) == apic.read(A.VER, 2) == 0     # QEMU: narrow reads read 0
    assert rd(apic, A.VER + 4) == 0x00050014            # QEMU: offset bits 3:0 are ignored
    apic.write(A.TPR, 1, 0x40)                          # narrow writes are ignored
    assert rd(apic, A.TPR) == 0
    wr(apic, A.VER, 0)                                  # read-only
    assert rd(apic, A.VER) == 0x00050014


def test_id_ldr_dfr_writable_bits():
    apic, _, _ = make()
    wr(apic, A.ID, 0xFFFFFFFF)
    assert rd(apic, A.ID) == 0xFF000000
    wr(apic, A.LDR, 0x12345678)
    assert rd(apic, A.LDR) == 0x12000000
    wr(apic, A.DFR, 0)
    assert rd(apic, A.DFR) == 0x0FFFFFFF                # cluster model; bits 27:0 read 1


@pytest.mark.parametrize("reg,writable", [
    (A.LVT_TIMER, 0x300FF), (A.LVT_THERMAL, 0x107FF), (A.LVT_PERF, 0x107FF),
    (A.LVT_LINT0, 0x1A7FF), (A.LVT_LINT1, 0x1A7FF), (A.LVT_ERROR, 0x100FF)])
def test_lvt_writable_bits(reg, writable):
    """SDM figure 10-8: delivery status (12) and remote IRR (14) are read-only, timer mode bit 18
    (TSC deadline) is reserved without CPUID.1:ECX[24]."""
    apic, _, _ = make()
    wr(apic, reg, 0xFFFFFFFF)
    assert rd(apic, reg) == writable
    wr(apic, reg, 0)
    assert rd(apic, reg) == 0


def test_illegal_register_sets_esr_bit_7_on_the_next_esr_write():
    apic, _, _ = make()
    assert rd(apic, 0x2F0) == 0                         # no CMCI LVT: 6 entries
    assert rd(apic, A.ESR) == 0                         # SDM 10.5.3: latched by a write (QEMU: at once)
    wr(apic, A.ESR, 0)
    assert rd(apic, A.ESR) == A.ESR_ILLEGAL_REGISTER
    wr(apic, A.ESR, 0)
    assert rd(apic, A.ESR) == 0                         # and cleared by the next


# --- priorities (SDM 10.8.3) ---------------------------------------------------------------------------

def test_tpr_masks_vectors_of_its_class_and_below():
    apic, _, _ = make()
    self_ipi(apic, 0x41)
    for tpr, deliverable in [(0x50, False), (0x40, False), (0x4F, False), (0x3F, True), (0, True)]:
        wr(apic, A.TPR, tpr)
        assert rd(apic, A.PPR) == tpr
        assert (apic.pending_vector() == 0x41) is deliverable, hex(tpr)
    assert bit_of(apic, A.IRR, 0x41) == 1


def test_ppr_is_the_in_service_class_when_higher_than_tpr():
    apic, _, _ = make()
    wr(apic, A.TPR, 0x25)
    self_ipi(apic, 0x61)
    assert apic.acknowledge() == 0x61
    assert bit_of(apic, A.ISR, 0x61) == 1 and bit_of(apic, A.IRR, 0x61) == 0
    assert rd(apic, A.PPR) == 0x60
    wr(apic, A.TPR, 0x75)
    assert rd(apic, A.PPR) == 0x75
    wr(apic, A.TPR, 0x65)                               # equal class: TPR wins
    assert rd(apic, A.PPR) == 0x65


def test_highest_vector_first_and_nesting_only_for_a_higher_class():
    apic, _, _ = make()
    for v in (0x41, 0x61, 0x62):
        self_ipi(apic, v)
    assert apic.acknowledge() == 0x62
    assert apic.pending_vector() is None                # 0x61 is the same class as 0x62 in service
    self_ipi(apic, 0x71)
    assert apic.acknowledge() == 0x71                   # a higher class nests
    wr(apic, A.EOI, 0)                                  # EOI ends the highest in service: 0x71
    assert bit_of(apic, A.ISR, 0x71) == 0 and bit_of(apic, A.ISR, 0x62) == 1
    assert apic.pending_vector() is None
    wr(apic, A.EOI, 0)
    assert apic.acknowledge() == 0x61
    wr(apic, A.EOI, 0)
    assert apic.acknowledge() == 0x41
    wr(apic, A.EOI, 0)
    wr(apic, A.EOI, 0)                                  # EOI with nothing in service: no effect
    assert apic.isr == 0 and apic.irr == 0


def test_acknowledge_with_nothing_deliverable_is_the_spurious_vector():
    apic, _, _ = make()
    wr(apic, A.SPIV, 0x1EF)
    assert apic.acknowledge() == 0xEF and apic.isr == 0     # SDM 10.9


def test_apr():
    apic, _, _ = make()
    wr(apic, A.TPR, 0x35)
    assert rd(apic, A.APR) == 0x35
    self_ipi(apic, 0x51)
    assert rd(apic, A.APR) == 0x50                      # IRRV's class is above TPR's


# --- software and global disable -------------------------------------------------------------------------

def test_software_disable_masks_every_lvt_and_holds_irr():
    apic, _, _ = make()
    wr(apic, A.LVT_TIMER, 0x40)
    self_ipi(apic, 0x41)
    wr(apic, A.SPIV, 0xFF)
    assert apic.pending_vector() is None and bit_of(apic, A.IRR, 0x41) == 1
    assert all(rd(apic, A.LVT_TIMER + 0x10 * i) & A.LVT_MASKED for i in range(6))   # SDM 10.4.7.2
    wr(apic, A.LVT_LINT0, 0x700)                        # the masks cannot be cleared while disabled
    assert rd(apic, A.LVT_LINT0) == 0x10700
    assert not apic.pic_connected()
    wr(apic, A.SPIV, 0x1FF)
    assert apic.pending_vector() == 0x41
    wr(apic, A.LVT_LINT0, 0x700)
    assert apic.pic_connected()


def test_ia32_apic_base_msr():
    apic, _, _ = make()
    with pytest.raises(ApicReservedBits):
        apic.write_base_msr(0xFEE00000 | A.APIC_BASE_ENABLE | 1 << 10)    # x2APIC: not offered
    with pytest.raises(ApicReservedBits):
        apic.write_base_msr(1 << 32 | 0xFEE00900)                         # above MAXPHYADDR 32
    self_ipi(apic, 0x41)
    apic.write_base_msr(0xFEE00000)                     # global disable; BSP is read-only
    assert apic.read_base_msr() == 0xFEE00100
    assert not apic.hw_enabled and apic.pic_connected()  # the 8259 goes straight to the CPU
    assert apic.pending_vector() is None
    assert rd(apic, A.SPIV) == 0xFF and apic.irr == 0   # back to the power-up state (SDM 10.4.3)
    apic.write_base_msr(0xFEE00800)                     # may be enabled again (QEMU refuses)
    assert apic.hw_enabled and not apic.pic_connected()  # LINT0 masked after the reset


# --- IPIs through the ICR (SDM 10.6) ------------------------------------------------------------------------

@pytest.mark.parametrize("icr_lo,icr_hi,ldr,dfr,delivered", [
    (0x40000, 0, 0, 0xFFFFFFFF, True),              # shorthand self
    (0x80000, 0, 0, 0xFFFFFFFF, True),              # all including self
    (0xC0000, 0, 0, 0xFFFFFFFF, False),             # all excluding self
    (0x00000, 0x00000000, 0, 0xFFFFFFFF, True),     # physical, APIC ID 0
    (0x00000, 0x01000000, 0, 0xFFFFFFFF, False),    # physical, another CPU
    (0x00000, 0xFF000000, 0, 0xFFFFFFFF, True),     # physical broadcast
    (0x00800, 0x01000000, 0x01000000, 0xFFFFFFFF, True),    # logical flat, our bit
    (0x00800, 0x02000000, 0x01000000, 0xFFFFFFFF, False),   # logical flat, another bit
    (0x00800, 0x13000000, 0x11000000, 0x0FFFFFFF, True),    # logical cluster 1, member 1
    (0x00800, 0x23000000, 0x11000000, 0x0FFFFFFF, False),   # another cluster
])
def test_fixed_ipi_destinations(icr_lo, icr_hi, ldr, dfr, delivered):
    apic, _, _ = make()
    wr(apic, A.LDR, ldr)
    wr(apic, A.DFR, dfr)
    wr(apic, A.ICR_HI, icr_hi)
    wr(apic, A.ICR_LO, icr_lo | 0x55)
    assert (apic.pending_vector() == 0x55) is delivered
    assert rd(apic, A.ICR_LO) & 0x1000 == 0             # delivery status: idle at once


def test_nmi_init_sipi_and_illegal_vectors():
    apic, _, _ = make()
    self_ipi(apic, 0, A.DM_NMI)
    assert apic.nmi_pending and apic.irr == 0
    assert apic.take_nmi() and not apic.nmi_pending
    wr(apic, A.ICR_LO, 0xC4500)                         # INIT to all but self
    wr(apic, A.ICR_LO, 0xC4610)                         # SIPI to all but self
    self_ipi(apic, 0x20, A.DM_INIT)
    assert apic.irr == 0 and not apic.nmi_pending
    self_ipi(apic, 0x0E)                                # vectors 0-15 are illegal
    assert apic.irr == 0
    wr(apic, A.ESR, 0)
    assert rd(apic, A.ESR) == A.ESR_SEND_ILLEGAL_VECTOR


def test_an_error_raises_the_lvt_error_interrupt():
    apic, _, _ = make()
    wr(apic, A.LVT_ERROR, 0xFE)
    self_ipi(apic, 0x03)
    assert apic.pending_vector() == 0xFE


def test_icr_writable_bits():
    apic, _, _ = make()
    wr(apic, A.ICR_HI, 0xFFFFFFFF)
    assert rd(apic, A.ICR_HI) == 0xFF000000
    wr(apic, A.ICR_LO, 0xFFF33000)                      # reserved bits and delivery status only
    assert rd(apic, A.ICR_LO) == 0


def test_every_write_reports_a_change():
    apic, _, changes = make()
    wr(apic, A.TPR, 0x10)
    wr(apic, A.EOI, 0)
    assert len(changes) == 2


# --- the timer (SDM 10.5.4) ------------------------------------------------------------------------------

@pytest.mark.parametrize("dcr,divisor", [(0x0, 2), (0x1, 4), (0x2, 8), (0x3, 16), (0x8, 32), (0x9, 64),
                                         (0xA, 128), (0xB, 1)])
def test_divide_configuration(dcr, divisor):
    """SDM figure 10-10; the timer's input clock is the 1 GHz virtual clock (BUS_HZ)."""
    apic, clock, _ = make()
    wr(apic, A.TIMER_DIVIDE, dcr | 0xF0)                # only bits 0, 1, 3 are kept
    assert rd(apic, A.TIMER_DIVIDE) == dcr
    wr(apic, A.LVT_TIMER, 0x40)
    wr(apic, A.TIMER_INITIAL, 1000)
    assert apic.next_deadline() == 1000 * divisor
    clock.t = 10 * divisor + divisor - 1
    assert rd(apic, A.TIMER_CURRENT) == 990


def test_one_shot_fires_once_at_zero():
    apic, clock, changes = make()
    wr(apic, A.TIMER_DIVIDE, 0xB)
    wr(apic, A.LVT_TIMER, 0x40)
    clock.t = 500
    wr(apic, A.TIMER_INITIAL, 100)
    assert rd(apic, A.TIMER_CURRENT) == 100 and apic.next_deadline() == 600
    clock.t = 540
    assert rd(apic, A.TIMER_CURRENT) == 60
    clock.t = 599
    apic.update()
    assert apic.irr == 0
    clock.t = 600
    n = len(changes)
    apic.update()
    assert apic.pending_vector() == 0x40 and len(changes) == n + 1
    assert rd(apic, A.TIMER_CURRENT) == 0 and apic.next_deadline() is None
    assert apic.acknowledge() == 0x40
    clock.t = 10_000
    apic.update()
    assert apic.irr == 0                                # one-shot: never again


def test_periodic_reloads_and_coalesces_missed_periods():
    apic, clock, _ = make()
    wr(apic, A.TIMER_DIVIDE, 0x0)                       # divide by 2
    wr(apic, A.LVT_TIMER, A.LVT_PERIODIC | 0x40)
    wr(apic, A.TIMER_INITIAL, 10)                       # a period of 20 cycles
    assert apic.next_deadline() == 20
    clock.t = 25
    assert rd(apic, A.TIMER_CURRENT) == 8               # reloaded at 20, then 2 ticks
    clock.t = 65
    apic.update()                                       # 3 periods passed: one interrupt latched
    assert apic.irr == 1 << 0x40 and apic.next_deadline() == 80
    assert rd(apic, A.TIMER_CURRENT) == 8


def test_initial_count_zero_stops_the_timer():
    apic, clock, _ = make()
    wr(apic, A.LVT_TIMER, A.LVT_PERIODIC | 0x40)
    wr(apic, A.TIMER_INITIAL, 10)
    wr(apic, A.TIMER_INITIAL, 0)
    assert apic.next_deadline() is None
    clock.t = 1000
    apic.update()
    assert rd(apic, A.TIMER_CURRENT) == 0 and apic.irr == 0


def test_masked_timer_counts_without_interrupts():
    apic, clock, _ = make()
    wr(apic, A.TIMER_DIVIDE, 0xB)
    wr(apic, A.LVT_TIMER, A.LVT_MASKED | A.LVT_PERIODIC | 0x40)
    wr(apic, A.TIMER_INITIAL, 100)
    assert apic.next_deadline() is None                 # nothing for the CPU to wait for
    clock.t = 250
    assert rd(apic, A.TIMER_CURRENT) == 50
    wr(apic, A.LVT_TIMER, A.LVT_PERIODIC | 0x40)        # unmasking keeps the phase
    assert apic.irr == 0 and apic.next_deadline() == 300


def test_changing_divider_or_mode_continues_from_the_current_count():
    apic, clock, _ = make()
    wr(apic, A.TIMER_DIVIDE, 0xB)
    wr(apic, A.LVT_TIMER, 0x40)
    wr(apic, A.TIMER_INITIAL, 100)
    clock.t = 40
    wr(apic, A.TIMER_DIVIDE, 0x1)                       # 60 left, now 4 cycles each
    assert rd(apic, A.TIMER_CURRENT) == 60 and apic.next_deadline() == 40 + 240
    wr(apic, A.LVT_TIMER, A.LVT_PERIODIC | 0x40)
    clock.t = 280
    apic.update()
    assert apic.irr and apic.next_deadline() == 280 + 400   # reloads the initial count (100 x 4)


def test_timer_with_an_illegal_vector_is_an_error():
    apic, clock, _ = make()
    wr(apic, A.TIMER_DIVIDE, 0xB)
    wr(apic, A.LVT_TIMER, 0x05)
    wr(apic, A.TIMER_INITIAL, 1)
    clock.t = 1
    apic.update()
    assert apic.irr == 0
    wr(apic, A.ESR, 0)
    assert rd(apic, A.ESR) == A.ESR_RECEIVE_ILLEGAL_VECTOR


def test_reads_catch_the_timer_up():
    """A register read between two engine stops sees the interrupt a due zero crossing raised."""
    apic, clock, _ = make()
    wr(apic, A.TIMER_DIVIDE, 0xB)
    wr(apic, A.LVT_TIMER, 0x40)
    wr(apic, A.TIMER_INITIAL, 10)
    clock.t = 10
    assert bit_of(apic, A.IRR, 0x40) == 1
