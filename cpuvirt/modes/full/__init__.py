"""Mode `full`: VMware-style binary translation of the guest kernel (Adams & Agesen 2006; docs/binary-translation.md).

The guest kernel (virtual CPL 0) never runs in place: its code is translated block by block into a
translation cache (cpuvirt/bt) in hypervisor memory and runs from there at ring 1, with real IOPL 1 so
that cli/sti/popf act natively on the real IF, which carries the virtual IF. Guest user code (CPL 3)
runs directly. What the translator cannot leave native becomes a callout into this hypervisor, which
emulates it through the shared deprivileging core (cpu/deprivilege.py).

The TC is reached through a linear window (TC_WINDOW) that the TLB-fill hook serves only to fetches at
CPL 1: any read or write there, and any access at CPL 3, is served from the guest's own mapping, as if
the window were not there. Translated code never reads the TC as data.

The package, a module per job: `vcpu.py` the vCPU (the TC window and its fill, entering translated
code, where the guest was when the engine stopped), `callouts.py` the emulation of the instructions
the translator hands out (cpuid, int n, in/out, rdtsc...), `coherence.py` keeping translations true
to the guest's code and virtual-CPU state, `adaptive.py` adaptive BT's stores; the translator and the
translation cache themselves are in cpuvirt/bt.
"""

from __future__ import annotations

import ctypes

from cpuvirt.bt.direct import WANTED
from cpuvirt.bt.tcache import TC_SIZE
from cpuvirt.memory.shadowmirror import ShadowFastFill
from cpuvirt.modes.base import Mode
from cpuvirt.modes.full.adaptive import ADAPTIVE_THRESHOLD
from cpuvirt.modes.full.coherence import CODE
from cpuvirt.modes.full.deliverfast import FullFaults
from cpuvirt.modes.full.evfast import FullEvVirtualCpu
from cpuvirt.modes.full.vcpu import TC_WINDOW, FullVcpu

__all__ = ["ADAPTIVE_THRESHOLD", "CODE", "TC_WINDOW", "FullMode", "FullVcpu"]


class FullMode(Mode):
    name = "full"
    description = "binary translation: kernel code translated into a TC at ring 1, user code direct"
    vcpu: FullVcpu

    def __init__(self, machine, trace=None, max_insns: int = 0, verbose: bool = False, observer=None):
        """`verbose`: record a `translate` event per block; `observer(mode)`: called once built (the
        `bt` verb and tests look at the translation cache after the run)."""
        self.machine = machine
        self.vcpu = FullVcpu(machine, trace=trace, max_insns=max_insns, verbose=verbose)
        if observer is not None:
            observer(self)
        fill = ShadowFastFill.install(machine.mmu)  # before Mmu.fill's hook: the shadow's hits in C
        faults = FullFaults.install(machine.uc)  # after it, before Mmu.fill's: the common true #PF in C
        self.vcpu.install_hooks()
        self.vcpu.enable_io_gate()
        assert self.vcpu.intercepts is not None  # the I/O gate made them
        self.vcpu.intercepts.wanted |= WANTED  # real mode's way out (bt/direct.py)
        self.vcpu.watch_in_place_code()  # hypervisor stores into code run in place (inplace.py)
        from cpuvirt.memory.shadow import ShadowPaging

        self.shadow = ShadowPaging(machine.mmu)  # installs itself as the memory strategy
        self.shadow.attach(self.vcpu)
        self.vcpu.install_delivery(self.shadow)  # the common deliveries in C (deliverfast.py)
        vcpu = self.vcpu.virtual_cpu
        if fill is not None and isinstance(vcpu, FullEvVirtualCpu):  # the virtual CRs are in its table
            fast = self.vcpu.rt.fast  # (FullEvVirtualCpu: the callout table exists)
            if fill.follow(self.shadow, vcpu.crs_addresses(), TC_WINDOW) and fast is not None:
                fill.take_misses(self.shadow)  # the common hidden faults too
                table = fast.table
                on = ctypes.addressof(table) + type(table).enabled.offset  # 0 while 16-bit code runs in place
                fill.serve_tc(TC_WINDOW, TC_WINDOW + TC_SIZE, self.vcpu.tc_hpa, on)
                if faults is not None:
                    faults.attach(self.vcpu, self.vcpu.fdeliver, fill, self.shadow)
                    self.vcpu.pf_fast = faults

    def translation_stats(self) -> dict:
        """The translation cache's counters, for `run --stats` (runner.RunResult.mmu["translation"])."""
        return self.vcpu.stats()

    def boot(self) -> None:
        vcpu, mmio = self.vcpu, self.machine.mmio
        inner = mmio.on_access
        if inner is not None:
            # The MMIO trace finds the accessing instruction by decoding the running engine block,
            # which is TC code: let it read the TC while it does (see FullVcpu.fetch_bytes).
            def on_access(*args):
                vcpu._mmio_decode = True
                try:
                    return inner(*args)
                finally:
                    vcpu._mmio_decode = False

            mmio.on_access = on_access
        self.vcpu.deprivilege()
        self.vcpu._vsnap = self.vcpu._snapshot()
        if self.vcpu.evfast is not None:
            self.vcpu.evfast.snapshot(self.vcpu._vsnap)
