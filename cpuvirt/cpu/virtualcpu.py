"""What a deprivileged guest believes about the privileged CPU state, kept where it can never address
it (docs/deprivileging.md): the `VirtualCpu`, the system-segment caches of LDTR and TR, and the
`GuestFault` an emulated instruction raises for the guest to see. Shared by the deprivileging core
(deprivilege.py) and the emulation of privileged instructions (privileged.py).
"""

from __future__ import annotations

from cpuvirt.engine import regs as R

SREGS = {"es": R.ES, "cs": R.CS, "ss": R.SS, "ds": R.DS, "fs": R.FS, "gs": R.GS}


class GuestFault(Exception):
    """Emulating an instruction raised an exception the guest must see (delivered through its IDT)."""

    def __init__(self, vector: int, error_code: int | None = None, cr2: int | None = None, eip: int | None = None):
        super().__init__(f"vector {vector} error {error_code}")
        self.vector, self.error_code, self.cr2 = vector, error_code, cr2
        self.eip = eip  # set when it arose in a new task (after a task switch's commit point)


class SegCache:
    """A system-segment register as the guest loaded it (LDTR, TR): selector and cached base/limit."""

    __slots__ = ("base", "limit", "selector")

    def __init__(self, selector: int = 0, base: int = 0, limit: int = 0):
        self.selector, self.base, self.limit = selector, base, limit

    def __repr__(self):
        return f"SegCache({self.selector:#x}, {self.base:#x}, {self.limit:#x})"


class VirtualCpu:
    """What the guest believes about the privileged CPU state (never in guest-addressable memory).

    CPL, IF and the guest-view selectors are not stored: CPL is derived from the real CS (real ring 1
    = virtual 0), IF is the real EFLAGS.IF, and a kernel selector is the real one with RPL 0
    (`DeprivilegedVcpu.guest_selector`)."""

    __slots__ = ("cr0", "cr2", "cr3", "cr4", "dr", "gdtr", "idtr", "iopl", "ldtr", "tr", "sysenter")

    def __init__(self):
        self.cr0, self.cr2, self.cr3, self.cr4 = 0x11, 0, 0, 0
        self.dr = [0, 0, 0, 0, 0, 0, 0xFFFF0FF0, 0x400]  # DR0-7 at reset (no breakpoint is armed)
        self.gdtr = (0, 0)  # (base, limit)
        self.idtr = (0, 0x3FF)
        self.ldtr = SegCache()
        self.tr = SegCache()
        self.iopl = 0
        # IA32_SYSENTER_CS/ESP/EIP (MSRs 0x174-0x176): virtual, never the engine's, whose own
        # sysenter would enter real ring 0 (it is hooked and emulated instead: `_sysenter`)
        self.sysenter = [0, 0, 0]

    def crs(self) -> tuple[int, int, int]:
        return self.cr0, self.cr3, self.cr4


class TableVirtualCpu(VirtualCpu):
    """A VirtualCpu some of whose fields live in a C path's table, where C reads and writes the guest's
    value (the subclass says which, with `in_table`); built from the VirtualCpu it replaces."""

    __slots__ = ("_table",)

    def __init__(self, table, old: VirtualCpu):
        self._table = table  # a ctypes structure or array
        for name in VirtualCpu.__slots__:
            setattr(self, name, getattr(old, name))


def in_table(field: str | None, index: int | None = None, mask: int = 0xFFFFFFFF) -> property:
    """A TableVirtualCpu field kept in its table: `field` of the structure (None: the table itself),
    element `index` of it when that is an array."""
    if index is None:
        assert field is not None
        name = field

        def get(cpu) -> int:
            return getattr(cpu._table, name)

        def put(cpu, value: int) -> None:
            setattr(cpu._table, name, value & mask)

        return property(get, put)
    at = index

    def array(cpu):
        return cpu._table if field is None else getattr(cpu._table, field)

    def get_at(cpu) -> int:
        return array(cpu)[at]

    def put_at(cpu, value: int) -> None:
        array(cpu)[at] = value & mask

    return property(get_at, put_at)
