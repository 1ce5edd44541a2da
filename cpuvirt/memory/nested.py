"""Nested paging (EPT): the guest's walk over guest-physical memory that EPT translates (DESIGN.md 4).

Every guest paging-structure read is itself translated by EPT, then the final guest-physical address
is: the two-dimensional walk. A refusal in the second dimension is a `NestedFault` carrying the
EptViolation, whether it hit a guest paging structure or the final address, so the processor can
report an EPT_VIOLATION exit with the SDM's qualification bits.
"""

from __future__ import annotations

from cpuvirt.memory.ept import EPT_R, EPT_W, EPT_X, Ept
from cpuvirt.memory.mmu import NestedFault
from cpuvirt.memory.types import GPA, GVA, Access
from cpuvirt.memory.walk import Fault, walk
from cpuvirt.x86.flags import CR0_PG

_ACCESS_BIT: dict[int, int] = {Access.READ: EPT_R, Access.WRITE: EPT_W, Access.FETCH: EPT_X}


class EptWalk:
    def __init__(self, mmu, ept: Ept):
        self.mmu = mmu
        self.ept = ept
        self.ram = mmu.ram

    def _host(self, gpa: int, bit: int, final: bool) -> int:
        r = self.ept.translate(gpa, bit)
        if type(r) is not int:
            raise NestedFault(r, gpa, final)
        return r

    def read32(self, gpa: int) -> int:
        hpa = self._host(gpa, EPT_R, False)
        return self.ram.read32(hpa) if self.ram.contains(hpa, 4) else 0xFFFFFFFF

    def write32(self, gpa: int, value: int) -> None:
        hpa = self._host(gpa, EPT_W, False)
        if self.ram.contains(hpa, 4):
            self.ram.write32(hpa, value)

    def gva_to_gpa(self, gva: GVA, access, user, side_effects=True):
        m = self.mmu
        cr0, cr3, cr4 = m.crs or m.load_crs()
        if not cr0 & CR0_PG:
            return gva, True
        before = self.ept.refs
        t = walk(gva, access, user, cr0, cr3, cr4, self.read32, self.write32 if side_effects else None)
        if side_effects:  # a look without side effects (disassembly for a trace) is not the guest's
            c = m.counters
            c.walks += 1
            c.walk_refs += t.refs + (self.ept.refs - before)
        if type(t) is Fault:
            return None, t.error_code
        return t.gpa, (t.writable and (t.dirty or access == Access.WRITE))

    def gpa_to_hpa(self, gpa: GPA, access: int) -> int | None:
        before = self.ept.refs
        hpa = self._host(gpa, _ACCESS_BIT[access], True)
        self.mmu.counters.walk_refs += self.ept.refs - before
        return hpa
