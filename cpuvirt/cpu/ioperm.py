"""The I/O permission check the engine leaves out (it never faults in/out): one function, every mode.

SDM Vol. 1 19.5: in protected mode an I/O instruction is allowed when CPL <= IOPL; otherwise, and
always in virtual-8086 mode, the I/O permission bitmap of the current 32-bit TSS decides (the map
base at offset 0x66; every bit of the accessed ports must be 0, and the two bytes read must lie
within the TSS limit). Not allowed: #GP(0), before the access and before any VM exit.
"""

from __future__ import annotations

from cpuvirt.cpu.faults import DeliveryFault
from cpuvirt.engine import regs as R
from cpuvirt.x86.flags import EFLAGS_VM

_SIZES = {"al": 1, "ax": 2, "eax": 4}


def io_operands(mnem: str, ops: str, regs: R.Regs) -> tuple[int, int]:
    """(port, size) of an in/out/ins/outs whose capstone text is `mnem ops`."""
    name = mnem.split()[-1]
    if name in ("in", "out"):
        a, b = (o.strip() for o in ops.split(","))
        reg, port = (a, b) if name == "in" else (b, a)
        return (regs.read(R.EDX) & 0xFFFF if port == "dx" else int(port, 0)), _SIZES.get(reg, 1)
    return regs.read(R.EDX) & 0xFFFF, {"b": 1, "w": 2, "d": 4}[name[-1]]


def io_permitted(view, port: int, size: int) -> bool:
    """May the guest, in its current state (`view`: a tasks.CpuView), access `size` ports at `port`?"""
    eflags = view.eflags()
    if not eflags & EFLAGS_VM and view.cpl() <= (eflags >> 12) & 3:
        return True
    sel, base, limit = view.tr()
    if not sel & ~3 or limit < 0x67:
        return False
    try:
        map_base = int.from_bytes(view.read(base + 0x66, 2), "little")
        at = map_base + (port >> 3)
        if at + 1 > limit:
            return False
        bits = int.from_bytes(view.read(base + at, 2), "little")
    except DeliveryFault:
        return False
    return not bits & (((1 << size) - 1) << (port & 7))
