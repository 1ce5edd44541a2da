"""The virtual CPU's life in one loop: enter the guest, see why it stopped, dispatch, repeat.

Exits that need no stop (I/O, exceptions, `int n`, rdtsc) are handled inside Unicorn's hooks, so they
cost a hook call and not a stop/restart (~4 us). The engine stops only for a refused TLB fill (a page
fault), the clock's deadline (timer interrupts, budget), the interrupt window opening (IF set to 1 while
an interrupt waits: an event, never polled), `hlt`, and the end of the run.
"""

from __future__ import annotations

import ctypes
from collections import Counter
from typing import TYPE_CHECKING, Any, Callable

from unicorn import UC_HOOK_INSN, UC_HOOK_TLB_FILL, UcError
from unicorn import x86_const as X

from cpuvirt import limits
from cpuvirt.cpu.events import EventDelivery
from cpuvirt.cpu.faults import DeliveryFault, TripleFault
from cpuvirt.cpu.quirks import FaultState
from cpuvirt.cpu.tasks import CpuView
from cpuvirt.engine import regs as R
from cpuvirt.engine.cext import add_c_hook, first_fill_hook
from cpuvirt.engine.clock import NEVER
from cpuvirt.engine.cpuid import CpuidTable
from cpuvirt.engine.hooks import EngineHooks, hook_guard
from cpuvirt.memory.traces import TracedWrite, TraceError
from cpuvirt.memory.types import Access
from cpuvirt.status import BUDGET as EXIT_BUDGET
from cpuvirt.status import HALTED as EXIT_HALTED
from cpuvirt.status import HYPERVISOR_STOP as EXIT_HYPERVISOR_STOP
from cpuvirt.status import INTERNAL_ERROR as EXIT_ERROR
from cpuvirt.status import TRIPLE_FAULT as EXIT_TRIPLE_FAULT
from cpuvirt.status import Unsupported
from cpuvirt.x86.faultaddr import fault_address
from cpuvirt.x86.flags import EFLAGS_IF, EFLAGS_NT, EFLAGS_RF, EFLAGS_VM
from cpuvirt.x86.vectors import HAS_ERROR_CODE, MNEMONIC, Vector

if TYPE_CHECKING:
    from cpuvirt.cpu.intercept import Intercepts
    from cpuvirt.cpu.iosites import IoSites

EXTERNAL_WAIT_S = 60.0  # host seconds a halted CPU waits for a frame from another process

IO_CYCLES = 1000  # a port access costs 1 us of virtual time, as an ISA bus cycle does on a PC


# The instructions that can set EFLAGS.IF in the guest's own code (capstone mnemonics): each gets a
# window hook (clock.hook_if_setter) the first time a block holding it runs.
def instruction_breakpoint_armed(dr7: int) -> bool:
    """Does DR7 enable (L or G) a breakpoint whose R/W field is 00, on instruction execution (SDM
    Vol. 3B 18.2.4)?"""
    return any(dr7 >> (2 * i) & 3 and not dr7 >> (16 + 4 * i) & 3 for i in range(4))


IF_SETTERS = frozenset(("sti", "popf", "popfd", "iret", "iretd"))
FETCH_FAULT_CYCLES = 100  # a fault on an instruction fetch retires nothing: it costs this much time,
# so a handler whose own code faults spends the budget (docs/security.md)
_IO_MNEMONICS = frozenset(("in", "out", "insb", "insw", "insd", "outsb", "outsw", "outsd"))
IO_INSTRUCTIONS = _IO_MNEMONICS | frozenset("rep " + m for m in _IO_MNEMONICS if m not in ("in", "out"))
_BLOCK_ENDERS = frozenset(
    (
        "jmp",
        "call",
        "ret",
        "iret",
        "iretd",
        "hlt",
        "int",
        "int3",
        "into",
        "ljmp",
        "lcall",
        "retf",
        "sysenter",
        "syscall",
        "ud2",
        "loop",
        "loope",
        "loopne",
        "jecxz",
    )
    + tuple("j" + c for c in ("a", "ae", "b", "be", "e", "ne", "g", "ge", "l", "le", "o", "no", "p", "np", "s", "ns"))
)
_RDTSC_CB = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)


class Outcome:
    __slots__ = ("kind", "status", "message")

    def __init__(self, kind: str, status: int, message: str = ""):
        self.kind, self.status, self.message = kind, status, message


class Vcpu:
    def __init__(self, machine, trace=None, max_insns: int = 0):
        self.machine = machine
        self.uc = machine.uc
        self.regs = machine.regs
        self.mmu = machine.mmu
        self.clock = machine.clock
        self.delivery = EventDelivery(self.uc, self.regs, self.mmu)
        self.delivery.view = self.view = CpuView(self)
        self.faults = FaultState(self.uc)
        self.trace = trace
        self.budget = max_insns or NEVER
        self.outcome: Outcome | None = None
        self._counts: Counter = Counter()
        self._reasons: Counter = Counter()
        self.fold_counts: Callable[[], None] | None = None  # adds events counted in C (native's EventBooks)
        self.device_folds: list[Callable[[], None]] = []  # the same for devices' C paths (machine/apicmmio.py)
        self._disasm = None
        self._insn_cache: dict[tuple[int, bytes], str] = {}
        self.error: BaseException | None = None
        self.hooks = EngineHooks(self)  # every engine hook is added through it, under the one guard
        self.intercepts: Intercepts | None = None  # for modes that must see non-trapping instructions
        self._io_block: tuple[int, int] = (-1, -1)
        self._io_index = 0
        self._intr_depth = 0
        self.on_nmi_blocked = None  # callback(bool): told of every change (native's C iret hook)
        self._nmi_blocked = False
        self.io_gate_armed = True  # in/out hooked for the I/O permission check (lazy in native, hw)
        self._flush_translations = False
        self._after_one_block = False
        self._io_sites: dict = {}
        self._window_retranslate: list[tuple[int, int]] = []
        self._window_ready = False
        self._port_hooks: tuple[int, int] = (0, 0)  # the in/out hooks (install_hooks)
        self._port_io_in_c = False  # time_port_io_in_c made them C's
        self.io_sites: IoSites | None = None  # the I/O gate's C hooks (install_io_sites)
        machine.on_new_block = self.forget_block
        machine.code32 = self.running_code32  # new blocks decode as the CPU does (CS.D)

    @property
    def counts(self) -> Counter:
        """Events by kind (the summary's counts)."""
        if self.fold_counts is not None:
            self.fold_counts()
        for fold in self.device_folds:
            fold()
        return self._counts

    @property
    def reasons(self) -> Counter:
        """(kind, reason) -> n: the cost model's view (cpuvirt/costs)."""
        if self.fold_counts is not None:
            self.fold_counts()
        return self._reasons

    def tally(self, kind: str, reason: str, n: int = 1) -> None:
        """Count n events of `kind` for `reason` that no trace records. Straight into the counters: the
        `counts` and `reasons` properties first fold in what C counted, which only their readers need
        (a fold per event was 3% of mode full's time on xv6)."""
        self._counts[kind] += n
        self._reasons[kind, reason] += n

    @property
    def nmi_blocked(self) -> bool:
        """From an NMI's delivery to the next iret (SDM 6.7.1)."""
        return self._nmi_blocked

    @nmi_blocked.setter
    def nmi_blocked(self, value: bool) -> None:
        self._nmi_blocked = value
        if self.on_nmi_blocked is not None:
            self.on_nmi_blocked(value)

    # -- the run loop --------------------------------------------------------------------------------
    def run(self, entry: int) -> Outcome:
        uc, regs, clock = self.uc, self.regs, self.clock
        regs.write(R.EIP, entry)
        self.watch_if_setters()
        while self.outcome is None:
            if self._flush_translations or clock.stubs_full():
                # New intercepts (the I/O gate): translations made without their hooks go. Or the clock's
                # stubs fill their region: the blocks that jump to them go, and the region is reused.
                self._flush_translations = False
                uc.ctl_flush_tb()
                clock.translations_dropped()
            if clock.now >= self.budget:
                # Time spent outside instructions (faults that retire nothing, hypervisor work)
                # reaches the budget too: every turn of this loop makes progress or spends it.
                self.finish("budget", EXIT_BUDGET, self.budget_message())
                break
            self.before_entry()
            if self.outcome is not None:
                break
            eip = regs.read(R.EIP)
            clock.arm(self._next_deadline())
            clock.watch_if(self.waits_for_window())
            try:
                uc.emu_start(eip, 0)
                stopped_by_fault = False
            except UcError as e:
                stopped_by_fault = True
                engine_error = e
            if self.error is not None:
                raise self.error
            if self.outcome is not None:
                break
            self.mmu.crs = None
            eip = regs.read(R.EIP)
            # A new block held an instruction without its intercept or window hook: drop its
            # translation and rerun it. Both lists are emptied at the stop that filled them: one left
            # for a later stop would be taken for this stop's cause (a hlt would be skipped).
            retranslate = self._window_retranslate
            if self.intercepts is not None and self.intercepts.retranslate:
                retranslate = self.intercepts.retranslate + retranslate
                self.intercepts.retranslate.clear()
            if retranslate:
                for address, size in retranslate:
                    uc.ctl_remove_cache(address, address + size)
                self._window_retranslate.clear()
                if not stopped_by_fault and not clock.expired() and not self.halt_requested():
                    continue
            if stopped_by_fault:
                self.left_block_at(eip)
                pending = self.mmu.take_pending()
                if pending is None:
                    self.finish("error", EXIT_ERROR, f"engine error at {eip:#x}: {engine_error}")
                else:
                    self.on_refused_fill(pending, eip)
            elif clock.expired():
                self.on_deadline(eip)
            else:
                self.on_hlt(eip)
            eip = regs.read(R.EIP)
        assert self.outcome is not None  # the loop ends only when finish() set it
        return self.outcome

    def halt_requested(self) -> bool:
        """Did a hook stop the engine to halt the vCPU (hw's HLT exit)? Then a retranslation
        requested in the same run must not swallow the halt: the loop idles first."""
        return False

    def left_block_at(self, boundary: int) -> None:
        """Execution leaves the running block early: the instructions from `boundary` on did not
        retire, so they come off the count (the clock counted the whole block when it began)."""
        entry = self.machine.block_insns.get(self.clock.last_block)
        if entry is None:
            return
        addrs, end = entry
        if addrs[0] <= boundary < end:
            n = sum(1 for a in addrs if a >= boundary)
            if n:
                self.clock.unretire(n)

    def before_entry(self) -> None:
        """Called before each return to the guest; modes with exits due now (hw) override it."""

    def on_refused_fill(self, pending, eip: int) -> None:
        """The TLB-fill hook refused an access: a guest page fault (modes add other kinds)."""
        if pending.unbacked_fetch:
            self.stop_unbacked_fetch(self.exact_linear(pending, eip))
            return
        if type(pending) is TracedWrite:
            self.traced_write(pending, eip)
            return
        self.page_fault(self.exact_linear(pending, eip), pending.access, pending.error_code, eip)

    def traced_write(self, tw, eip: int) -> None:
        """A store to a write-traced guest frame (memory/traces.py): its owners emulate or untrace."""
        gva = self.exact_linear(tw, eip)
        tw.gpa = (tw.gpa & ~0xFFF) | (gva & 0xFFF)
        tw.gva, tw.eip = gva, eip
        try:
            self.mmu.traces.dispatch(tw, self)
        except TraceError as e:
            self.finish("error", EXIT_ERROR, str(e))
            return
        if tw.done and self.regs.read(R.EIP) != eip:
            self.clock.unretire(-1)  # emulated and skipped: the instruction retired

    def exact_linear(self, pending, eip: int) -> int:
        """The faulting linear address (the fill hook is told only its page)."""
        gva = pending.gva
        if pending.access != Access.FETCH:  # a data access: decode the instruction's operands
            return fault_address(self.mmu.fetch_bytes(eip, 15), eip, gva & 0xFFFFF000, self.regs)
        if (eip & 0xFFFFF000) == (gva & 0xFFFFF000):
            return eip  # a fetch faults at the instruction (or its next page)
        return gva

    def stop_unbacked_fetch(self, gva: int) -> None:
        """Code fetched where the machine has no RAM (unbacked or device memory): the hypervisor
        stops the guest, in every mode alike (docs/security.md, "Outcomes")."""
        self.finish(
            "error",
            EXIT_HYPERVISOR_STOP,
            f"guest fetched code from unbacked memory at {gva:#x} "
            "(no RAM there: cpuvirt does not execute from device or unassigned memory)",
        )

    def budget_message(self, when: str = "") -> str:
        return (
            f"budget of {self.budget:,} cycles exhausted (--max-insns: instructions plus I/O, idle "
            f"time and hypervisor work){when}"
        )

    def finish(self, kind: str, status: int, message: str = "") -> None:
        if self.outcome is None:
            self.outcome = Outcome(kind, status, message)
            self.uc.emu_stop()

    def _next_deadline(self) -> int:
        d = self.machine.next_timer_deadline()
        # A deadline already due was handled (update_timers); what it raised waits in the
        # controller: deliverable now, or when the window opens (waits_for_window).
        d = NEVER if d is None or d <= self.clock.now else d
        if self.machine.pending_nmi() and not self.nmi_blocked:
            d = self.clock.now  # an NMI ignores IF: take it at the next block boundary
        elif self.machine.pending_interrupt() is not None and self.regs.read(R.EFLAGS) & EFLAGS_IF:
            d = self.clock.now  # deliverable (not taken at the last stop): the next boundary
        if self._after_one_block:
            self._after_one_block = False
            d = self.clock.now  # already due: the clock stops after the next block
        return min(d, self.budget)

    # -- the interrupt window ----------------------------------------------------------------------
    WINDOW_HOOKS = True  # sti/popf/iret in the guest's own code can set the real IF

    def waits_for_window(self) -> bool:
        """Does something wait for EFLAGS.IF = 1 (an interrupt pending while IF = 0)? Then the window
        hooks are live for this entry: the engine stops where IF becomes 1, and nowhere else."""
        return self.machine.pending_interrupt() is not None and not self.regs.read(R.EFLAGS) & EFLAGS_IF

    def watch_if_setters(self) -> None:
        """Give every sti/popf/iret the guest runs a window hook: the clock's block-count callback
        sees each new block's instructions; one holding an unhooked IF-setter is translated again
        with its hook (the engine is stopped before the block runs, as for intercepts)."""
        if self._window_ready or not self.WINDOW_HOOKS:
            return
        self._window_ready = True
        m, clock = self.machine, self.clock
        inner = m.block_observer

        def observe(insns):
            # the intercepts' hooks first: Unicorn runs an address's hooks in the order they were
            # added, and an intercepted iret must run before the window hook that looks at IF after it
            stop = inner is not None and inner(insns)
            missing = False
            for addr, _size, mnem, _ in insns:
                if mnem in IF_SETTERS and clock.hook_if_setter(addr, mnem == "sti"):
                    missing = True
            if missing:
                self._window_retranslate.append((insns[0][0], sum(i[1] for i in insns)))
            return stop or missing

        m.block_observer = observe

    # -- time: timer interrupts, budget, hlt -------------------------------------------------------
    def on_deadline(self, eip: int) -> None:
        if self.clock.now >= self.budget:
            self.finish("budget", EXIT_BUDGET, self.budget_message())
            return
        self.machine.update_timers()
        self.inject_pending_interrupt(eip)

    def inject_pending_interrupt(self, eip: int) -> bool:
        m = self.machine
        if m.pending_nmi() and not self.nmi_blocked:
            # NMI (vector 2) is not masked by IF and goes before INTR (SDM 6.9, priority 5 vs 6);
            # further NMIs are blocked until the next iret (SDM 6.7.1).
            m.acknowledge_nmi()
            self.nmi_blocked = True
            self.record("interrupt", "NMI", Vector.NMI, eip, {}, "delivered through the guest IDT")
            self.deliver(Vector.NMI, eip, external=True)
            return True
        if m.pending_interrupt() is None or not self.regs.read(R.EFLAGS) & EFLAGS_IF:
            return False
        if self.faults.interrupt_shadow():
            # Right after sti / mov ss: the next instruction runs first (the engine gives it a block
            # of its own, so "stop after one block" is exact).
            self._after_one_block = True
            return False
        vector = m.acknowledge_interrupt()
        self.record("interrupt", f"IRQ vector {vector:#x}", vector, eip, {}, "delivered through the guest IDT")
        self.deliver(vector, eip, external=True)
        return True

    def on_hlt(self, eip: int) -> None:
        hlt_eip = (eip - 1) & 0xFFFFFFFF
        if_set = self.regs.read(R.EFLAGS) & EFLAGS_IF
        self.record("hlt", "HLT", None, hlt_eip, {"if": bool(if_set)}, "idle until the next interrupt")
        if not if_set:
            self.finish(
                "halted", EXIT_HALTED, f"hlt at {hlt_eip:#x} with interrupts disabled: nothing can wake the CPU"
            )
            return
        if self.inject_pending_interrupt(eip):
            return
        deadline = self.machine.next_timer_deadline()
        while deadline is None and self.machine.wait_external(EXTERNAL_WAIT_S, lambda: self.outcome is not None):
            if self.inject_pending_interrupt(eip):  # a frame from another process woke the CPU
                return
            deadline = self.machine.next_timer_deadline()
        if deadline is None or deadline >= self.budget:
            if self.outcome is not None:
                return
            if deadline is None:
                waited = any(src.wait_fds() for src in self.machine.external)
                quiet = f" (and nothing came from outside in {EXTERNAL_WAIT_S:.0f} s)" if waited else ""
                self.finish(
                    "halted", EXIT_HALTED, f"hlt at {hlt_eip:#x} with no timer armed: nothing can wake the CPU{quiet}"
                )
            else:
                self.finish("budget", EXIT_BUDGET, self.budget_message(" while halted"))
            return
        if deadline > self.clock.now:
            self.clock.advance(deadline - self.clock.now)
        self.machine.update_timers()
        if not self.inject_pending_interrupt(eip):
            self.finish("halted", EXIT_HALTED, f"hlt at {hlt_eip:#x}: the timer fired but its IRQ is masked")

    # -- faults and interrupts ---------------------------------------------------------------------
    def charge_fault(self, access: int) -> None:
        """A #PF on an instruction fetch retires nothing: charge its delivery to the clock, so a
        guest whose handler itself cannot be fetched spends its budget instead of looping free."""
        if access == Access.FETCH:
            self.clock.advance(FETCH_FAULT_CYCLES)

    def page_fault(self, gva: int, access: int, error_code: int, eip: int) -> None:
        self.charge_fault(access)
        self.regs.write(R.CR2, gva)
        self.record_page_fault(gva, access, error_code, eip)
        self.deliver(Vector.PF, eip, error_code)

    def record_page_fault(
        self, gva: int, access: int, error_code: int, eip: int, action: str = "delivered #PF through the guest IDT"
    ) -> None:
        """The trace row of a guest #PF, the same in every mode (only where it goes differs: `action`)."""
        self.record(
            "page_fault",
            "#PF",
            14,
            eip,
            {
                "cr2": f"{gva:#x}",
                "error_code": error_code,
                "access": ("read", "write", "fetch")[access],
                "fault": "true",
            },
            action,
        )

    def deliver(
        self,
        vector: int,
        return_eip: int,
        error_code: int | None = None,
        soft: bool = False,
        external: bool = False,
        fault_eip: int | None = None,
    ) -> None:
        try:
            self.delivery.deliver(vector, return_eip, error_code, soft, external, fault_eip)
        except TripleFault as tf:
            self.record("exception", "TRIPLE_FAULT", None, return_eip, {"why": str(tf)}, "shutdown")
            self.finish("triple_fault", EXIT_TRIPLE_FAULT, f"triple fault at {return_eip:#x}: {tf}")
        except Unsupported as u:
            self.finish("error", EXIT_HYPERVISOR_STOP, f"unsupported at {return_eip:#x}: {u}")

    def hook_intr(self, uc, intno, _data):
        """Every exception and `int n` the engine raises (it never delivers them itself)."""
        if self._intr_depth:
            # The engine raised a fault while cpuvirt was delivering one (a register load refused):
            # that is a cpuvirt bug, so end the run with a clear message instead of recursing.
            self.finish(
                "error", EXIT_ERROR, f"internal: the engine raised vector {intno} while cpuvirt was delivering an event"
            )
            return
        self._intr_depth += 1
        self.mmu.crs = None
        try:
            error_code, soft = self.faults.take()
            self.on_engine_event(intno, error_code, soft, self.regs.read(R.EIP))
        finally:
            self._intr_depth -= 1
            self.clock.if_may_have_changed()

    def on_engine_event(self, intno: int, error_code: int, soft: bool, eip: int) -> None:
        """What the engine raised, EIP as it left it: modes that emulate some of it (trap's #GP) or
        run the guest elsewhere (full's translation cache) override this."""
        self.left_block_at(eip)
        self._deliver_engine_event(intno, error_code, soft, eip)

    def _deliver_engine_event(self, intno: int, error_code: int, soft: bool, eip: int) -> None:
        """Deliver what the engine raised: `int n`/int3/into (EIP already past them) or a fault."""
        if soft or intno in (Vector.BP, Vector.OF):
            prev = self.mmu.fetch_bytes((eip - 1) & 0xFFFFFFFF, 1)
            insn_len = 1 if prev in (b"\xcc", b"\xce") else 2  # int3 / into, or int n
            start = (eip - insn_len) & 0xFFFFFFFF
            name = f"int {intno:#x}" if soft else MNEMONIC.get(intno, str(intno))
            detail: dict[str, object] = {"vector": intno, "software": soft}
            if insn_len == 2:  # `int n`: EAX is the system-call number by OS convention
                detail["eax"] = f"{self.regs.read(R.EAX):#x}"
            self.record(
                "exception" if not soft else "interrupt", name, intno, start, detail, "delivered through the guest IDT"
            )
            self.deliver(intno, eip, soft=soft, fault_eip=start)
        else:
            ec = error_code if intno in HAS_ERROR_CODE else None
            detail = {"vector": intno} if ec is None else {"vector": intno, "error_code": ec}
            self.record(
                "exception",
                MNEMONIC.get(intno, f"vector {intno}"),
                intno,
                eip,
                detail,
                "delivered through the guest IDT",
            )
            self.deliver(intno, eip, ec)

    def hook_invalid(self, uc, _data) -> bool:
        self.mmu.crs = None
        eip = self.regs.read(R.EIP)
        self.left_block_at(eip)
        self.record("exception", "#UD", 6, eip, {"vector": 6}, "delivered through the guest IDT")
        self.deliver(Vector.UD, eip)
        self.clock.if_may_have_changed()
        return True

    # -- devices -----------------------------------------------------------------------------------
    def hook_in(self, uc, port, size, _data):
        if self.outcome is not None:
            return 0
        self.mmu.crs = None
        return self.port_io(port, size, True)

    def hook_out(self, uc, port, size, value, _data):
        if self.outcome is not None:
            return
        self.mmu.crs = None
        self.port_io(port, size, False, value)
        if self.outcome is not None:
            uc.emu_stop()

    def time_port_io_in_c(self) -> None:
        """Without a trace, the in/out hooks become C ones that spend the access's virtual time and
        call timed_in / timed_out for the device: native's (VirtualClock.hook_port_io) for every
        access; a deprivileging mode's (its IoSites: install_io_sites) for the accesses its I/O gate
        lets through at once, every other one going to the mode's own hook_in / hook_out as before.
        Called when the run starts (a trace is attached after the mode is built); hw's VmxCpu
        overrides it (its I/O decides VM exits)."""
        if self.trace is not None or self._port_io_in_c:
            return
        if self.io_sites is not None:
            sites = self.io_sites
            hooks = sites.hook_port_io(self.timed_in, self.timed_out, self.untimed_in, self.untimed_out, IO_CYCLES)
        elif type(self).port_io is Vcpu.port_io and type(self).hook_in is Vcpu.hook_in:
            hooks = self.clock.hook_port_io(self.timed_in, self.timed_out, IO_CYCLES)
        else:
            return
        self._port_io_in_c = True
        for handle in self._port_hooks:
            self.hooks.remove(handle)
        self._port_hooks = hooks

    @hook_guard(returns=0)
    def untimed_in(self, port: int, size: int) -> int:
        """The mode's own `in` hook, called from the C hook that did not take the access (IoSites)."""
        return self.hook_in(self.uc, port, size, None)

    @hook_guard()
    def untimed_out(self, port: int, size: int, value: int) -> None:
        """The mode's own `out` hook, called from the C hook that did not take the access (IoSites)."""
        self.hook_out(self.uc, port, size, value, None)

    @hook_guard(returns=0)
    def timed_in(self, port: int, size: int) -> int:
        """hook_in and port_io (no trace) after the C hook spent the access's time."""
        if self.outcome is not None:
            self.clock.advance(-IO_CYCLES)  # as hook_in: nothing once the run has ended
            return 0
        self.mmu.crs = None
        self._counts["io"] += 1
        return self.machine.bus.read(port, size)

    @hook_guard()
    def timed_out(self, port: int, size: int, value: int) -> None:
        """hook_out and port_io (no trace) after the C hook spent the access's time."""
        if self.outcome is not None:
            self.clock.advance(-IO_CYCLES)
            return
        self.mmu.crs = None
        self._counts["io"] += 1
        self.machine.bus.write(port, size, value)
        if self.outcome is not None:
            self.uc.emu_stop()

    def msr_instruction(self, address: int, size: int, mnem: str) -> bool:
        """rdmsr/wrmsr of an MSR the machine models (IA32_APIC_BASE): done here, the instruction
        skipped; a reserved bit written is #GP(0). False: the engine executes it (its own MSRs)."""
        regs, m = self.regs, self.machine
        msr = regs.read(R.ECX)
        if not m.implements_msr(msr):
            return False
        from cpuvirt.machine.machine import MsrFault

        try:
            if mnem == "rdmsr":
                value = m.rdmsr(msr)
                regs.write(R.EAX, value & 0xFFFFFFFF)
                regs.write(R.EDX, value >> 32 & 0xFFFFFFFF)
            else:
                m.wrmsr(msr, regs.read(R.EAX) | regs.read(R.EDX) << 32)
        except MsrFault as f:
            self.record(
                "exception",
                "#GP",
                13,
                address,
                {"vector": 13, "error_code": 0, "msr": f"{msr:#x}", "why": str(f)},
                "delivered through the guest IDT",
            )
            self.deliver(Vector.GP, address, 0)
            return True
        regs.write(R.EIP, address + size)
        return True

    def port_io(self, port: int, size: int, is_in: bool, value: int = 0) -> int:
        """A port access reaching the devices (modes decide first whether it exits)."""
        self.clock.advance(IO_CYCLES)
        self._counts["io"] += 1
        if is_in:
            value = self.machine.bus.read(port, size)
            if self.trace is not None:
                self._io_event(port, size, "in", value)
            return value
        if self.trace is not None:
            self._io_event(port, size, "out", value)
        self.machine.bus.write(port, size, value)
        return 0

    def _io_event(self, port, size, direction, value):
        eip = self.io_site()[0]
        self.trace.event(
            self.clock.instructions,
            self.regs.cpl(),
            "io",
            direction.upper(),
            None,
            eip,
            self.insn_at(eip),
            {"port": f"{port:#x}", "size": size, "value": f"{value:#x}"},
            "emulated by the device model",
        )

    def io_site(self) -> tuple[int, int]:
        """(address, length) of the in/out instruction whose hook is running.

        The engine does not update EIP before an I/O hook, so the instruction is found instead in the
        block now running (the clock hook saw it start): the k-th I/O hook call since the block began
        belongs to the k-th in/out/ins/outs of the block; a rep-string I/O instruction keeps its place.
        """
        blocks = self.clock.run_id
        sites = self._io_sites.get(blocks[1])
        if sites is None:
            sites = self._block_io_sites(blocks[1])
        if blocks != self._io_block:
            self._io_block, self._io_index = blocks, 0
        elif self._io_index < len(sites) - 1 and not sites[self._io_index][2]:
            self._io_index += 1
        if not sites:
            return self.regs.read(R.EIP), 0
        addr, length, _ = sites[self._io_index]
        return addr, length

    def _block_code(self, block: int) -> bytes:
        """The code bytes the engine's block at `block` was decoded from (full mode's TC blocks: the TC)."""
        return self.mmu.fetch_bytes(block, 256) or b""

    def _block_io_sites(self, block: int) -> list[tuple[int, int, bool]]:
        """The I/O instructions of the block at `block`, decoded once per translation of it (the
        machine drops the entry when the engine translates a new block there: forget_block)."""
        sites = self._io_sites.get(block)
        if sites is None:
            code = self._block_code(block)
            sites = []
            for addr, size, mnem, _ in self._cs().disasm_lite(code, block):
                m = mnem.split()[-1]
                if m in _IO_MNEMONICS:
                    sites.append((addr, size, mnem.startswith("rep")))
                if m in _BLOCK_ENDERS:
                    break
            limits.put(self._io_sites, block, sites)
        return sites

    def forget_block(self, address: int) -> None:
        """The engine translated a new block at `address`: its code may have changed."""
        self._io_sites.pop(address, None)

    def _cs(self):
        if self._disasm is None:
            from capstone import CS_ARCH_X86, CS_MODE_32, Cs

            self._disasm = Cs(CS_ARCH_X86, CS_MODE_32)
        return self._disasm

    # rdtsc returns the virtual clock and nothing else happens: the C hook does exactly what rdtsc()
    # does. A vCPU class that intercepts rdtsc (hw: RDTSC exiting, TSC offsetting) sets this False.
    rdtsc_in_c = True
    # CPUID answers with the CPU model and nothing else happens: the C hook (engine/cpuid.py) answers
    # from the model's table. A vCPU class that intercepts CPUID (hw: always a VM exit) sets this False.
    cpuid_in_c = True

    def rdtsc(self, _uc, _data) -> int:
        now = self.clock.now
        self.regs.write(R.EAX, now & 0xFFFFFFFF)
        self.regs.write(R.EDX, (now >> 32) & 0xFFFFFFFF)
        return 1

    def enable_intercepts(self, wanted: frozenset[str], on_hit, lazy_io: bool = False) -> None:
        """Make the instructions in `wanted` visible (see cpu/intercept.py); on_hit runs before each.
        Far jmp/call and iret are always added: cpuvirt decides gates and task switches (far_site).

        `lazy_io`: the in/out of `wanted` get their hooks only once the guest runs outside CPL 0
        (arm_io_gate): at CPL 0 the I/O permission check always passes, and a code hook on every
        in/out would triple the cost of an I/O exit. Code at another CPL (or in V86 mode) is always
        translated anew (the engine's translations are keyed by CPL), so the first block translated
        there arms the gate before it runs, however the guest got there (iret, retf, sysexit...)."""
        from cpuvirt.cpu import ssealign
        from cpuvirt.cpu.intercept import FAR_TRANSFERS, Intercepts, is_far_transfer

        if lazy_io:
            self.io_gate_armed = False
            wanted = wanted - IO_INSTRUCTIONS

        def hit(address, size, mnem, ops):
            self.mmu.crs = None
            # The hook's address is linear; EIP is an offset in CS, and they differ in real mode
            # with a segment other than 0. The handlers work on the linear address (fetch, trace) and
            # skip by writing address + size: made EIP + size here.
            eip = self.regs.read(R.EIP)
            if mnem in FAR_TRANSFERS and is_far_transfer(mnem, ops):
                self.far_site(address, size, mnem)
            elif ssealign.is_aligned_sse(mnem, ops):
                self.sse_align_site(address, size)
            else:
                on_hit(address, size, mnem, ops)
            after = self.regs.read(R.EIP)
            skipped = (eip + size) & 0xFFFFFFFF
            if eip != address and after == (address + size) & 0xFFFFFFFF:
                after = skipped
                self.regs.write(R.EIP, after)
            if after != eip:
                # Emulated and skipped (it retired), or an event delivered instead (it did not).
                self.left_block_at(address + size if after == skipped else address)
                if after == skipped:
                    self.faults.clear_interrupt_shadow()
            self.clock.if_may_have_changed()

        ic = self.intercepts = Intercepts(self.hooks, self.mmu, wanted | FAR_TRANSFERS | {ssealign.MARKER}, hit)
        ic.sse = ssealign.SseAlign.create(self.uc, self.faults.layout.hflags)
        ic.on_limit = lambda why: self.finish("error", EXIT_HYPERVISOR_STOP, why)
        # real-address and virtual-8086 mode, and code segments with D = 0: 16-bit code
        ic.code16 = lambda: not self.running_code32()
        self.mmu.on_code_frame = ic.note_frame  # (the block check finds the sites: cpu/intercept.py)

        def observe(insns):
            if not self.io_gate_armed and self.regs.cpl() != 0:
                self.arm_io_gate()  # then this block is translated again, with hooks
                ic.check_block(insns)  # its own in/out too: the clock never asks about it again
                ic.retranslate.append((insns[0][0], sum(i[1] for i in insns)))
                return True
            if ic.check_block(insns):
                ic.retranslate.append((insns[0][0], sum(i[1] for i in insns)))
                return True
            return False

        self.machine.block_observer = observe

    # -- far transfers: call gates, task switches, iret (cpu/tasks.py) -----------------------------
    def far_site(self, address: int, size: int, mnem: str) -> None:
        """Before a far jmp/call or an iret: what may change privilege or task is done here, by
        cpuvirt; an ordinary far transfer is left to the engine (it returns without acting)."""
        if mnem.startswith("iret") and self.outcome is None:
            self.iret_image_rf(address, size)
        if self.outcome is not None or not self.regs.read(R.CR0) & 1:
            return  # real-address mode has no gates, tasks or NT
        from cpuvirt.cpu import tasks

        try:
            if mnem.startswith("iret"):
                self.iret_site(address, size, mnem == "iretd")
                return
            target = self.far_pointer(address)
            if target is None:
                return
            sel, offset, call = target
            if not sel & ~3:
                return  # the engine raises #GP(0)
            try:
                _, hi = tasks.descriptor(self.view, sel)
            except DeliveryFault:
                return  # outside its table: the engine raises that #GP
            if hi & (1 << 12):
                return  # a code segment: an ordinary far transfer
            self.record(
                "transfer",
                "lcall" if call else "ljmp",
                None,
                address,
                {"selector": f"{sel:#x}", "type": (hi >> 8) & 0xF},
                "through a gate or to a task, done by cpuvirt",
            )
            self.system_transfer(address, size, sel, offset, call)
            self.clock.unretire(-1)  # it retired (the hook's caller counts it out)
            self.after_transfer()
        except DeliveryFault as f:
            self.transfer_fault(address, f)

    def iret_site(self, address: int, size: int, wide: bool) -> None:
        """iret: with EFLAGS.NT a task return (done here); an image with EFLAGS.VM = 1 is honoured
        only at CPL 0 (SDM IRET): at CPL > 0 the engine would enter V86 anyway, so the bit is
        cleared in the image first and the engine does the protected-mode return."""
        regs = self.regs
        self.unblock_nmi()
        eflags = regs.read(R.EFLAGS)
        if eflags & EFLAGS_VM:
            return  # a V86 iret: IOPL 3, or the engine's #GP(0)
        if eflags & EFLAGS_NT:
            self.record("transfer", "iret", None, address, {"nt": 1}, "task return, done by cpuvirt")
            self.task_return(address, size)
            self.clock.unretire(-1)
            self.after_transfer()
            return
        if wide and regs.read(R.CS) & 3:
            self.iret_to_v86(address)  # at CPL 0 (native, hw) VM=1 is honoured: nothing to do

    def install_io_sites(self, site_cpls: int, port_cpls: int) -> None:
        """Answer in C what the I/O gate decides at once (cpu/iosites.py, _iogate.c): the intercepted
        I/O sites at a real CPL in the mask `site_cpls` outside V86 mode (allowed without the TSS
        bitmap: nothing to do), and, once the run starts without a trace (time_port_io_in_c), the
        accesses at a real CPL in `port_cpls` (their virtual time in C, the device through
        timed_in / timed_out). Call after enable_intercepts. Off switch: CPUVIRT_IO_GATE_C=0."""
        from cpuvirt.cpu.iosites import IoSites

        self.io_sites = IoSites.install(self, IO_INSTRUCTIONS, site_cpls, port_cpls)

    def arm_io_gate(self) -> None:
        """The guest runs outside CPL 0 (or in V86 mode): from now on every in/out is checked. Its
        translations, made without those hooks, are dropped before the engine runs again, and the
        clock's block cache is emptied so that every block is checked for in/out when it next runs."""
        if self.io_gate_armed:
            return
        from cpuvirt.cpu.vcpu import IO_INSTRUCTIONS as io

        self.io_gate_armed = True
        ic = self.intercepts
        assert ic is not None, "the I/O gate arms the intercepts watch_if_setters made"
        ic.wanted = ic.wanted | io
        self._flush_translations = True
        # The clock counts a block once per (address, size) and asks the observer only then: an in/out
        # site run at CPL 0 before now would never be looked at again, and run unchecked at CPL 3.
        self.clock.forget_blocks()

    def unblock_nmi(self) -> None:
        """An iret ends NMI blocking, even one that faults (SDM 6.7.1): an NMI that waited is taken
        right after it (the iret ends its block, so the clock stops at the next instruction)."""
        if self.nmi_blocked:
            self.nmi_blocked = False
            if self.machine.pending_nmi():
                self.clock.pull_in(self.clock.now)

    def iret_to_v86(self, address: int) -> None:
        """An iretd whose EFLAGS image may have VM set: the engine honours it at any CPL."""
        if self.view.cpl() == 0:
            return  # as hardware: the engine enters V86 mode
        self.strip_vm_image(address)

    def strip_vm_image(self, address: int) -> None:
        esp = self.regs.read(R.ESP)
        try:
            image = int.from_bytes(self.view.read(esp + 8, 4), "little")
        except DeliveryFault:
            return  # the engine's iret faults the same way
        if image & EFLAGS_VM:
            self.record(
                "transfer",
                "iretd",
                None,
                address,
                {"eflags": f"{image:#x}"},
                "EFLAGS.VM ignored at CPL > 0 (cleared in the image)",
            )
            self.view.write(esp + 8, (image & ~EFLAGS_VM).to_bytes(4, "little"))

    def far_pointer(self, address: int) -> tuple[int, int, bool] | None:
        """(selector, offset, is_call) of the far jmp/call at `address` (operand read as the CPU
        would: a #PF on it is the guest's)."""
        from cpuvirt.cpu.intercept import PREFIXES
        from cpuvirt.x86.faultaddr import operand_address

        code = self.mmu.fetch_bytes(address, 15)
        if not code:
            return None
        p, o16 = 0, False
        while p < len(code) - 1 and code[p] in PREFIXES:
            o16 |= code[p] == 0x66
            p += 1
        n = 2 if o16 else 4
        op = code[p]
        if op in (0x9A, 0xEA):
            offset = int.from_bytes(code[p + 1 : p + 1 + n], "little")
            return int.from_bytes(code[p + 1 + n : p + 3 + n], "little"), offset, op == 0x9A
        if op == 0xFF and p + 1 < len(code):
            addr = operand_address(code, address, self.regs)
            if addr is None:
                return None
            raw = self.view.read(addr, n + 2)
            return int.from_bytes(raw[n:], "little"), int.from_bytes(raw[:n], "little"), (code[p + 1] >> 3) & 7 == 3
        return None

    def io_gate(self, address: int, size: int, mnem: str, ops: str) -> None:
        """Before an in/out/ins/outs: #GP(0) when the I/O permission check fails (cpu/ioperm.py);
        at CPL 0 outside V86 mode it always passes (two register reads)."""
        regs = self.regs
        if not regs.read(R.CS) & 3 and not regs.read(R.EFLAGS) & EFLAGS_VM:
            return
        from cpuvirt.cpu.ioperm import io_operands, io_permitted

        port, width = io_operands(mnem, ops, regs)
        if not io_permitted(self.view, port, width):
            self.record(
                "exception",
                "#GP",
                13,
                address,
                {"vector": 13, "error_code": 0, "port": f"{port:#x}", "why": "I/O not permitted (IOPL, TSS bitmap)"},
                "delivered through the guest IDT",
            )
            # the return EIP is the offset in CS (the hook's address is linear: V86 and real mode differ)
            self.deliver(Vector.GP, self.regs.read(R.EIP), 0)

    def sse_align_site(self, address: int, size: int) -> None:
        """A legacy-SSE instruction whose m128 operand must be 16-byte aligned (cpu/ssealign.py), seen
        by Python when the C check did not pass it: #GP(0) if the operand is misaligned (SDM Vol. 2A
        2.4), decoded as the CPU decodes it now (16- or 32-bit code, the segment's base)."""
        from cpuvirt.cpu.ssealign import misaligned_operand

        code = self.sse_code(address, size)
        segs = self.engine_segments()
        if not code or segs is None:
            return
        linear = misaligned_operand(code, self.code32(segs), self.regs, segs.base)
        if linear is None:
            return
        eip = self.sse_fault_eip(address)
        self.record(
            "exception",
            "#GP",
            13,
            eip,
            {"vector": 13, "error_code": 0, "address": f"{linear:#x}", "why": "misaligned SSE operand"},
            "delivered through the guest IDT",
        )
        self.deliver(Vector.GP, eip, 0)

    _engine_segments = None
    _live_cs: Any = None  # CS's segment cache in the engine's CPU state (False: not found), running_code32

    def engine_segments(self):
        """The engine's segment caches (cpu/segcache.py), refreshed; None if they cannot be read."""
        from cpuvirt.cpu.segcache import EngineSegments

        segs = self._engine_segments
        if segs is None:
            segs = self._engine_segments = EngineSegments(self.uc)
        if not segs.available:
            return None
        segs.refresh()
        return segs

    def running_code32(self) -> bool:
        """Does the code running now decode as 32-bit code: protected mode outside V86 with CS.D = 1
        (SDM Vol. 3A 3.4.5)? Asked when a new block is counted or an intercept re-decodes; in
        protected mode it costs one read of the engine's segment caches (D = 1 if unreadable)."""
        if not self.regs.read(R.CR0) & 1 or self.regs.read(R.EFLAGS) & EFLAGS_VM:
            return False
        cs = self._live_cs
        if cs is None:
            from cpuvirt.cpu.segcache import live_segment

            cs = self._live_cs = live_segment(self.uc, R.CS) or False
        if cs is not False:
            return bool(cs.flags >> 22 & 1)
        segs = self.engine_segments()
        return segs is None or segs.code32()

    def code32(self, segs) -> bool:
        """Does the code running now default to 32-bit operands (protected mode, outside V86, CS.D)?"""
        return bool(self.regs.read(R.CR0) & 1) and not self.regs.read(R.EFLAGS) & EFLAGS_VM and segs.code32()

    def iret_image_rf(self, address: int, size: int) -> None:
        """An iret whose 32-bit EFLAGS image sets RF: cleared in the image before the engine pops it.
        The engine keeps RF = 1 to the end of its next translation block, and a `pushf` there stores
        it, where the SDM says PUSHF never copies RF (nor VM) but stores them cleared (kvm-unit-tests
        realmode, `rflags.rf`; tests/guests/iret_rf.S). RF's one other effect is to let the
        instruction at the return address run past its instruction breakpoint (SDM Vol. 3B 18.3.1.1),
        which the engine honours in native and hw: while DR7 arms an instruction breakpoint the image
        is left as it is (a debugger's #DB handler returns with RF = 1), and the pushf difference
        stays. In every mode; native's C iret hook sends here only the irets whose image has RF."""
        segs = self.engine_segments()
        ic = self.intercepts
        site = ic.sites.get(address) if ic is not None else None  # its bytes, checked by Intercepts._hit
        code = site[3] if site is not None and site[0] == size else self.mmu.fetch_bytes(address, size)
        if segs is None or not code:
            return
        prefixes = code[:-1]
        if self.code32(segs) == (0x66 in prefixes):
            return  # iretw: a 16-bit image has no RF
        esp = self.regs.read(R.ESP)
        mask = 0xFFFFFFFF if segs.stack32() else 0xFFFF
        linear = (segs.base(R.SS) + ((esp + 8) & mask)) & 0xFFFFFFFF
        # read without side effects, as native's C hook peeks (the engine's iret reads it for real);
        # hw with EPT has the same C walker (its delivery path), the Python walk costs 40 us there
        fast = self.delivery.fast
        raw = fast.peek(linear, 4) if fast is not None else None
        if raw is None:
            raw = self.mmu.fetch_bytes(linear, 4)
        if raw is None or not raw[2] & 1 or instruction_breakpoint_armed(self.regs.read(R.DR7)):
            return  # unreadable (the engine's iret faults), RF clear, or RF wanted by a breakpoint
        try:
            self.view.write(linear, (int.from_bytes(raw, "little") & ~EFLAGS_RF).to_bytes(4, "little"))
        except DeliveryFault:
            return  # the engine's iret faults the same way

    def smsw_site(self, address: int, size: int) -> bool:
        """`smsw r32`: all of the guest's CR0 in the register, as QEMU 7.2 stores it (the SDM leaves
        the upper half undefined; the engine keeps the register's own); True when done. Other forms
        are left to run as they are (False)."""
        segs = self.engine_segments()
        code = self.mmu.fetch_bytes(address, size)
        if segs is None or not code:
            return False
        reg = smsw_register32(code, self.code32(segs))
        if reg is None:
            return False
        self.regs.write(reg, self.guest_cr0() & 0xFFFFFFFF)
        self.regs.write(R.EIP, (address + size) & 0xFFFFFFFF)
        return True

    def guest_cr0(self) -> int:
        """CR0 as the guest reads it (the deprivileging core and hw override it)."""
        return self.regs.read(R.CR0)

    def sse_code(self, address: int, size: int) -> bytes | None:
        """The bytes of the intercepted SSE instruction at engine address `address`."""
        return self.mmu.fetch_bytes(address, size)

    def sse_fault_eip(self, address: int) -> int:
        """The guest EIP of a fault at engine address `address`: EIP, the offset in CS (the address is
        linear); full maps its translation cache."""
        return self.regs.read(R.EIP)

    def cr4_gate(self, address: int, size: int, ops: str) -> None:
        """mov to CR4 setting a bit the CPU model does not have: #GP(0) (SDM Vol. 3A 2.5)."""
        from cpuvirt.x86.cpuid import CR4_RESERVED

        dst, _, src = (t.strip() for t in ops.partition(","))
        if dst != "cr4" or src not in R.GPR_NAMES:
            return
        value = self.regs.read(R.GPR_ORDER[R.GPR_NAMES.index(src)])
        # bits newly set (the engine starts with some of its own above bit 11: they stay)
        if value & ~self.regs.read(R.CR4) & CR4_RESERVED and self.regs.cpl() == 0:
            self.record(
                "exception",
                "#GP",
                13,
                address,
                {"vector": 13, "error_code": 0, "why": "reserved CR4 bit"},
                "delivered through the guest IDT",
            )
            self.deliver(Vector.GP, address, 0)

    def system_transfer(self, address: int, size: int, sel: int, offset: int, call: bool) -> None:
        """A far jmp/call to a call gate, TSS or task gate (cpu/tasks.py)."""
        from cpuvirt.cpu import tasks

        tasks.far_transfer(self.view, sel, offset, call, address, (address + size) & 0xFFFFFFFF)

    def task_return(self, address: int, size: int) -> None:
        """iret with EFLAGS.NT: back to the previous task."""
        from cpuvirt.cpu import tasks

        tasks.task_return(self.view, (address + size) & 0xFFFFFFFF)

    def switch_task(self, view, sel: int, reason: int, next_eip: int, ext: int = 0) -> None:
        """A hardware task switch (cpu/tasks.py); hw makes it a TASK_SWITCH VM exit first."""
        from cpuvirt.cpu import tasks

        tasks.switch_task(view, sel, reason, next_eip, ext)

    def after_transfer(self) -> None:
        """After a gate or task switch done by cpuvirt (full mode drops translations it invalidated)."""

    def transfer_fault(self, address: int, f: DeliveryFault) -> None:
        """A fault raised by a far transfer or task switch: to the guest, at the instruction (or, after
        a task switch's commit point, in the new task)."""
        eip = f.eip if f.eip is not None else address
        ec = f.error_code if f.vector in HAS_ERROR_CODE else None
        if f.cr2 is not None:
            self.delivery._set_cr2(f.cr2)
        self.record(
            "exception",
            MNEMONIC.get(f.vector, str(f.vector)),
            f.vector,
            eip,
            {"vector": f.vector, "error_code": ec},
            "delivered through the guest IDT",
        )
        self.deliver(f.vector, eip, ec)

    # -- hooks -------------------------------------------------------------------------------------
    def install_hooks(self) -> None:
        uc = self.uc
        hooks = self.hooks  # each under the one guard (engine/hooks.py)
        first_fill_hook(uc)
        uc.hook_add(UC_HOOK_TLB_FILL, self.mmu.fill)
        self._intr_hook = hooks.intr(self.hook_intr)  # para replaces it (modes/para)
        hooks.invalid(self.hook_invalid)
        self._port_hooks = (hooks.port_in(self.hook_in), hooks.port_out(self.hook_out))
        if self.rdtsc_in_c:
            self.clock.hook_rdtsc()  # the virtual clock, read in C: rdtsc causes no Python
        else:
            self.add_rdtsc_hook()
        table = CpuidTable.install(uc) if self.cpuid_in_c else None
        if table is not None:
            self.cpuid_table = table
            table.load(*self.machine.cpuid_table())
            self.machine.apic.on_base_change = lambda: table.load(*self.machine.cpuid_table())
        else:
            self.add_cpuid_hook()
        hooks.system_call(X.UC_X86_INS_SYSCALL, self.hook_syscall)
        hooks.system_call(X.UC_X86_INS_SYSENTER, self.hook_sysenter)

    def _hooked_system_call(self, second: int) -> tuple[int, int]:
        """(address, length) of the syscall (0F 05) or sysenter (0F 34) whose hook is running.

        The engine does not update EIP before these hooks (it holds the start of the running
        block), but each of them ends its block: it is the block's last instruction."""
        entry = self.machine.block_insns.get(self.clock.last_block)
        candidates = [entry[0][-1]] if entry else []
        candidates.append(self.regs.read(R.EIP))
        for eip in candidates:
            code = self.mmu.fetch_bytes(eip, 15) or b""
            p = 0
            while p < len(code) - 1 and code[p] in (0x66, 0x67, 0xF2, 0xF3, 0x2E, 0x3E, 0x26, 0x36, 0x64, 0x65):
                p += 1
            if code[p : p + 2] == bytes((0x0F, second)):
                return eip, p + 2
        raise RuntimeError(
            f"internal: no {'sysenter' if second == 0x34 else 'syscall'} at the hooked block {self.clock.last_block:#x}"
        )

    def hook_syscall(self, uc, _data) -> None:
        """syscall: the CPU model reports no SYSCALL and EFER.SCE is never set, so #UD as on QEMU
        (the engine alone treats it as a no-op). The engine adds the instruction's length to the
        EIP this hook leaves: EIP is set that much before where the delivery left it."""
        self.mmu.crs = None
        eip, length = self._hooked_system_call(0x05)
        self.left_block_at(eip)
        self.invalid_opcode(eip)
        self.regs.write(R.EIP, (self.regs.read(R.EIP) - length) & 0xFFFFFFFF)

    def hook_sysenter(self, uc, _data) -> None:
        """sysenter, done here in every mode (the engine alone treats it as a no-op, and under
        deprivileging its transfer would load a real ring-0 CS); see hook_syscall for EIP."""
        self.mmu.crs = None
        eip, length = self._hooked_system_call(0x34)
        self.left_block_at(eip)
        self.sysenter(eip)
        self.regs.write(R.EIP, (self.regs.read(R.EIP) - length) & 0xFFFFFFFF)

    def sysenter_msrs(self) -> tuple[int, int, int]:
        """IA32_SYSENTER_CS, _ESP, _EIP (deprivileging keeps them in the virtual CPU)."""
        return self.uc.msr_read(0x174), self.uc.msr_read(0x175), self.uc.msr_read(0x176)

    def sysenter(self, eip: int) -> None:
        """SDM SYSENTER, as QEMU does it: #GP(0) while IA32_SYSENTER_CS is null, else to CPL 0 at
        IA32_SYSENTER_EIP/ESP with CS = IA32_SYSENTER_CS, SS = CS + 8, VM, IF and RF cleared."""
        cs, esp, target = self.sysenter_msrs()
        cs &= 0xFFFC
        if not cs:
            self.record(
                "exception",
                "#GP",
                13,
                eip,
                {"vector": 13, "error_code": 0, "why": "sysenter with IA32_SYSENTER_CS null"},
                "delivered through the guest IDT",
            )
            self.deliver(Vector.GP, eip, 0)
            return
        d = self.delivery
        flags = d._eflags() & ~(EFLAGS_VM | EFLAGS_IF | EFLAGS_RF)
        d._enter(cs, cs + 8, d._cpl(), 0, self.regs.read(R.CS), esp & 0xFFFFFFFF, flags, target & 0xFFFFFFFF)

    def invalid_opcode(self, eip: int) -> None:
        """#UD for the instruction at `eip` (modes that run code elsewhere map `eip` first)."""
        self.record("exception", "#UD", 6, eip, {"vector": 6}, "delivered through the guest IDT")
        self.deliver(Vector.UD, eip)

    def add_rdtsc_hook(self) -> None:
        """The Python rdtsc hook, when rdtsc is not the plain virtual clock (hw puts a C path in front)."""
        self._rdtsc_cb = _RDTSC_CB(self.rdtsc)
        self._rdtsc_hook = add_c_hook(
            self.uc._uch, UC_HOOK_INSN, self._rdtsc_cb, None, 1, 0, insn=X.UC_X86_INS_RDTSC, what="hook rdtsc"
        )

    def add_cpuid_hook(self) -> None:
        """The Python cpuid hook, when CPUID is not answered in C (hw puts its own C path in front)."""
        self.hooks.cpuid(self.hook_cpuid)

    def hook_cpuid(self, uc, _data) -> bool:
        """CPUID answers with cpuvirt's CPU model (x86/cpuid.py, through the machine), in every mode,
        never with the engine's own CPU. Returning True keeps the registers written here."""
        self.mmu.crs = None
        regs = self.regs
        eax, ebx, ecx, edx = self.machine.cpuid(regs.read(R.EAX), regs.read(R.ECX))
        regs.write(R.EAX, eax)
        regs.write(R.EBX, ebx)
        regs.write(R.ECX, ecx)
        regs.write(R.EDX, edx)
        return True

    # -- recording -----------------------------------------------------------------------------------
    def record(self, kind: str, reason: str, code, eip: int, detail: dict, action: str) -> None:
        self._counts[kind] += 1
        self._reasons[kind, reason if reason != "mov" else _mov_reason(detail)] += 1
        if self.trace is not None:
            self.trace.event(
                self.clock.instructions, self.regs.cpl(), kind, reason, code, eip, self.insn_at(eip), detail, action
            )

    def insn_at(self, eip: int) -> str:
        code = self.mmu.fetch_bytes(eip, 15)
        if code is None:
            return "(not mapped)"
        text = self._insn_cache.get((eip, code))
        if text is None:
            for _, _, mnem, ops in self._cs().disasm_lite(code, eip, 1):
                text = f"{mnem} {ops}".strip()
                break
            else:
                text = "(bad)"
            if len(self._insn_cache) >= 65536:  # bounded: a guest may run code at any address
                self._insn_cache.clear()
            self._insn_cache[(eip, code)] = text
        return text


def _mov_reason(detail: dict) -> str:
    """The cost model's reason for an emulated `mov`: which register (mov cr3, mov dr7, mov sreg)."""
    if "cr" in detail:
        return f"mov cr{detail['cr']}"
    if "dr" in detail:
        return f"mov dr{detail['dr']}"
    return "mov sreg" if "sreg" in detail else "mov"


def smsw_register32(code: bytes, code32: bool) -> int | None:
    """The register of an `smsw` with a 32-bit register destination (0F 01 /4, ModRM.mod = 3, 32-bit
    operand size), or None for any other form or instruction."""
    from cpuvirt.cpu.intercept import PREFIXES

    p, o16 = 0, False
    while p < len(code) and code[p] in PREFIXES:
        o16 |= code[p] == 0x66
        p += 1
    if code[p : p + 2] != b"\x0f\x01" or p + 2 >= len(code):
        return None
    modrm = code[p + 2]
    if modrm >> 6 != 3 or (modrm >> 3) & 7 != 4 or code32 == o16:
        return None
    return R.GPR_ORDER[modrm & 7]
