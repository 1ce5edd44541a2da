"""pc-lite: one Uc, guest RAM at a host offset, the PC devices on the port and MMIO buses, the virtual clock.

DESIGN.md section 2. The machine knows nothing of virtualization modes: it is what a bare PC would be.
The CPU's interrupt source is the local APIC, with the 8259 pair behind its LINT0 pin (docs/platform.md).
"""

from __future__ import annotations

import select
import struct
import time
from typing import Any, Callable, Protocol

from unicorn import UC_TLB_VIRTUAL

from cpuvirt import limits
from cpuvirt.engine.clock import TSC_HZ, VirtualClock
from cpuvirt.engine.hostmem import HostRegion
from cpuvirt.engine.internals import new_engine
from cpuvirt.engine.regs import CR0 as CR0_REG
from cpuvirt.engine.regs import EFLAGS as EFLAGS_REG
from cpuvirt.engine.regs import Regs
from cpuvirt.machine.apic import APIC_BASE_GPA, APIC_SIZE, MSR_IA32_APIC_BASE, ApicReservedBits, LocalApic
from cpuvirt.machine.blocks import BlockInsns
from cpuvirt.machine.bus import PortBus
from cpuvirt.machine.debug_exit import DebugExit
from cpuvirt.machine.fw_cfg import FW_CFG_PORT_SEL, FwCfg
from cpuvirt.machine.hpet import HPET_BASE_GPA, HPET_SIZE, Hpet
from cpuvirt.machine.i8042 import DATA_PORT as I8042_DATA
from cpuvirt.machine.i8042 import I8042
from cpuvirt.machine.i8042 import STATUS_PORT as I8042_STATUS
from cpuvirt.machine.ioapic import IOAPIC_BASE_GPA, IOAPIC_SIZE, IoApic, isa_irq_to_pin
from cpuvirt.machine.ivt import ivt_blobs
from cpuvirt.machine.mmio import MmioBus
from cpuvirt.machine.mptable import firmware_blobs
from cpuvirt.machine.pci import CONFIG_ADDRESS, CONFIG_DATA, PIIX_PIRQ_IRQS, PciBus
from cpuvirt.machine.pic import ELCR_PORT, Pic8259Pair
from cpuvirt.machine.pit import Pit8254
from cpuvirt.machine.post import PostPort
from cpuvirt.machine.reset import PORT92, Port92, ResetControl
from cpuvirt.machine.rtc import DEFAULT_BASE as RTC_DEFAULT_BASE
from cpuvirt.machine.rtc import RTC_PORT, CmosRtc
from cpuvirt.machine.uart import Uart16550
from cpuvirt.machine.vga import CRTC_PORT, VgaCrtc
from cpuvirt.memory.mmu import Mmu
from cpuvirt.memory.p2m import MMIO_HPA, RAM_HPA, UNBACKED_HPA, P2m
from cpuvirt.memory.types import GPA, GVA, HPA
from cpuvirt.x86 import cpuid as _cpuid
from cpuvirt.x86.flags import EFLAGS_VM

MIB = 1 << 20
MIN_MEM_MIB, MAX_MEM_MIB = 2, 512
VGA_TEXT = 0xB8000
COM1, PIC_MASTER, PIC_SLAVE, PIT_PORT, POST, DEBUG_EXIT = 0x3F8, 0x20, 0xA0, 0x40, 0x80, 0xF4


class _Replans:
    """A port or MMIO device whose accesses can change the CPU's interrupt state (the 8259, the
    8254, the I/O APIC)."""

    __slots__ = ("device", "machine")

    def __init__(self, device, machine: "Machine"):
        self.device, self.machine = device, machine

    def read(self, port: int, size: int) -> int:
        self.machine.pit.update()
        value = self.device.read(port, size)
        self.machine._interrupts_changed()
        return value

    def write(self, port: int, size: int, value: int) -> None:
        self.machine.pit.update()
        self.device.write(port, size, value)
        self.machine._interrupts_changed()


class _Elcr:
    """The PIIX3's edge/level control registers at 0x4D0/0x4D1 (they live in the 8259 model)."""

    __slots__ = ("pic",)

    def __init__(self, pic: Pic8259Pair):
        self.pic = pic

    def read(self, port: int, size: int) -> int:
        return self.pic.read_elcr(port, size)

    def write(self, port: int, size: int, value: int) -> None:
        self.pic.write_elcr(port, size, value & 0xFF)


class TimedDevice(Protocol):
    """Something with its own deadline in virtual time (scripted serial input, a device's completion
    timer): the machine wakes for the earliest, then lets each catch up."""

    def deadline(self) -> int | None: ...
    def update(self) -> object: ...


class _PortWindow:
    """A PCI I/O BAR on the port bus: the region sees offsets from the BAR's base."""

    __slots__ = ("base", "region")

    def __init__(self, base: int, region):
        self.base, self.region = base, region

    def read(self, port: int, size: int) -> int:
        return self.region.read(port - self.base, size)

    def write(self, port: int, size: int, value: int) -> None:
        self.region.write(port - self.base, size, value)


class _MmioWindow:
    """A device region that may move in guest-physical space (a PCI memory BAR): one Unicorn MMIO
    region at a fixed host-physical address, whose callbacks add the current guest-physical base."""

    __slots__ = ("gpa", "hpa", "size", "callbacks")

    def __init__(self, hpa: int, size: int):
        self.gpa: int = 0  # set by map_mem before the region is reachable
        self.hpa, self.size = hpa, size
        self.callbacks: tuple | None = None


class MsrFault(Exception):
    """rdmsr/wrmsr of an MSR the machine does not implement, or a reserved bit written: #GP(0)."""


class Machine:
    def __init__(
        self,
        mem_mib: int = 32,
        on_console=None,
        on_exit=None,
        on_unhandled_io=None,
        on_mmio=None,
        shared_ram: bool = False,
        rtc_base=RTC_DEFAULT_BASE,
    ):
        self.mem_bytes = mem_mib * MIB
        uc = self.uc = new_engine()
        # Stop only when cpuvirt says so: with an empty exit list Unicorn never looks up `until - 1`
        # (which would be a guest fetch through our TLB-fill hook at the end of every run).
        uc.ctl_exits_enabled(True)
        uc.ctl_set_exits([])
        self.ram = HostRegion(uc, RAM_HPA, self.mem_bytes, shared=shared_ram)  # shared: a memfd (vhost-user)
        uc.mmio_map(UNBACKED_HPA, 0x1000, lambda *_: 0xFFFFFFFF, None, lambda *_: None, None)
        uc.ctl_set_tlb_mode(UC_TLB_VIRTUAL)  # type: ignore[attr-defined]  # in 2.1.3, not in its hints
        self.regs = Regs(uc)
        self.p2m = P2m(self.mem_bytes)
        self.mmu = Mmu(uc, self.regs, self.p2m, self.ram)
        self.clock = VirtualClock(uc, self._count_block)
        self.mmu.on_code_remap = self.clock.drop_page

        self.bus = PortBus(on_unhandled=on_unhandled_io)
        self.input: TimedDevice | None = None  # serial_input.ScriptedInput / TerminalInput (attach_input)
        self.external: list = []  # devices fed from outside the machine (a NIC's sockets): wait_external
        self.device_timers: list[TimedDevice] = []  # devices' own deadlines (virtio/completion.py DeviceTimer)
        self.uart = Uart16550(on_output=on_console, raise_irq=self._uart_irq_raise, lower_irq=self._uart_irq_lower)
        self.pic = Pic8259Pair()
        self.pit = Pit8254(
            now=lambda: self.clock.now, tsc_hz=TSC_HZ, raise_irq=self._pit_irq_raise, lower_irq=self._pit_irq_lower
        )
        # Guests boot under QEMU after SeaBIOS: start from the state it leaves the PIC and PIT in.
        self.pic.bios_setup()
        self.pit.bios_setup()
        self.debug_exit = DebugExit(on_exit=on_exit)
        self.bus.register(COM1, 8, self.uart)
        # The 8259 and 8254 change what the CPU sees: their port accesses catch the PIT up first
        # (an edge latched while IRQ 0 was masked shows in the IRR) and re-plan the next stop after.
        self.bus.register(PIC_MASTER, 2, _Replans(self.pic, self))
        self.bus.register(PIC_SLAVE, 2, _Replans(self.pic, self))
        self.bus.register(PIT_PORT, 4, _Replans(self.pit, self))
        self.bus.register(POST, 1, PostPort())
        self.bus.register(DEBUG_EXIT, 4, self.debug_exit, wide=True)
        self.fw_cfg = FwCfg(self.mem_bytes)
        self.bus.register(FW_CFG_PORT_SEL, 2, self.fw_cfg, wide=True)
        # SeaBIOS makes the PCI interrupt lines (PIIX3 PIRQA-D -> IRQ 10, 11) level-triggered.
        self.pic.bios_setup_elcr(PIIX_PIRQ_IRQS)
        self.bus.register(ELCR_PORT, 2, _Replans(_Elcr(self.pic), self))
        # PCI bus 0 (machine/pci.py): the host and ISA bridges; devices are added before boot.
        self.pci = PciBus(self)
        # A reset request (port 0x92, 0xCF9, the 8042) calls on_reset(why): the runner ends the run.
        self.on_reset: Callable[[str], None] | None = None
        self.bus.register(CONFIG_ADDRESS, 4, ResetControl(self.pci, self._reset), wide=True)
        self.bus.register(PORT92, 1, Port92(self._reset))
        self.bus.register(CONFIG_DATA, 4, self.pci, wide=True)
        self._windows: dict[int, _MmioWindow] = {}  # id(region) -> its window
        self.rtc = CmosRtc(now=lambda: self.clock.now, mem_bytes=self.mem_bytes, base=rtc_base)
        self.bus.register(RTC_PORT, 2, self.rtc)
        self.i8042 = I8042(on_reset=self._reset)
        self.bus.register(I8042_DATA, 1, self.i8042)
        self.bus.register(I8042_STATUS, 1, self.i8042)
        self.crtc = VgaCrtc()
        self.bus.register(CRTC_PORT, 2, self.crtc)

        self.mmio = MmioBus(on_access=on_mmio)
        # callback() whenever a device changes the CPU's interrupt or timer state (hw's quick EPT exit in C
        # takes no exit after one until the run loop has looked again)
        self.on_interrupts_changed: Callable[[], None] | None = None
        self.mmu.devices = self.mmio  # the hypervisor's linear accesses reach device registers
        self._next_mmio_hpa = MMIO_HPA
        self._mmio_callbacks: list[tuple] = []  # Unicorn keeps only pointers: keep the closures alive
        self.apic_mmio: Any = None  # the local APIC's region with its ID read in C (machine/apicmmio.py)
        self.apic = LocalApic(now=lambda: self.clock.now, on_change=self._interrupts_changed)
        self.apic.bios_setup()
        self.map_mmio(APIC_BASE_GPA, APIC_SIZE, self.apic)
        # The I/O APIC: ISA lines -> redirection table -> messages to the local APIC, which tells it
        # of the EOI of a level-triggered vector. All its entries start masked, as SeaBIOS leaves them.
        self.ioapic = IoApic(deliver=self._ioapic_message, on_change=self._interrupts_changed)
        self.apic.on_level_eoi = self.ioapic.eoi
        self.map_mmio(IOAPIC_BASE_GPA, IOAPIC_SIZE, _Replans(self.ioapic, self))
        # The HPET (machine/hpet.py), as QEMU's pc has one; in legacy replacement mode it takes IRQ 0
        # from the 8254.
        self.hpet = Hpet(now=lambda: self.clock.now, tsc_hz=TSC_HZ, set_gsi=self._set_gsi, send_msi=self.send_msi)
        self.map_mmio(HPET_BASE_GPA, HPET_SIZE, _Replans(self.hpet, self))
        self._insn_counter: Any = None  # capstone Cs (32-bit), made on first use
        self._insn_counter16: Any = None
        self._decoded: dict[tuple[int, bool, bytes], tuple[list, tuple | None]] = {}  # _count_block's decodes
        self.block_observer = None  # callback(insns) -> True to stop and retranslate the block
        self.code32: Callable[[], bool] | None = None  # does the code running now decode as 32-bit?
        self.on_new_block = None  # callback(address): caches keyed by block must drop it
        self.block_insns = BlockInsns()  # block -> (instruction addresses, end address)

    def _reset(self, why: str) -> None:
        if self.on_reset is not None:
            self.on_reset(why)

    # -- interrupt lines -------------------------------------------------------------------------------
    # An ISA IRQ line goes to both interrupt controllers, as on a PC: the 8259 pair (IRQ n) and the
    # I/O APIC (pin n, IRQ 0 on pin 2). Which one reaches the CPU is the guest's choice of masks.
    def _isa_irq_raise(self, irq: int) -> None:
        self.pic.raise_irq(irq)
        self.ioapic.set_irq(isa_irq_to_pin(irq), True)

    def _isa_irq_lower(self, irq: int) -> None:
        self.pic.lower_irq(irq)
        self.ioapic.set_irq(isa_irq_to_pin(irq), False)

    def _pit_irq_raise(self, irq: int) -> None:
        if not self.hpet.legacy:  # the HPET's legacy replacement route disconnects the 8254
            self._isa_irq_raise(irq)

    def _pit_irq_lower(self, irq: int) -> None:
        if not self.hpet.legacy:
            self._isa_irq_lower(irq)

    def _set_gsi(self, gsi: int, level: bool) -> None:
        """A global system interrupt below 16 is an ISA line: the 8259 input and the I/O APIC pin."""
        if level:
            self._isa_irq_raise(gsi)
        else:
            self._isa_irq_lower(gsi)

    def _uart_irq_raise(self, irq: int) -> None:
        self._isa_irq_raise(irq)
        self._interrupts_changed()

    def _uart_irq_lower(self, irq: int) -> None:
        self._isa_irq_lower(irq)
        self._interrupts_changed()

    def _ioapic_message(self, vector: int, level: bool, dest: int, logical: bool, mode: int) -> None:
        self.apic.receive(vector, level, dest, logical, nmi=(mode == 4))

    def attach_input(self, source: TimedDevice) -> None:
        """Connect what is typed into COM1 (serial_input.py); its byte times become timer events."""
        self.input = source
        self._interrupts_changed()

    def wait_external(self, timeout: float, stopped) -> bool:
        """The CPU halted with no timer armed: wait on the host for an event from outside the machine
        (another process's frame on a NIC's socket or eventfd) and let the device take it, which may
        raise an interrupt. Virtual time does not move while the CPU waits. Each source gives
        `wait_fds()` and `take_external()`; they are served in attach order. False when no source
        has anything to wait on, nothing came within `timeout` seconds, or `stopped()` (Ctrl-C)."""
        end = time.monotonic() + timeout
        while not stopped():
            fds = [(fd, src) for src in self.external for fd in src.wait_fds()]
            left = end - time.monotonic()
            if not fds or left <= 0:
                return False
            ready, _, _ = select.select([fd for fd, _ in fds], [], [], min(left, 0.25))
            if ready:
                for src in self.external:
                    if any(fd in ready for fd in src.wait_fds()):
                        src.take_external()
                self._interrupts_changed()
                return True
        return False

    def bios_tables(self) -> list[tuple[int, bytes]]:
        """What the firmware leaves in RAM for the kernel to find: the real-mode IVT and its
        handlers (machine/ivt.py), BDA words and the MP tables."""
        eax, _, _, edx = self.cpuid(1)
        return ivt_blobs() + firmware_blobs(eax, edx)

    # -- what the CPU sees of the interrupt controllers and timers ---------------------------------
    # The vCPU knows only these calls, so that interrupt controllers and timers are added here
    # without touching the run loop. The local APIC is the CPU's interrupt source; the 8259 pair
    # sits behind its LINT0 pin (virtual-wire mode) and reaches the CPU while LINT0 is unmasked in
    # ExtINT mode, or directly while the APIC is globally disabled. ExtINT interrupts ignore the
    # APIC's priorities, so the 8259 is asked first (SDM 10.5.1; QEMU's apic_get_interrupt).
    def next_timer_deadline(self) -> int | None:
        """Virtual time of the next timer event that can interrupt the CPU, or None.

        The timers are the local APIC's, the HPET's (those with their interrupt enabled), the PIT's and
        the byte times of scripted or terminal input (serial_input.py). The PIT counts only while IRQ 0
        can reach the CPU (unmasked at the master 8259 and the 8259 connected, or unmasked at I/O APIC
        pin 2) and no HPET has taken IRQ 0 (legacy replacement): an edge it makes while masked
        would only latch the IRR, which every 8259, 8254 and I/O APIC access catches up on first
        (_Replans), so no stop is needed for it, and a CPU halted waiting for the APIC timer is not
        woken by a PIT edge it cannot take.
        """
        candidates = [self.apic.next_deadline(), self.hpet.next_deadline()]
        if not self.hpet.legacy and (
            (not self.pic.master.imr & 1 and self.apic.pic_connected()) or self.ioapic.pin_unmasked(2)
        ):
            candidates.append(self.pit.next_deadline())
        if self.input is not None:
            candidates.append(self.input.deadline())
        candidates.extend(t.deadline() for t in self.device_timers)
        deadlines = [d for d in candidates if d is not None]
        return min(deadlines) if deadlines else None

    def update_timers(self) -> None:
        """Let every timer catch up with virtual time (raising its interrupt lines)."""
        self.pit.update()
        self.apic.update()
        self.hpet.update()
        if self.input is not None:
            self.input.update()
        for t in self.device_timers:
            t.update()

    def add_device_timer(self, timer) -> None:
        """A device's own timer (`deadline() -> int | None`, `update()`): work it does later in
        virtual time. It calls `timer.on_change()` when it arms a deadline, to stop the engine then."""
        timer.on_change = self._interrupts_changed
        self.device_timers.append(timer)

    def pending_interrupt(self) -> int | None:
        """The vector the CPU's INTR line would deliver now, or None."""
        if self.apic.pic_connected():
            vector = self.pic.pending_vector()
            if vector is not None:
                return vector
        return self.apic.pending_vector()

    def acknowledge_interrupt(self) -> int:
        """The INTA cycle: the vector to deliver (the controller marks it in service)."""
        if self.apic.pic_connected() and self.pic.pending_vector() is not None:
            return self.pic.acknowledge()
        return self.apic.acknowledge()

    def pending_nmi(self) -> bool:
        """Is an NMI waiting (a self-NMI through the APIC's ICR)? NMIs ignore EFLAGS.IF."""
        return self.apic.nmi_pending

    def acknowledge_nmi(self) -> None:
        """The CPU takes the NMI (vector 2). NMI blocking until the next iret is not modelled."""
        self.apic.take_nmi()

    def _interrupts_changed(self) -> None:
        """A device changed its interrupt state while the guest runs (an APIC register write, a
        timer armed): make the engine stop in time for the CPU to look again. A deliverable
        interrupt or NMI stops it at the next block boundary, a new timer at its deadline."""
        clock = self.clock
        if self.on_interrupts_changed is not None:
            self.on_interrupts_changed()
        self.pit.update()  # an edge due while IRQ 0 could not interrupt: latch it now
        deadline = self.next_timer_deadline()
        if self.apic.nmi_pending or self.pending_interrupt() is not None:
            deadline = clock.now
        if deadline is not None:
            clock.pull_in(deadline)

    # -- model-specific registers and CPUID -----------------------------------------------------------
    # The vCPU (or, in hw mode, the exit handlers) ask the machine, which owns the APIC.
    def implements_msr(self, msr: int) -> bool:
        """MSRs the platform models itself; the engine keeps the others (TSC, SYSENTER_*, ...)."""
        return msr == MSR_IA32_APIC_BASE

    def rdmsr(self, msr: int) -> int:
        """The MSRs the platform implements: IA32_APIC_BASE (0x1B). Others raise MsrFault (#GP)."""
        if msr == MSR_IA32_APIC_BASE:
            return self.apic.read_base_msr()
        raise MsrFault(f"rdmsr of unimplemented MSR {msr:#x}")

    def wrmsr(self, msr: int, value: int) -> None:
        if msr == MSR_IA32_APIC_BASE:
            try:
                self.apic.write_base_msr(value)
            except ApicReservedBits as e:
                raise MsrFault(str(e)) from None
            return
        raise MsrFault(f"wrmsr of unimplemented MSR {msr:#x}")

    def cpuid(self, leaf: int, subleaf: int = 0) -> tuple[int, int, int, int]:
        """CPUID as the platform's CPU model answers it (x86/cpuid.py; APIC bit per IA32_APIC_BASE)."""
        return _cpuid.cpuid(leaf, subleaf, apic_enabled=self.apic.hw_enabled)

    def cpuid_table(self):
        """The same answers as a table (leaf -> registers, every other leaf), for a C cpuid hook; it
        changes when IA32_APIC_BASE does (LocalApic.on_base_change)."""
        return _cpuid.table(apic_enabled=self.apic.hw_enabled)

    # -- memory-mapped devices ---------------------------------------------------------------------
    def map_mmio(self, gpa: int, size: int, device) -> None:
        """Put `device` on the MMIO bus at guest-physical gpa .. gpa + size - 1 (whole pages).

        The range gets a Unicorn MMIO region at the next free host-physical address, and the p2m
        maps the guest-physical pages to it, so that a guest access goes TLB-fill hook -> region
        callback -> MmioBus -> device, with no hook anywhere else.
        """
        hpa = self._next_mmio_hpa
        if hpa + size > UNBACKED_HPA:
            raise ValueError("no host-physical room left for MMIO ranges")
        self.mmio.register(gpa, size, device)
        dev_read, dev_write = self.mmio.bound(gpa)

        def read(_uc, offset, width, _data):
            return dev_read(offset, width)

        def write(_uc, offset, width, value, _data):
            dev_write(offset, width, value)

        self._mmio_callbacks.append((read, write))
        if device is self.apic and self.apic_mmio is None:
            # its ID register, read on every spinlock by some kernels, is answered in C
            from cpuvirt.machine.apicmmio import ApicMmio

            self.apic_mmio = ApicMmio.map(self.uc, self.apic, self.clock.time_address, hpa, size, read, write)
        if device is not self.apic or self.apic_mmio is None:
            self.uc.mmio_map(hpa, size, read, None, write, None)
        self.p2m.add_mmio(GPA(gpa), size, HPA(hpa))
        self._next_mmio_hpa = hpa + size

    # -- the PCI bus's view of the machine (machine/pci.py, Platform) --------------------------------
    def map_io(self, base: int, size: int, device) -> None:
        """A PCI I/O BAR decodes at base: its region gets the ports (offsets from base)."""
        self.bus.register(base, size, _PortWindow(base, device), wide=True)

    def unmap_io(self, base: int, size: int) -> None:
        self.bus.unregister(base, size)

    def map_mem(self, base: int, size: int, device) -> None:
        """A PCI memory BAR decodes at base (whole pages, outside RAM); the engine's TLB is flushed
        so that no stale translation reaches the old place."""
        if base < self.mem_bytes or base & 0xFFF or size & 0xFFF:
            raise ValueError(f"{base:#x}+{size:#x} overlaps RAM or is not page-aligned")
        window = self._windows.get(id(device))
        if window is None:
            hpa = self._next_mmio_hpa
            if hpa + size > UNBACKED_HPA:
                raise ValueError("no host-physical room left for MMIO ranges")
            self._next_mmio_hpa = hpa + size
            window = self._windows[id(device)] = _MmioWindow(hpa, size)
            bus = self.mmio

            def read(_uc, offset, width, _data):
                return bus.read(window.gpa + offset, width)

            def write(_uc, offset, width, value, _data):
                bus.write(window.gpa + offset, width, value)

            window.callbacks = (read, write)
            self.uc.mmio_map(hpa, size, read, None, write, None)
        self.mmio.register(base, size, device)
        window.gpa = base
        self.p2m.add_mmio(GPA(base), size, HPA(window.hpa))
        self._flush_engine_tlb()

    def unmap_mem(self, base: int, size: int) -> None:
        self.mmio.unregister(base)
        self.p2m.remove_mmio(GPA(base))
        self._flush_engine_tlb()

    def _flush_engine_tlb(self) -> None:
        from unicorn import UC_CTL_IO_WRITE, UC_CTL_TLB_FLUSH

        self.uc.ctl(UC_CTL_TLB_FLUSH, UC_CTL_IO_WRITE)

    def set_isa_irq(self, irq: int, level: bool) -> None:
        """A PCI INTx line routed to ISA IRQ `irq` changes level (the PIIX3 drives the 8259)."""
        self.pit.update()
        if level:
            self.pic.raise_irq(irq)
        else:
            self.pic.lower_irq(irq)
        self._interrupts_changed()

    def send_msi(self, address: int, data: int) -> bool:
        """An MSI/MSI-X message write (SDM Vol. 3A 10.11): to 0xFEExxxxx it is an interrupt for the
        local APIC; fixed and lowest-priority delivery to APIC ID 0 (or broadcast) are accepted.
        False: the message went nowhere (another address or destination, or a mode not modelled)."""
        if address >> 20 != 0xFEE:
            return False
        dest = (address >> 12) & 0xFF
        mode = (data >> 8) & 7
        if dest not in (self.apic.id >> 24, 0xFF) or mode not in (0, 1):
            return False
        self.apic.receive_message(data & 0xFF, level=bool(data & 0x8000))
        self._interrupts_changed()
        return True

    # -- guest-physical memory ---------------------------------------------------------------------
    def write_gpa(self, gpa: int, data: bytes) -> None:
        if gpa < 0 or gpa + len(data) > self.mem_bytes:
            raise ValueError(f"{gpa:#x}+{len(data):#x} is outside guest RAM")
        self.ram.write(RAM_HPA + gpa, bytes(data))

    def dma_refusal(self, gpa: int, size: int) -> str | None:
        """Why a bus-mastering device may not write there (para's typed frames), or None."""
        guard = self.mmu.dma_guard
        return None if guard is None else guard(gpa, size)

    def dma_write(self, gpa: int, data: bytes) -> None:
        """A device writes guest RAM (DMA): as write_gpa, and whoever derived state from a
        write-traced frame there (shadow page tables, the translator) drops it, as for the
        hypervisor's own stores. Call dma_refusal first."""
        self.write_gpa(gpa, data)
        if self.mmu.traces.frames:
            self.mmu.traces.hv_wrote(gpa, gpa, len(data))

    def read_gpa(self, gpa: int, size: int) -> bytes:
        return self.ram.read(RAM_HPA + gpa, size)

    def vga_text(self) -> bytes:
        return self.read_gpa(VGA_TEXT, 80 * 25 * 2) if self.mem_bytes > VGA_TEXT + 4000 else b""

    # -- the clock asks how many instructions a newly seen block holds -----------------------------
    def _count_block(self, address: int, size: int) -> int:
        try:
            self.mmu.crs = None  # a fresh hypervisor entry: CRs may have changed
            code = self.mmu.fetch_bytes(GVA(address), size)
            if not code:
                self.block_insns.pop(address, None)
                return 1
            if self._insn_counter is None:
                from capstone import CS_ARCH_X86, CS_MODE_16, CS_MODE_32, Cs

                self._insn_counter = Cs(CS_ARCH_X86, CS_MODE_32)
                self._insn_counter16 = Cs(CS_ARCH_X86, CS_MODE_16)
            # Real-address and virtual-8086 mode run 16-bit code (SDM Vol. 3A 20.1, 20.2), and so does
            # a protected-mode code segment with D = 0 (3.4.5): decoded as such, its instruction
            # boundaries, counts and intercepted instructions are the CPU's. CS.D is in the engine's
            # segment cache, which the vCPU reads (`code32`); without one, D = 1 is assumed.
            if self.code32 is not None:
                code32 = self.code32()
            else:
                code32 = bool(self.regs.read(CR0_REG) & 1) and not self.regs.read(EFLAGS_REG) & EFLAGS_VM
            insns, entry = self.decode_block(
                address, code, code32, self._insn_counter if code32 else self._insn_counter16
            )
            if self.on_new_block is not None:
                self.on_new_block(address)
            self.note_block(address, entry)
            if self.block_observer is not None and self.block_observer(insns):
                self.clock.discard_current_block()
                self.uc.emu_stop()
            return max(len(insns), 1)
        except Exception:  # never let an exception cross into C
            self.block_insns.pop(address, None)
            return 1

    def decode_block(self, address: int, code: bytes, code32: bool, counter) -> tuple[list, tuple | None]:
        """A block's instructions (capstone's lite tuples, from `counter`) and its Machine.block_insns entry
        (None when nothing decodes). The engine translates the same code again and again (a fork runs its
        parent's code from new frames, a freed frame loses its blocks, full patches its TC): the same bytes
        at the same address in the same mode reuse the decode (`_decoded`, bounded)."""
        key = (address, code32, code)
        decoded = self._decoded.get(key)
        if decoded is None:
            insns = list(counter.disasm_lite(code, address))
            entry = (tuple(i[0] for i in insns), insns[-1][0] + insns[-1][1]) if insns else None
            decoded = (insns, entry)
            if len(insns) <= limits.DECODED_BLOCK_INSNS:
                limits.put(self._decoded, key, decoded, limits.DECODED_BLOCKS)
        return decoded

    def note_block(self, address: int, entry: tuple | None) -> None:
        """Machine.block_insns[address] = entry; the table's mirrors hear only of a change. None: nothing
        decodes (the engine cut the block at an instruction that faults when it is translated): no list,
        rather than the one of code that was there before."""
        if entry is None:
            self.block_insns.pop(address, None)
        elif self.block_insns.get(address) != entry:
            if len(self.block_insns) >= limits.CACHE_ENTRIES and address not in self.block_insns:
                # The table empties at its cap (limits.put): the clock then counts every block through
                # Python again, or a block it goes on counting by itself (its table, its stubs) would have
                # no list here for an event that leaves it early.
                self.clock.forget_blocks()
            limits.put(self.block_insns, address, entry)

    # -- boot --------------------------------------------------------------------------------------
    def set_flat_protected_mode(self, scratch_gpa: int) -> None:
        """Multiboot entry state (spec 3.2): 32-bit protected mode, flat segments, paging off.

        The engine loads segment registers from a GDT, so a 3-entry one is written at `scratch_gpa`
        (a place the boot information says is free); the guest loads its own before it relies on any.
        """
        gdt = struct.pack("<QQQ", 0, 0x00CF9A000000FFFF, 0x00CF92000000FFFF)
        self.write_gpa(scratch_gpa, gdt)
        uc = self.uc
        from cpuvirt.engine import regs as R

        uc.reg_write(R.GDTR, (0, scratch_gpa, len(gdt) - 1, 0))
        uc.reg_write(R.CR0, 0x11)  # PE | ET
        uc.reg_write(R.CS, 0x08)
        for seg in (R.SS, R.DS, R.ES, R.FS, R.GS):
            uc.reg_write(seg, 0x10)
        uc.reg_write(R.EFLAGS, 0x2)
