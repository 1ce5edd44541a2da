"""Deprivileging (ring compression), shared by modes `trap` and `full`: docs/deprivileging.md.

The guest kernel (virtual CPL 0) runs at real CPL 1, guest user code at CPL 3. What the guest believes
(CR0-4, GDTR, IDTR, LDTR, TR, IOPL, CPL 0) is kept in a `VirtualCpu`, Python state the guest can never
address. The real CPU holds only what the engine needs: the guest's own GDT in the real GDTR (so native
descriptor loads read the guest's descriptors), the hypervisor's IDTR/TR/LDTR and CR0, and IF (which the
engine never uses to deliver anything, so it carries the guest's IF).

Ring-0 descriptors cannot be loaded at CPL 1, so every guest-kernel segment load is done here from a
SHADOW descriptor (the guest's, DPL 0 made DPL 1): written straight into the engine's segment cache in
its saved context (`_load_direct`, as the engine's own load would leave it), or, where that is not
possible, loaded by the engine from a SHADOW GDT in hypervisor memory reached through a linear window
that the TLB-fill hook serves only during that load (the real GDTR points at the window for the load,
then back; the engine's TLB is flushed so no entry for the window survives into guest execution).

`DeprivilegedVcpu` is the Vcpu every deprivileging mode builds on: event delivery through the guest's
IDT in the guest's view (`RingCompressedDelivery`), the emulation of privileged instructions
(`emulate_at`), segment loads (`load_segment`, `load_cs_ss`), the I/O privilege check the engine does
not do, and page faults with the virtual CR2. Modes decide when to call it (trap: on #GP; full: from
translator callouts) and where kernel code runs (`enter_kernel`).
"""
from __future__ import annotations

import ctypes
import struct

from unicorn import UC_CTL_IO_WRITE, UC_CTL_TLB_FLUSH, UC_PROT_READ, UC_PROT_WRITE

from cpuvirt import limits
from cpuvirt.cpu.events import EventDelivery
from cpuvirt.cpu.faults import DeliveryFault
from cpuvirt.cpu.privileged import EMULATE
from cpuvirt.cpu.quirks import HF_INHIBIT_IRQ
from cpuvirt.cpu.segcache import _SEG_INDEX, _SegmentCache, segs_offset  # noqa: F401  (re-exported)
from cpuvirt.cpu.tasks import CpuView
from cpuvirt.cpu.vcpu import EXIT_HYPERVISOR_STOP, Vcpu
from cpuvirt.cpu.virtualcpu import SREGS, GuestFault, SegCache, VirtualCpu  # noqa: F401  (re-exported)
from cpuvirt.engine import regs as R
from cpuvirt.engine.hostmem import HostRegion, HvAllocator
from cpuvirt.engine.regs import _uclib
from cpuvirt.memory.mmu import GuestPageFault
from cpuvirt.memory.p2m import HV_HPA
from cpuvirt.status import Unsupported
from cpuvirt.x86.faultaddr import operand_address
from cpuvirt.x86.flags import (
    CR0_PE,
    CR0_PG,
    CR0_TS,
    CR0_WP,
    CR4_PGE,
    CR4_PSE,
    EFLAGS_IOPL,
    EFLAGS_NT,
    EFLAGS_VM,
)
from cpuvirt.x86.vectors import HAS_ERROR_CODE, Vector

KERNEL_RING = 1                   # the real ring of the guest kernel (virtual CPL 0)
SYSENTER_MSRS = (0x174, 0x175, 0x176)   # IA32_SYSENTER_CS, _ESP, _EIP: kept in the VirtualCpu
HV_SIZE = 8 << 20                 # hypervisor-only host memory (shadow GDT; full mode's translation cache)
SHADOW_GDT_WINDOW = 0xFFF00000    # linear window of the shadow GDT, served only during a hypervisor load
SHADOW_GDT_BYTES = 0x10000        # a GDT's largest size (limit 0xFFFF)
# The hypervisor's CR0 (what `smsw` shows natively): PE MP ET NE WP PG. Its low 16 bits differ from a
# guest's usual PE|ET (0x11), which is what makes the smsw hole visible.
HV_CR0 = 0x80010033
HV_IDTR = (0, 0xFFC00000, 0x7FF, 0)   # the hypervisor's IDTR (the engine never uses it): `sidt` shows it
_REG32 = dict(zip(R.GPR_NAMES, R.GPR_ORDER))
_REG16 = {n[1:]: r for n, r in _REG32.items()}
_REG8 = {"al": (R.EAX, 0), "cl": (R.ECX, 0), "dl": (R.EDX, 0), "bl": (R.EBX, 0),
         "ah": (R.EAX, 8), "ch": (R.ECX, 8), "dh": (R.EDX, 8), "bh": (R.EBX, 8)}


_HF_CS32, _HF_SS32, _HF_ADDSEG = 1 << 4, 1 << 5, 1 << 6


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
        if hi & (1 << 12) and (hi >> 13) & 3 == 0:     # S = 1 (code/data) and DPL 0
            hi |= 1 << 13
        return lo, hi

    def put(self, index: int, lo: int, hi: int) -> None:
        lo, hi = self.compress(lo, hi)
        self.hv_mem.write(self.hpa + index * 8, struct.pack("<II", lo, hi))


class RingCompressedDelivery(EventDelivery):
    """IDT delivery in the guest's view: the guest's IDT, GDT and TSS from the VirtualCpu, privilege
    rules against the virtual CPL, a frame holding guest-view CS/EFLAGS; the handler then runs at real
    ring 1 (its code and stack segments loaded from the shadow GDT) and starts at `enter_kernel`."""

    def __init__(self, vcpu: DeprivilegedVcpu):
        super().__init__(vcpu.uc, vcpu.regs, vcpu.mmu)
        self.vcpu = vcpu

    def _descriptor(self, selector: int, ext: int) -> tuple[int, int]:
        try:
            return self.vcpu.descriptor(selector, ext)
        except GuestFault as g:
            raise DeliveryFault(g.vector, g.error_code or 0, g.cr2) from None

    def _idt(self) -> tuple[int, int]:
        return self.vcpu.v.idtr

    def _tss(self) -> tuple[int, int, int]:
        tr = self.vcpu.v.tr
        return tr.selector, tr.base, tr.limit

    def _cpl(self) -> int:
        return self.vcpu.vcpl()

    def _eflags(self) -> int:
        return self.vcpu.guest_eflags()

    def _view(self, selector: int) -> int:
        return self.vcpu.guest_selector(selector)

    def _set_cr2(self, cr2: int) -> None:
        self.vcpu.v.cr2 = cr2

    def _enter(self, selector, new_ss, cpl, new_cpl, old_cs, esp, flags, offset) -> None:
        vc, regs = self.vcpu, self.regs
        new_cs = (selector & ~3) | new_cpl
        if new_ss is not None:
            vc.load_cs_ss(new_cs, (new_ss & ~3) | new_cpl, new_cpl)
        elif (old_cs & ~3) != (selector & ~3):
            vc.load_cs_ss(new_cs, None, new_cpl)
        regs.write(R.ESP, esp)
        vc.set_guest_eflags(flags)
        if new_cpl == 0:
            vc.enter_kernel(offset)
        else:
            regs.write(R.EIP, offset)


class VirtualView(CpuView):
    """What a far transfer or task switch sees under deprivileging (cpu/tasks.py): the guest's GDT,
    LDT, TR, CR0/CR3 and CPL from the virtual CPU; CS/SS loaded ring-compressed (a new task or gate
    target at virtual CPL 0 runs at real ring 1, never 0)."""

    def read(self, gva: int, size: int) -> bytes:
        try:
            return self.vcpu.read_guest(gva & 0xFFFFFFFF, size)
        except GuestFault as g:
            raise DeliveryFault(g.vector, g.error_code or 0, g.cr2) from None

    def write(self, gva: int, data: bytes) -> None:
        try:
            self.vcpu.write_guest(gva & 0xFFFFFFFF, data)
        except GuestFault as g:
            raise DeliveryFault(g.vector, g.error_code or 0, g.cr2) from None

    def cpl(self) -> int:
        return self.vcpu.vcpl()

    def eflags(self) -> int:
        return self.vcpu.guest_eflags()

    def set_eflags(self, value: int) -> None:
        self.vcpu.set_guest_eflags(value)

    def selector(self, reg: int) -> int:
        real = self.regs.read(reg)
        return real if self.regs.read(R.EFLAGS) & EFLAGS_VM else self.vcpu.guest_selector(real)

    def gdtr(self) -> tuple[int, int]:
        return self.vcpu.v.gdtr

    def ldtr(self) -> tuple[int, int, int]:
        t = self.vcpu.v.ldtr
        return t.selector, t.base, t.limit

    def tr(self) -> tuple[int, int, int]:
        t = self.vcpu.v.tr
        return t.selector, t.base, t.limit

    def set_tr(self, sel: int, base: int, limit: int, hi: int) -> None:
        self.vcpu.v.tr = SegCache(sel, base, limit)

    def set_ldtr(self, sel: int, base: int, limit: int, hi: int) -> None:
        self.vcpu.v.ldtr = SegCache(sel, base, limit)

    def paging(self) -> bool:
        return bool(self.vcpu.v.cr0 & CR0_PG)

    def set_cr3(self, value: int) -> None:
        self.vcpu.write_cr(3, value)

    def set_task_switched(self) -> None:
        self.vcpu.v.cr0 |= CR0_TS

    def load(self, cs, ss, cpl, eip, esp, data=None) -> None:
        c, regs = self.vcpu, self.regs
        names = {R.DS: "ds", R.ES: "es", R.FS: "fs", R.GS: "gs"}
        c.load_cs_ss(cs, ss, cpl)
        regs.write(R.ESP, esp)
        try:
            for reg, sel in (data or {}).items():
                c.load_segment(names[reg], sel)
        except GuestFault as g:
            raise DeliveryFault(g.vector, g.error_code or 0, g.cr2) from None
        c.set_guest_eflags(c.guest_eflags())       # the real IOPL of the new ring
        self.entered = eip
        if cpl == 0:
            c.enter_kernel(eip)
        else:
            regs.write(R.EIP, eip)

    def load_v86(self, sels, eip, esp) -> None:
        regs = self.regs
        for reg in (R.SS, R.CS, R.DS, R.ES, R.FS, R.GS):
            regs.write(reg, sels[reg])
        self.vcpu._loaded.clear()
        regs.write(R.ESP, esp)
        regs.write(R.EIP, eip)
        self.entered = eip


class DeprivilegedVcpu(Vcpu):
    """A Vcpu whose guest kernel runs at ring 1 against a VirtualCpu (docs/deprivileging.md, "API").

    Subclasses set `event_kind` ("trap" or "callout": the trace kind of each emulation) and may override
    `enter_kernel(guest_eip)` (where guest-kernel code really runs) and `real_iopl(vcpl)`."""

    event_kind = "trap"
    CODE16 = False          # may the guest kernel run 16-bit code (CS.D = 0)? full: yes (bt/direct.py)

    def __init__(self, machine, trace=None, max_insns: int = 0):
        super().__init__(machine, trace=trace, max_insns=max_insns)
        self.v = VirtualCpu()
        self.hv_mem = HostRegion(self.uc, HV_HPA, HV_SIZE)
        self.alloc = HvAllocator(self.hv_mem)
        self.shadow = ShadowGdt(self.hv_mem, self.alloc)
        self.delivery = RingCompressedDelivery(self)
        self.delivery.view = self.view = VirtualView(self)
        self._window_on = False
        self._window_touched = True        # unknown at start: flush before the first window use
        self._cplctx = self.uc.context_save()
        self._cplflags = ctypes.c_uint32.from_address(                      # its hflags, viewed once
            ctypes.cast(self._cplctx.context, ctypes.c_void_p).value + self.faults.layout.hflags)
        self._decoded: dict[tuple[int, bytes], tuple[int, str, str]] = {}
        self._gdtr_mmr = R._Mmr()
        self._io_site_once = None
        self._rtlb: dict[int, int] = {}          # linear page -> host frame, for the hypervisor's reads
        self._loaded: dict[int, tuple[int, int, int]] = {}   # segment register -> (real selector, lo, hi)
        self._direct = None                      # views into a saved context for direct segment loads
        off = segs_offset()
        if off is not None:
            ctx = self.uc.context_save()
            addr = ctypes.cast(ctx.context, ctypes.c_void_p).value
            self._direct = (ctx, ctx.context, (_SegmentCache * 6).from_address(addr + off),
                            ctypes.c_uint32.from_address(addr + self.faults.layout.hflags))
        mmu = self.mmu
        if hasattr(mmu, "crs_source"):
            mmu.crs_source = self.v.crs
        else:
            def load_crs():
                mmu.crs = crs = self.v.crs()
                return crs
            mmu.load_crs = load_crs
        inner_fill = mmu.fill

        def fill(uc, vaddr, access, entry, data):
            if SHADOW_GDT_WINDOW <= vaddr < SHADOW_GDT_WINDOW + SHADOW_GDT_BYTES:
                if self._window_on and access != 18:       # never a fetch
                    entry.paddr = self.shadow.hpa + ((vaddr - SHADOW_GDT_WINDOW) & ~0xFFF)
                    entry.perms = UC_PROT_READ | UC_PROT_WRITE
                    return True
                self._window_touched = True                # the guest's own page there is cached now
            return inner_fill(uc, vaddr, access, entry, data)
        mmu.fill = fill                                    # install_hooks registers mmu.fill

    # -- the guest's view ------------------------------------------------------------------------------
    def vcpl(self) -> int:
        """The CPL the guest believes in: real ring 1 is its ring 0; in virtual-8086 mode it is 3
        whatever CS holds (real ring 0 is never used otherwise)."""
        cpl = self.regs.read(R.CS) & 3
        if cpl == 3:
            return 3
        if self.regs.read(R.EFLAGS) & EFLAGS_VM:
            return 3
        return 0 if cpl == KERNEL_RING else cpl

    @staticmethod
    def guest_selector(real: int) -> int:
        """A real selector as the guest sees it: RPL 1 (ring compression) shows as RPL 0."""
        return real & ~3 if real & 3 == KERNEL_RING else real

    def real_iopl(self, vcpl: int) -> int:
        """The real IOPL while the guest runs at `vcpl` (trap: always 0, so cli/sti trap)."""
        return 0

    def guest_eflags(self) -> int:
        """EFLAGS as the guest sees it: the real flags (IF included) with the virtual IOPL."""
        return (self.regs.read(R.EFLAGS) & ~EFLAGS_IOPL) | (self.v.iopl << 12)

    def set_guest_eflags(self, image: int) -> None:
        """Load an EFLAGS image the guest may load at its current (virtual) privilege."""
        self.v.iopl = (image >> 12) & 3
        if image & EFLAGS_VM:
            # V86 code really runs at CPL 3: its IOPL-sensitive instructions act on the real IF
            # (the virtual one) or raise #GP as the guest's IOPL says; I/O goes through the gate.
            self.regs.write(R.EFLAGS, image | 2)
            return
        real = (image & ~EFLAGS_IOPL) | (self.real_iopl(self.vcpl()) << 12) | 2
        self.regs.write(R.EFLAGS, real)

    def enter_kernel(self, guest_eip: int) -> None:
        """Make guest-kernel code run from `guest_eip` (trap: in place; full: its translation)."""
        self.regs.write(R.EIP, guest_eip)

    def iret_to_v86(self, address: int) -> None:
        """An iretd with VM in its image: at virtual CPL 0 a return to V86 mode (emulated, since the
        engine runs it at ring 1), at CPL 3 the bit is ignored as on hardware."""
        if self.vcpl() != 0:
            self.strip_vm_image(address)
            return
        esp = self.regs.read(R.ESP)
        try:
            image = int.from_bytes(self.read_guest(esp + 8, 4), "little")
        except GuestFault:
            return
        if image & EFLAGS_VM:
            self.emulate_at(address)

    # -- descriptors and segment loads --------------------------------------------------------------
    def read_guest(self, gva: int, size: int) -> bytes:
        """Guest-linear read with supervisor rights, as the CPU's own accesses; #PF becomes GuestFault.

        Translations are cached per page like a TLB (dropped on CR3/CR0/CR4 writes and invlpg): the
        hypervisor reads the same descriptor-table and code pages on every trap."""
        off = gva & 0xFFF
        if off + size <= 0x1000:
            hpa = self._rtlb.get(gva >> 12)
            if hpa is None:
                try:
                    hpa = self.mmu.gva_to_hpa(gva & ~0xFFF, 0, False)
                except GuestPageFault as pf:
                    raise GuestFault(Vector.PF, pf.error_code, (pf.gva & ~0xFFF) | off) from None
                if hpa is None or not self.mmu.ram.contains(hpa, 0x1000):
                    return self._read_slow(gva, size)
                limits.put(self._rtlb, gva >> 12, hpa)
            return self.mmu.ram.read(hpa + off, size)
        return self._read_slow(gva, size)

    def _read_slow(self, gva: int, size: int) -> bytes:
        try:
            return self.mmu.read_linear(gva, size, user=False)
        except GuestPageFault as pf:
            raise GuestFault(Vector.PF, pf.error_code, pf.gva) from None

    def fetch_guest(self, eip: int, size: int = 15) -> bytes | None:
        """Code bytes for decoding (no fault: None if unmapped)."""
        try:
            return self.read_guest(eip, size)
        except GuestFault:
            return self.mmu.fetch_bytes(eip, size)

    def write_guest(self, gva: int, data: bytes) -> None:
        try:
            self.mmu.write_linear(gva, data, user=False)
        except GuestPageFault as pf:
            raise GuestFault(Vector.PF, pf.error_code, pf.gva) from None

    def descriptor(self, selector: int, ext: int = 0) -> tuple[int, int]:
        """The guest's descriptor for `selector` (GDT or LDT, the guest's view); #GP if out of limits."""
        if selector & 4:
            base, limit = self.v.ldtr.base, self.v.ldtr.limit
            if not self.v.ldtr.selector & ~3:
                raise GuestFault(Vector.GP, (selector & ~3) | ext)
        else:
            base, limit = self.v.gdtr
            if not selector & ~7:
                raise GuestFault(Vector.GP, ext)
        index = selector & ~7
        if index + 7 > limit:
            raise GuestFault(Vector.GP, (selector & ~3) | ext)
        return struct.unpack("<II", self.read_guest(base + index, 8))

    def _set_accessed(self, selector: int, hi: int) -> None:
        """The CPU sets the descriptor's accessed bit when it loads a segment (SDM 3.4.5)."""
        if not hi & (1 << 8) and not selector & 4:
            self.write_guest(self.v.gdtr[0] + (selector & ~7) + 4, struct.pack("<I", hi | (1 << 8)))

    def _set_engine_cpl(self, ring: int) -> None:
        """Set the engine's CPL (QEMU's hflags) so that SS of that ring may be loaded next; the SS load
        then sets CPL from its descriptor anyway. Needed because the engine checks SS.RPL = CPL."""
        ctx = self._cplctx
        h = self.uc._uch
        _uclib.uc_context_save(h, ctx.context)
        slot = self._cplflags
        if slot.value & 3 != ring:
            slot.value = (slot.value & ~3) | ring
            _uclib.uc_context_restore(h, ctx.context)

    def set_interrupt_shadow(self) -> None:
        """An emulated sti / mov ss / pop ss: no interrupt before the next instruction (SDM 6.8.3)."""
        ctx = self._cplctx
        h = self.uc._uch
        _uclib.uc_context_save(h, ctx.context)
        slot = self._cplflags
        if not slot.value & HF_INHIBIT_IRQ:
            slot.value |= HF_INHIBIT_IRQ
            _uclib.uc_context_restore(h, ctx.context)

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
                continue          # the same descriptor is already loaded there: nothing would change
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
        self._set_gdtr(SHADOW_GDT_WINDOW, self.v.gdtr[1])
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
        _, cptr, segs, hflags = self._direct
        h = self.uc._uch
        _uclib.uc_context_save(h, cptr)
        hf = hflags.value
        if ring is not None:
            hf = (hf & ~3) | ring
        limit = self.v.gdtr[1]
        for reg, real, lo, hi in todo:
            _, shi = ShadowGdt.compress(lo, hi)
            cpl, rpl, dpl = hf & 3, real & 3, (shi >> 13) & 3
            if ((real & ~7) + 7 > limit or not shi & (1 << 12) or not shi & 0x8000
                    or (reg == R.SS and (shi & (1 << 11) or not shi & (1 << 9) or rpl != cpl or dpl != cpl))
                    or (reg != R.SS and ((shi >> 9) & 5 == 4 or ((not shi & (1 << 11) or not shi & (1 << 10))
                                                                  and (dpl < cpl or dpl < rpl))))):
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
        _uclib.uc_context_restore(h, cptr)
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
            selector = self.guest_selector(selector)   # RPL 1 is the compressed ring 0 (read natively)
        rpl = selector & 3
        if not selector & ~3:
            if name == "ss":
                raise GuestFault(Vector.GP, 0)
            self.regs.write(reg, selector)            # a null data selector loads anywhere
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
            if code and not (hi >> 9) & 1:             # execute-only code
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
                    raise Unsupported(f"a 16-bit code segment ({cs:#x}): 16-bit code is not supported "
                                      "under this deprivileging (only full runs it, in place)")
                self._set_accessed(sel, hi)
        self.hv_load(loads, ring if ss is not None else None)

    # -- the privileged instructions, emulated against the VirtualCpu -------------------------------
    def decode(self, eip: int) -> tuple[int, str, str] | None:
        """(length, mnemonic, operands) of the guest instruction at eip, decoded once per site."""
        code = self.fetch_guest(eip, 15)
        if not code:
            return None
        key = (eip, code)
        d = self._decoded.get(key)
        if d is None:
            for _, size, mnem, ops in self._cs().disasm_lite(code, eip, 1):
                d = (size, mnem, ops)
            if d is None:
                return None
            if len(self._decoded) > 8192:
                self._decoded.clear()
            self._decoded[key] = d
        return d

    def emulate_at(self, eip: int, decoded=None) -> int | None:
        """Emulate the guest-kernel instruction at `eip` if it is one this core emulates; returns its
        length (EIP is then set: past it, or wherever it went), or None (not ours: the caller delivers
        the fault). A fault the instruction raises in the guest's view is delivered here."""
        d = decoded or self.decode(eip)
        if d is None:
            return None
        size, mnem, ops = d
        handler = EMULATE.get(mnem)
        if handler is None:
            return None
        try:
            done = handler(self, eip, size, ops)
        except Unsupported as u:
            self.finish("error", EXIT_HYPERVISOR_STOP, f"unsupported at {eip:#x} ({mnem} {ops}): {u}")
            return size
        except GuestFault as g:
            self.record(self.event_kind, mnem, 13, eip, {"fault": g.vector}, "emulated: raised a fault in the guest")
            if g.cr2 is not None:
                self.v.cr2 = g.cr2
            self.deliver(g.vector, g.eip if g.eip is not None else eip,
                         g.error_code if g.vector in HAS_ERROR_CODE else None)
            return size
        if done is False:
            return None
        return size

    def emulated(self, eip: int, mnem: str, detail: dict, action: str = "emulated against the virtual CPU") -> None:
        self.record(self.event_kind, mnem, 13, eip, detail, action)

    # operand helpers
    def read_operand(self, eip: int, op: str, size: int = 4) -> int:
        op = op.strip()
        if op in _REG32:
            return self.regs.read(_REG32[op])
        if op in _REG16:
            return self.regs.read(_REG16[op]) & 0xFFFF
        if op in _REG8:
            reg, shift = _REG8[op]
            return (self.regs.read(reg) >> shift) & 0xFF
        if "[" in op:
            addr = self.memory_operand(eip)
            return int.from_bytes(self.read_guest(addr, size), "little")
        return int(op, 0)

    def memory_operand(self, eip: int) -> int:
        addr = operand_address(self.mmu.fetch_bytes(eip, 15), eip, self.regs)
        if addr is None:
            raise Unsupported(f"cannot find the memory operand of the instruction at {eip:#x}")
        return addr

    def write_reg(self, name: str, value: int) -> None:
        if name in _REG32:
            self.regs.write(_REG32[name], value)
        elif name in _REG16:
            r = _REG16[name]
            self.regs.write(r, (self.regs.read(r) & ~0xFFFF) | (value & 0xFFFF))
        else:
            raise Unsupported(f"register operand {name}")

    def flush_guest_tlb(self) -> None:
        """The guest's translations changed (CR3, CR0.PG/WP, CR4.PSE/PGE, invlpg)."""
        self.mmu.crs = None
        self._rtlb.clear()
        flush = getattr(self.mmu.strategy, "flush", None)
        if flush is not None:
            flush()
        self.uc.ctl(UC_CTL_TLB_FLUSH, UC_CTL_IO_WRITE)

    def write_cr(self, n: int, value: int) -> None:
        v = self.v
        value &= 0xFFFFFFFF
        if n == 0:
            if not value & CR0_PE:
                raise Unsupported("the guest cleared CR0.PE (real mode is not supported under deprivileging)")
            old, v.cr0 = v.cr0, value | 0x10          # ET is hard-wired to 1
            if (old ^ value) & (CR0_PG | CR0_WP | CR0_PE):
                self.flush_guest_tlb()
        elif n == 2:
            v.cr2 = value
        elif n == 3:
            v.cr3 = value
            switch = getattr(self.mmu.strategy, "on_cr3_write", None)
            if switch is not None:
                self.mmu.crs = None
                self._rtlb.clear()
                switch(value)                      # shadow paging: its root for this CR3 (flushes the engine)
            else:
                self.flush_guest_tlb()
        elif n == 4:
            from cpuvirt.x86.cpuid import CR4_RESERVED
            if value & ~v.cr4 & CR4_RESERVED:
                raise GuestFault(Vector.GP, 0)
            old, v.cr4 = v.cr4, value
            if (old ^ value) & (CR4_PSE | CR4_PGE):
                self.flush_guest_tlb()
        else:
            raise GuestFault(Vector.UD)

    def guest_cr0(self) -> int:
        return self.v.cr0

    def read_cr(self, n: int) -> int:
        v = self.v
        if n in (0, 2, 3, 4):
            return (v.cr0, 0, v.cr2, v.cr3, v.cr4)[n]
        raise GuestFault(Vector.UD)

    def _system_segment(self, selector: int, types: tuple[int, ...]) -> tuple[int, int, int, int]:
        """(base, limit, lo, hi) of a GDT system descriptor of one of `types` for lldt/ltr; #GP/#NP."""
        if selector & 4:
            raise GuestFault(Vector.GP, selector & ~3)
        lo, hi = self.descriptor(selector)
        if hi & (1 << 12) or (hi >> 8) & 0xF not in types:
            raise GuestFault(Vector.GP, selector & ~3)
        if not hi & 0x8000:
            raise GuestFault(Vector.NP, selector & ~3)
        base = (lo >> 16) | ((hi & 0xFF) << 16) | (hi & 0xFF000000)
        limit = (lo & 0xFFFF) | (hi & 0xF0000)
        if hi & (1 << 23):
            limit = (limit << 12) | 0xFFF
        return base, limit, lo, hi

    def iret(self, eip: int, size: int = 1) -> None:
        """iretd by the guest kernel (virtual CPL 0), in the guest's view (SDM IRET, protected mode):
        a task return with EFLAGS.NT (cpu/tasks.py), a return to virtual-8086 mode with VM in the
        image, else a protected-mode return."""
        regs = self.regs
        self.unblock_nmi()
        if regs.read(R.EFLAGS) & EFLAGS_NT:
            from cpuvirt.cpu import tasks
            try:
                tasks.task_return(self.view, (eip + size) & 0xFFFFFFFF)
            except DeliveryFault as f:
                raise GuestFault(f.vector, f.error_code, f.cr2, f.eip) from None
            return
        esp = regs.read(R.ESP)
        new_eip, cs, flags = struct.unpack("<III", self.read_guest(esp, 12))
        if flags & EFLAGS_VM:
            # RETURN-TO-VIRTUAL-8086-MODE: the segment values are real-mode ones, CPL becomes 3.
            new_esp, ss, es, ds, fs, gs = struct.unpack("<6I", self.read_guest(esp + 12, 24))
            self.set_guest_eflags(flags)
            for reg, value in ((R.SS, ss), (R.CS, cs), (R.ES, es), (R.DS, ds), (R.FS, fs), (R.GS, gs)):
                regs.write(reg, value & 0xFFFF)
            self._loaded.clear()
            regs.write(R.ESP, new_esp)
            regs.write(R.EIP, new_eip & 0xFFFF)
            return
        cs = self.guest_selector(cs & 0xFFFF)       # a CS the guest read natively (RPL 1) is its ring 0
        rpl = cs & 3
        _, hi = self.descriptor(cs)
        if not (hi >> 11) & 1 or not (hi >> 12) & 1 or rpl == 1 or rpl == 2:
            raise GuestFault(Vector.GP, cs & ~3)
        if not hi & 0x8000:
            raise GuestFault(Vector.NP, cs & ~3)
        if rpl == 0:
            self.load_cs_ss(cs, None, 0)
            regs.write(R.ESP, (esp + 12) & 0xFFFFFFFF)
            self.set_guest_eflags(flags)
            self.enter_kernel(new_eip)
            return
        new_esp, ss = struct.unpack("<II", self.read_guest(esp + 12, 8))
        ss = self.guest_selector(ss & 0xFFFF)
        _, shi = self.descriptor(ss)
        if (ss & 3) != 3 or (shi >> 13) & 3 != 3 or (shi >> 11) & 1 or not (shi >> 9) & 1:
            raise GuestFault(Vector.GP, ss & ~3)
        self.load_cs_ss(cs, ss, 3)
        regs.write(R.ESP, new_esp)
        self.set_guest_eflags(flags)
        regs.write(R.EIP, new_eip)
        # Data segments the outer ring may not use are nulled (SDM IRET, RETURN-TO-OUTER-PRIVILEGE-LEVEL).
        for reg in (R.ES, R.DS, R.FS, R.GS):
            sel = regs.read(reg)
            if sel & ~3:
                try:
                    _, dhi = self.descriptor(sel)
                except GuestFault:
                    regs.write(reg, 0)
                    continue
                conforming_code = (dhi >> 11) & 1 and (dhi >> 10) & 1
                if not conforming_code and (dhi >> 13) & 3 < 3:
                    regs.write(reg, 0)

    def far_transfer(self, eip: int, size: int, selector: int, offset: int, call: bool) -> None:
        """ljmp/lcall to a code segment at the same (virtual) privilege; other targets are #GP."""
        selector = self.guest_selector(selector)
        _, hi = self.descriptor(selector)
        cpl = self.vcpl()
        dpl = (hi >> 13) & 3
        if not (hi >> 12) & 1:
            # a call gate, TSS or task gate: cpu/tasks.py, in the guest's view
            from cpuvirt.cpu import tasks
            try:
                tasks.far_transfer(self.view, selector, offset, call, eip, (eip + size) & 0xFFFFFFFF)
            except DeliveryFault as f:
                raise GuestFault(f.vector, f.error_code, f.cr2, f.eip) from None
            return
        if not (hi >> 11) & 1:
            raise GuestFault(Vector.GP, selector & ~3)
        conforming = (hi >> 10) & 1
        if (conforming and dpl > cpl) or (not conforming and (dpl != cpl or (selector & 3) > cpl)):
            raise GuestFault(Vector.GP, selector & ~3)
        if not hi & 0x8000:
            raise GuestFault(Vector.NP, selector & ~3)
        if call:
            esp = (self.regs.read(R.ESP) - 8) & 0xFFFFFFFF
            self.write_guest(esp, struct.pack("<II", (eip + size) & 0xFFFFFFFF,
                                              self.guest_selector(self.regs.read(R.CS))))
            self.regs.write(R.ESP, esp)
        self.load_cs_ss((selector & ~3) | cpl, None, cpl)
        if cpl == 0:
            self.enter_kernel(offset)
        else:
            self.regs.write(R.EIP, offset)

    def retf(self, eip: int, imm: int) -> None:
        regs = self.regs
        esp = regs.read(R.ESP)
        new_eip, cs = struct.unpack("<II", self.read_guest(esp, 8))
        cs = self.guest_selector(cs & 0xFFFF)
        cpl = self.vcpl()
        _, hi = self.descriptor(cs)
        if not (hi >> 11) & 1 or not (hi >> 12) & 1 or (cs & 3) < cpl:
            raise GuestFault(Vector.GP, cs & ~3)
        if (cs & 3) == cpl:
            self.load_cs_ss(cs, None, cpl)
            regs.write(R.ESP, (esp + 8 + imm) & 0xFFFFFFFF)
            if cpl == 0:
                self.enter_kernel(new_eip)
            else:
                regs.write(R.EIP, new_eip)
            return
        new_esp, ss = struct.unpack("<II", self.read_guest(esp + 8 + imm, 8))
        self.load_cs_ss(cs, ss & 0xFFFF, cs & 3)
        regs.write(R.ESP, (new_esp + imm) & 0xFFFFFFFF)
        regs.write(R.EIP, new_eip)

    def msr(self, eip: int, size: int, write: bool) -> None:
        regs, m = self.regs, self.m
        msr = regs.read(R.ECX)
        from cpuvirt.machine.machine import MsrFault
        try:
            if msr in SYSENTER_MSRS:
                if write:
                    self.v.sysenter[msr - SYSENTER_MSRS[0]] = regs.read(R.EAX)
                else:
                    regs.write(R.EAX, self.v.sysenter[msr - SYSENTER_MSRS[0]])
                    regs.write(R.EDX, 0)
            elif m.implements_msr(msr):
                if write:
                    m.wrmsr(msr, regs.read(R.EAX) | regs.read(R.EDX) << 32)
                else:
                    value = m.rdmsr(msr)
                    regs.write(R.EAX, value & 0xFFFFFFFF)
                    regs.write(R.EDX, value >> 32 & 0xFFFFFFFF)
            elif write:
                self.uc.msr_write(msr, regs.read(R.EAX) | regs.read(R.EDX) << 32)
            else:
                value = self.uc.msr_read(msr)
                regs.write(R.EAX, value & 0xFFFFFFFF)
                regs.write(R.EDX, value >> 32 & 0xFFFFFFFF)
        except MsrFault:
            raise GuestFault(Vector.GP, 0) from None

    # -- what the engine hands the hypervisor ---------------------------------------------------------
    def sysenter_msrs(self) -> tuple[int, int, int]:
        return tuple(self.v.sysenter)

    def page_fault(self, gva: int, access: int, error_code: int, eip: int) -> None:
        """A guest #PF: CR2 is the virtual one (the real CR2 is the hypervisor's)."""
        self.charge_fault(access)
        self.v.cr2 = gva
        self.record("page_fault", "#PF", 14, eip,
                    {"cr2": f"{gva:#x}", "error_code": error_code, "access": ("read", "write", "fetch")[access],
                     "fault": "true"}, "delivered #PF through the guest IDT")
        self.deliver(Vector.PF, eip, error_code)

    def port_io(self, port: int, size: int, is_in: bool, value: int = 0) -> int:
        """Port I/O: the engine checks no I/O privilege, so it is done here. At virtual CPL 0 it is a
        trap (recorded, then done by the device model); at CPL 3 without IOPL 3 the code hook
        (`_io_gate`) has already raised #GP, so only an I/O that slipped past it is dropped here."""
        cpl = self.vcpl()
        if cpl == 0:
            return self.kernel_port_io(port, size, is_in, value)
        if cpl > self.v.iopl:
            self.record("unhandled_io", "IN" if is_in else "OUT", None, self.io_site()[0],
                        {"port": f"{port:#x}", "size": size, "cpl": cpl, "iopl": self.v.iopl},
                        "above IOPL and missed by the I/O gate: not performed (no #GP delivered)")
            return (1 << (8 * size)) - 1 if is_in else 0
        try:
            return super().port_io(port, size, is_in, value)
        finally:
            self._io_site_once = None

    def kernel_port_io(self, port: int, size: int, is_in: bool, value: int = 0) -> int:
        """Port I/O at virtual CPL 0 (the caller knows the CPL: full mode's callouts): a trap event,
        then the device model."""
        if self.trace is not None:
            site = self.io_site()
            self._io_site_once = site              # the io event that follows names the same site
            self.record(self.event_kind, "in" if is_in else "out", None, site[0],
                        {"port": f"{port:#x}", "size": size}, "emulated: port I/O through the device model")
        else:
            self.counts[self.event_kind] += 1
            self.reasons[self.event_kind, "in" if is_in else "out"] += 1
        try:
            return super().port_io(port, size, is_in, value)
        finally:
            self._io_site_once = None

    def io_site(self) -> tuple[int, int]:
        site = self._io_site_once
        if site is not None:
            self._io_site_once = None
            return site
        return super().io_site()

    def io_gate(self, address: int, size: int, mnem: str, ops: str) -> None:
        """Code hook before every in/out/ins/outs: at CPL 3 (V86 included) without I/O permission
        (virtual IOPL, then the guest TSS's I/O bitmap: cpu/ioperm.py) the guest gets #GP(0) and the
        instruction does not run."""
        if self.vcpl() != 3:
            return
        from cpuvirt.cpu.ioperm import io_operands, io_permitted
        port, width = io_operands(mnem, ops, self.regs)
        if not io_permitted(self.view, port, width):
            self.record("exception", "#GP", 13, address, {"vector": 13, "error_code": 0, "why": "I/O above IOPL"},
                        "delivered through the guest IDT")
            # the return EIP is the offset in CS (the hook's address is linear: V86 and real mode differ)
            self.deliver(Vector.GP, self.regs.read(R.EIP), 0)

    def enable_io_gate(self) -> None:
        """Put a code hook on every in/out the guest runs (blocks are checked as they are translated)."""
        from cpuvirt.cpu.intercept import Intercepts
        wanted = frozenset(("in", "out", "insb", "insw", "insd", "outsb", "outsw", "outsd",
                            "rep insb", "rep insw", "rep insd", "rep outsb", "rep outsw", "rep outsd"))
        self.enable_intercepts(wanted, self.io_gate)
        self.mmu.on_code_frame = None        # the page scan knows no in/out opcodes: the block check finds them
        assert isinstance(self.intercepts, Intercepts)

    # -- boot ----------------------------------------------------------------------------------------
    def deprivilege(self) -> None:
        """Take the loader's state (flat protected mode at ring 0) into the VirtualCpu and drop the
        guest to ring 1: the hypervisor's CR0/IDTR/TR/LDTR in the real CPU, the guest's GDT in GDTR."""
        regs, v = self.regs, self.v
        v.cr0 = regs.read(R.CR0) | 0x10
        v.cr3 = regs.read(R.CR3)
        v.cr4 = regs.read(R.CR4)
        _, base, limit, _ = regs.table(R.GDTR)
        v.gdtr = (base, limit)
        _, base, limit, _ = regs.table(R.IDTR)
        v.idtr = (base, limit)
        v.iopl = (regs.read(R.EFLAGS) >> 12) & 3
        sels = {name: regs.read(reg) for name, reg in SREGS.items()}
        regs.write(R.CR0, HV_CR0)            # the real CR4 stays the engine's (OSFXSR...: SSE works)
        regs.set_table(R.IDTR, HV_IDTR)
        self.load_cs_ss(sels["cs"], sels["ss"], 0)
        self.hv_load([(SREGS[n], sels[n], sels[n]) for n in ("ds", "es", "fs", "gs") if sels[n] & ~3])
        self.set_guest_eflags(regs.read(R.EFLAGS) | (v.iopl << 12))
        self.mmu.crs = None
        self.uc.ctl(UC_CTL_TLB_FLUSH, UC_CTL_IO_WRITE)
