"""The PV vCPU: the run loop of Vcpu with Xen's event model instead of the hardware IDT.

`int 0x82` from ring 1 is a hypercall, dispatched inside the interrupt hook without stopping the
engine. Exceptions and `int n` are "bounced" through the guest's virtual trap table (set_trap_table)
with a hardware-like frame at ring 1; event-channel upcalls go to the set_callbacks address when
evtchn_upcall_pending and not evtchn_upcall_mask. While an event waits behind the mask, the shared-info
frame is write-traced, so the store that clears the mask is emulated and the upcall follows it at once
(the mask is para's IF, and it is not polled either).
"""

from __future__ import annotations

import ctypes
import struct
from typing import TYPE_CHECKING

from unicorn.unicorn_py3 import unicorn as _ucmod

from cpuvirt.cpu.vcpu import EXIT_BUDGET, EXIT_ERROR, EXIT_HALTED, EXIT_HYPERVISOR_STOP, Vcpu
from cpuvirt.engine import regs as R
from cpuvirt.engine.clock import NEVER
from cpuvirt.memory.direct import Refused
from cpuvirt.memory.mmu import GuestPageFault
from cpuvirt.modes.para.events import VIRQ_TIMER, EventChannels
from cpuvirt.modes.para.hypercalls import ENTRY_CYCLES, HYPERCALL_CYCLES, HYPERCALLS
from cpuvirt.x86.flags import EFLAGS_IF, EFLAGS_NT, EFLAGS_RF, EFLAGS_TF, EFLAGS_VM
from cpuvirt.x86.privilege import CPL0_ONLY, IO, IOPL_SENSITIVE
from cpuvirt.x86.vectors import HAS_ERROR_CODE, MNEMONIC
from cpuvirt.xen import EFAULT, EPERM

if TYPE_CHECKING:
    from cpuvirt.modes.para.pvfast import PvFast

HYPERCALL_VECTOR = 0x82
_IO = ("in", "out", "insb", "insw", "insd", "outsb", "outsw", "outsd")
IO_MNEMONICS = frozenset(_IO + tuple("rep " + m for m in _IO if m[-1] in "bwd" and m not in ("in", "out")))
PRIVILEGED = CPL0_ONLY | IOPL_SENSITIVE | IO | {"rdpmc", "mov", "iretd", "popfd"}
NOT_PV = (
    "privileged instruction in a guest that is not paravirtualized "
    "(run it with --mode native/trap/full/hw, or build its PV version)"
)


def _io_cpls(iopl: int) -> tuple[int, int]:
    """The real CPLs whose in/out the C I/O gate lets through at once (cpu/iosites.py), as masks for
    its sites and its port accesses: those at or below the granted IOPL (_io_allowed), none for 0."""
    from cpuvirt.cpu.iosites import cpls_up_to

    mask = cpls_up_to(iopl) if iopl else 0
    return mask, mask


class ParaVcpu(Vcpu):
    def __init__(self, machine, paging, trace=None, max_insns: int = 0):
        super().__init__(machine, trace=trace, max_insns=max_insns)
        self.paging = paging
        self.events: EventChannels | None = None  # once the shared-info page exists (boot)
        self.hypercall_va = 0
        self.trap_table: dict[int, tuple[int, int, int]] = {}
        self.trap_table_set = False
        self.pv_fast: PvFast | None = None  # the common events in C (install_hooks)
        self._kernel_stack: tuple[int, int] | None = None
        self.event_callback: tuple[int, int] | None = None
        self.failsafe_callback = None
        self.timer: int | None = None
        self._iopl = 0  # physdev_op(set_iopl)
        self.shared_info_ma = 0  # set at boot, with events
        self._traced = False
        self._upcall_flag = ctypes.c_uint32(0)  # _in_upcall, where pvfast's C side reads and clears it
        self.detail: dict | None = None
        self.a = (0, 0, 0, 0, 0)  # EBX, ECX, EDX, ESI, EDI of the hypercall being handled
        ids = (R.EAX, R.CS, R.EBX, R.ECX, R.EDX, R.ESI, R.EDI, R.EFLAGS)
        self._batch = (ctypes.c_uint64 * 8)()
        self._batch_ids = (ctypes.c_int * 8)(*ids)
        self._batch_ptrs = (ctypes.c_void_p * 8)(*(ctypes.addressof(self._batch) + 8 * i for i in range(8)))
        self._read_batch = _ucmod.uclib.uc_reg_read_batch
        self._uch = self.uc._uch

    # -- hooks ---------------------------------------------------------------------------------
    def install_hooks(self) -> None:
        # the common events in C (modes/para/pvfast.py): its #PF hook goes before Mmu.fill's
        from cpuvirt.modes.para.pvfast import PvFast

        self.pv_fast = PvFast.prepare(self)
        super().install_hooks()
        # int 0x82 is a hypercall, anything else an event for the trap table.
        self.hooks.remove(self._intr_hook)
        self._intr_hook = self.hooks.intr(self._intr)
        # in/out never fault in the engine: hook every instance and make it a #GP unless granted.
        self.enable_intercepts(IO_MNEMONICS, self._io_instruction)
        # in/out within the granted IOPL (nothing for the gate to do) answered in C
        self.install_io_sites(*_io_cpls(self._iopl))
        if self.pv_fast is not None:
            self.pv_fast.install_sites()  # the iretd sites with nothing for para to do, in C

    # -- the state the C paths (pvfast.py) read too ------------------------------------------------------
    @property
    def kernel_stack(self) -> tuple[int, int] | None:
        """stack_switch's (ss, esp): the ring-1 stack of events from ring 3."""
        return self._kernel_stack

    @kernel_stack.setter
    def kernel_stack(self, value: tuple[int, int] | None) -> None:
        self._kernel_stack = value
        if self.pv_fast is not None:
            self.pv_fast.set_kernel_stack(value)

    @property
    def _in_upcall(self) -> bool:
        """From an upcall to the guest's next hypercall (its iret)."""
        return bool(self._upcall_flag.value)

    @_in_upcall.setter
    def _in_upcall(self, value: bool) -> None:
        self._upcall_flag.value = int(value)

    @property
    def _mask_traced(self) -> bool:
        """The shared-info frame is write-traced (an event waits behind the mask)."""
        return self._traced

    @_mask_traced.setter
    def _mask_traced(self, value: bool) -> None:
        self._traced = value
        if self.pv_fast is not None:
            self.pv_fast.set_traced(value)

    @property
    def iopl(self) -> int:
        """The IOPL granted by physdev_op(set_iopl): in/out at CPL <= it are allowed."""
        return self._iopl

    @iopl.setter
    def iopl(self, value: int) -> None:
        self._iopl = value
        if self.io_sites is not None:
            self.io_sites.cpls = _io_cpls(value)  # the C hooks decide by it from their next call

    def _intr(self, _uc, intno, _data) -> None:
        if intno != HYPERCALL_VECTOR:
            self.hook_intr(self.uc, intno, None)
            return
        self.hypercall()

    def hypercall(self) -> None:
        """int 0x82: EAX = number, EBX.. = arguments, EAX = result; EIP is already past the int.
        EAX, CS and the five argument registers come in one batched read (an engine call costs
        far more than the Python around it), and EAX goes back in one write."""
        regs = self.regs
        self._in_upcall = False
        self._read_batch(self._uch, self._batch_ids, self._batch_ptrs, 8)
        b = self._batch
        nr = b[0]
        self.a = (b[2], b[3], b[4], b[5], b[6])
        # the raw counters: the properties would fold in what C counted (pvfast.py) at every call
        self._counts["hypercall"] += 1
        self._reasons["hypercall", nr] += 1
        tracing = self.trace is not None
        if tracing:
            self.detail = {}
        entry = HYPERCALLS.get(nr)
        result: int | None
        self.paging.work = 0
        self.clock.advance(HYPERCALL_CYCLES)
        if b[1] & 3 != 1 or b[7] & EFLAGS_VM:
            # Only the kernel (ring 1) may call the hypervisor: in V86 mode CPL is 3 whatever CS says.
            result = -EPERM
            if tracing:
                self.refused("hypercall from ring 3" if not b[7] & EFLAGS_VM else "hypercall from V86 mode")
        elif entry is None:
            result = -38
        else:
            try:
                result = entry[1](self)
            except Refused as r:
                result = -r.errno
                if tracing:
                    self.refused(r.why)
        if result is not None:
            regs.write(R.EAX, result & 0xFFFFFFFF)
        if self.paging.work:
            self.clock.advance(ENTRY_CYCLES * self.paging.work)  # page-table entries validated/released
        if self.paging.flush_due:
            self.paging.flush_tlb()
        if tracing:
            self._trace_hypercall(nr, entry, result)
        if self.pv_fast is not None:
            if nr == 0:
                self.pv_fast.set_trap_table(self.trap_table, self.trap_table_set)
            else:
                self.pv_fast.seen(nr)
        ev = self.events
        assert ev is not None  # boot made them before the first hypercall
        if ev.buf[ev.off] and not ev.buf[ev.off + 1] and self.outcome is None:  # deliverable()
            self.upcall(regs.read(R.EIP))

    def _trace_hypercall(self, nr, entry, result) -> None:
        eip = (self.regs.read(R.EIP) - 2) & 0xFFFFFFFF
        if nr == 23:
            eip = (self.hypercall_va + 23 * 32 + 6) & 0xFFFFFFFF
        detail = dict(self.detail or {})
        detail["result"] = result if result is not None else "resumed"
        self.trace.event(
            self.clock.instructions,
            self.regs.cpl(),
            "hypercall",
            entry[0] if entry else f"unknown ({nr})",
            nr,
            eip,
            "int 0x82",
            detail,
            "refused" if isinstance(result, int) and result < 0 else "done",
        )
        self.detail = None

    # -- helpers for the hypercall handlers ---------------------------------------------------------
    def charge(self, cycles: int) -> None:
        """Hypervisor work done for the guest, charged to its budget (hypercalls.py: the cost model)."""
        self.clock.advance(cycles)

    def note(self, **kw) -> None:
        if self.detail is not None:
            self.detail.update(kw)

    def refused(self, why: str) -> None:
        if self.detail is not None:
            self.detail["refused"] = why

    def refuse(self, errno: int, why: str) -> int:
        self.refused(why)
        return -errno

    def gread(self, va: int, n: int) -> bytes:
        """Read guest-virtual memory with the kernel's rights; an unmapped pointer is -EFAULT."""
        try:
            return self.mmu.read_linear(va, n, user=False)
        except GuestPageFault:
            raise Refused(EFAULT, f"pointer {va:#x}+{n}: not mapped") from None

    def gwrite(self, va: int, data: bytes) -> None:
        try:
            self.mmu.write_linear(va, data, user=False)
        except GuestPageFault:
            raise Refused(EFAULT, f"pointer {va:#x}+{len(data)}: not mapped writable") from None

    def descriptor(self, selector: int) -> int | None:
        """The current GDT's descriptor for `selector`, or None (beyond the limit, null, LDT)."""
        _, _, limit, _ = self.regs.table(R.GDTR)
        index = selector & ~7
        if selector & 4 or index == 0 or index + 7 > limit:
            return None
        frames = self.paging.gdt_frames
        if index >> 12 >= len(frames):
            return None
        ram = self.machine.ram
        return struct.unpack_from("<Q", ram.buf, (frames[index >> 12] << 12) - ram.hpa + (index & 0xFFF))[0]

    def check_code_selector(self, sel: int) -> str:
        d = self.descriptor(sel)
        if d is None:
            return f"selector {sel:#x} is not in the GDT"
        if not (d >> 47) & 1 or (d >> 43) & 3 != 3 or (d >> 45) & 3 != 1:
            return f"selector {sel:#x} is not a present DPL-1 code segment"
        return ""

    def check_stack_selector(self, sel: int) -> str:
        d = self.descriptor(sel)
        if (
            sel & 3 != 1
            or d is None
            or not (d >> 47) & 1
            or (d >> 43) & 3 != 2
            or not (d >> 41) & 1
            or (d >> 45) & 3 != 1
        ):
            return f"ss {sel:#x} is not a writable DPL-1 data selector with RPL 1"
        return ""

    def flush_tlb(self) -> None:
        """CR3 = the current L2: the write also drops the engine's whole TLB."""
        self.regs.write(R.CR3, self.paging.base)

    # -- time and blocking ---------------------------------------------------------------------
    def set_timer(self, deadline: int | None) -> None:
        self.timer = deadline
        if deadline is not None:
            if deadline <= self.clock.now:
                self._fire_timer()  # already past: pending now, delivered on the way back
            else:
                self.clock.pull_in(deadline)

    def _fire_timer(self) -> None:
        if self.timer is not None and self.clock.now >= self.timer:
            self.timer = None
            ev = self.events
            assert ev is not None  # set_timer_op is a hypercall: after boot
            port = ev.virq_port.get(VIRQ_TIMER)
            ev.raise_virq(VIRQ_TIMER)
            detail = {"port": port, "mask": ev.mask}
            action = "timer expired, VIRQ_TIMER not bound"
            if port is not None:
                masked = ev.port_masked(port)
                detail["port_masked"] = int(masked)
                action = "port set pending, masked: latched, no upcall" if masked else "port set pending"
            self.record("event_channel", "VIRQ_TIMER", VIRQ_TIMER, self.regs.read(R.EIP), detail, action)

    def block(self) -> int:
        """SCHEDOP_block: unmask events and sleep until one is pending (virtual time jumps)."""
        ev = self.events
        assert ev is not None
        ev.mask = 0
        if ev.pending():
            return 0
        if self.timer is None:
            self.finish(
                "halted",
                EXIT_HALTED,
                "sched_op(SCHEDOP_block) with no timer set and no event pending: nothing can wake the vCPU",
            )
            return 0
        if self.timer >= self.budget:
            self.finish("budget", EXIT_BUDGET, self.budget_message(" while blocked"))
            return 0
        if self.timer > self.clock.now:
            self.clock.advance(self.timer - self.clock.now)
        self._fire_timer()
        if not ev.pending():
            self.finish(
                "halted",
                EXIT_HALTED,
                "sched_op(SCHEDOP_block): the timer fired but VIRQ_TIMER is "
                "not bound or its port is masked: nothing can wake the vCPU",
            )
        return 0

    def shutdown(self, status: int, reason: str) -> None:
        if self.trace is not None:
            self.note(action=f"machine powered off, status {status}")
        self.finish("exit", status, reason)

    def crash(self, why: str) -> None:
        self.finish("error", EXIT_HYPERVISOR_STOP, f"para: domain crashed: {why}")

    def _next_deadline(self) -> int:
        now = self.clock.now
        d = NEVER if self.timer is None else max(self.timer, now)
        if self._after_one_block:
            self._after_one_block = False
            d = now
        return min(d, self.budget)

    # -- the upcall mask is para's IF: a store that clears it opens the window ----------------------
    WINDOW_HOOKS = False  # the kernel runs at ring 1: its sti/popf/iret never set the real IF

    def waits_for_window(self) -> bool:
        # Not inside the event callback: it runs masked with evtchn_upcall_pending still set until it
        # clears it, and returns through the iret hypercall (which unmasks and delivers what is
        # pending); watching there would trap its acknowledging stores for nothing.
        ev = self.events
        waiting = ev is not None and not self._in_upcall and ev.mask != 0 and ev.pending()
        if waiting != self._mask_traced:
            traces = self.mmu.traces
            if waiting:
                traces.trace_frame(self.shared_info_ma, "upcall_mask", self._shared_info_written)
            else:
                traces.untrace_frame(self.shared_info_ma, "upcall_mask")
            self._mask_traced = waiting
        return False

    def _shared_info_written(self, tw) -> bool:
        """A guest store to the shared-info page while an event waits behind the mask: done here, so
        that when it clears evtchn_upcall_mask the upcall goes right after it (before_entry). A
        store form the emulator does not know untraces the page and runs natively; the upcall
        then goes after the block that holds it."""
        if tw.done or tw.eip is None:
            return False
        from cpuvirt.status import Unsupported
        from cpuvirt.x86.emulate import emulate_store

        mmu = self.mmu

        def read(gva, size):
            return int.from_bytes(mmu.read_linear(gva, size, False), "little")

        def write(gva, size, value):
            mmu.write_linear(gva, value.to_bytes(size, "little"), False)

        try:
            length = emulate_store(mmu.fetch_bytes(tw.eip, 15), tw.eip, self.regs, read, write)[0]
        except (Unsupported, GuestPageFault):
            self.mmu.traces.untrace_frame(self.shared_info_ma, "upcall_mask")
            self._mask_traced = False
            self._after_one_block = True
            return False
        self.regs.write(R.EIP, (tw.eip + length) & 0xFFFFFFFF)
        return True

    def on_deadline(self, eip: int) -> None:
        if self.clock.now >= self.budget:
            self.finish("budget", EXIT_BUDGET, self.budget_message())
            return
        self._fire_timer()

    def before_entry(self) -> None:
        if self.events is not None and self.events.deliverable():
            self.upcall(self.regs.read(R.EIP))

    def on_hlt(self, eip: int) -> None:
        # The kernel runs at ring 1, where hlt is a #GP: the engine returning here is a bug.
        self.finish("error", EXIT_ERROR, f"internal: the engine halted at {eip:#x} at ring {self.regs.cpl()}")

    # -- bouncing events to the guest ----------------------------------------------------------------
    def upcall(self, return_eip: int) -> None:
        if self.event_callback is None:
            self.crash("an event is pending and unmasked but no event callback is registered (set_callbacks)")
            return
        self.record(
            "upcall",
            "evtchn_upcall",
            None,
            return_eip,
            {"callback": f"{self.event_callback[1]:#x}"},
            "upcall delivered to the event callback",
        )
        cs, eip = self.event_callback
        self.bounce(cs, eip, return_eip, None, True, "upcall")
        self._in_upcall = True

    def bounce(self, cs: int, eip: int, return_eip: int, error_code: int | None, mask_events: bool, what: str) -> None:
        """Deliver to the guest at ring 1 like a hardware gate, with Xen's virtual IF and mask."""
        regs, ev = self.regs, self.events
        assert ev is not None  # the trap table is a hypercall: after boot
        old_cs = regs.read(R.CS)
        cpl = old_cs & 3
        eflags = regs.read(R.EFLAGS)
        mask = ev.mask
        saved = (eflags & ~EFLAGS_IF) | (0 if mask else EFLAGS_IF)
        frame = [return_eip, (old_cs & 0xFFFF) | (mask << 16), saved]
        if cpl == 3:
            if self.kernel_stack is None:
                self.crash(f"{what} from ring 3 at {return_eip:#x} with no kernel stack (stack_switch)")
                return
            ss, esp = self.kernel_stack
            frame += [regs.read(R.ESP), regs.read(R.SS)]
        else:
            ss, esp = None, regs.read(R.ESP)
        if error_code is not None:
            frame.insert(0, error_code)
        data = struct.pack(f"<{len(frame)}I", *frame)
        esp = (esp - len(data)) & 0xFFFFFFFF
        try:
            self.mmu.write_linear(esp, data, user=False)
        except GuestPageFault as pf:
            self.crash(
                f"{what} at {return_eip:#x}: the ring-1 stack at {esp:#x} is not writable "
                f"(#PF {pf.error_code:#x} at {pf.gva:#x})"
            )
            return
        try:
            if ss is not None:
                self._enter_ring1_stack(ss)
            regs.write(R.ESP, esp)
            if cpl == 3 or old_cs != cs:
                regs.write(R.CS, cs)
        except RuntimeError as e:
            self.crash(f"{what} at {return_eip:#x}: {e}")
            return
        regs.write(R.EFLAGS, (eflags & ~(EFLAGS_TF | EFLAGS_NT | EFLAGS_RF | EFLAGS_VM)) | EFLAGS_IF)
        regs.write(R.EIP, eip)
        if mask_events:
            ev.mask = 1

    def _enter_ring1_stack(self, ss: int) -> None:
        """Load the ring-1 SS from ring 3 inside a hook. The engine checks SS.RPL against the CPL it
        keeps in hflags (taken from SS's DPL), so the CPL field is set to 1 first, in the saved
        context, as the gate's privilege change would (the same context trick as quirks.py)."""
        import ctypes

        faults = self.faults
        ctx = faults._ctx
        self.uc.context_update(ctx)
        addr = ctypes.cast(ctx.context, ctypes.c_void_p).value
        slot = ctypes.c_uint32.from_address(addr + faults.layout.hflags)
        slot.value = (slot.value & ~3) | 1
        self.uc.context_restore(ctx)
        self.regs.write(R.SS, ss)

    def trap(self, vector: int, return_eip: int, error_code: int | None, insn_eip: int, soft: bool = False) -> None:
        """An exception or `int n` of the guest: through its trap table, or the run stops."""
        entry = self.trap_table.get(vector)
        if not self.trap_table_set:
            insn = self.insn_at(insn_eip)
            if vector == 13 and not soft and insn.split()[0] in PRIVILEGED:
                self.finish("error", EXIT_HYPERVISOR_STOP, f"para: {insn} at {insn_eip:#x}: {NOT_PV}")
            else:
                name = f"int {vector:#x}" if soft else MNEMONIC.get(vector, f"vector {vector}")
                self.crash(f"{name} at {insn_eip:#x} ({insn}) before any set_trap_table")
            return
        if entry is None:
            name = f"int {vector:#x}" if soft else MNEMONIC.get(vector, f"vector {vector}")
            self.crash(f"{name} at {insn_eip:#x} ({self.insn_at(insn_eip)}): no trap_info entry for vector {vector}")
            return
        flags, cs, address = entry
        if soft and (flags & 3) < self.regs.cpl():
            # int n through an entry whose DPL is below CPL: #GP(vector * 8 + 2), as a gate would.
            return self.trap(13, insn_eip, vector * 8 + 2, insn_eip)
        self.bounce(cs, address, return_eip, error_code, bool(flags & 4), MNEMONIC.get(vector, f"int {vector:#x}"))

    # -- far transfers: a PV guest has no hardware tasks or call gates ---------------------------------
    def system_transfer(self, address: int, size: int, sel: int, offset: int, call: bool) -> None:
        """A far jmp/call to a system descriptor (a call gate or TSS that reached the guest's GDT or
        LDT): refused with #GP(selector), as Xen refuses such descriptors; the engine never sees it."""
        from cpuvirt.cpu.faults import DeliveryFault

        raise DeliveryFault(13, sel & ~3)

    def task_return(self, address: int, size: int) -> None:
        """iret with EFLAGS.NT: there is no previous task under para: #GP(0)."""
        from cpuvirt.cpu.faults import DeliveryFault

        raise DeliveryFault(13, 0)

    def transfer_fault(self, address: int, f) -> None:
        ec = f.error_code if f.vector in HAS_ERROR_CODE else None
        self.record(
            "exception",
            MNEMONIC.get(f.vector, str(f.vector)),
            f.vector,
            address,
            {"vector": f.vector, "error_code": ec},
            "bounced through the guest's trap table",
        )
        self.trap(f.vector, address, ec, address)

    # -- what the engine raises ---------------------------------------------------------------------
    def _deliver_engine_event(self, intno: int, error_code: int, soft: bool, eip: int) -> None:
        if soft or intno in (3, 4):
            prev = self.mmu.fetch_bytes((eip - 1) & 0xFFFFFFFF, 1)
            insn_len = 1 if prev in (b"\xcc", b"\xce") else 2
            start = (eip - insn_len) & 0xFFFFFFFF
            detail: dict[str, object] = {"vector": intno, "software": soft}
            if insn_len == 2:  # `int n`: EAX is the system-call number by OS convention
                detail["eax"] = f"{self.regs.read(R.EAX):#x}"
            self.record(
                "interrupt" if soft else "exception",
                f"int {intno:#x}" if soft else MNEMONIC[intno],
                intno,
                start,
                detail,
                "bounced through the trap table",
            )
            self.trap(intno, eip, None, start, soft=soft)
            return
        ec = error_code if intno in HAS_ERROR_CODE else None
        detail = {"vector": intno} if ec is None else {"vector": intno, "error_code": ec}
        self.record(
            "exception", MNEMONIC.get(intno, f"vector {intno}"), intno, eip, detail, "bounced through the trap table"
        )
        self.trap(intno, eip, ec, eip)

    def hook_invalid(self, uc, _data) -> bool:
        self.mmu.crs = None
        eip = self.regs.read(R.EIP)
        self.left_block_at(eip)
        self.record("exception", "#UD", 6, eip, {"vector": 6}, "bounced through the trap table")
        self.trap(6, eip, None, eip)
        return True

    def page_fault(self, gva: int, access: int, error_code: int, eip: int) -> None:
        self.charge_fault(access)
        assert self.events is not None
        self.events.set_cr2(gva)
        self.record_page_fault(
            gva, access, error_code, eip, "bounced through the trap table (CR2 in vcpu_info.arch.cr2)"
        )
        self.trap(14, eip, error_code, eip)

    def _io_instruction(self, address: int, size: int, mnem: str, ops: str) -> None:
        """in/out: allowed at ring 1 after physdev_op(set_iopl), else #GP(0) to the guest."""
        if self._io_allowed():
            return  # executes; the I/O hooks reach the devices
        self.record(
            "exception",
            "#GP",
            13,
            address,
            {"vector": 13, "error_code": 0, "why": "port I/O without IOPL"},
            "bounced through the trap table",
        )
        self.trap(13, address, 0, address)

    def _io_allowed(self) -> bool:
        """CPL <= the granted IOPL (the CPL is read only when the grant is 1 or 2)."""
        iopl = self.iopl
        return iopl == 3 or (iopl != 0 and self.regs.cpl() <= iopl)

    def hook_in(self, uc, port, size, _data):
        if not self._io_allowed():  # an unhooked site (never expected): deny
            return 0xFFFFFFFF
        return super().hook_in(uc, port, size, _data)

    def hook_out(self, uc, port, size, value, _data):
        if not self._io_allowed():
            return None
        return super().hook_out(uc, port, size, value, _data)
