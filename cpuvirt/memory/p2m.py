"""GPA -> HPA: where guest-physical memory lives in the host's (Unicorn's) physical space.

Guest RAM sits at a non-identity host offset (RAM_HPA), so a path that forgets to translate shows up
at once. Guest-physical addresses outside RAM are unbacked: they map to one MMIO page that reads
all-ones and drops writes, so a guest can never reach host memory it was not given.
"""
from __future__ import annotations

from cpuvirt.memory.types import Gpa, Hpa

RAM_HPA = 0x4000_0000        # guest RAM, up to 512 MiB
HV_HPA = 0x2000_0000         # the hypervisor's own structures (never in any guest mapping)
UNBACKED_HPA = 0x7FFF_F000   # the all-ones page


class P2m:
    """A flat p2m: one RAM region. EPT and direct paging replace it per mode."""

    __slots__ = ("ram_bytes", "ram_hpa")

    def __init__(self, ram_bytes: int, ram_hpa: int = RAM_HPA):
        self.ram_bytes = ram_bytes
        self.ram_hpa = ram_hpa

    def gpa_to_hpa(self, gpa: Gpa) -> Hpa | None:
        if 0 <= gpa < self.ram_bytes:
            return Hpa(self.ram_hpa + gpa)
        return None
