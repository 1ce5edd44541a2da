"""Mode `full`: the guest kernel's segment loads, CR2 reads and iretd served in C by the callout hook
(bt/_callout.c `events`, through cpu/_evseg.h, the code mode `trap` runs for the same instructions).

An event the guest kernel handles costs, under full, a callout per segment load of its handler
(`mov ds/es/fs/gs, r16/r32` and `pop ds/es/fs/gs`), its `mov r32, cr2` and its `iretd`, each a
Python call of tens of microseconds. Once Python has served such a site (and the translation the
guest goes on at exists), the slot is linked: the C hook then answers it when the common case holds
(descriptors and the stack in the copy of the hypervisor's own TLB, present and accessed, DPL 0 data
segments, an iretd to the kernel's own ring with CS already loaded, at the translation the slot knows,
or to ring 3 with a plain frame; the virtual IOPL unchanged, no NMI blocking, no NT), and hands
everything else to Python unchanged. The C table holds what that needs: the virtual GDTR, CR2 and
IOPL (`FullEvVirtualCpu`), the hypervisor-TLB copy (cpu/evseg.EvHvTlb) and `_loaded`
(cpu/evseg.EvLoaded). CPUVIRT_FULL_EVENTS_C=0 keeps every such callout Python's; a trace does too
(nothing is linked while one is written).
"""

from __future__ import annotations

import ctypes
import os
from typing import Any

from cpuvirt.bt.fastcallout import INVLPG, IRETD, LTR, MOV_CR2, MOV_SREG, POP_SREG, PYTHON
from cpuvirt.cpu import evseg
from cpuvirt.cpu.evseg import EvHvTlb, EvLoaded, EvVirtualCpu
from cpuvirt.cpu.quirks import context_layout
from cpuvirt.cpu.virtualcpu import SegCache, in_table

_DATA_SEGS = {0: 0, 3: 3, 4: 4, 5: 5}  # ModRM sreg field -> QEMU segment index (ES, DS, FS, GS)
_POPS = {b"\x07": 0, b"\x1f": 3, b"\x0f\xa1": 4, b"\x0f\xa9": 5}  # pop es/ds/fs/gs


def enabled_by_environment() -> bool:
    """CPUVIRT_FULL_EVENTS_C=0 keeps the kernel's segment loads, CR2 reads and iretd in Python."""
    return os.environ.get("CPUVIRT_FULL_EVENTS_C", "1") != "0"


class FullEvVirtualCpu(EvVirtualCpu):
    """A VirtualCpu whose CR0, CR3 and CR4 are the callout table's (crfast.py; CR3 for the shadow's C fill,
    memory/shadowmirror.py), CR2, IOPL and GDTR its `ev`'s, IDTR and TR's base and limit its `dl`'s (the
    C delivery, deliverfast.py)."""

    __slots__ = ()
    cr0 = in_table("cr", 0)  # type: ignore[assignment]
    cr3 = in_table("cr3")  # type: ignore[assignment]
    cr4 = in_table("cr", 1)  # type: ignore[assignment]

    def _delivery_fields(self) -> Any:
        return self._table.dl

    @property  # type: ignore[override, misc]
    def tr(self) -> SegCache:
        """TR as the table holds it: the C callout hook loads it too (bt/_callout.c ltr)."""
        t = self._table
        d = t.dl
        return SegCache(t.tr_sel, d.tr_base, d.tr_limit)

    @tr.setter
    def tr(self, value: SegCache) -> None:
        self._table.tr_sel = value.selector & 0xFFFF
        self._set_tr(value)

    def crs_addresses(self) -> tuple[int, int, int]:
        """Where the virtual CR0, CR3 and CR4 are (uint32 each)."""
        t = self._table
        base, kind = ctypes.addressof(t), type(t)
        return base + kind.cr.offset, base + kind.cr3.offset, base + kind.cr.offset + 4


def site_kind(raw: bytes) -> tuple[int, int]:
    """(kind, arg) of a callout site's instruction bytes for _callout.c (PYTHON, 0: none of them)."""
    n = len(raw)
    if n in (2, 3) and raw[n - 2] == 0x8E and (n == 2 or raw[0] == 0x66):
        modrm = raw[n - 1]
        if modrm >> 6 == 3 and (modrm >> 3) & 7 in _DATA_SEGS:
            return MOV_SREG, modrm & 0x3F
        return PYTHON, 0
    seg = _POPS.get(raw)
    if seg is not None:
        return POP_SREG, seg
    if n == 3 and raw[0] == 0x0F and raw[1] == 0x20 and raw[2] >> 6 == 3 and (raw[2] >> 3) & 7 == 2:
        return MOV_CR2, raw[2]
    if raw == b"\xcf":
        return IRETD, 0
    if n >= 3 and raw[0] == 0x0F and raw[1] == 0x01 and raw[2] >> 6 != 3 and (raw[2] >> 3) & 7 == 7:
        return INVLPG, 0  # invlpg m (its address: the runtime's link_store)
    if n == 3 and raw[0] == 0x0F and raw[1] == 0x00 and raw[2] >> 3 == 0b11011:
        return LTR, raw[2] & 7  # ltr r16 (ModRM mod 3, reg 3)
    return PYTHON, 0


class FullEvents:
    """The Python side of the event kinds of the callout table (module docstring)."""

    def __init__(self, vcpu, table):
        self.vcpu = vcpu
        self.table = table
        self.on = enabled_by_environment()
        self._keep: list = []  # what C points at, alive as long as the table
        p2m = vcpu.mmu.p2m
        vcpu.virtual_cpu = FullEvVirtualCpu(table, vcpu.virtual_cpu)
        vcpu._rtlb = EvHvTlb(table.ev, p2m.ram_hpa, p2m.ram_bytes)
        vcpu._loaded = EvLoaded(table.ev, vcpu._loaded)

    def attach(self) -> None:
        """After install_hooks: where the engine's state is; the C side serves the kinds from now on
        (when the engine is of the expected shape and the switch is on)."""
        from cpuvirt.engine.internals import context_header, engine_env

        vcpu, t = self.vcpu, self.table
        ev = t.ev
        mmu = vcpu.mmu
        p2m, ram = mmu.p2m, mmu.ram
        if p2m.ram_hpa < ram.hpa or p2m.ram_hpa + p2m.ram_bytes > ram.hpa + ram.size:
            self.on = False
            return
        env = engine_env(vcpu.uc)
        header = None if env is None else context_header(vcpu.uc, env)
        if env is None or header is None:
            self.on = False
            return
        evseg.setup(ev, vcpu, env, header, context_layout().hflags, self._keep.append)
        evseg.mirror_nmi_blocking(ev, vcpu)
        if not ev.segs_ok:
            self.on = False
        t.events_on = 1 if self.on else 0

    def snapshot(self, snap: dict) -> None:
        """The virtual-CPU snapshot translations are now checked against (coherence.py `_vsnap`): C
        serves an event only while CS, SS and IOPL are its values (the rest changes only where Python
        takes a snapshot: CR writes, descriptor-table loads, task switches)."""
        t = self.table
        cs, ss, iopl = snap.get("cs"), snap.get("ss"), snap.get("iopl")
        if isinstance(cs, int) and isinstance(ss, int) and isinstance(iopl, int):
            t.snap_cs, t.snap_ss, t.snap_iopl, t.snap_ok = cs, ss, iopl, 1
        else:
            t.snap_ok = 0
        tr = snap.get("tr")
        t.snap_tr = tr if isinstance(tr, int) else 0xFFFFFFFF
