"""Extended page tables: GPA -> HPA, built by the hypervisor in its own host memory (SDM Vol. 3C 29.3).

Four levels (PML4, PDPT, PD, PT) of 512 eight-byte entries, 4 KiB leaves, bits 0/1/2 = read / write /
execute, memory type WB in the leaves. The tables live in the hypervisor's host region, which no guest
translation ever maps, so a guest cannot read or change them. The processor side (`translate`) counts
every entry it reads: the simulated 2-D walk of a 2-level guest over 4-level EPT makes up to
(2+1)*(4+1)-1 = 14 references per TLB fill.
"""

from __future__ import annotations

import ctypes
import struct

from cpuvirt.engine.hostmem import HvAllocator
from cpuvirt.memory.types import GPA, HPA

EPT_R, EPT_W, EPT_X = 1, 2, 4
EPT_RWX = 7
EPT_MT_WB = 6 << 3
_ADDR = 0x000FFFFFFFFFF000
_Q = struct.Struct("<Q")


class EptViolation:
    __slots__ = ("gpa", "access", "perms", "refs")
    misconfig = False

    def __init__(self, gpa, access, perms, refs):
        self.gpa, self.access, self.perms, self.refs = gpa, access, perms, refs


class EptMisconfig(EptViolation):
    """An entry the processor cannot use (write or execute-only without read: SDM 29.3.3.1)."""

    misconfig = True


class Ept:
    def __init__(self, region, alloc: HvAllocator):
        self.region = region
        self.alloc = alloc
        self.pml4 = alloc.page()
        self.refs = 0  # entry reads by the processor's walks
        # the count of table writes a C walk's cache of translations follows (memory/fastfill.py), or None
        self.writes: ctypes.c_uint64 | None = None

    @property
    def eptp(self) -> int:
        """EPT_POINTER: PML4 address, page-walk length 4 (encoded 3), memory type WB (SDM 25.6.11)."""
        return self.pml4 | (3 << 3) | 6

    # -- hypervisor side ---------------------------------------------------------------------------
    def map(self, gpa: GPA, hpa: HPA, perms: int = EPT_RWX) -> None:
        """Map the guest-physical page of `gpa` to the host frame of `hpa`, making tables as needed."""
        self._map(gpa, hpa, perms)

    def map_range(self, gpa: GPA, hpa: HPA, size: int, perms: int = EPT_RWX) -> None:
        for off in range(0, size, 0x1000):
            self._map(gpa + off, hpa + off, perms)

    def _map(self, gpa: int, hpa: int, perms: int) -> None:
        table = self.pml4
        r = self.region
        for shift in (39, 30, 21):
            slot = table + ((gpa >> shift) & 0x1FF) * 8
            entry = _Q.unpack_from(r.buf, slot - r.hpa)[0]
            if not entry & EPT_RWX:
                nxt = self.alloc.page()
                entry = nxt | EPT_RWX
                _Q.pack_into(r.buf, slot - r.hpa, entry)
            table = entry & _ADDR
        slot = table + ((gpa >> 12) & 0x1FF) * 8
        _Q.pack_into(r.buf, slot - r.hpa, (hpa & _ADDR) | EPT_MT_WB | perms)
        if self.writes is not None:
            self.writes.value += 1

    # -- processor side: the walk ---------------------------------------------------------------------
    def write_entry(self, gpa: GPA, value: int) -> None:
        """Write a raw leaf entry (tests: make a misconfigured entry on purpose)."""
        self._map(gpa, value & _ADDR, value & EPT_RWX)

    def translate(self, gpa: int, access_bit: int) -> int | EptViolation:
        """HPA for `gpa`, or an EptViolation; access_bit is EPT_R, EPT_W or EPT_X."""
        r = self.region
        buf, base = r.buf, r.hpa
        table = self.pml4
        refs = 0
        perms = EPT_RWX
        for shift in (39, 30, 21, 12):
            entry = _Q.unpack_from(buf, table + ((gpa >> shift) & 0x1FF) * 8 - base)[0]
            refs += 1
            if entry & EPT_RWX and not entry & EPT_R:
                self.refs += refs
                return EptMisconfig(gpa, access_bit, entry & EPT_RWX, refs)
            perms &= entry & EPT_RWX
            if not entry & EPT_RWX or not entry & access_bit:
                self.refs += refs
                return EptViolation(gpa, access_bit, perms if entry & EPT_RWX else 0, refs)
            table = entry & _ADDR
        self.refs += refs
        return table | (gpa & 0xFFF)
