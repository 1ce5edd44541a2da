"""PCI bus 0 as SeaBIOS leaves it under QEMU's `pc` machine.

What a guest sees (docs/platform.md, "PCI"):
- configuration mechanism #1 (PCI Local Bus Specification 3.0, 3.2.2.3.2): CONFIG_ADDRESS at 0xCF8
  (dword accesses only: enable bit 31, bus 23:16, device 15:11, function 10:8, register 7:2) and
  CONFIG_DATA at 0xCFC-0xCFF (byte, word and dword accesses at the byte the port selects). With the
  enable bit clear, or for a function nobody implements, data reads all ones and writes are dropped;
- the type 0 configuration header (spec 6.1) of each function, with BAR sizing (6.2.5.1: write all
  ones, read back the size mask), the capability list (6.7), interrupt pin and line (6.2.4);
- the i440FX host bridge at 00:00.0 and the PIIX3 ISA bridge at 00:01.0 with QEMU's IDs, then the
  devices of the command line in slots 2, 3, ... in order, as QEMU's `-device` places them;
- the state SeaBIOS's pciinit.c leaves: BARs assigned (I/O from 0xC000 up, memory packed below
  0xFEC00000, biggest first), I/O + memory decoding and SERR on in the command register, INTx pin A of
  slot s routed through PIIX3 PIRQ (s - 1) & 3 to ISA IRQ 10, 10, 11, 11 (PIIX3 registers 0x60-0x63)
  and written into the interrupt-line register; the 8259 ELCR makes IRQ 10 and 11 level-triggered.

A guest may re-program a BAR or the command register: the function's regions then move on (or leave)
the port and MMIO buses at once. Devices know nothing of the CPU: they call `set_intx(level)` or
send MSI messages through the bus's `platform`.
"""

from __future__ import annotations

import struct
from typing import Protocol, TypeVar

CONFIG_ADDRESS, CONFIG_DATA = 0xCF8, 0xCFC
CONFIG_ENABLE = 1 << 31

# Type 0 header offsets (spec 6.1)
VENDOR_ID, DEVICE_ID, COMMAND, STATUS, REVISION_ID, CLASS_PROG = 0x00, 0x02, 0x04, 0x06, 0x08, 0x09
HEADER_TYPE, BAR0, SUBSYSTEM_VENDOR_ID, SUBSYSTEM_ID, ROM_ADDRESS = 0x0E, 0x10, 0x2C, 0x2E, 0x30
CAPABILITIES_POINTER, INTERRUPT_LINE, INTERRUPT_PIN = 0x34, 0x3C, 0x3D

COMMAND_IO, COMMAND_MEMORY, COMMAND_MASTER, COMMAND_SERR, COMMAND_INTX_DISABLE = 0x1, 0x2, 0x4, 0x100, 0x400
STATUS_INTERRUPT, STATUS_CAP_LIST = 0x08, 0x10
BAR_IO = 0x1
CAP_ID_MSIX = 0x11

# QEMU's default subsystem IDs (hw/pci/pci.c: PCI_SUBVENDOR_ID_REDHAT_QUMRANET, PCI_SUBDEVICE_ID_QEMU)
QEMU_SUBVENDOR, QEMU_SUBDEVICE = 0x1AF4, 0x1100

# SeaBIOS pciinit.c: pci_irqs[] for PIRQA-D, the I/O window start and the top of the memory window
PIIX_PIRQ_IRQS = (10, 10, 11, 11)
PIIX_PIRQRC = 0x60
IO_WINDOW_BASE = 0xC000
MEM_WINDOW_TOP = 0xFEC00000
FIRST_DEVICE_SLOT = 2
MAX_SLOTS = 32
_F = TypeVar("_F", bound="PciFunction")


def _overlaps(offset: int, size: int, lo: int, n: int) -> bool:
    return offset < lo + n and offset + size > lo


class Platform(Protocol):
    """What the bus needs from the machine: put regions on its buses, raise ISA IRQs, MSI."""

    def map_io(self, base: int, size: int, device) -> None: ...
    def unmap_io(self, base: int, size: int) -> None: ...
    def map_mem(self, base: int, size: int, device) -> None: ...
    def unmap_mem(self, base: int, size: int) -> None: ...
    def set_isa_irq(self, irq: int, level: bool) -> None: ...
    def send_msi(self, address: int, data: int) -> bool: ...


class Bar:
    """One base address register: its kind, its size (a power of two) and who serves its accesses
    (`region.read(offset, size)` / `region.write(offset, size, value)`)."""

    __slots__ = ("index", "io", "size", "region", "mapped")

    def __init__(self, index: int, io: bool, size: int, region):
        if size & (size - 1) or size < (4 if io else 16):
            raise ValueError(f"BAR size {size:#x} is not a power of two of the minimum size")
        self.index, self.io, self.size, self.region = index, io, size, region
        self.mapped: int | None = None  # the address its region is decoded at now, or None


class PciFunction:
    """One function's 256-byte configuration space. Subclasses (devices) add BARs and capabilities.

    `wmask` holds the bits software may write (QEMU's `wmask`); BARs and the command register have
    side effects handled here, so that every access goes through `read_config`/`write_config`.
    """

    def __init__(
        self,
        name: str,
        vendor: int,
        device: int,
        class_code: int,
        revision: int = 0,
        subsystem_vendor: int = QEMU_SUBVENDOR,
        subsystem: int = QEMU_SUBDEVICE,
        header_type: int = 0,
        int_pin: int = 0,
    ):
        self.name = name
        self.config = bytearray(256)
        self.wmask = bytearray(256)
        self.bars: dict[int, Bar] = {}
        self.rom_size = 0  # expansion ROM BAR (0x30): sized and assigned, never decoded
        self.bus: PciBus | None = None
        self.slot = -1
        self.intx_level = False
        struct.pack_into("<HH", self.config, VENDOR_ID, vendor, device)
        self.config[REVISION_ID] = revision
        struct.pack_into("<I", self.config, 0x08, (class_code << 8) | revision)
        self.config[HEADER_TYPE] = header_type
        struct.pack_into("<HH", self.config, SUBSYSTEM_VENDOR_ID, subsystem_vendor, subsystem)
        self.config[INTERRUPT_PIN] = int_pin
        struct.pack_into(
            "<H",
            self.wmask,
            COMMAND,
            COMMAND_IO | COMMAND_MEMORY | COMMAND_MASTER | COMMAND_SERR | COMMAND_INTX_DISABLE | 0x40,
        )
        self.wmask[0x0C] = 0xFF  # cache line size
        self.wmask[0x0D] = 0xFF  # latency timer
        self.wmask[INTERRUPT_LINE] = 0xFF
        self._last_cap = CAPABILITIES_POINTER

    # -- building --------------------------------------------------------------------------------------
    def add_bar(self, index: int, io: bool, size: int, region) -> Bar:
        bar = self.bars[index] = Bar(index, io, size, region)
        self._write_bar_raw(index, 0)
        struct.pack_into("<I", self.wmask, BAR0 + 4 * index, ~(size - 1) & 0xFFFFFFFF)  # type bits read-only
        return bar

    def add_rom_bar(self, size: int) -> None:
        """An expansion ROM BAR (spec 6.2.5.2) of `size` bytes: software sizes it and the firmware
        assigns it (disabled) as for a real ROM; cpuvirt has no ROM image, so it is never decoded."""
        self.rom_size = size
        struct.pack_into("<I", self.wmask, ROM_ADDRESS, (~(size - 1) & 0xFFFFFFFF) | 1)

    def add_capability(self, cap_id: int, body: bytes, wmask: bytes, at: int) -> int:
        """Chain a capability (spec 6.7) at config offset `at`: id, next pointer, then `body`."""
        self.config[at] = cap_id
        self.config[at + 1] = 0
        self.config[at + 2 : at + 2 + len(body)] = body
        self.wmask[at + 2 : at + 2 + len(wmask)] = wmask
        self.config[self._last_cap if self._last_cap == CAPABILITIES_POINTER else self._last_cap + 1] = at
        self._last_cap = at
        struct.pack_into("<H", self.config, STATUS, self.status | STATUS_CAP_LIST)
        return at

    # -- fields ----------------------------------------------------------------------------------------
    @property
    def command(self) -> int:
        return struct.unpack_from("<H", self.config, COMMAND)[0]

    @property
    def status(self) -> int:
        return struct.unpack_from("<H", self.config, STATUS)[0]

    @property
    def bus_master(self) -> bool:
        """May the function read and write memory (spec 6.2.2, command bit 2)? Devices check it before DMA."""
        return bool(self.command & COMMAND_MASTER)

    def bar_address(self, index: int) -> int:
        raw = struct.unpack_from("<I", self.config, BAR0 + 4 * index)[0]
        return raw & (0xFFFFFFFC if self.bars[index].io else 0xFFFFFFF0)

    def _write_bar_raw(self, index: int, address: int) -> None:
        bar = self.bars[index]
        address &= ~(bar.size - 1) & 0xFFFFFFFF
        struct.pack_into("<I", self.config, BAR0 + 4 * index, address | (BAR_IO if bar.io else 0))

    # -- configuration accesses ------------------------------------------------------------------------
    def read_config(self, offset: int, size: int) -> int:
        return int.from_bytes(self.config[offset : offset + size], "little")

    def write_config(self, offset: int, size: int, value: int) -> None:
        """Write the bits `wmask` allows (a BAR's are its address bits above its size: writing all
        ones reads back the size mask), then apply what a command or BAR write changes."""
        for i in range(size):
            at = offset + i
            mask = self.wmask[at]
            self.config[at] = (self.config[at] & ~mask) | ((value >> (8 * i)) & mask)
        command = _overlaps(offset, size, COMMAND, 2)
        if command or any(_overlaps(offset, size, BAR0 + 4 * i, 4) for i in self.bars):
            self.update_mappings()
        if command:
            self._drive_intx()

    def update_mappings(self) -> None:
        """Decode each BAR where it now says, if the command register lets it (spec 6.2.2)."""
        if self.bus is None:
            return
        cmd = self.command
        for bar in self.bars.values():
            address = self.bar_address(bar.index)
            enabled = cmd & (COMMAND_IO if bar.io else COMMAND_MEMORY)
            # A BAR being sized (all ones) or at 0 is not decoded (QEMU's pci_bar_address).
            limit = 0x10000 if bar.io else 1 << 32
            want = address if enabled and address and address + bar.size <= limit else None
            if want == bar.mapped:
                continue
            if bar.mapped is not None:
                self.bus.unmap(self, bar)
            bar.mapped = None
            if want is not None and self.bus.map(self, bar, want):
                bar.mapped = want

    # -- INTx ------------------------------------------------------------------------------------------
    def set_intx(self, level: bool) -> None:
        """The device drives its INTx pin (spec 6.2.4); status bit 3 follows it."""
        self.intx_level = bool(level)
        status = self.status & ~STATUS_INTERRUPT
        struct.pack_into("<H", self.config, STATUS, status | (STATUS_INTERRUPT if level else 0))
        self._drive_intx()

    def _drive_intx(self) -> None:
        if self.bus is not None and self.config[INTERRUPT_PIN]:
            self.bus.intx(self, self.intx_level and not self.command & COMMAND_INTX_DISABLE)


class HostBridge(PciFunction):
    """i440FX PMC (QEMU hw/pci-host/i440fx.c): 8086:1237, revision 2, class 0600."""

    def __init__(self):
        super().__init__("i440FX", 0x8086, 0x1237, 0x060000, revision=2)


class Piix3(PciFunction):
    """PIIX3 PCI-to-ISA bridge (QEMU hw/isa/piix3.c): 8086:7000, class 0601, multifunction (QEMU
    puts IDE, USB and ACPI at functions 1-3; cpuvirt models function 0 only). Registers 0x60-0x63
    (PIRQRC[A:D]) route PCI interrupts to ISA IRQs; bit 7 set = not routed."""

    def __init__(self):
        super().__init__("PIIX3", 0x8086, 0x7000, 0x060100, header_type=0x80)
        struct.pack_into("<H", self.config, STATUS, 0x0200)  # DEVSEL medium
        for i in range(4):
            self.config[PIIX_PIRQRC + i] = 0x80
            self.wmask[PIIX_PIRQRC + i] = 0x8F

    def route(self, pirq: int) -> int | None:
        value = self.config[PIIX_PIRQRC + pirq]
        return None if value & 0x80 else value & 0x0F


class PciBus:
    """Bus 0: the functions by slot, and the two configuration ports (register them with the
    port bus through `address_port`/`data_port`, both `wide`)."""

    def __init__(self, platform: Platform, on_event=None):
        self.platform = platform
        self.on_event = on_event  # callback(reason, detail: dict) for the trace
        self.functions: dict[int, PciFunction] = {}
        self.config_address = 0
        self.host = self.add(HostBridge(), 0)
        self.isa = self.add(Piix3(), 1)
        self._irq_levels: dict[int, set] = {}

    def add(self, function: _F, slot: int | None = None) -> _F:
        if slot is None:
            slot = next((s for s in range(FIRST_DEVICE_SLOT, MAX_SLOTS) if s not in self.functions), None)
            if slot is None:
                raise ValueError("PCI bus 0 is full (32 slots)")
        if slot in self.functions:
            raise ValueError(f"PCI slot {slot} is taken")
        function.bus, function.slot = self, slot
        self.functions[slot] = function
        return function

    # -- configuration mechanism #1 --------------------------------------------------------------------
    def _selected(self) -> tuple[PciFunction | None, int]:
        a = self.config_address
        if not a & CONFIG_ENABLE or (a >> 16) & 0xFF or (a >> 8) & 7:
            return None, 0
        return self.functions.get((a >> 11) & 0x1F), a & 0xFC

    def read(self, port: int, size: int) -> int:
        if port < CONFIG_DATA:
            # CONFIG_ADDRESS answers dword accesses only (QEMU's pci_host_config_read).
            return self.config_address if port == CONFIG_ADDRESS and size == 4 else (1 << (8 * size)) - 1
        function, register = self._selected()
        offset = register + (port & 3)
        if function is None or offset + size > 256:
            return (1 << (8 * size)) - 1
        value = function.read_config(offset, size)
        self._note("CONFIG_READ", function, offset, size, value)
        return value

    def write(self, port: int, size: int, value: int) -> None:
        if port < CONFIG_DATA:
            if port == CONFIG_ADDRESS and size == 4:
                self.config_address = value & 0x80FFFFFC
            return
        function, register = self._selected()
        offset = register + (port & 3)
        if function is None or offset + size > 256:
            return
        self._note("CONFIG_WRITE", function, offset, size, value)
        function.write_config(offset, size, value)

    def _note(self, reason, function, offset, size, value) -> None:
        if self.on_event is not None:
            self.on_event(
                reason,
                {
                    "bdf": f"00:{function.slot:02x}.0",
                    "device": function.name,
                    "offset": f"{offset:#04x}",
                    "size": size,
                    "value": f"{value:#x}",
                },
            )

    # -- regions and interrupts ------------------------------------------------------------------------
    def map(self, function: PciFunction, bar: Bar, address: int) -> bool:
        try:
            if bar.io:
                self.platform.map_io(address, bar.size, bar.region)
            else:
                self.platform.map_mem(address, bar.size, bar.region)
        except ValueError as e:
            # Overlapping another region (or RAM): not decoded, as a conflicting BAR decodes nothing useful.
            if self.on_event is not None:
                self.on_event(
                    "BAR_CONFLICT",
                    {"device": function.name, "bar": bar.index, "address": f"{address:#x}", "why": str(e)},
                )
            return False
        if self.on_event is not None:
            self.on_event(
                "BAR_MAPPED",
                {
                    "device": function.name,
                    "bar": bar.index,
                    "space": "io" if bar.io else "mem",
                    "address": f"{address:#x}",
                    "size": f"{bar.size:#x}",
                },
            )
        return True

    def unmap(self, function: PciFunction, bar: Bar) -> None:
        if bar.mapped is None:
            return
        if bar.io:
            self.platform.unmap_io(bar.mapped, bar.size)
        else:
            self.platform.unmap_mem(bar.mapped, bar.size)

    def pirq_of(self, function: PciFunction) -> int:
        """PIIX3 swizzle (QEMU's pci_slot_get_pirq for the i440FX): PIRQ (pin - 1 + slot - 1) & 3."""
        return (function.config[INTERRUPT_PIN] - 1 + function.slot - 1) & 3

    def intx(self, function: PciFunction, level: bool) -> None:
        """Wire-OR of every function sharing a PIRQ, driven into the ISA IRQ the PIIX3 routes it to."""
        pirq = self.pirq_of(function)
        levels = self._irq_levels.setdefault(pirq, set())
        if level:
            levels.add(function.slot)
        else:
            levels.discard(function.slot)
        irq = self.isa.route(pirq)
        if irq is not None:
            self.platform.set_isa_irq(irq, bool(levels))

    # -- firmware --------------------------------------------------------------------------------------
    def firmware_setup(self) -> None:
        """What SeaBIOS (src/fw/pciinit.c) does before it boots the kernel: route PIRQA-D, assign
        the BARs biggest first (I/O upward from 0xC000, memory packed below 0xFEC00000), write the
        interrupt line, turn on I/O, memory and SERR in every command register."""
        for i, irq in enumerate(PIIX_PIRQ_IRQS):
            self.isa.config[PIIX_PIRQRC + i] = irq
        functions = [f for _, f in sorted(self.functions.items())]
        io = sorted(((f, b.index, b.size) for f in functions for b in f.bars.values() if b.io), key=lambda r: -r[2])
        bars: list[tuple[PciFunction, int | None, int]] = [
            (f, b.index, b.size) for f in functions for b in f.bars.values() if not b.io
        ]
        # None: the expansion ROM's base register
        mem = sorted(bars + [(f, None, f.rom_size) for f in functions if f.rom_size], key=lambda r: -r[2])
        address = IO_WINDOW_BASE
        for function, index, size in io:
            address = (address + size - 1) & ~(size - 1)
            function._write_bar_raw(index, address)
            address += size
        if mem:
            total = sum(size for _, _, size in mem)
            align = max(size for _, _, size in mem)
            address = (MEM_WINDOW_TOP - total) & ~(align - 1)
            for function, bar_index, size in mem:
                if bar_index is None:
                    struct.pack_into("<I", function.config, ROM_ADDRESS, address)  # assigned, disabled
                else:
                    function._write_bar_raw(bar_index, address)
                address += size
        for _slot, function in sorted(self.functions.items()):
            if function.config[INTERRUPT_PIN]:
                function.config[INTERRUPT_LINE] = PIIX_PIRQ_IRQS[self.pirq_of(function)]
            cmd = function.command | COMMAND_IO | COMMAND_MEMORY | COMMAND_SERR
            struct.pack_into("<H", function.config, COMMAND, cmd)
            function.update_mappings()
