"""The local APIC of the one CPU: an xAPIC at guest-physical 0xFEE00000.

Follows the Intel SDM Vol. 3A chapter 10 ("Advanced Programmable Interrupt Controller"; chapter 11 in
editions from 2023; section numbers here are chapter 10's); where the
SDM leaves room, or where a guest could see a difference under the reference machine, QEMU 7.2's
`hw/intc/apic.c` is followed (measured with a probe kernel under QEMU + SeaBIOS):

- Registers (SDM table 10-1), one per 16 bytes, accessed as aligned 32-bit loads and stores. As in
  QEMU, a narrower access reads 0 and a narrower write is ignored, and the low 4 bits of the offset
  are ignored (offset 0x34 reads the version register).
- ID (0x20, bits 31:24, writable, 0 at reset); version (0x30) 0x00050014: an integrated APIC
  (version 0x14) with 6 LVT entries, as QEMU reports it.
- Task priority (0x80), processor priority (0xA0, SDM 10.8.3.1), arbitration priority (0x90, SDM
  10.8.3.1 figure 10-15; QEMU reads 0 there), EOI (0xB0), logical destination (0xD0), destination
  format (0xE0), spurious-interrupt vector (0xF0; bit 8 software-enables the APIC).
- ISR, TMR, IRR (0x100-0x270, 8 x 32 bits each); ESR (0x280; a write latches the errors seen
  since the last write and clears them, SDM 10.5.3).
- ICR (0x300/0x310): fixed and lowest-priority IPIs and NMI whose destination is this CPU (self,
  all-including-self, physical ID or 0xFF broadcast, logical flat or cluster match) are accepted;
  INIT and SIPI have no other CPU to go to and are accepted as no-ops; SMI is a no-op (no SMM).
  Delivery is instantaneous: the delivery-status bit always reads 0.
- LVT timer, thermal, performance counter, LINT0, LINT1, error (0x320-0x370), with the SDM's
  writable bits only; thermal and performance-counter interrupts never occur, nothing drives LINT1.
  LINT0 in ExtINT mode and unmasked is the 8259's path to the CPU (`pic_connected`).
- Timer (SDM 10.5.4): divide configuration (0x3E0), initial count (0x380), current count (0x390);
  one-shot and periodic modes (TSC-deadline mode is not offered: CPUID does not report it, so bit
  18 of the LVT timer is reserved and reads 0).

Timer rate: the APIC timer's input ("bus") clock is the virtual CPU clock itself, 1 GHz
(BUS_HZ = engine.clock.TSC_HZ): with divide-by-1 the current count drops by one per virtual
cycle, which is also QEMU's rate (its APIC timer counts nanoseconds of QEMU_CLOCK_VIRTUAL). Time
is integer virtual cycles, so runs are deterministic. In periodic mode the interrupt comes every
`initial count x divisor` cycles (SDM: the count reloads when it reaches 0; QEMU uses count + 1);
changing the divide configuration or the timer mode lets the count continue from its current value
at the new rate or mode.

Software disable (SPIV bit 8 = 0) masks every LVT entry and keeps the masks set (SDM 10.4.7.2; QEMU
leaves the masks alone). Global disable (IA32_APIC_BASE bit 11 = 0) returns the APIC to its
power-up state (SDM 10.4.3) and takes it out of the interrupt path: the 8259 then reaches the CPU
directly; unlike QEMU it may be enabled again. The base address field of IA32_APIC_BASE reads back
what was written, but the registers stay at 0xFEE00000, as in QEMU (relocation is not modelled).

The APIC never calls the CPU: the machine asks `pending_vector()` / `acknowledge()` (and
`nmi_pending`) and learns of every state change through `on_change()`, after which it re-plans
when the CPU next looks at its interrupt lines. `now()` is virtual time in cycles.
"""

from __future__ import annotations

from typing import Callable

APIC_BASE_GPA = 0xFEE00000
APIC_SIZE = 0x1000
BUS_HZ = 1_000_000_000
"""The timer's input clock: the 1 GHz virtual CPU clock (see the module docstring)."""

MSR_IA32_APIC_BASE = 0x1B
APIC_BASE_BSP = 1 << 8  # this is the bootstrap processor (read-only here)
APIC_BASE_ENABLE = 1 << 11  # global enable
APIC_BASE_ADDR = 0xFFFFF000  # bits 31:12; MAXPHYADDR is 32 (no PAE, no PSE-36 in CPUID)

VERSION = 0x00050014  # max LVT entry 5 (6 entries) << 16 | version 0x14

# Register offsets, SDM Vol. 3A table 10-1.
ID, VER, TPR, APR, PPR, EOI, RRD, LDR, DFR, SPIV = (0x20, 0x30, 0x80, 0x90, 0xA0, 0xB0, 0xC0, 0xD0, 0xE0, 0xF0)
ISR, TMR, IRR, ESR = 0x100, 0x180, 0x200, 0x280
ICR_LO, ICR_HI = 0x300, 0x310
LVT_TIMER, LVT_THERMAL, LVT_PERF, LVT_LINT0, LVT_LINT1, LVT_ERROR = (0x320, 0x330, 0x340, 0x350, 0x360, 0x370)
TIMER_INITIAL, TIMER_CURRENT, TIMER_DIVIDE = 0x380, 0x390, 0x3E0

# LVT entries, in register order; their writable bits (SDM figure 10-8): vector 7:0, delivery
# mode 10:8 (not for timer and error), pin polarity 13, trigger mode 15 (LINT0/1), mask 16,
# timer mode 17. Delivery status (12) and remote IRR (14) are read-only and read 0 here.
LVT_NAMES = ("timer", "thermal", "perf", "lint0", "lint1", "error")
_LVT_WRITABLE = (0x300FF, 0x107FF, 0x107FF, 0x1A7FF, 0x1A7FF, 0x100FF)
_L_TIMER, _L_LINT0, _L_LINT1, _L_ERROR = 0, 3, 4, 5
LVT_MASKED = 1 << 16
LVT_PERIODIC = 1 << 17

SPIV_ENABLE = 1 << 8
_SPIV_WRITABLE = 0x1FF  # vector and enable; focus checking and EOI-broadcast suppression absent

# Delivery modes (ICR and LVT bits 10:8).
DM_FIXED, DM_LOWEST, DM_SMI, DM_NMI, DM_INIT, DM_SIPI, DM_EXTINT = 0, 1, 2, 4, 5, 6, 7
_ICR_LO_WRITABLE = 0xCCFFF  # vector, delivery mode, destination mode, level, trigger, shorthand

# Error status register bits (SDM 10.5.3).
ESR_SEND_ILLEGAL_VECTOR = 1 << 5
ESR_RECEIVE_ILLEGAL_VECTOR = 1 << 6
ESR_ILLEGAL_REGISTER = 1 << 7

# What SeaBIOS leaves (read back under QEMU 7.2 by a probe kernel): software-enabled, LINT0 ExtINT
# (virtual-wire mode: the 8259 reaches the CPU through the APIC), LINT1 NMI, and the ICR holding
# the SIPI it broadcast while looking for other CPUs.
BIOS_SPIV = 0x1FF
BIOS_LINT0 = 0x8700
BIOS_LINT1 = 0x8400
BIOS_ICR_LO = 0xC4610


def _highest(bits: int) -> int:
    """The highest set bit's index (the highest-priority vector), -1 when none."""
    return bits.bit_length() - 1


def _divide_shift(dcr: int) -> int:
    """Divide configuration (SDM figure 10-10): bits 3,1,0 = 000 -> /2 ... 110 -> /128, 111 -> /1."""
    v = (dcr & 3) | ((dcr >> 1) & 4)
    return (v + 1) & 7


class ApicReservedBits(ValueError):
    """A write to IA32_APIC_BASE set a reserved bit: the CPU raises #GP(0)."""


# The registers whose values a hypervisor with APIC virtualization keeps in its virtual-APIC page for
# reads served without a VM exit (SDM Vol. 3C 29.4.2), in the order `mirrored_values` gives them: ID,
# version, EOI, LDR, DFR, SVR, ISR[8], TMR[8], IRR[8], ESR, ICR low and high, the 6 LVT entries,
# initial count, divide configuration. (The TPR is not among them: while a virtual-APIC page is
# attached it lives there, see `vtpr_page`.)
MIRRORED = (
    (ID, VER, EOI, LDR, DFR, SPIV)
    + tuple(base + 16 * i for base in (ISR, TMR, IRR) for i in range(8))
    + (ESR, ICR_LO, ICR_HI)
    + tuple(LVT_TIMER + 16 * i for i in range(6))
    + (TIMER_INITIAL, TIMER_DIVIDE)
)
_W = 0xFFFFFFFF


class LocalApic:
    # While a hypervisor's virtual-APIC page is attached (hw mode, "use TPR shadow"), the guest writes
    # its TPR there without a VM exit, so the page is where the TPR lives (as in KVM, whose APIC
    # registers are that page): `vtpr_page` is a writable view of the page's byte 0x80.
    vtpr_page = None

    def __init__(self, now: Callable[[], int], on_change: Callable[[], None] | None = None):
        self.now = now
        self.on_change = on_change or (lambda: None)
        self.base_msr = APIC_BASE_GPA | APIC_BASE_BSP | APIC_BASE_ENABLE
        self.nmi_pending = False
        self.on_level_eoi: Callable[[int], None] = lambda vector: None
        self.on_base_change: Callable[[], None] = lambda: None  # CPUID's APIC bit follows the enable
        # told after every change of the ID or of the timer's next zero crossing (machine/apicmmio.py)
        self.on_registers: Callable[[], None] = lambda: None
        self.reset()

    # -- states ------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Power-up / INIT state (SDM 10.4.7.1): everything 0 except DFR all ones, SPIV 0xFF
        (software-disabled) and every LVT entry masked."""
        self.id = 0
        self.tpr = 0
        self.ldr = 0
        self.dfr = 0xFFFFFFFF
        self.spiv = 0xFF
        self.irr = self.isr = self.tmr = 0  # 256-bit bitmaps, bit n = vector n
        self.lvt = [LVT_MASKED] * 6
        self.esr = 0
        self.esr_pending = 0  # errors since the last ESR write
        self.icr_lo = self.icr_hi = 0
        self.divide = 0
        self._shift = _divide_shift(0)
        self.initial_count = 0
        self._base = self.now()  # timer: virtual time of the last (re)load ...
        self._base_count = 0  # ... and the count then
        self._fire_tick: int | None = None  # ticks after _base of the next zero crossing
        self.on_registers()

    def bios_setup(self) -> None:
        """Leave the APIC as SeaBIOS does under QEMU (see BIOS_*)."""
        self.spiv = BIOS_SPIV
        self.lvt[_L_LINT0] = BIOS_LINT0
        self.lvt[_L_LINT1] = BIOS_LINT1
        self.icr_lo = BIOS_ICR_LO

    @property
    def tpr(self) -> int:
        page = self.vtpr_page
        return self._tpr if page is None else page[0]

    @tpr.setter
    def tpr(self, value: int) -> None:
        self._tpr = value
        page = self.vtpr_page
        if page is not None:
            page[0:4] = bytes((value & 0xFF, 0, 0, 0))

    def attach_vtpr(self, page) -> None:
        """Keep the TPR in `page` (4 bytes of a virtual-APIC page at offset 0x80) from now on."""
        tpr = self.tpr
        self.vtpr_page = page
        self.tpr = tpr

    def mirror_key(self) -> tuple:
        """Changes whenever `mirrored_values` does (cheaper to build: compared at every VM entry)."""
        return (
            self.id,
            self.ldr,
            self.dfr,
            self.spiv,
            self.isr,
            self.tmr,
            self.irr,
            self.esr,
            self.icr_lo,
            self.icr_hi,
            *self.lvt,
            self.initial_count,
            self.divide,
        )

    def mirrored_values(self) -> tuple[int, ...]:
        """The values of the MIRRORED registers as a read would return them, with no side effect
        (no timer catch-up): what a hypervisor copies into its virtual-APIC page."""
        isr, tmr, irr = self.isr, self.tmr, self.irr
        return (
            (self.id << 24, VERSION, 0, self.ldr, self.dfr, self.spiv)
            + tuple((isr >> (32 * i)) & _W for i in range(8))
            + tuple((tmr >> (32 * i)) & _W for i in range(8))
            + tuple((irr >> (32 * i)) & _W for i in range(8))
            + (self.esr, self.icr_lo, self.icr_hi, *self.lvt, self.initial_count, self.divide)
        )

    @property
    def hw_enabled(self) -> bool:
        return bool(self.base_msr & APIC_BASE_ENABLE)

    @property
    def sw_enabled(self) -> bool:
        return bool(self.spiv & SPIV_ENABLE)

    def pic_connected(self) -> bool:
        """Does the 8259's INT output reach the CPU? Directly when the APIC is globally disabled,
        else through LINT0 when that is unmasked in ExtINT mode (virtual-wire mode, MP spec 3.6.2.2)."""
        return not self.base_msr & APIC_BASE_ENABLE or (self.lvt[_L_LINT0] & (LVT_MASKED | 0x700)) == 0x700

    # -- what the CPU sees ---------------------------------------------------------------------------
    def ppr(self) -> int:
        """Processor priority (SDM 10.8.3.1): TPR, or the in-service vector's class if higher."""
        tpr = self.tpr
        isrv = max(_highest(self.isr), 0)
        return tpr if (tpr >> 4) >= (isrv >> 4) else isrv & 0xF0

    def apr(self) -> int:
        """Arbitration priority (SDM 10.8.3.1, the APR figure)."""
        tpr = self.tpr
        irrv = max(_highest(self.irr), 0)
        isrv = max(_highest(self.isr), 0)
        if (tpr >> 4) >= (irrv >> 4) and (tpr >> 4) > (isrv >> 4):
            return tpr
        return max(tpr & 0xF0, isrv & 0xF0, irrv & 0xF0)

    def pending_vector(self) -> int | None:
        """The vector the APIC presents to the CPU now: the highest IRR vector whose priority class
        is above the PPR's (SDM 10.8.3.1), or None. Nothing while disabled (IRR is kept)."""
        if not (self.base_msr & APIC_BASE_ENABLE and self.spiv & SPIV_ENABLE) or not self.irr:
            return None
        v = _highest(self.irr)
        return v if (v & 0xF0) > (self.ppr() & 0xF0) else None

    def acknowledge(self) -> int:
        """The CPU takes the interrupt (SDM 10.8.4): IRR -> ISR. When nothing is deliverable any
        more the answer is the spurious vector, with no ISR bit set (SDM 10.9)."""
        v = self.pending_vector()
        if v is None:
            return self.spiv & 0xFF
        bit = 1 << v
        self.irr &= ~bit
        self.isr |= bit
        return v

    def take_nmi(self) -> bool:
        pending, self.nmi_pending = self.nmi_pending, False
        return pending

    # -- timer ---------------------------------------------------------------------------------------
    def catch_up_due(self) -> int | None:
        """Virtual time from which a register access first has an effect (the timer's next zero
        crossing is caught up with), masked or not; None while no count runs."""
        if self._fire_tick is None:
            return None
        return self._base + (self._fire_tick << self._shift)

    def next_deadline(self) -> int | None:
        """Virtual time of the next timer interrupt, or None (no count running, or LVT masked)."""
        if self._fire_tick is None or self.lvt[_L_TIMER] & LVT_MASKED or not self.hw_enabled:
            return None
        return self._base + (self._fire_tick << self._shift)

    def update(self) -> None:
        """Catch up with virtual time: a zero crossing that is due raises the timer interrupt
        (one per call, however many periods went by, as one edge latches one IRR bit)."""
        if self._catch_up(self.now()):
            self.on_change()

    def current_count(self) -> int:
        return self._current(self.now())

    def _current(self, now: int) -> int:
        t = (now - self._base) >> self._shift
        if t < self._base_count:
            return self._base_count - t
        if self._fire_tick is not None and self.lvt[_L_TIMER] & LVT_PERIODIC and self.initial_count:
            return self.initial_count - (t - self._base_count) % self.initial_count
        return 0  # expired one-shot, or stopped

    def _catch_up(self, now: int) -> bool:
        tick = self._fire_tick
        if tick is None or now < self._base + (tick << self._shift):
            return False
        if self.lvt[_L_TIMER] & LVT_PERIODIC and self.initial_count:
            t = (now - self._base) >> self._shift
            self._fire_tick = tick + ((t - tick) // self.initial_count + 1) * self.initial_count
        else:
            self._fire_tick = None
        self.on_registers()
        lvt = self.lvt[_L_TIMER]
        if not lvt & LVT_MASKED and self.hw_enabled:
            self._accept(lvt & 0xFF)
            return True
        return False

    def _rebase(self, now: int) -> None:
        """The count continues from its value now (new divider, or a mode change)."""
        count = self._current(now)
        self._base, self._base_count = now, count
        self._fire_tick = count if count else None

    # -- the register file (MMIO device interface) ---------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        if size != 4:
            return 0
        if self._catch_up(self.now()):
            self.on_change()
        reg = offset & 0xFF0
        if reg == ID:
            return self.id << 24
        if reg == VER:
            return VERSION
        if reg == TPR:
            return self.tpr
        if reg == APR:
            return self.apr()
        if reg == PPR:
            return self.ppr()
        if reg in (EOI, RRD):
            return 0
        if reg == LDR:
            return self.ldr
        if reg == DFR:
            return self.dfr
        if reg == SPIV:
            return self.spiv
        if ISR <= reg < ESR:
            bitmap = (self.isr, self.tmr, self.irr)[(reg - ISR) >> 7]
            return (bitmap >> (32 * ((reg >> 4) & 7))) & 0xFFFFFFFF
        if reg == ESR:
            return self.esr
        if reg == ICR_LO:
            return self.icr_lo
        if reg == ICR_HI:
            return self.icr_hi
        if LVT_TIMER <= reg <= LVT_ERROR:
            return self.lvt[(reg - LVT_TIMER) >> 4]
        if reg == TIMER_INITIAL:
            return self.initial_count
        if reg == TIMER_CURRENT:
            return self._current(self.now())
        if reg == TIMER_DIVIDE:
            return self.divide
        self._error(ESR_ILLEGAL_REGISTER)
        self.on_change()  # the LVT error interrupt may now be pending
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        if size != 4:
            return
        now = self.now()
        self._catch_up(now)
        reg = offset & 0xFF0
        value &= 0xFFFFFFFF
        if reg == ID:
            self.id = value >> 24
        elif reg == TPR:
            self.tpr = value & 0xFF
        elif reg == EOI:
            # SDM 10.8.5: the highest in-service interrupt is done (the value written is ignored).
            if self.isr:
                vector = _highest(self.isr)
                self.isr &= ~(1 << vector)
                if self.tmr >> vector & 1:
                    self.on_level_eoi(vector)  # SDM 10.8.5: the I/O APIC hears the EOI
        elif reg == LDR:
            self.ldr = value & 0xFF000000
        elif reg == DFR:
            self.dfr = value | 0x0FFFFFFF
        elif reg == SPIV:
            self.spiv = value & _SPIV_WRITABLE
            if not self.spiv & SPIV_ENABLE:
                self.lvt = [lvt | LVT_MASKED for lvt in self.lvt]
        elif reg == ESR:
            self.esr, self.esr_pending = self.esr_pending, 0
        elif reg == ICR_LO:
            self.icr_lo = value & _ICR_LO_WRITABLE
            self._send_ipi()
        elif reg == ICR_HI:
            self.icr_hi = value & 0xFF000000
        elif LVT_TIMER <= reg <= LVT_ERROR:
            self._write_lvt((reg - LVT_TIMER) >> 4, value, now)
        elif reg == TIMER_INITIAL:
            # SDM 10.5.4: a write (re)starts the count; 0 stops the timer.
            self.initial_count = value
            self._base, self._base_count = now, value
            self._fire_tick = value if value else None
        elif reg == TIMER_DIVIDE:
            self._rebase(now)
            self.divide = value & 0xB
            self._shift = _divide_shift(self.divide)
        elif reg in (VER, APR, PPR, RRD, TIMER_CURRENT) or ISR <= reg < ESR:
            pass  # read-only: the write is ignored
        else:
            self._error(ESR_ILLEGAL_REGISTER)
        self.on_registers()
        self.on_change()

    def _write_lvt(self, index: int, value: int, now: int) -> None:
        value &= _LVT_WRITABLE[index]
        if not self.spiv & SPIV_ENABLE:
            value |= LVT_MASKED  # SDM 10.4.7.2: masks stay set while software-disabled
        if index == _L_TIMER and (value ^ self.lvt[_L_TIMER]) & LVT_PERIODIC:
            self._rebase(now)  # the count so far is the old mode's
        self.lvt[index] = value

    # -- interrupt acceptance --------------------------------------------------------------------------
    def receive(self, vector: int, level: bool, dest: int, logical: bool, nmi: bool = False) -> None:
        """An interrupt message from the I/O APIC (SDM 10.6.2 destinations; one CPU, so lowest
        priority is fixed). Ignored while the APIC is globally disabled or not a destination."""
        if not self.hw_enabled or not self.is_destination(dest, logical):
            return
        if nmi:
            self.nmi_pending = True
        else:
            self._accept(vector, level)
        self.on_change()

    def _accept(self, vector: int, level: bool = False) -> None:
        """A fixed interrupt arrives (SDM 10.8.3): set its IRR bit. Vectors 0-15 are illegal."""
        if vector < 16:
            self._error(ESR_RECEIVE_ILLEGAL_VECTOR)
            return
        bit = 1 << vector
        self.irr |= bit
        self.tmr = self.tmr | bit if level else self.tmr & ~bit

    def receive_message(self, vector: int, level: bool = False) -> None:
        """A fixed interrupt message from the bus (an MSI/MSI-X write to 0xFEExxxxx, SDM 10.11)."""
        self._accept(vector, level)

    def _error(self, bits: int) -> None:
        """Record an APIC error (SDM 10.5.3) and raise the LVT error interrupt for a new one."""
        new = bits & ~self.esr_pending
        self.esr_pending |= bits
        lvt = self.lvt[_L_ERROR]
        if new and not lvt & LVT_MASKED:
            self._accept(lvt & 0xFF)

    def _targets_self(self) -> bool:
        """Is this CPU a destination of the IPI in the ICR (SDM 10.6.2)?"""
        shorthand = (self.icr_lo >> 18) & 3
        if shorthand:
            return shorthand != 3  # self, all including self; not all-excluding-self
        return self.is_destination(self.icr_hi >> 24, bool(self.icr_lo & (1 << 11)))

    def is_destination(self, dest: int, logical: bool) -> bool:
        """Does an interrupt message for `dest` (physical APIC ID, or a logical destination) reach
        this APIC (SDM 10.6.2)? 0xFF is a broadcast in both modes."""
        if dest == 0xFF:
            return True  # broadcast, physical or logical
        if not logical:
            return dest == self.id  # physical destination mode
        ldr = self.ldr >> 24
        if self.dfr >> 28 == 0xF:  # flat model: a bit mask of CPUs
            return bool(dest & ldr)
        return (dest >> 4) == (ldr >> 4) and bool(dest & ldr & 0xF)  # cluster model

    def _send_ipi(self) -> None:
        """ICR low was written: send the IPI it describes (SDM 10.6.1), instantly."""
        lo = self.icr_lo
        mode = (lo >> 8) & 7
        to_self = self._targets_self()
        if mode in (DM_FIXED, DM_LOWEST):
            vector = lo & 0xFF
            if vector < 16:
                self._error(ESR_SEND_ILLEGAL_VECTOR)
            elif to_self:
                self._accept(vector)
        elif mode == DM_NMI:
            if to_self:
                self.nmi_pending = True
        # INIT and SIPI: there is no other CPU; SMI: no SMM. Accepted, nothing happens.

    # -- IA32_APIC_BASE (MSR 0x1B) ---------------------------------------------------------------------
    def read_base_msr(self) -> int:
        return self.base_msr

    def write_base_msr(self, value: int) -> None:
        """SDM 10.4.4: base (bits 31:12), global enable (11); BSP (8) is read-only. Any other bit,
        x2APIC enable (10) included (CPUID reports no x2APIC), is reserved: #GP."""
        if value & ~(APIC_BASE_ADDR | APIC_BASE_ENABLE | APIC_BASE_BSP):
            raise ApicReservedBits(f"IA32_APIC_BASE: reserved bits in {value:#x}")
        was_enabled = self.hw_enabled
        self.base_msr = (value & (APIC_BASE_ADDR | APIC_BASE_ENABLE)) | (self.base_msr & APIC_BASE_BSP)
        self.on_base_change()
        if was_enabled and not self.hw_enabled:
            self.reset()
            self.nmi_pending = False
        self.on_change()
