"""Event delivery through the guest IDT, done by cpuvirt because Unicorn never does it.

SDM Vol. 3A chapter 6: interrupt and trap gates (6.11, 6.12.1), the privilege check for `int n`
(6.12.1.1), the stack switch through the TSS on a privilege change (6.12.1, 7.2.1), error codes
(6.13), and the double-fault / triple-fault rules of table 6-5 (6.15, interrupt 8); in real-address
mode (CR0.PE = 0), the interrupt vector table (20.1.4).
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from cpuvirt.cpu.faults import DeliveryFault, TripleFault  # noqa: F401  (re-exported)
from cpuvirt.engine import regs as R
from cpuvirt.memory.mmu import GuestPageFault, NestedFault
from cpuvirt.status import Unsupported  # noqa: F401  (re-exported: the modes import it from here)
from cpuvirt.x86.flags import EFLAGS_AC, EFLAGS_IF, EFLAGS_NT, EFLAGS_RF, EFLAGS_TF, EFLAGS_VM
from cpuvirt.x86.vectors import CONTRIBUTORY, HAS_ERROR_CODE, MNEMONIC, Vector  # noqa: F401  (re-exported)

if TYPE_CHECKING:
    from cpuvirt.cpu.tasks import CpuView

GATE_TASK, GATE_INT32, GATE_TRAP32 = 0x5, 0xE, 0xF


def _is_double_fault(first: int, second: int) -> bool:
    if first == Vector.PF:
        return second == Vector.PF or second in CONTRIBUTORY
    return first in CONTRIBUTORY and second in CONTRIBUTORY


class EventDelivery:
    """Pushes the frame and loads CS:EIP (and SS:ESP) the way the CPU would, then returns."""

    def __init__(self, uc, regs: R.Regs, mmu):
        self.uc = uc
        self.regs = regs
        self.mmu = mmu
        self.view: CpuView | None = None  # the vCPU's tasks.CpuView: task gates switch tasks through it
        self.fast = None  # the common case in C (cpu/fastdelivery.py), native mode only

    def deliver(
        self,
        vector: int,
        return_eip: int,
        error_code: int | None = None,
        soft: bool = False,
        external: bool = False,
        fault_eip: int | None = None,
    ) -> int:
        """Deliver one event, applying the #DF and triple-fault rules; returns the vector delivered.

        `fault_eip` is where a fault raised by the delivery itself returns to: the `int n`
        instruction for a software interrupt (its #GP is a fault), else `return_eip`.
        """
        if self.fast is not None and self.fast.deliver(vector, return_eip, error_code, soft, external):
            return vector
        try:
            self._deliver(vector, return_eip, error_code, soft, external)
            return vector
        except DeliveryFault as f:
            if fault_eip is not None:
                return_eip = fault_eip
            if f.eip is not None:
                return_eip = f.eip  # the fault belongs to the task switched to
            if vector == Vector.DF:
                raise TripleFault(f"{MNEMONIC.get(f.vector, f.vector)} while delivering #DF") from None
            if f.cr2 is not None:
                self._set_cr2(f.cr2)
            if _is_double_fault(vector, f.vector):
                return self.deliver(Vector.DF, return_eip, 0)
            return self.deliver(f.vector, return_eip, f.error_code if f.vector in HAS_ERROR_CODE else None)

    # -- where the processor state comes from and goes to: the real registers here; a deprivileging
    # -- monitor's virtual CPU in RingCompressedDelivery (cpu/deprivilege.py) --------------------------
    def _idt(self) -> tuple[int, int]:
        _, base, limit, _ = self.regs.table(R.IDTR)
        return base, limit

    def _tss(self) -> tuple[int, int, int]:
        selector, base, limit, _ = self.regs.table(R.TR)
        return selector, base, limit

    def _cpl(self) -> int:
        return self.regs.cpl()

    def _eflags(self) -> int:
        return self.regs.read(R.EFLAGS)

    def _view(self, selector: int) -> int:
        """The selector as the guest sees it (in a frame, in a comparison)."""
        return selector

    def _set_cr2(self, cr2: int) -> None:
        self.regs.write(R.CR2, cr2)

    def _enter(
        self, selector: int, new_ss: int | None, cpl: int, new_cpl: int, old_cs: int, esp: int, flags: int, offset: int
    ) -> None:
        """Load the handler's CS (and SS on a privilege change), ESP, EFLAGS and EIP."""
        regs = self.regs
        if new_ss is not None:
            self.load_stack_segment(new_ss & ~3 | new_cpl, cpl, new_cpl)
        regs.write(R.ESP, esp)
        if (old_cs & ~3) != (selector & ~3) or new_cpl != cpl:
            regs.write(R.CS, (selector & ~3) | new_cpl)
        regs.write(R.EFLAGS, flags)
        regs.write(R.EIP, offset)

    # -- one delivery attempt ----------------------------------------------------------------------
    def _read(self, gva: int, size: int) -> bytes:
        try:
            return self.mmu.read_linear(gva, size, user=False)
        except GuestPageFault as pf:
            raise DeliveryFault(Vector.PF, pf.error_code, pf.gva) from None
        except NestedFault:
            return b"\xff" * size  # guest-physical memory with nothing behind it (hw, EPT)

    def _write(self, gva: int, data: bytes) -> None:
        try:
            self.mmu.write_linear(gva, data, user=False)
        except GuestPageFault as pf:
            raise DeliveryFault(Vector.PF, pf.error_code, pf.gva) from None
        except NestedFault:
            pass  # dropped, as a write to unbacked memory is

    def _descriptor(self, selector: int, ext: int) -> tuple[int, int]:
        _, base, limit, _ = self.regs.table(R.LDTR if selector & 4 else R.GDTR)
        index = selector & ~7
        if index == 0 and not selector & 4:
            raise DeliveryFault(Vector.GP, ext)
        if index + 7 > limit:
            raise DeliveryFault(Vector.GP, (selector & ~3) | ext)
        return struct.unpack("<II", self._read(base + index, 8))

    def _real_mode(self) -> bool:
        return not self.regs.read(R.CR0) & 1

    def _deliver_real(self, vector: int, return_eip: int) -> None:
        """Real-address mode (SDM Vol. 3A 20.1.4): the IVT entry at IDTR.base + 4 * vector holds IP and
        CS; FLAGS, CS and IP are pushed as words at SS:SP; IF, TF, AC and RF are cleared. No error code."""
        regs = self.regs
        base, limit = self._idt()
        if vector * 4 + 3 > limit:
            raise DeliveryFault(Vector.GP, 0)
        ip, cs = struct.unpack("<HH", self._read(base + vector * 4, 4))
        sp = regs.read(R.ESP)
        new_sp = (sp - 6) & 0xFFFF
        flags = regs.read(R.EFLAGS)
        self._write(
            ((regs.read(R.SS) << 4) + new_sp) & 0xFFFFFFFF,
            struct.pack("<HHH", return_eip & 0xFFFF, regs.read(R.CS), flags & 0xFFFF),
        )
        regs.write(R.ESP, (sp & ~0xFFFF) | new_sp)
        regs.write(R.EFLAGS, flags & ~(EFLAGS_IF | EFLAGS_TF | EFLAGS_RF | EFLAGS_AC))
        regs.write(R.CS, cs)
        regs.write(R.EIP, ip)

    def _deliver(self, vector: int, return_eip: int, error_code: int | None, soft: bool, external: bool):
        regs = self.regs
        ext = 1 if external else 0
        if self._real_mode():
            self._deliver_real(vector, return_eip)
            return
        idt_base, idt_limit = self._idt()
        if vector * 8 + 7 > idt_limit:
            raise DeliveryFault(Vector.GP, vector * 8 + 2 + ext)
        lo, hi = struct.unpack("<II", self._read(idt_base + vector * 8, 8))
        gate_type = (hi >> 8) & 0x1F
        gate_dpl = (hi >> 13) & 3
        cpl = self._cpl()
        if gate_type == GATE_TASK:
            if soft and gate_dpl < cpl:
                raise DeliveryFault(Vector.GP, vector * 8 + 2)
            if not hi & 0x8000:
                raise DeliveryFault(Vector.NP, vector * 8 + 2 + ext)
            self._task_gate(lo >> 16, return_eip, error_code, ext)
            return
        if gate_type not in (GATE_INT32, GATE_TRAP32):
            raise DeliveryFault(Vector.GP, vector * 8 + 2 + ext)
        if soft and gate_dpl < cpl:
            raise DeliveryFault(Vector.GP, vector * 8 + 2)
        if not hi & 0x8000:
            raise DeliveryFault(Vector.NP, vector * 8 + 2 + ext)
        selector = lo >> 16
        offset = (lo & 0xFFFF) | (hi & 0xFFFF0000)
        _, dhi = self._descriptor(selector, ext)
        if not (dhi >> 11) & 1 or not (dhi >> 12) & 1:  # must be a code segment
            raise DeliveryFault(Vector.GP, (selector & ~3) | ext)
        code_dpl = (dhi >> 13) & 3
        if code_dpl > cpl:
            raise DeliveryFault(Vector.GP, (selector & ~3) | ext)
        if not dhi & 0x8000:
            raise DeliveryFault(Vector.NP, (selector & ~3) | ext)
        conforming = (dhi >> 10) & 1
        new_cpl = cpl if conforming else code_dpl

        eflags = self._eflags()
        v86 = bool(eflags & EFLAGS_VM)
        if v86 and new_cpl != 0:
            # From virtual-8086 mode only to a ring-0 handler (SDM 6.12.1, interrupt from V86 mode).
            raise DeliveryFault(Vector.GP, (selector & ~3) | ext)
        old_cs = regs.read(R.CS) if v86 else self._view(regs.read(R.CS))
        frame = [return_eip, old_cs, eflags]  # pushed in this order: EIP lowest
        if v86:
            # The V86 frame also holds the real-mode segment values, which the handler gets null.
            new_ss, new_esp = self._stack_from_tss(0, ext)
            frame += [regs.read(R.ESP), regs.read(R.SS)] + [regs.read(r) for r in (R.ES, R.DS, R.FS, R.GS)]
            esp = new_esp
        elif new_cpl < cpl:
            new_ss, new_esp = self._stack_from_tss(new_cpl, ext)
            frame += [regs.read(R.ESP), self._view(regs.read(R.SS))]
            esp = new_esp
        else:
            new_ss = None
            esp = regs.read(R.ESP)
        if error_code is not None:
            frame.insert(0, error_code)
        data = struct.pack(f"<{len(frame)}I", *frame)
        esp = (esp - len(data)) & 0xFFFFFFFF
        self._write(esp, data)

        new_flags = eflags & ~(EFLAGS_TF | EFLAGS_NT | EFLAGS_RF | EFLAGS_VM)
        if gate_type == GATE_INT32:
            new_flags &= ~EFLAGS_IF
        if v86:
            # Out of V86 first: segment loads are protected-mode ones again.
            regs.write(R.EFLAGS, regs.read(R.EFLAGS) & ~EFLAGS_VM)
        self._enter(selector, new_ss, cpl, new_cpl, old_cs, esp, new_flags, offset)
        if v86:
            for reg in (R.ES, R.DS, R.FS, R.GS):
                regs.write(reg, 0)

    def _stack_from_tss(self, dpl: int, ext: int) -> tuple[int, int]:
        """SS:ESP for ring `dpl` from the current TSS, with the checks of SDM 6.12.1 (#TS, #SS)."""
        tr_sel, tss_base, tss_limit = self._tss()
        slot = 4 + 8 * dpl
        if slot + 5 > tss_limit:
            raise DeliveryFault(Vector.TS, (tr_sel & ~3) | ext)
        new_esp, new_ss = struct.unpack("<IH", self._read(tss_base + slot, 6))
        if new_ss & ~3 == 0:
            raise DeliveryFault(Vector.TS, ext)
        try:
            _, hi = self._descriptor(new_ss, ext)
        except DeliveryFault as f:
            raise DeliveryFault(Vector.TS, (new_ss & ~3) | ext) if f.vector == Vector.GP else f from None
        if (new_ss & 3) != dpl or (hi >> 13) & 3 != dpl or not hi & (1 << 12) or hi & (1 << 11) or not hi & (1 << 9):
            raise DeliveryFault(Vector.TS, (new_ss & ~3) | ext)
        if not hi & 0x8000:
            raise DeliveryFault(Vector.SS, (new_ss & ~3) | ext)
        return new_ss, new_esp

    def _task_gate(self, tss: int, return_eip: int, error_code: int | None, ext: int) -> None:
        """An IDT task gate: a task switch (SDM 6.11, 7.3), then the error code, if any, is pushed on
        the new task's stack."""
        from cpuvirt.cpu import tasks

        view = self.view
        if view is None:
            raise Unsupported("task gates in this mode")
        view.vcpu.switch_task(view, tss, tasks.INT, return_eip, ext)
        if error_code is not None:
            tasks.push_error_code(view, error_code)

    def load_stack_segment(self, ss: int, cpl: int, new_cpl: int) -> None:
        """Load SS for a more privileged ring from a hook.

        The engine checks SS.RPL against the CPL it holds, still the old one: the CPL in the engine's
        flags and SS's selector are made the new ring's first (FaultState.set_cpl; the selector so that
        the TLB-fill hooks take the load's descriptor accesses as the supervisor accesses they are),
        and the SS load then gives SS its descriptor. (Clearing CR0.PE for a real-mode load instead,
        as cpuvirt did before, flushed the engine's whole TLB at every ring change: the handler's and
        then the interrupted code's pages were filled again on every system call.)
        """
        if new_cpl < cpl and self.view is not None:
            self.view.vcpu.faults.set_cpl(new_cpl, ss)
        self.regs.write(R.SS, ss)
