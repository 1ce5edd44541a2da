"""The virtual CPU's life in one loop: enter the guest, see why it stopped, dispatch, repeat.

Exits that need no stop (I/O, exceptions, `int n`, rdtsc) are handled inside Unicorn's hooks, so they
cost a hook call and not a stop/restart (~4 us). The engine stops only for a refused TLB fill (a page
fault), the clock's deadline (timer interrupts, budget), `hlt`, and the end of the run.
"""
from __future__ import annotations

import ctypes
from collections import Counter

from unicorn import (UC_HOOK_INSN, UC_HOOK_INSN_INVALID, UC_HOOK_INTR, UC_HOOK_TLB_FILL, UcError)
from unicorn import x86_const as X
from unicorn.unicorn_py3 import unicorn as _ucmod

from cpuvirt.cpu import regs as R
from cpuvirt.cpu.faultaddr import fault_address
from cpuvirt.cpu.events import MNEMONIC, EventDelivery, TripleFault, Unsupported, Vector
from cpuvirt.cpu.quirks import FaultState
from cpuvirt.machine.clock import NEVER
from cpuvirt.memory.traces import TraceError, TracedWrite

EXIT_BUDGET, EXIT_TRIPLE_FAULT, EXIT_HALTED, EXIT_ERROR = 124, 125, 126, 1
IO_CYCLES = 1000    # a port access costs 1 us of virtual time, as an ISA bus cycle does on a PC
POLL_INSNS = 1000   # while an interrupt waits for IF=1, look again this often (instructions)
_IO_MNEMONICS = frozenset(("in", "out", "insb", "insw", "insd", "outsb", "outsw", "outsd"))
_BLOCK_ENDERS = frozenset(("jmp", "call", "ret", "iret", "iretd", "hlt", "int", "int3", "into", "ljmp", "lcall",
                           "retf", "sysenter", "syscall", "ud2", "loop", "loope", "loopne", "jecxz")
                          + tuple("j" + c for c in ("a", "ae", "b", "be", "e", "ne", "g", "ge", "l", "le",
                                                      "o", "no", "p", "np", "s", "ns")))
_RDTSC_CB = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)


class Outcome:
    __slots__ = ("kind", "status", "message")

    def __init__(self, kind: str, status: int, message: str = ""):
        self.kind, self.status, self.message = kind, status, message


class Vcpu:
    def __init__(self, machine, trace=None, max_insns: int = 0):
        self.m = machine
        self.uc = machine.uc
        self.regs = machine.regs
        self.mmu = machine.mmu
        self.clock = machine.clock
        self.delivery = EventDelivery(self.uc, self.regs, self.mmu)
        self.faults = FaultState(self.uc)
        self.trace = trace
        self.budget = max_insns or NEVER
        self.outcome: Outcome | None = None
        self.counts: Counter = Counter()
        self._disasm = None
        self._insn_cache: dict[tuple[int, bytes], str] = {}
        self.error: BaseException | None = None
        self.intercepts = None    # an Intercepts, for modes that must see non-trapping instructions
        self._io_block, self._io_index = -1, 0
        self._intr_depth = 0
        self._after_one_block = False
        self._io_sites: dict = {}
        machine.on_new_block = self.forget_block

    # -- the run loop --------------------------------------------------------------------------------
    def run(self, entry: int) -> Outcome:
        uc, regs, clock = self.uc, self.regs, self.clock
        regs.write(R.EIP, entry)
        while self.outcome is None:
            self.before_entry()
            if self.outcome is not None:
                break
            eip = regs.read(R.EIP)
            clock.arm(self._next_deadline())
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
            if self.intercepts is not None and self.intercepts.retranslate:
                # A new block held an instruction without its hook: drop its translation and rerun it.
                for address, size in self.intercepts.retranslate:
                    uc.ctl_remove_cache(address, address + size)
                self.intercepts.retranslate.clear()
                if not stopped_by_fault and not clock.expired():
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
        return self.outcome

    def left_block_at(self, boundary: int) -> None:
        """Execution leaves the running block early: the instructions from `boundary` on did not
        retire, so they come off the count (the clock counted the whole block when it began)."""
        entry = self.m.block_insns.get(self.clock.last_block)
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
            self.finish("error", EXIT_ERROR, f"guest fetched code from unbacked memory at {pending.gva:#x}")
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
            self.clock.unretire(-1)     # emulated and skipped: the instruction retired

    def exact_linear(self, pending, eip: int) -> int:
        """The faulting linear address (the fill hook is told only its page)."""
        gva = pending.gva
        if pending.access != 2:   # a data access: decode the instruction's operands
            return fault_address(self.mmu.fetch_bytes(eip, 15), eip, gva & 0xFFFFF000, self.regs)
        if (eip & 0xFFFFF000) == (gva & 0xFFFFF000):
            return eip             # a fetch faults at the instruction (or its next page)
        return gva

    def finish(self, kind: str, status: int, message: str = "") -> None:
        if self.outcome is None:
            self.outcome = Outcome(kind, status, message)
            self.uc.emu_stop()

    def _next_deadline(self) -> int:
        d = self.m.next_timer_deadline()
        # A deadline already due was handled (update_timers); what it raised waits in the
        # controller and is covered by the poll below.
        d = NEVER if d is None or d <= self.clock.now else d
        if self.m.pending_nmi():
            d = self.clock.now              # an NMI ignores IF: take it at the next block boundary
        elif self.m.pending_interrupt() is not None:
            d = min(d, self.clock.now + POLL_INSNS)
        if self._after_one_block:
            self._after_one_block = False
            d = self.clock.now              # already due: the clock stops after the next block
        return min(d, self.budget)

    # -- time: timer interrupts, budget, hlt -------------------------------------------------------
    def on_deadline(self, eip: int) -> None:
        if self.clock.now >= self.budget:
            self.finish("budget", EXIT_BUDGET, f"budget of {self.budget:,} cycles exhausted (--max-insns: instructions plus I/O and idle time)")
            return
        self.m.update_timers()
        self.inject_pending_interrupt(eip)

    def inject_pending_interrupt(self, eip: int) -> bool:
        m = self.m
        if m.pending_nmi():
            # NMI (vector 2) is not masked by IF and goes before INTR (SDM 6.9, priority 5 vs 6).
            m.acknowledge_nmi()
            self.record("interrupt", "NMI", Vector.NMI, eip, {}, "delivered through the guest IDT")
            self.deliver(Vector.NMI, eip, external=True)
            return True
        if m.pending_interrupt() is None or not self.regs.read(R.EFLAGS) & R.EFLAGS_IF:
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
        if_set = self.regs.read(R.EFLAGS) & R.EFLAGS_IF
        self.record("hlt", "HLT", None, hlt_eip, {"if": bool(if_set)}, "idle until the next interrupt")
        if not if_set:
            self.finish("halted", EXIT_HALTED, f"hlt at {hlt_eip:#x} with interrupts disabled: nothing can wake the CPU")
            return
        if self.inject_pending_interrupt(eip):
            return
        deadline = self.m.next_timer_deadline()
        if deadline is None or deadline >= self.budget:
            if deadline is None:
                self.finish("halted", EXIT_HALTED, f"hlt at {hlt_eip:#x} with no timer armed: nothing can wake the CPU")
            else:
                self.finish("budget", EXIT_BUDGET, f"budget of {self.budget:,} cycles exhausted (--max-insns: instructions plus I/O and idle time) while halted")
            return
        if deadline > self.clock.now:
            self.clock.advance(deadline - self.clock.now)
        self.m.update_timers()
        if not self.inject_pending_interrupt(eip):
            self.finish("halted", EXIT_HALTED, f"hlt at {hlt_eip:#x}: the timer fired but its IRQ is masked")

    # -- faults and interrupts ---------------------------------------------------------------------
    def page_fault(self, gva: int, access: int, error_code: int, eip: int) -> None:
        self.regs.write(R.CR2, gva)
        self.record("page_fault", "#PF", 14, eip,
                    {"cr2": f"{gva:#x}", "error_code": error_code, "access": ("read", "write", "fetch")[access],
                     "fault": "true"}, "delivered #PF through the guest IDT")
        self.deliver(Vector.PF, eip, error_code)

    def deliver(self, vector: int, return_eip: int, error_code: int | None = None,
                soft: bool = False, external: bool = False, fault_eip: int | None = None) -> None:
        try:
            self.delivery.deliver(vector, return_eip, error_code, soft, external, fault_eip)
        except TripleFault as tf:
            self.record("exception", "TRIPLE_FAULT", None, return_eip, {"why": str(tf)}, "shutdown")
            self.finish("triple_fault", EXIT_TRIPLE_FAULT, f"triple fault at {return_eip:#x}: {tf}")
        except Unsupported as u:
            self.finish("error", EXIT_ERROR, f"unsupported at {return_eip:#x}: {u}")

    def hook_intr(self, uc, intno, _data):
        """Every exception and `int n` the engine raises (it never delivers them itself)."""
        if self._intr_depth:
            # The engine raised a fault while cpuvirt was delivering one (a register load refused):
            # that is a cpuvirt bug, so end the run with a clear message instead of recursing.
            self.finish("error", EXIT_ERROR, f"internal: the engine raised vector {intno} while cpuvirt "
                        "was delivering an event")
            return
        self._intr_depth += 1
        self.mmu.crs = None
        try:
            error_code, soft = self.faults.take()
            self.on_engine_event(intno, error_code, soft, self.regs.read(R.EIP))
        except BaseException as e:   # never let an exception unwind through the engine
            self.error = e
            uc.emu_stop()
        finally:
            self._intr_depth -= 1

    def on_engine_event(self, intno: int, error_code: int, soft: bool, eip: int) -> None:
        """What the engine raised, EIP as it left it: modes that emulate some of it (trap's #GP) or
        run the guest elsewhere (full's translation cache) override this."""
        self.left_block_at(eip)
        self._deliver_engine_event(intno, error_code, soft, eip)

    def _deliver_engine_event(self, intno: int, error_code: int, soft: bool, eip: int) -> None:
        """Deliver what the engine raised: `int n`/int3/into (EIP already past them) or a fault."""
        if soft or intno in (Vector.BP, Vector.OF):
            prev = self.mmu.fetch_bytes((eip - 1) & 0xFFFFFFFF, 1)
            insn_len = 1 if prev in (b"\xcc", b"\xce") else 2     # int3 / into, or int n
            start = (eip - insn_len) & 0xFFFFFFFF
            name = f"int {intno:#x}" if soft else MNEMONIC.get(intno, str(intno))
            self.record("exception" if not soft else "interrupt", name, intno, start,
                        {"vector": intno, "software": soft}, "delivered through the guest IDT")
            self.deliver(intno, eip, soft=soft, fault_eip=start)
        else:
            ec = error_code if intno in (8, 10, 11, 12, 13, 14, 17) else None
            detail = {"vector": intno} if ec is None else {"vector": intno, "error_code": ec}
            self.record("exception", MNEMONIC.get(intno, f"vector {intno}"), intno, eip, detail,
                        "delivered through the guest IDT")
            self.deliver(intno, eip, ec)

    def hook_invalid(self, uc, _data) -> bool:
        self.mmu.crs = None
        try:
            eip = self.regs.read(R.EIP)
            self.left_block_at(eip)
            self.record("exception", "#UD", 6, eip, {"vector": 6}, "delivered through the guest IDT")
            self.deliver(Vector.UD, eip)
        except BaseException as e:
            self.error = e
            uc.emu_stop()
        return True

    # -- devices -----------------------------------------------------------------------------------
    def hook_in(self, uc, port, size, _data):
        if self.outcome is not None:
            return 0
        self.mmu.crs = None
        try:
            return self.port_io(port, size, True)
        except BaseException as e:
            self.error = e
            uc.emu_stop()
            return 0

    def hook_out(self, uc, port, size, value, _data):
        if self.outcome is not None:
            return
        self.mmu.crs = None
        try:
            self.port_io(port, size, False, value)
            if self.outcome is not None:
                uc.emu_stop()
        except BaseException as e:
            self.error = e
            uc.emu_stop()

    def msr_instruction(self, address: int, size: int, mnem: str) -> bool:
        """rdmsr/wrmsr of an MSR the machine models (IA32_APIC_BASE): done here, the instruction
        skipped; a reserved bit written is #GP(0). False: the engine executes it (its own MSRs)."""
        regs, m = self.regs, self.m
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
            self.record("exception", "#GP", 13, address, {"vector": 13, "error_code": 0, "msr": f"{msr:#x}",
                                                           "why": str(f)}, "delivered through the guest IDT")
            self.deliver(Vector.GP, address, 0)
            return True
        regs.write(R.EIP, address + size)
        return True

    def port_io(self, port: int, size: int, is_in: bool, value: int = 0) -> int:
        """A port access reaching the devices (modes decide first whether it exits)."""
        self.clock.advance(IO_CYCLES)
        self.counts["io"] += 1
        if is_in:
            value = self.m.bus.read(port, size)
            if self.trace is not None:
                self._io_event(port, size, "in", value)
            return value
        if self.trace is not None:
            self._io_event(port, size, "out", value)
        self.m.bus.write(port, size, value)
        return 0

    def _io_event(self, port, size, direction, value):
        eip = self.io_site()[0]
        self.trace.event(self.clock.instructions, self.regs.cpl(), "io", direction.upper(), None, eip,
                         self.insn_at(eip), {"port": f"{port:#x}", "size": size, "value": f"{value:#x}"},
                         "emulated by the device model")

    def io_site(self) -> tuple[int, int]:
        """(address, length) of the in/out instruction whose hook is running.

        The engine does not update EIP before an I/O hook, so the instruction is found instead in the
        block now running (the clock hook saw it start): the k-th I/O hook call since the block began
        belongs to the k-th in/out/ins/outs of the block; a rep-string I/O instruction keeps its place.
        """
        clock = self.clock
        blocks = clock.blocks
        sites = self._block_io_sites(clock.last_block)
        if blocks != self._io_block:
            self._io_block, self._io_index = blocks, 0
        elif self._io_index < len(sites) - 1 and not sites[self._io_index][2]:
            self._io_index += 1
        if not sites:
            return self.regs.read(R.EIP), 0
        addr, length, _ = sites[self._io_index]
        return addr, length

    def _block_io_sites(self, block: int) -> list[tuple[int, int, bool]]:
        """The I/O instructions of the block at `block`, decoded once per translation of it (the
        machine drops the entry when the engine translates a new block there: forget_block)."""
        sites = self._io_sites.get(block)
        if sites is None:
            code = self.mmu.fetch_bytes(block, 256) or b""
            sites = []
            for addr, size, mnem, _ in self._cs().disasm_lite(code, block):
                m = mnem.split()[-1]
                if m in _IO_MNEMONICS:
                    sites.append((addr, size, mnem.startswith("rep")))
                if m in _BLOCK_ENDERS:
                    break
            self._io_sites[block] = sites
        return sites

    def forget_block(self, address: int) -> None:
        """The engine translated a new block at `address`: its code may have changed."""
        self._io_sites.pop(address, None)

    def _cs(self):
        if self._disasm is None:
            from capstone import CS_ARCH_X86, CS_MODE_32, Cs
            self._disasm = Cs(CS_ARCH_X86, CS_MODE_32)
        return self._disasm

    def rdtsc(self, _uc, _data) -> int:
        now = self.clock.now
        self.regs.write(R.EAX, now & 0xFFFFFFFF)
        self.regs.write(R.EDX, (now >> 32) & 0xFFFFFFFF)
        return 1

    def enable_intercepts(self, wanted: frozenset[str], on_hit) -> None:
        """Make the instructions in `wanted` visible (see cpu/intercept.py); on_hit runs before each."""
        from cpuvirt.cpu.intercept import Intercepts

        def guarded(address, size, mnem, ops):
            self.mmu.crs = None
            try:
                on_hit(address, size, mnem, ops)
                after = self.regs.read(R.EIP)
                if after != address:
                    # Emulated and skipped (it retired), or an event delivered instead (it did not).
                    self.left_block_at(address + size if after == address + size else address)
                    if after == address + size:
                        self.faults.clear_interrupt_shadow()
            except BaseException as e:   # never let an exception unwind through the engine
                self.error = e
                self.uc.emu_stop()

        ic = self.intercepts = Intercepts(self.uc, self.mmu, wanted, guarded)
        self.mmu.on_code_frame = ic.scan_frame

        def observe(insns):
            if ic.check_block(insns):
                ic.retranslate.append((insns[0][0], sum(i[1] for i in insns)))
                return True
            return False
        self.m.block_observer = observe

    # -- hooks -------------------------------------------------------------------------------------
    def install_hooks(self) -> None:
        uc = self.uc
        uc.hook_add(UC_HOOK_TLB_FILL, self.mmu.fill)
        self._intr_hook = uc.hook_add(UC_HOOK_INTR, self.hook_intr)   # para replaces it (modes/para)
        uc.hook_add(UC_HOOK_INSN_INVALID, self.hook_invalid)
        uc.hook_add(UC_HOOK_INSN, self.hook_in, None, 1, 0, X.UC_X86_INS_IN)
        uc.hook_add(UC_HOOK_INSN, self.hook_out, None, 1, 0, X.UC_X86_INS_OUT)
        self._rdtsc_cb = _RDTSC_CB(self.rdtsc)
        self._rdtsc_hook = ctypes.c_size_t()
        err = _ucmod.uclib.uc_hook_add(uc._uch, ctypes.byref(self._rdtsc_hook), UC_HOOK_INSN,
                                       ctypes.cast(self._rdtsc_cb, ctypes.c_void_p), None,
                                       ctypes.c_uint64(1), ctypes.c_uint64(0), ctypes.c_int(X.UC_X86_INS_RDTSC))
        if err:
            raise RuntimeError(f"cannot hook rdtsc (uc error {err})")
        uc.hook_add(UC_HOOK_INSN, self.hook_cpuid, None, 1, 0, X.UC_X86_INS_CPUID)

    def hook_cpuid(self, uc, _data) -> bool:
        """CPUID answers with cpuvirt's CPU model (cpu/cpuid.py, through the machine), in every mode,
        never with the engine's own CPU. Returning True keeps the registers written here."""
        self.mmu.crs = None
        try:
            regs = self.regs
            eax, ebx, ecx, edx = self.m.cpuid(regs.read(R.EAX), regs.read(R.ECX))
            regs.write(R.EAX, eax)
            regs.write(R.EBX, ebx)
            regs.write(R.ECX, ecx)
            regs.write(R.EDX, edx)
        except BaseException as e:
            self.error = e
            uc.emu_stop()
        return True

    # -- recording -----------------------------------------------------------------------------------
    def record(self, kind: str, reason: str, code, eip: int, detail: dict, action: str) -> None:
        self.counts[kind] += 1
        if self.trace is not None:
            self.trace.event(self.clock.instructions, self.regs.cpl(), kind, reason, code, eip, self.insn_at(eip),
                             detail, action)

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
            self._insn_cache[(eip, code)] = text
        return text
