"""pc-testdev: QEMU's ISA test device, which kvm-unit-tests kernels expect (`--device pc-testdev`).

A test device, not a PC part: no real machine has it. QEMU adds it with `-device pc-testdev`
(kvm-unit-tests' own run script always does) so that test kernels have a scratch register on ports
and a scratch MMIO area on which to check how instructions are emulated. What it has, as QEMU 7.2's
hw/misc/pc-testdev.c (same addresses, same access rules):

- ports 0xE0-0xE3: one 32-bit scratch register; an access of 1, 2 or 4 bytes at port 0xE0 + k
  reads or writes the register's bytes from byte k (what lies beyond byte 3 is lost).
- ports 0xE4-0xE7: "flush page": a 4-byte write of a guest-physical address makes the host drop its
  mapping of that page (KVM then faults on the next access). Here the engine's TLB is flushed, so
  the next access to any page goes through the TLB-fill hook again. Reads return 0.
- ports 0xE8-0xEB: the same scratch register, accessed a byte at a time (a wider access is split).
- ports 0x2000-0x2017: IRQ lines: writing v to 0x2000 + n drives interrupt line n high (v != 0) or
  low. Lines 0-15 are ISA lines (the 8259 pair and the I/O APIC, as every ISA line); 16-23 are the
  I/O APIC's other pins. Reads return 0.
- GPA 0xFF000000-0xFF00FFFF: 64 KiB of scratch memory behind the MMIO bus (each access is a device
  access: it exits under hw and is emulated, which is what kvm-unit-tests' `emulator` test checks).
"""

from __future__ import annotations

TESTDEV_PORT = 0xE0  # the scratch register (wide accesses)
FLUSH_PORT = 0xE4
BYTE_PORT = 0xE8  # the scratch register, byte accesses
IRQ_PORT, IRQ_LINES = 0x2000, 24
IOMEM_GPA, IOMEM_SIZE = 0xFF000000, 0x10000

_MASK32 = 0xFFFFFFFF


class ScratchRegister:
    """The 32-bit register at 0xE0 (and, byte-wise, 0xE8)."""

    def __init__(self):
        self.data = 0

    def read(self, port: int, size: int) -> int:
        shift = 8 * (port & 3)
        mask = ((1 << 8 * size) - 1) << shift & _MASK32
        return (self.data & mask) >> shift

    def write(self, port: int, size: int, value: int) -> None:
        shift = 8 * (port & 3)
        mask = ((1 << 8 * size) - 1) << shift & _MASK32
        self.data = (self.data & ~mask | (value << shift) & mask) & _MASK32


class FlushPage:
    """Port 0xE4: only 4-byte writes do something (QEMU's valid access size is 4)."""

    def __init__(self, flush):
        self.flush = flush
        self.count = 0

    def read(self, port: int, size: int) -> int:
        return 0

    def write(self, port: int, size: int, value: int) -> None:
        if size == 4 and port == FLUSH_PORT:
            self.count += 1
            self.flush(value & ~0xFFF)


class IrqLines:
    """Ports 0x2000-0x2017: `set_line(n, level)` for a byte written to 0x2000 + n."""

    def __init__(self, set_line):
        self.set_line = set_line

    def read(self, port: int, size: int) -> int:
        return 0

    def write(self, port: int, size: int, value: int) -> None:
        self.set_line(port - IRQ_PORT, bool(value & 0xFF))


class IoMem:
    """The 64 KiB scratch area at 0xFF000000 (offsets from its base), little-endian."""

    def __init__(self):
        self.buf = bytearray(IOMEM_SIZE)

    def read(self, offset: int, size: int) -> int:
        return int.from_bytes(self.buf[offset : offset + size].ljust(size, b"\0"), "little")

    def write(self, offset: int, size: int, value: int) -> None:
        end = min(offset + size, IOMEM_SIZE)
        self.buf[offset:end] = (value & ((1 << 8 * size) - 1)).to_bytes(size, "little")[: end - offset]


class PcTestdev:
    """The device's parts, attached to a machine's port and MMIO buses."""

    def __init__(self, machine):
        self.machine = machine
        self.scratch = ScratchRegister()
        self.flush = FlushPage(lambda gpa: machine._flush_engine_tlb())
        self.irq = IrqLines(self._set_line)
        self.iomem = IoMem()
        machine.bus.register(TESTDEV_PORT, 4, self.scratch, wide=True)
        machine.bus.register(FLUSH_PORT, 4, self.flush, wide=True)
        machine.bus.register(BYTE_PORT, 4, self.scratch)
        machine.bus.register(IRQ_PORT, IRQ_LINES, self.irq)
        machine.map_mmio(IOMEM_GPA, IOMEM_SIZE, self.iomem)

    def _set_line(self, line: int, level: bool) -> None:
        m = self.machine
        m.pit.update()
        if line < 16:
            (m._isa_irq_raise if level else m._isa_irq_lower)(line)
        else:
            m.ioapic.set_irq(line, level)
        m._interrupts_changed()


class TestdevSpec:
    """`--device pc-testdev` (no options), beside the PCI devices' specifications (virtio/setup.py)."""

    kind = "pc-testdev"
    backend = ""

    def as_dict(self) -> dict:
        return {"device": self.kind}

    def __eq__(self, other) -> bool:
        return isinstance(other, TestdevSpec)

    def __hash__(self) -> int:
        return hash(self.kind)

    def __repr__(self) -> str:
        return "TestdevSpec()"


def attach_testdev(machine, specs) -> PcTestdev | None:
    """Put a pc-testdev on the machine if `specs` (all --device specifications) asks for one."""
    return PcTestdev(machine) if any(getattr(s, "kind", None) == TestdevSpec.kind for s in specs) else None
