"""Segment loads under ring compression: the shadow GDT, and writes into the engine's saved context.

Ring-0 descriptors cannot be loaded at CPL 1, so every guest-kernel segment load is done here from a
SHADOW descriptor (the guest's, DPL 0 made DPL 1): written straight into the engine's segment cache in
its saved context (`_load_direct`, as the engine's own load would leave it: QEMU's helper_load_seg), or,
where that is not possible, loaded by the engine from a SHADOW GDT in hypervisor memory reached through
a linear window that the TLB-fill hook serves only during that load (the real GDTR points at the window
for the load, then back; the engine's TLB is flushed so no entry for the window survives into guest
execution). The guest's own loads (`load_segment`, `load_cs_ss`) are checked here in its view (SDM
5.7, 5.10) first. The second floor of the deprivileging core (deprivilege.py).
"""

from __future__ import annotations

import ctypes
import struct
from typing import Any

from unicorn import UC_CTL_IO_WRITE, UC_CTL_TLB_FLUSH, UC_PROT_READ, UC_PROT_WRITE

from cpuvirt.cpu.guestview import KERNEL_RING, GuestViewVcpu
from cpuvirt.cpu.quirks import HF_INHIBIT_IRQ
from cpuvirt.cpu.segcache import _HF_ADDSEG, _HF_CS32, _HF_SS32, _SEG_INDEX, _SegmentCache, segs_offset
from cpuvirt.cpu.virtualcpu import SREGS, GuestFault
from cpuvirt.engine import regs as R
from cpuvirt.engine.hostmem import HostRegion, HvAllocator
from cpuvirt.memory.p2m import HV_HPA
from cpuvirt.status import Unsupported
from cpuvirt.x86.vectors import Vector

# called with (c_void_p handle, uc_context pointer) only: no argtypes conversion (engine/regs.py bare)
_context_save, _context_restore = R.bare("uc_context_save"), R.bare("uc_context_restore")

HV_SIZE = 8 << 20  # hypervisor-only host memory (shadow GDT; full mode's translation cache)
SHADOW_GDT_WINDOW = 0xFFF00000  # linear window of the shadow GDT, served only during a hypervisor load
SHADOW_GDT_BYTES = 0x10000  # a GDT's largest size (limit 0xFFFF)


class ShadowGdt:
    """The guest GDT as the real CPU must see it for hypervisor loads: DPL-0 code/data descriptors made
    DPL 1. Kept coherent on demand: each entry is copied from the guest's GDT right before it is loaded,
    so guest writes to its GDT need no tracking."""

    def __init__(self, hv_mem: HostRegion, alloc: HvAllocator):
        self.hv_mem = hv_mem
        self.hpa = alloc.page()
        for _ in range(SHADOW_GDT_BYTES // 0x1000 - 1):
            alloc.page()

    @staticmethod
    def compress(lo: int, hi: int) -> tuple[int, int]:
        """A guest descriptor as the shadow holds it: a DPL-0 code or data segment becomes DPL 1."""
        if hi & (1 << 12) and (hi >> 13) & 3 == 0:  # S = 1 (code/data) and DPL 0
            hi |= 1 << 13
        return lo, hi

    def put(self, index: int, lo: int, hi: int) -> None:
        lo, hi = self.compress(lo, hi)
        self.hv_mem.write(self.hpa + index * 8, struct.pack("<II", lo, hi))


class SegmentLoadingVcpu(GuestViewVcpu):
    """Segment registers loaded in the guest's view, ring-compressed (module docstring)."""

    CODE16 = False  # may the guest kernel run 16-bit code (CS.D = 0)? full: yes (bt/direct.py)

    def __init__(self, machine, trace=None, max_insns: int = 0):
        super().__init__(machine, trace=trace, max_insns=max_insns)
        self.hv_mem = HostRegion(self.uc, HV_HPA, HV_SIZE)
        self.alloc = HvAllocator(self.hv_mem)
        self.shadow = ShadowGdt(self.hv_mem, self.alloc)
        self._window_on = False
        self._window_touched = True  # unknown at start: flush before the first window use
        self._cplctx = self.uc.context_save()
        self._cplflags = ctypes.c_uint32.from_address(  # its hflags, viewed once
            ctypes.cast(self._cplctx.context, ctypes.c_void_p).value + self.faults.layout.hflags
        )
        self._gdtr_mmr = R._Mmr()
        self._loaded: dict[int, tuple[int, int, int]] = {}  # segment register -> (real selector, lo, hi)
        # views into a saved context for direct segment loads: (context, its pointer, segs, hflags)
        self._direct: tuple[Any, Any, Any, ctypes.c_uint32] | None = None
        off = segs_offset()
        if off is not None:
            ctx = self.uc.context_save()
            addr = ctypes.cast(ctx.context, ctypes.c_void_p).value
            assert addr is not None  # a saved context is never NULL
            self._direct = (
                ctx,
                ctx.context,
                (_SegmentCache * 6).from_address(addr + off),
                ctypes.c_uint32.from_address(addr + self.faults.layout.hflags),
            )
        mmu = self.mmu
        inner_fill = mmu.fill

        def fill(uc, vaddr, access, entry, data):
            if SHADOW_GDT_WINDOW <= vaddr < SHADOW_GDT_WINDOW + SHADOW_GDT_BYTES:
                if self._window_on and access != 18:  # never a fetch
                    entry.paddr = self.shadow.hpa + ((vaddr - SHADOW_GDT_WINDOW) & ~0xFFF)
                    entry.perms = UC_PROT_READ | UC_PROT_WRITE
                    return True
                self._window_touched = True  # the guest's own page there is cached now
            return inner_fill(uc, vaddr, access, entry, data)

        mmu.fill = fill  # install_hooks registers mmu.fill

    def descriptor(self, selector: int, ext: int = 0) -> tuple[int, int]:
        """The guest's descriptor for `selector` (GDT or LDT, the guest's view); #GP if out of limits."""
        if selector & 4:
            base, limit = self.virtual_cpu.ldtr.base, self.virtual_cpu.ldtr.limit
            if not self.virtual_cpu.ldtr.selector & ~3:
                raise GuestFault(Vector.GP, (selector & ~3) | ext)
        else:
            base, limit = self.virtual_cpu.gdtr
            if not selector & ~7:
                raise GuestFault(Vector.GP, ext)
        index = selector & ~7
        if index + 7 > limit:
            raise GuestFault(Vector.GP, (selector & ~3) | ext)
        return struct.unpack("<II", self.read_guest(base + index, 8))

    def _set_accessed(self, selector: int, hi: int) -> None:
        """The CPU sets the descriptor's accessed bit when it loads a segment (SDM 3.4.5)."""
        if not hi & (1 << 8) and not selector & 4:
            self.write_guest(self.virtual_cpu.gdtr[0] + (selector & ~7) + 4, struct.pack("<I", hi | (1 << 8)))

    def _set_engine_cpl(self, ring: int) -> None:
        """Set the engine's CPL (QEMU's hflags) so that SS of that ring may be loaded next; the SS load
        then sets CPL from its descriptor anyway. Needed because the engine checks SS.RPL = CPL."""
        ctx = self._cplctx
        h = self.uc._uch
        _context_save(h, ctx.context)
        slot = self._cplflags
        if slot.value & 3 != ring:
            slot.value = (slot.value & ~3) | ring
            _context_restore(h, ctx.context)

    def set_interrupt_shadow(self) -> None:
        """An emulated sti / mov ss / pop ss: no interrupt before the next instruction (SDM 6.8.3)."""
        ctx = self._cplctx
        h = self.uc._uch
        _context_save(h, ctx.context)
        slot = self._cplflags
        if not slot.value & HF_INHIBIT_IRQ:
            slot.value |= HF_INHIBIT_IRQ
            _context_restore(h, ctx.context)

    def hv_load(self, loads, ring: int | None = None, desc: tuple[int, int] | None = None) -> None:
        """Load real segment registers from the shadow GDT: `loads` = [(register, guest selector,
        real selector)]. `ring` first moves the engine to that ring (a CS/SS ring change); `desc` is
        the guest descriptor of a single load when the caller has just read it."""
        regs = self.regs
        todo = []
        for reg, sel, real in loads:
            if sel & 4:
                raise Unsupported(f"loading an LDT selector ({sel:#x}) into a segment register at ring 1")
            lo, hi = desc if desc is not None else self.descriptor(sel) if sel & ~3 else (0, 0)
            if ring is None and self._loaded.get(reg) == (real, lo, hi) and regs.read(reg) == real:
                continue  # the same descriptor is already loaded there: nothing would change
            todo.append((reg, real, lo, hi))
        if not todo:
            return
        if self._direct is None or not self._load_direct(todo, ring):
            self._load_window(todo, ring)

    def _load_window(self, todo, ring: int | None) -> None:
        """The loads of `hv_load` done by the engine itself, from the shadow GDT through the window
        (the fallback of `_load_direct`, and what tests check it against)."""
        regs, uc = self.regs, self.uc
        for _reg, real, lo, hi in todo:
            self.shadow.put(real >> 3, lo, hi)
        _, base, limit, _ = regs.table(R.GDTR)
        if self._window_touched:
            uc.ctl(UC_CTL_TLB_FLUSH, UC_CTL_IO_WRITE)
            self._window_touched = False
        self._set_gdtr(SHADOW_GDT_WINDOW, self.virtual_cpu.gdtr[1])
        self._window_on = True
        try:
            if ring is not None:
                self._set_engine_cpl(ring)
            for reg, real, lo, hi in todo:
                regs.write(reg, real)
                self._loaded[reg] = (real, lo, hi | (1 << 8))
        finally:
            self._window_on = False
            self._set_gdtr(base, limit)
            uc.ctl(UC_CTL_TLB_FLUSH, UC_CTL_IO_WRITE)
            self.mmu.crs = None

    def _load_direct(self, todo, ring: int | None) -> bool:
        """The loads of `hv_load` written straight into the engine's segment caches (saved context),
        as its own load from the shadow GDT would leave them (QEMU helper_load_seg and
        cpu_x86_load_seg_cache: the engine's checks, base, limit, flags = shadow descriptor | accessed,
        hflags CPL/CS32/SS32/ADDSEG): no window, no GDTR switch, no TLB flush. False: not a case done
        here (null or LDT selector), nothing changed."""
        for _, real, _, _ in todo:
            if not real & ~3 or real & 4:
                return False
        if self._direct is None:
            return False
        _, cptr, segs, hflags = self._direct
        h = self.uc._uch
        _context_save(h, cptr)
        hf = hflags.value
        if ring is not None:
            hf = (hf & ~3) | ring
        limit = self.virtual_cpu.gdtr[1]
        for reg, real, lo, hi in todo:
            _, shi = ShadowGdt.compress(lo, hi)
            cpl, rpl, dpl = hf & 3, real & 3, (shi >> 13) & 3
            if (
                (real & ~7) + 7 > limit
                or not shi & (1 << 12)
                or not shi & 0x8000
                or (reg == R.SS and (shi & (1 << 11) or not shi & (1 << 9) or rpl != cpl or dpl != cpl))
                or (
                    reg != R.SS
                    and (
                        (shi >> 9) & 5 == 4
                        or ((not shi & (1 << 11) or not shi & (1 << 10)) and (dpl < cpl or dpl < rpl))
                    )
                )
            ):
                raise RuntimeError(f"engine refused register write {reg}={real:#x}")
            sc = segs[_SEG_INDEX[reg]]
            sc.selector = real
            sc.base = (lo >> 16) | ((shi & 0xFF) << 16) | (shi & 0xFF000000)
            lim = (lo & 0xFFFF) | (shi & 0xF0000)
            sc.limit = (lim << 12) | 0xFFF if shi & (1 << 23) else lim
            sc.flags = shi | (1 << 8)
            if reg == R.CS:
                hf = (hf & ~_HF_CS32) | ((shi >> 22) & 1) << 4
            elif reg == R.SS:
                hf = (hf & ~3) | dpl
            hf = (hf & ~(_HF_SS32 | _HF_ADDSEG)) | ((segs[2].flags >> 22) & 1) << 5
            if not hf & _HF_CS32 or segs[0].base | segs[2].base | segs[3].base:
                hf |= _HF_ADDSEG
            self._loaded[reg] = (real, lo, hi | (1 << 8))
        hflags.value = hf
        _context_restore(h, cptr)
        self.mmu.crs = None
        return True

    def _set_gdtr(self, base: int, limit: int) -> None:
        """GDTR straight through libunicorn (the wrapper's tuple path costs several microseconds)."""
        m = self._gdtr_mmr
        m.selector, m.base, m.limit, m.flags = 0, base, limit, 0
        if R._uclib.uc_reg_write(self.uc._uch, R.GDTR, ctypes.byref(m)):
            raise RuntimeError("engine refused a GDTR write")

    def load_segment(self, name: str, selector: int) -> None:
        """`mov sreg` / `pop sreg` by the guest at its virtual CPL: the checks of SDM 5.7/5.10 in the
        guest's view (GuestFault for the guest), then the real load (ring-0 SS gets RPL 1)."""
        reg = SREGS[name]
        cpl = self.vcpl()
        if cpl == 0:
            selector = self.guest_selector(selector)  # RPL 1 is the compressed ring 0 (read natively)
        rpl = selector & 3
        if not selector & ~3:
            if name == "ss":
                raise GuestFault(Vector.GP, 0)
            self.regs.write(reg, selector)  # a null data selector loads anywhere
            return
        lo, hi = self.descriptor(selector)
        dpl = (hi >> 13) & 3
        code, s = (hi >> 11) & 1, (hi >> 12) & 1
        if not s:
            raise GuestFault(Vector.GP, selector & ~3)
        if name == "ss":
            if code or not (hi >> 9) & 1 or rpl != cpl or dpl != cpl:
                raise GuestFault(Vector.GP, selector & ~3)
            if not hi & 0x8000:
                raise GuestFault(Vector.SS, selector & ~3)
        else:
            if code and not (hi >> 9) & 1:  # execute-only code
                raise GuestFault(Vector.GP, selector & ~3)
            if (not code or not (hi >> 10) & 1) and dpl < max(cpl, rpl):
                raise GuestFault(Vector.GP, selector & ~3)
            if not hi & 0x8000:
                raise GuestFault(Vector.NP, selector & ~3)
        self._set_accessed(selector, hi)
        real = selector | KERNEL_RING if name == "ss" and cpl == 0 else selector
        if dpl == 0:
            self.hv_load([(reg, selector, real)], desc=(lo, hi | (1 << 8)))
        else:
            self.regs.write(reg, real)

    def load_cs_ss(self, cs: int, ss: int | None, vcpl: int) -> None:
        """Make CS (and SS) the guest selectors `cs`/`ss` at virtual CPL `vcpl` (descriptors already
        checked by the caller): ring-0 ones become ring-1 ones from the shadow GDT."""
        ring = KERNEL_RING if vcpl == 0 else vcpl

        def real(sel):
            return (sel & ~3) | ring if sel & 3 == 0 and vcpl == 0 else sel

        loads = []
        if ss is not None:
            loads.append((R.SS, ss, real(ss)))
        loads.append((R.CS, cs, real(cs)))
        for sel in (cs, ss):
            if sel is not None:
                hi = self.descriptor(sel)[1]
                if sel is cs and not hi >> 22 & 1 and not self.CODE16:
                    raise Unsupported(
                        f"a 16-bit code segment ({cs:#x}): 16-bit code is not supported "
                        "under this deprivileging (only full runs it, in place)"
                    )
                self._set_accessed(sel, hi)
        self.hv_load(loads, ring if ss is not None else None)
