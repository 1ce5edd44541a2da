"""The first floor of the deprivileging core: the virtual CPU and the guest's view of it.

The guest kernel believes it runs at CPL 0 with its own CR0-4, descriptor tables and IOPL; those live
in a `VirtualCpu` (virtualcpu.py) it can never address, while the engine runs it at real ring 1
(`KERNEL_RING`). `GuestViewVcpu` translates between the two: the virtual CPL, selectors and EFLAGS
as the guest sees them, and guest-linear reads and writes made with the supervisor rights the CPU's
own accesses have (a per-page cache like a TLB, dropped by `flush_guest_tlb`). The floors above it:
segments.py (segment loads), privileged.py (emulated instructions), iogate.py, deprivilege.py.
"""

from __future__ import annotations

from unicorn import UC_CTL_IO_WRITE, UC_CTL_TLB_FLUSH

from cpuvirt import limits
from cpuvirt.cpu.vcpu import Vcpu
from cpuvirt.cpu.virtualcpu import GuestFault, VirtualCpu
from cpuvirt.engine import regs as R
from cpuvirt.memory.mmu import GuestPageFault
from cpuvirt.x86.flags import EFLAGS_IOPL, EFLAGS_VM
from cpuvirt.x86.vectors import Vector

KERNEL_RING = 1  # the real ring of the guest kernel (virtual CPL 0)


class GuestViewVcpu(Vcpu):
    """A Vcpu whose guest kernel runs at ring 1 against a `VirtualCpu` (`v`)."""

    event_kind = "trap"  # the trace kind of each emulation: "trap", or "callout" (full mode)

    def __init__(self, machine, trace=None, max_insns: int = 0):
        super().__init__(machine, trace=trace, max_insns=max_insns)
        self.virtual_cpu = VirtualCpu()
        self._rtlb: dict[int, int] = {}  # linear page -> host frame, for the hypervisor's reads

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
        return (self.regs.read(R.EFLAGS) & ~EFLAGS_IOPL) | (self.virtual_cpu.iopl << 12)

    def set_guest_eflags(self, image: int) -> None:
        """Load an EFLAGS image the guest may load at its current (virtual) privilege."""
        self.virtual_cpu.iopl = (image >> 12) & 3
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

    # -- guest-linear memory, as the CPU's own (supervisor) accesses --------------------------------
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

    def flush_guest_tlb(self, rules_changed: bool = True, wp_set: bool = False) -> None:
        """The guest's translations changed (CR3, CR0.PG, CR4.PSE, invlpg): `rules_changed`; or only
        its TLB is flushed and the rights it holds may be stale (CR0.WP, CR4.PGE/SMEP; `wp_set`: WP
        went from 0 to 1): a shadow keeps its tables then and says whether the engine's TLB must go
        (ShadowPaging.tlb_flush)."""
        self.mmu.crs = None
        self._rtlb.clear()
        strategy = self.mmu.strategy
        if not rules_changed:
            tlb_flush = getattr(strategy, "tlb_flush", None)
            if tlb_flush is not None:
                if tlb_flush(wp_set):
                    self.uc.ctl(UC_CTL_TLB_FLUSH, UC_CTL_IO_WRITE)
                return
        flush = getattr(strategy, "flush", None)
        if flush is not None:
            flush()
        self.uc.ctl(UC_CTL_TLB_FLUSH, UC_CTL_IO_WRITE)
