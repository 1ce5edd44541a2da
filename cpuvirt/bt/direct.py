"""16-bit guest code under `full`: run directly in the engine, never translated (docs/binary-translation.md).

The translator emits 32-bit code only. Guest-kernel code that is not 32-bit protected-mode code runs
in place instead, in one of two states:

- `REAL` (CR0.PE = 0, real-address mode, SDM Vol. 3A 20.1): the engine itself is in real mode
  (its CR0 is the guest's, its IDTR the guest's IVT) at CPL 0. Real mode has no privilege levels, so
  nothing is compressed: what the hypervisor must keep is the way out. The instructions that leave
  or change the mode are intercepted before they run (`mov` to/from a control register, `lmsw`:
  one-address hooks found by decoding each new block as 16-bit code, cpu/intercept.py) and emulated
  against the virtual CPU. `lgdt`/`lidt`/`sgdt`/`sidt` run natively on the engine's tables, which
  hold the guest's while in real mode and are read back when the guest leaves it. Interrupts and
  exceptions go through the guest's IVT (cpu/events.py); I/O through the usual hooks.
- `PM16` (CR0.PE = 1 with a 16-bit code segment, e.g. just after `mov cr0` sets PE from real mode, or
  a far jump to a descriptor with D = 0): the code runs in place at ring 1, exactly as `trap` runs a
  kernel: privileged instructions raise #GP and are emulated (decoded as 16-bit code); the x86 holes
  (pushf, smsw, mov r,cs...) show ring 1, as under trap. A far transfer to a 32-bit code segment
  ends it: the translator takes over at the target.

Entering real mode keeps the segment registers' hidden parts (base, limit) as the CPU does, so "big
real mode" (a segment loaded with a 4 GiB limit before PE is cleared) works; only the DPL of CS and
SS, which is the engine's CPL, changes (0 in real mode, the kernel ring while PE = 1).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from capstone import CS_ARCH_X86, CS_MODE_16, Cs
from unicorn import UC_CTL_IO_WRITE, UC_CTL_TLB_FLUSH

from cpuvirt.cpu.deprivilege import GuestFault
from cpuvirt.cpu.events import Unsupported, Vector
from cpuvirt.engine import regs as R
from cpuvirt.engine.regs import _uclib
from cpuvirt.x86.flags import CR0_PE, CR0_PG, CR0_WP, EFLAGS_IOPL
from cpuvirt.x86.privilege import CPL0_ONLY, FAR_TRANSFERS, IOPL_SENSITIVE

if TYPE_CHECKING:  # a mixin: mypy reads its super() calls against the class it is mixed into
    from cpuvirt.cpu.deprivilege import DeprivilegedVcpu as _VcpuBase
else:
    _VcpuBase = object

REAL, PM16 = "real", "pm16"
_CS, _SS = 1, 2  # QEMU's R_CS, R_SS: indexes of env->segs
_DPL = 3 << 13
# The real-mode intercepts (cpu/intercept.py names): mov to/from CR and DR, lmsw, clts, rdmsr, wrmsr
# (privileged: the engine would run them at its CPL 0 on its own state), and smsw (all of CR0 in a
# 32-bit register, in any state: Vcpu.smsw_site).
WANTED = frozenset(("mov", "lmsw", "clts", "rdmsr", "wrmsr", "smsw"))
REAL_EMULATED = frozenset(("lmsw", "clts", "rdmsr", "wrmsr"))
# What a #GP at ring 1 in PM16 code may be: a privileged instruction to emulate (as trap does).
TRAPPED = CPL0_ONLY | IOPL_SENSITIVE | FAR_TRANSFERS


def trapped(mnem: str, ops: str) -> bool:
    if mnem in TRAPPED:
        return True
    first = ops.split(",")[0].strip()
    if mnem == "mov":
        return "cr" in ops or "dr" in ops or (first in ("ds", "es", "fs", "gs", "ss"))
    return mnem == "pop" and first in ("ds", "es", "fs", "gs", "ss")


class Direct16:
    """The state machine of 16-bit execution for one FullVcpu: `state` is None (32-bit protected
    mode: translated), REAL or PM16. `from_real`: CS still holds the cache real mode left (CPL 0)."""

    def __init__(self, vcpu, kernel_ring: int, hv_cr0: int, hv_idtr: tuple):
        self.vcpu = vcpu
        self.kernel_ring = kernel_ring
        self.hv_cr0, self.hv_idtr = hv_cr0, hv_idtr
        self.state: str | None = None
        self.from_real = False
        self.transitions = 0

    @property
    def supported(self) -> bool:
        return self.vcpu._direct is not None  # segment caches writable (cpu/segcache.segs_offset)

    # -- CR0 writes that change the mode ---------------------------------------------------------------
    def write_cr0(self, value: int) -> None:
        """A guest CR0 write while PE is, or becomes, 0. Called for the virtual CPU's CR0 (write_cr)."""
        c = self.vcpu
        old = c.virtual_cpu.cr0
        if not value & CR0_PE:
            if self.state != REAL:
                c.virtual_cpu.cr0 = (value | 0x10) & 0xFFFFFFFF
                try:
                    self._enter_real()
                except Unsupported:
                    c.virtual_cpu.cr0 = old
                    raise
            c.virtual_cpu.cr0 = (value | 0x10) & 0xFFFFFFFF
            c.regs.write(R.CR0, c.virtual_cpu.cr0)  # the engine runs real mode with the guest's CR0
        else:
            c.virtual_cpu.cr0 = (value | 0x10) & 0xFFFFFFFF
            self._leave_real()
        if (old ^ value) & (CR0_PG | CR0_WP | CR0_PE):
            c.flush_guest_tlb()

    def _enter_real(self) -> None:
        c = self.vcpu
        regs = c.regs
        _, cptr, segs, _ = c._direct
        _uclib.uc_context_save(c.uc._uch, cptr)
        if segs[_CS].flags >> 22 & 1:
            # 32-bit code in real mode: its `mov cr0` / `lmsw` could not be found by 16-bit decoding,
            # and one run natively at the engine's CPL 0 would enter protected mode at real ring 0.
            raise Unsupported(
                "the guest cleared CR0.PE in a 32-bit code segment (real mode is run under "
                "full only from a 16-bit code segment, as SDM Vol. 3A 9.9.2 prescribes)"
            )
        c.regs.write(R.CR0, c.virtual_cpu.cr0)
        base, limit = c.virtual_cpu.idtr
        regs.set_table(R.IDTR, (0, base, limit, 0))  # natively run sidt/lidt see the guest's
        self._set_ring(0)
        flags = regs.read(R.EFLAGS)
        regs.write(R.EFLAGS, (flags & ~EFLAGS_IOPL) | (c.virtual_cpu.iopl << 12))
        self.state = REAL
        self.from_real = False
        self._changed()

    def _leave_real(self) -> None:
        """PE set from real mode: the tables the guest loaded natively become the virtual CPU's; the
        engine goes back to the hypervisor's CR0/IDTR, CS and SS to the kernel ring; the code segment
        is still the 16-bit one real mode left (PM16) until a far transfer loads another."""
        if self.state != REAL:
            return
        c = self.vcpu
        regs = c.regs
        _, base, limit, _ = regs.table(R.GDTR)
        c.virtual_cpu.gdtr = (base, limit)
        _, base, limit, _ = regs.table(R.IDTR)
        c.virtual_cpu.idtr = (base, limit)
        c.virtual_cpu.iopl = (regs.read(R.EFLAGS) >> 12) & 3
        regs.write(R.CR0, self.hv_cr0)
        regs.set_table(R.IDTR, self.hv_idtr)
        self._set_ring(self.kernel_ring)
        c.set_guest_eflags(c.guest_eflags())  # the real IOPL of the kernel ring
        self.state = PM16
        self.from_real = True
        self._changed()

    def code_segment_loaded(self, hi: int | None) -> None:
        """The hypervisor loaded CS (a far transfer, an event, iret): its descriptor's D bit decides
        between translation and PM16."""
        if self.state == REAL:
            return
        self.from_real = False
        new = None if hi is None or hi >> 22 & 1 else PM16
        if new != self.state:
            self.state = new
            self._changed()

    def cs_base(self) -> int:
        """The base in the engine's CS cache (16-bit code need not be flat)."""
        c = self.vcpu
        _, cptr, segs, _ = c._direct
        _uclib.uc_context_save(c.uc._uch, cptr)
        return segs[_CS].base & 0xFFFFFFFF

    def emulate_trap(self, eip: int) -> bool:
        """A #GP at ring 1 in PM16 code at offset `eip`: emulate it if it is a privileged instruction
        (decoded as 16-bit code at its linear address). False: a real #GP, for the guest."""
        c = self.vcpu
        linear = (self.cs_base() + eip) & 0xFFFFFFFF
        d = c.decode(linear)
        if d is None or not trapped(d[1], d[2]):
            return False
        c.left_block_at(linear)
        c.emulate_at(linear, d)
        if linear != eip and c.regs.read(R.EIP) == (linear + d[0]) & 0xFFFFFFFF:
            c.regs.write(R.EIP, (eip + d[0]) & 0xFFFFFFFF)  # skipped: an offset in CS again
        return True

    # -- the engine's CPL ---------------------------------------------------------------------------------
    def _set_ring(self, ring: int) -> None:
        """CPL (QEMU's hflags), the DPL of the CS and SS caches and their selectors' RPL; base and limit
        kept. (So `mov ax, cs` in 16-bit protected mode shows RPL 1: the ring-compression hole.)"""
        c = self.vcpu
        _, cptr, segs, hflags = c._direct
        h = c.uc._uch
        _uclib.uc_context_save(h, cptr)
        for i in (_CS, _SS):
            segs[i].flags = (segs[i].flags & ~_DPL) | ring << 13
            segs[i].selector = (segs[i].selector & ~3) | ring  # RPL = CPL, as the checks expect
        hflags.value = (hflags.value & ~3) | ring
        _uclib.uc_context_restore(h, cptr)
        c._loaded.clear()  # the caches are no longer what hv_load last wrote

    def _changed(self) -> None:
        c = self.vcpu
        self.transitions += 1
        if c.rt.fast is not None:
            c.rt.fast.enabled = self.state is None  # callout slots are the translator's only then
        c._decoded.clear()  # the same bytes decode otherwise in 16-bit code
        c.mmu.crs = None
        c._rtlb.clear()
        c.uc.ctl(UC_CTL_TLB_FLUSH, UC_CTL_IO_WRITE)


class RunsCode16(_VcpuBase):
    """What a deprivileging vCPU overrides to run 16-bit code in place (full's FullVcpu: it sets
    `direct16`, a Direct16, and adds WANTED to its intercepts). Placed before DeprivilegedVcpu in
    the bases."""

    direct16: Direct16

    CODE16 = True  # the core accepts 16-bit code segments (cpu/deprivilege.load_cs_ss)
    _cs16 = None

    def vcpl(self) -> int:
        d = self.direct16
        if d.state == REAL or (d.state == PM16 and d.from_real):
            return 0  # real mode has no CPL; PE set from it leaves CS at DPL 0
        return super().vcpl()

    def write_cr(self, n: int, value: int) -> None:
        if n == 0 and self.direct16.supported and (not value & 1 or self.direct16.state == REAL):
            if value & (1 << 31) and not value & 1:
                raise GuestFault(Vector.GP, 0)  # PG without PE
            self.direct16.write_cr0(value)
            return
        super().write_cr(n, value)

    def hv_load(self, loads, ring=None, desc=None) -> None:
        super().hv_load(loads, ring, desc)
        if any(reg == R.CS for reg, _, _ in loads):
            cs = self._loaded.get(R.CS)
            self.direct16.code_segment_loaded(cs[2] if cs is not None else None)

    def _cs(self):
        if self.direct16.state is None:
            return super()._cs()
        if self._cs16 is None:
            self._cs16 = Cs(CS_ARCH_X86, CS_MODE_16)
        return self._cs16

    def io_gate(self, address: int, size: int, mnem: str, ops: str) -> None:
        """The intercept hook: in/out (the core's I/O gate), and in real mode `mov` to/from a control
        or debug register, `lmsw`, `clts`, `rdmsr` and `wrmsr`, which the engine would run at its
        CPL 0: emulated against the virtual CPU (setting PE leaves real mode). Elsewhere they fault at
        ring 1 or 3 as usual. `smsw` with a 32-bit register: all of the virtual CR0."""
        if mnem == "smsw":
            self.smsw_site(address, size)
            return
        if mnem in WANTED:
            if self.direct16.state == REAL and (mnem in REAL_EMULATED or "cr" in ops or "dr" in ops):
                self.emulate_at(address)
                if self.direct16.state == REAL:
                    self.regs.write(R.CR0, self.virtual_cpu.cr0)  # the engine runs real mode on the guest's CR0
            return
        super().io_gate(address, size, mnem, ops)

    def memory_operand(self, eip: int) -> int:
        """The linear address of a 16-bit instruction's memory operand (emulated in real mode or
        PM16): 16-bit addressing and the segment's base, which 16-bit code rarely has flat."""
        if self.direct16.state is None:
            return super().memory_operand(eip)
        from cpuvirt.cpu.ssealign import operand_linear

        segs = self.engine_segments()
        code = self.mmu.fetch_bytes(eip, 15)
        addr = operand_linear(code, False, self.regs, segs.base) if segs is not None and code else None
        if addr is None:
            raise Unsupported(f"cannot find the memory operand of the instruction at {eip:#x}")
        return addr

    def deliver(self, vector, return_eip, error_code=None, soft=False, external=False, fault_eip=None):
        if self.direct16.state == REAL:
            # the IVT the guest loaded natively (lidt in real mode) is the one interrupts use
            _, base, limit, _ = self.regs.table(R.IDTR)
            self.virtual_cpu.idtr = (base, limit)
        super().deliver(vector, return_eip, error_code, soft, external, fault_eip)
