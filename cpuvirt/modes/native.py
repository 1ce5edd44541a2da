"""Mode `native`: the guest kernel at ring 0 on the bare simulated PC, with no hypervisor between.

It is the reference every other mode is compared with, for console output and for speed: the guest's
own page tables are walked over a flat p2m, devices are reached through I/O hooks, and events go
through the guest's IDT exactly as the CPU would deliver them.
"""

from __future__ import annotations

from cpuvirt.cpu.fastdelivery import FastDelivery
from cpuvirt.cpu.vcpu import IO_INSTRUCTIONS, Vcpu
from cpuvirt.memory.fastfill import FastFill
from cpuvirt.modes.base import Mode


class NativeMode(Mode):
    name = "native"
    description = "ring 0 on the bare simulated PC (the reference)"

    def __init__(self, machine, trace=None, max_insns: int = 0):
        self.machine = machine
        self.vcpu = Vcpu(machine, trace=trace, max_insns=max_insns)
        FastFill.install(machine.mmu)  # first: common TLB fills in C, the rest in Mmu.fill
        self.fast = FastDelivery.install(self.vcpu.delivery)  # common deliveries through the IDT in C
        self.vcpu.install_hooks()
        # rdmsr/wrmsr of the MSRs the platform models (IA32_APIC_BASE) must reach the machine; the
        # engine would answer them itself. Only their sites get a hook.
        # in/out: the I/O permission check the engine does not make; mov to CR4: its reserved bits;
        # smsw: all of CR0 in a 32-bit register (the engine keeps the upper half).
        vcpu = self.vcpu

        def on_hit(address, size, mnem, ops):
            if mnem in IO_INSTRUCTIONS:
                vcpu.io_gate(address, size, mnem, ops)
            elif mnem == "mov":
                vcpu.cr4_gate(address, size, ops)
            elif mnem == "smsw":
                vcpu.smsw_site(address, size)
            else:
                vcpu.msr_instruction(address, size, mnem)

        self.vcpu.enable_intercepts(
            frozenset(("rdmsr", "wrmsr", "mov", "mov cr4", "smsw")) | IO_INSTRUCTIONS, on_hit, lazy_io=True
        )
        if self.fast is not None:
            self.fast.install_sites(self.vcpu)  # the common iret and mov to CR4 (nothing to do) in C

    def boot(self) -> None:
        """Nothing between the loader and the guest."""

    def run(self, entry: int):
        if self.fast is not None:
            # `int n` from the INTR hook to its handler without Python, unless a trace is being written
            # (it is attached after the mode is built, so this is decided here)
            self.fast.install_intr(self.vcpu)
        self.vcpu.time_port_io_in_c()  # in/out: the access's time spent in C, the device in Python
        return super().run(entry)
