"""Mode `trap`: naive trap-and-emulate (docs/deprivileging.md).

The guest kernel runs in place at ring 1 (cpu/deprivilege.py). What faults there (privileged
instructions: #GP from the engine, EIP at the instruction) is emulated against the virtual CPU;
port I/O is checked against the virtual CPL/IOPL in the I/O path (the engine checks nothing). What
does not fault at ring 1 (popf, pushf, sgdt, sidt, sldt, str, smsw, mov from cs, push cs, lar, lsl,
verr, verw) runs natively and shows the truth of ring 1: Popek & Goldberg's x86 holes, on purpose.
"""

from __future__ import annotations

from cpuvirt import limits
from cpuvirt.cpu.deprivilege import SHADOW_GDT_WINDOW, DeprivilegedVcpu
from cpuvirt.cpu.virtualcpu import SREGS
from cpuvirt.memory.shadow import ShadowPaging
from cpuvirt.memory.shadowmirror import ShadowFastFill
from cpuvirt.modes.base import Mode
from cpuvirt.modes.trapfast import TrapFast, TrapStores, enabled_by_environment
from cpuvirt.x86.privilege import CPL0_ONLY, FAR_TRANSFERS, IOPL_SENSITIVE
from cpuvirt.x86.vectors import Vector


class TrapVcpu(DeprivilegedVcpu):
    event_kind = "trap"
    fast: TrapFast | None = None  # the common traps in C (trapfast.py), once TrapMode installed it

    def __init__(self, machine, trace=None, max_insns: int = 0):
        super().__init__(machine, trace=trace, max_insns=max_insns)
        self._sites: dict[int, tuple] = {}

    def on_engine_event(self, intno, error_code, soft, eip) -> None:
        """A #GP at ring 1 is the guest kernel's privileged instruction: emulate it; every other event
        (and a #GP that is not one) goes to the guest through its IDT."""
        if intno == Vector.GP and not soft and self.vcpl() == 0:
            d = self._trap_site(eip)
            if d is not None:
                self._retired(eip, d[0])
                self.emulate_at(eip, d)
                if self.fast is not None:
                    self.fast.after_python(self._reasons)
                return
        self.left_block_at(eip)
        self._deliver_engine_event(intno, error_code, soft, eip)
        if self.fast is not None:
            self.fast.after_python(self._reasons)
            self.fast.seen_delivery(intno, soft)

    def _trap_site(self, eip: int):
        """The decoded instruction at eip if a #GP there is a trap to emulate, else None; decided once
        per (site, code bytes). The bytes are read as for disassembly (Mmu.fetch_bytes: no side effect,
        not in the walk counters): the engine has just fetched them; the C path reads them so too."""
        code = self.mmu.fetch_bytes(eip, 15)
        site = self._sites.get(eip)
        if site is None or site[0] != code:
            d = self.decode(eip, code)
            site = (code, d if d is not None and _trapped(d[1], d[2]) else None)
            limits.put(self._sites, eip, site)
        return site[1]

    def _retired(self, eip: int, size: int) -> None:
        """The emulated instruction retires, once: the rest of the running block did not. The engine
        cuts a block short at an instruction that faults at translation time (lgdt at CPL 1, before
        its displacement is read), so the clock may not have counted the instruction itself."""
        entry = self.machine.block_insns.get(self.clock.last_block)
        if entry is None:
            return
        addrs, end = entry
        n = sum(1 for a in addrs if a > eip) if addrs[0] <= eip < end else 0
        if eip not in addrs:
            n -= 1
        if n:
            self.clock.unretire(n)


_TRAPPED = CPL0_ONLY | IOPL_SENSITIVE | FAR_TRANSFERS


def _trapped(mnem: str, ops: str) -> bool:
    """Is this #GP at ring 1 a privileged instruction trap-and-emulate handles (vs a real guest #GP)?"""
    if mnem in _TRAPPED:
        return True
    first = ops.split(",")[0].strip()
    if mnem == "mov":
        return "cr" in ops or "dr" in ops or (first in SREGS and first != "cs")
    return mnem == "pop" and first in SREGS and first != "cs"


class TrapMode(Mode):
    name = "trap"
    description = "naive trap-and-emulate: the kernel in place at ring 1; the x86 holes go unseen"
    vcpu: TrapVcpu

    def __init__(self, machine, trace=None, max_insns: int = 0):
        self.machine = machine
        self.vcpu = TrapVcpu(machine, trace=trace, max_insns=max_insns)
        self.shadow = ShadowPaging(machine.mmu)  # installs itself as the memory strategy
        self.shadow.attach(self.vcpu)
        fill = ShadowFastFill.install(machine.mmu)  # before Mmu.fill's hook: the shadow's hits in C
        stores = TrapStores.install(machine.uc) if enabled_by_environment() else None  # ptemods: before it too
        self.vcpu.install_hooks()
        self.vcpu.enable_io_gate()
        if enabled_by_environment():
            self.vcpu.fast = self.vcpu.c_delivery = TrapFast.install(self.vcpu, self.shadow)  # cli/sti... in C
        if fill is not None and self.vcpu.fast is not None:  # the virtual CRs are in its table
            if fill.follow(self.shadow, self.vcpu.fast.crs_addresses(), SHADOW_GDT_WINDOW):
                fill.take_misses(self.shadow)  # the common hidden faults too
                if stores is not None:
                    stores.attach(self.vcpu.fast, fill, self.shadow)
        # In C (cpu/iosites.py): the I/O gate's sites at real rings 0-2 (it checks only ring 3), and
        # the kernel's accesses (real ring 1, virtual ring 0: a trap event each) timed there.
        self.vcpu.install_io_sites(0b0111, 0b0010)
        if self.vcpu.fast is not None:
            self.vcpu.fast.install_iret_sites()  # after the I/O gate's: the common iretd site in C

    def run(self, entry: int):
        self.vcpu.time_port_io_in_c()  # the kernel's in/out: their time in C (none with a trace)
        return super().run(entry)

    def boot(self) -> None:
        """The loader left ring 0: drop the guest kernel to ring 1 under its virtual CPU."""
        self.vcpu.deprivilege()
