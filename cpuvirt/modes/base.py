"""The Mode contract: what a virtualization mode supplies to the runner (runner.py calls only this).

A mode is a strategy over the same machine, vCPU core and memory module. Built as
`Mode(machine, trace=None, max_insns=0, **options)` (the options are its own: `vmx=`, `ept=` for hw,
`verbose=` for full...), it installs its vCPU's hooks and its memory strategy; the runner then loads
the image, calls `set_image` and `boot`, and `run` until an Outcome (cpu/vcpu.py; its `status` is one
of status.Status or the guest's debug-exit value).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from cpuvirt.cpu.vcpu import Outcome, Vcpu
    from cpuvirt.machine.machine import Machine
    from cpuvirt.memory.shadow import ShadowPaging
    from cpuvirt.modes.hw.controls import VmxSettings


class Mode(ABC):
    name: ClassVar[str]  # as given to --mode
    description: ClassVar[str]  # one line for `cpuvirt modes`

    machine: Machine  # the Machine it runs on (machine/machine.py)
    vcpu: Vcpu  # its Vcpu (cpu/vcpu.py) or a subclass: the run loop and exit handlers
    shadow: ShadowPaging | None = None  # the shadow pager (memory/shadow.py) when the mode uses one
    settings: VmxSettings | None = None  # hw: its VMX controls, recorded in the trace header

    def set_image(self, image, boot) -> None:
        """Where the loader placed the image and boot information, before boot() (para puts its
        start pages above them). Most modes need nothing."""

    @abstractmethod
    def boot(self) -> None:
        """Between the loader and the guest's first instruction (trap/full: deprivilege the kernel;
        hw: the first VM entry; para: the PV start pages)."""

    def run(self, entry: int) -> Outcome:
        """Run the guest from `entry` to its Outcome."""
        return self.vcpu.run(entry)

    def translation_stats(self) -> dict | None:
        """full: the translation cache's counters (`run --stats`)."""
        return None

    def summary_stats(self) -> list[tuple[str, int, int, float, float]]:
        """Rows the summary prints after a run (hw: exits by reason)."""
        return []
