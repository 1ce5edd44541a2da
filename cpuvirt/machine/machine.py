"""pc-lite: one Uc, guest RAM at a host offset, the PC devices on the port bus, the virtual clock.

DESIGN.md section 2. The machine knows nothing of virtualization modes: it is what a bare PC would be.
"""
from __future__ import annotations

import struct

from unicorn import UC_ARCH_X86, UC_MODE_32, UC_TLB_VIRTUAL, Uc

from cpuvirt.cpu.regs import Regs
from cpuvirt.machine.bus import PortBus
from cpuvirt.machine.clock import TSC_HZ, VirtualClock
from cpuvirt.machine.debug_exit import DebugExit
from cpuvirt.machine.hostmem import HostRegion
from cpuvirt.machine.pic import Pic8259Pair
from cpuvirt.machine.pit import Pit8254
from cpuvirt.machine.post import PostPort
from cpuvirt.machine.uart import Uart16550
from cpuvirt.memory.mmu import Mmu
from cpuvirt.memory.p2m import RAM_HPA, UNBACKED_HPA, P2m

MIB = 1 << 20
MIN_MEM_MIB, MAX_MEM_MIB = 2, 512
VGA_TEXT = 0xB8000
COM1, PIC_MASTER, PIC_SLAVE, PIT_PORT, POST, DEBUG_EXIT = 0x3F8, 0x20, 0xA0, 0x40, 0x80, 0xF4


class Machine:
    def __init__(self, mem_mib: int = 32, on_console=None, on_exit=None, on_unhandled_io=None):
        self.mem_bytes = mem_mib * MIB
        uc = self.uc = Uc(UC_ARCH_X86, UC_MODE_32)
        # Stop only when cpuvirt says so: with an empty exit list Unicorn never looks up `until - 1`
        # (which would be a guest fetch through our TLB-fill hook at the end of every run).
        uc.ctl_exits_enabled(True)
        uc.ctl_set_exits([])
        self.ram = HostRegion(uc, RAM_HPA, self.mem_bytes)
        uc.mmio_map(UNBACKED_HPA, 0x1000, lambda *_: 0xFFFFFFFF, None, lambda *_: None, None)
        uc.ctl_set_tlb_mode(UC_TLB_VIRTUAL)
        self.regs = Regs(uc)
        self.p2m = P2m(self.mem_bytes)
        self.mmu = Mmu(uc, self.regs, self.p2m, self.ram)
        self.clock = VirtualClock(uc, self._count_block)

        self.bus = PortBus(on_unhandled=on_unhandled_io)
        self.uart = Uart16550(on_output=on_console)
        self.pic = Pic8259Pair()
        self.pit = Pit8254(now=lambda: self.clock.now, tsc_hz=TSC_HZ,
                           raise_irq=self.pic.raise_irq, lower_irq=self.pic.lower_irq)
        # Guests boot under QEMU after SeaBIOS: start from the state it leaves the PIC and PIT in.
        self.pic.bios_setup()
        self.pit.bios_setup()
        self.debug_exit = DebugExit(on_exit=on_exit)
        self.bus.register(COM1, 8, self.uart)
        self.bus.register(PIC_MASTER, 2, self.pic)
        self.bus.register(PIC_SLAVE, 2, self.pic)
        self.bus.register(PIT_PORT, 4, self.pit)
        self.bus.register(POST, 1, PostPort())
        self.bus.register(DEBUG_EXIT, 4, self.debug_exit, wide=True)
        self._insn_counter = None
        self.block_observer = None   # callback(insns) -> True to stop and retranslate the block

    # -- what the CPU sees of the interrupt controllers and timers ---------------------------------
    # The vCPU knows only these four calls, so that interrupt controllers and timers (the 8259 and
    # PIT now, a local APIC later) are added here without touching the run loop.
    def next_timer_deadline(self) -> int | None:
        """Virtual time of the next timer event, or None if no timer is armed."""
        return self.pit.next_deadline()

    def update_timers(self) -> None:
        """Let every timer catch up with virtual time (raising its interrupt lines)."""
        self.pit.update()

    def pending_interrupt(self) -> int | None:
        """The vector the CPU's INTR line would deliver now, or None."""
        return self.pic.pending_vector()

    def acknowledge_interrupt(self) -> int:
        """The INTA cycle: the vector to deliver (the controller marks it in service)."""
        return self.pic.acknowledge()

    # -- guest-physical memory ---------------------------------------------------------------------
    def write_gpa(self, gpa: int, data: bytes) -> None:
        if gpa < 0 or gpa + len(data) > self.mem_bytes:
            raise ValueError(f"{gpa:#x}+{len(data):#x} is outside guest RAM")
        self.ram.write(RAM_HPA + gpa, bytes(data))

    def read_gpa(self, gpa: int, size: int) -> bytes:
        return self.ram.read(RAM_HPA + gpa, size)

    def vga_text(self) -> bytes:
        return self.read_gpa(VGA_TEXT, 80 * 25 * 2) if self.mem_bytes > VGA_TEXT + 4000 else b""

    # -- the clock asks how many instructions a newly seen block holds -----------------------------
    def _count_block(self, address: int, size: int) -> int:
        try:
            self.mmu.crs = None          # a fresh hypervisor entry: CRs may have changed
            code = self.mmu.fetch_bytes(address, size)
            if not code:
                return 1
            if self._insn_counter is None:
                from capstone import CS_ARCH_X86, CS_MODE_32, Cs
                self._insn_counter = Cs(CS_ARCH_X86, CS_MODE_32)
            insns = list(self._insn_counter.disasm_lite(code, address))
            if self.block_observer is not None and self.block_observer(insns):
                self.clock.discard_current_block()
                self.uc.emu_stop()
            return max(len(insns), 1)
        except Exception:   # never let an exception cross into C
            return 1

    # -- boot --------------------------------------------------------------------------------------
    def set_flat_protected_mode(self, scratch_gpa: int) -> None:
        """Multiboot entry state (spec 3.2): 32-bit protected mode, flat segments, paging off.

        The engine loads segment registers from a GDT, so a 3-entry one is written at `scratch_gpa`
        (a place the boot information says is free); the guest loads its own before it relies on any.
        """
        gdt = struct.pack("<QQQ", 0, 0x00CF9A000000FFFF, 0x00CF92000000FFFF)
        self.write_gpa(scratch_gpa, gdt)
        uc = self.uc
        from cpuvirt.cpu import regs as R
        uc.reg_write(R.GDTR, (0, scratch_gpa, len(gdt) - 1, 0))
        uc.reg_write(R.CR0, 0x11)   # PE | ET
        uc.reg_write(R.CS, 0x08)
        for seg in (R.SS, R.DS, R.ES, R.FS, R.GS):
            uc.reg_write(seg, 0x10)
        uc.reg_write(R.EFLAGS, 0x2)
