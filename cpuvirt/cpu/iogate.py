"""The fourth floor of the deprivileging core: the I/O privilege check the engine does not do.

The engine never faults in/out, so at CPL 3 (virtual-8086 mode included) a code hook before every
in/out/ins/outs (`io_gate`) checks the virtual IOPL, then the guest TSS's I/O permission bitmap
(ioperm.py), and delivers #GP(0) instead of the access. Port I/O at virtual CPL 0 is a trap event,
then the device model (`port_io`, `kernel_port_io`).
"""

from __future__ import annotations

from cpuvirt.cpu.guestview import GuestViewVcpu
from cpuvirt.cpu.vcpu import Vcpu
from cpuvirt.engine import regs as R
from cpuvirt.engine.hooks import hook_guard
from cpuvirt.x86.vectors import Vector


class IoGateVcpu(GuestViewVcpu):
    """Port I/O checked against the guest's I/O privilege (module docstring)."""

    def __init__(self, machine, trace=None, max_insns: int = 0):
        super().__init__(machine, trace=trace, max_insns=max_insns)
        self._io_site_once: tuple[int, int] | None = None

    def port_io(self, port: int, size: int, is_in: bool, value: int = 0) -> int:
        """Port I/O: the engine checks no I/O privilege, so it is done here. At virtual CPL 0 it is a
        trap (recorded, then done by the device model); above the virtual IOPL the code hook
        (`io_gate`) has already raised #GP unless the TSS bitmap grants the ports (then the access
        is done), so only an I/O that slipped past it is dropped here."""
        cpl = self.vcpl()
        if cpl == 0:
            return self.kernel_port_io(port, size, is_in, value)
        if cpl > self.virtual_cpu.iopl and not self._bitmap_grants(port, size):
            self.record(
                "unhandled_io",
                "IN" if is_in else "OUT",
                None,
                self.io_site()[0],
                {"port": f"{port:#x}", "size": size, "cpl": cpl, "iopl": self.virtual_cpu.iopl},
                "above IOPL and missed by the I/O gate: not performed (no #GP delivered)",
            )
            return (1 << (8 * size)) - 1 if is_in else 0
        try:
            return super().port_io(port, size, is_in, value)
        finally:
            self._io_site_once = None

    def _bitmap_grants(self, port: int, size: int) -> bool:
        """Does the guest TSS's I/O bitmap grant the ports (cpu/ioperm.py, the gate's own check)?"""
        from cpuvirt.cpu.ioperm import io_permitted

        return io_permitted(self.view, port, size)

    def kernel_port_io(self, port: int, size: int, is_in: bool, value: int = 0) -> int:
        """Port I/O at virtual CPL 0 (the caller knows the CPL: full mode's callouts): a trap event,
        then the device model."""
        if self.trace is not None:
            site = self.io_site()
            self._io_site_once = site  # the io event that follows names the same site
            self.record(
                self.event_kind,
                "in" if is_in else "out",
                None,
                site[0],
                {"port": f"{port:#x}", "size": size},
                "emulated: port I/O through the device model",
            )
        else:
            self.tally(self.event_kind, "in" if is_in else "out")
        try:
            return super().port_io(port, size, is_in, value)
        finally:
            self._io_site_once = None

    @hook_guard(returns=0)
    def timed_in(self, port: int, size: int) -> int:
        """The kernel's `in` (real ring 1: virtual CPL 0) once the C hook spent its time
        (install_io_sites): kernel_port_io without a trace."""
        if self.outcome is None:
            self._counts[self.event_kind] += 1
            self._reasons[self.event_kind, "in"] += 1
        return Vcpu.timed_in.__wrapped__(self, port, size)

    @hook_guard()
    def timed_out(self, port: int, size: int, value: int) -> None:
        """The kernel's `out`, as timed_in."""
        if self.outcome is None:
            self._counts[self.event_kind] += 1
            self._reasons[self.event_kind, "out"] += 1
        Vcpu.timed_out.__wrapped__(self, port, size, value)

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
            self.record(
                "exception",
                "#GP",
                13,
                address,
                {"vector": 13, "error_code": 0, "why": "I/O above IOPL"},
                "delivered through the guest IDT",
            )
            # the return EIP is the offset in CS (the hook's address is linear: V86 and real mode differ)
            self.deliver(Vector.GP, self.regs.read(R.EIP), 0)

    def enable_io_gate(self) -> None:
        """Put a code hook on every in/out the guest runs (blocks are checked as they are translated)."""
        from cpuvirt.cpu.intercept import Intercepts

        wanted = frozenset(
            (
                "in",
                "out",
                "insb",
                "insw",
                "insd",
                "outsb",
                "outsw",
                "outsd",
                "rep insb",
                "rep insw",
                "rep insd",
                "rep outsb",
                "rep outsw",
                "rep outsd",
            )
        )
        self.enable_intercepts(wanted, self.io_gate)
        assert isinstance(self.intercepts, Intercepts)
