"""GPA -> HPA: where guest-physical memory lives in the host's (Unicorn's) physical space.

Guest RAM sits at a non-identity host offset (RAM_HPA), so a path that forgets to translate shows up
at once. Device ranges (the MMIO bus: the local APIC...) map to Unicorn MMIO regions at MMIO_HPA and
up, whose callbacks reach the devices. Every other guest-physical address is unbacked: it maps to one
MMIO page that reads all-ones and drops writes, so a guest can never reach host memory it was not given.
"""

from __future__ import annotations

from collections.abc import Callable

from cpuvirt.memory.types import GPA, HPA

RAM_HPA = 0x4000_0000  # guest RAM, up to 512 MiB
HV_HPA = 0x2000_0000  # the hypervisor's own structures (never in any guest mapping)
MMIO_HPA = 0x7000_0000  # device register windows (Machine.map_mmio), up to UNBACKED_HPA
UNBACKED_HPA = 0x7FFF_F000  # the all-ones page


class P2m:
    """A flat p2m: one RAM region, and device (MMIO) ranges. EPT and direct paging replace it per mode.

    `gpa_to_hpa` answers for RAM only: the hypervisor's own reads and writes of guest memory (page
    walks, event frames) never reach a device. `mmio_to_hpa` answers for device ranges, which only
    guest accesses reach, through the TLB-fill hook.
    """

    __slots__ = ("ram_bytes", "ram_hpa", "mmio", "on_change")

    def __init__(self, ram_bytes: int, ram_hpa: int = RAM_HPA):
        self.ram_bytes = ram_bytes
        self.ram_hpa = ram_hpa
        self.mmio: list[tuple[int, int, int]] = []  # (first gpa, end gpa, hpa), page-aligned
        self.on_change: list[Callable[[], None]] = []  # told whenever `mmio` changes (the C fills' copy)

    def add_mmio(self, gpa: GPA, size: int, hpa: HPA) -> None:
        """Map the device range gpa .. gpa + size - 1 (whole pages) to host-physical hpa."""
        if gpa & 0xFFF or size & 0xFFF or hpa & 0xFFF or size <= 0:
            raise ValueError(f"MMIO range {gpa:#x}+{size:#x} -> {hpa:#x} is not page-aligned")
        if gpa < self.ram_bytes:
            raise ValueError(f"MMIO range {gpa:#x}+{size:#x} overlaps guest RAM")
        self.mmio.append((gpa, gpa + size, hpa))
        for tell in self.on_change:
            tell()

    def remove_mmio(self, gpa: GPA) -> None:
        """Unmap the device range that starts at gpa."""
        self.mmio = [m for m in self.mmio if m[0] != gpa]
        for tell in self.on_change:
            tell()

    def mmio_to_hpa(self, gpa: GPA) -> HPA | None:
        for lo, hi, hpa in self.mmio:
            if lo <= gpa < hi:
                return HPA(hpa + gpa - lo)
        return None

    def gpa_to_hpa(self, gpa: GPA) -> HPA | None:
        if 0 <= gpa < self.ram_bytes:
            return HPA(self.ram_hpa + gpa)
        return None
