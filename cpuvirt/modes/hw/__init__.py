"""Mode `hw`: the unmodified guest at ring 0 in simulated VMX non-root operation (Intel VT-x).

`vmcs.py` holds the VMCS, `exits.py` the exit reasons and exit-information encodings, `controls.py`
the execution controls by their SDM names, `vmx.py` the processor (when it exits, VM entry and its
checks, event injection) and `handlers.py` the root-mode hypervisor, organised as KVM's VMX code is.
"""

from __future__ import annotations

from cpuvirt.modes.base import Mode
from cpuvirt.modes.hw.controls import VmxSettings
from cpuvirt.modes.hw.vmx import VmxCpu


class HwMode(Mode):
    name = "hw"
    description = "ring 0 in simulated VMX non-root operation: VM exits, VMCS controls, EPT (or shadow paging)"
    vcpu: VmxCpu

    def __init__(
        self, machine, trace=None, max_insns: int = 0, vmx: list[str] | None = None, ept: bool = True, dump_on=None
    ):
        # Without EPT (--no-ept, or --vmx enable_ept=0) guest memory is virtualized by shadow paging.
        settings = VmxSettings(vmx, ept=ept)
        self.machine = machine
        self.settings = settings
        self.vcpu = VmxCpu(machine, settings, trace=trace, max_insns=max_insns, dump_on=dump_on)

    @property
    def shadow(self):
        """The shadow pager when EPT is off (--no-ept), else None."""
        return self.vcpu.shadow

    def boot(self) -> None:
        self.vcpu.guest_entry()

    def run(self, entry: int):
        self.vcpu.install_fast_events()
        return super().run(entry)

    def summary_stats(self) -> list[tuple[str, int, int, float, float]]:
        return self.vcpu.summary_stats()
