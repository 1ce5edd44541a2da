"""para's common events in C: the iret sites, the bounce through the trap table, HYPERVISOR_iret, and
the common case of the page-table hypercalls (update_va_mapping, mmu_update, mmuext_op).

Three pieces, one switch (CPUVIRT_PARA_FAST=0 turns them all off, and the Python path is the reference):

- cpu/_delivery.c's reader and iret hook over direct paging (FastDelivery.install_direct): every
  intercepted iretd at CPL > 0 whose EFLAGS image has neither VM (Vcpu.iret_to_v86 strips it) nor RF
  (Vcpu.iret_image_rf clears it) is left to the engine without Python; Mmu.fetch_bytes is answered in C;
- _pvfast.c's INTR hook in front of ParaVcpu._intr (only while no trace is written): an `int n`, int3
  or a fault bounced to the guest kernel through its trap table as ParaVcpu.bounce does it, and
  HYPERVISOR_iret as hypercalls.iret does it, and update_va_mapping, mmu_update and mmuext_op of one
  request that needs no table validated or released (on DirectPaging's own type and count arrays),
  each without Python when nothing else is to be done;
- the bookkeeping of both through the FastDelivery's EventBooks (the counters, folded into Vcpu.counts
  when read; the block's unretired instructions; the interrupt-window check).

The C side reads the trap table, the kernel stack and the shared-info page's mask; ParaVcpu tells it
of every change (set_trap_table, stack_switch, the mask trace, the upcall). Each kind of hypercall is
C's only after Python has made one (the counters' keys are then in Python's order). Console, trace, counters,
virtual time and the cost model's tally are the same either way (tests/test_pv_fast.py).
"""

from __future__ import annotations

import ctypes
import os

from unicorn import UC_HOOK_INTR
from unicorn.unicorn_py3 import unicorn as _ucmod

from cpuvirt.cpu.fastdelivery import _PF_DONE, PF_REFUSED, EventBooks, FastDelivery
from cpuvirt.cpu.vcpu import FETCH_FAULT_CYCLES
from cpuvirt.engine import regs as R
from cpuvirt.engine.cext import add_c_hook, load
from cpuvirt.engine.hooks import hook_guard
from cpuvirt.engine.internals import PageFlush
from cpuvirt.modes.para.hypercalls import HYPERCALL_CYCLES, REQUEST_CYCLES
from cpuvirt.modes.para.startinfo import IRET, IRET_STUB, VCPU_UPCALL_PENDING
from cpuvirt.x86.vectors import HAS_ERROR_CODE, MNEMONIC
from cpuvirt.xen import HYPERVISOR_VIRT_START

_REFUSED = ctypes.CFUNCTYPE(None, ctypes.c_uint32)
_SOFT_DONE = ctypes.CFUNCTYPE(None, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_uint32)
_FAULT_DONE = ctypes.CFUNCTYPE(None, ctypes.c_uint32, ctypes.c_uint32)
_REGS = (R.EAX, R.ESP, R.EIP, R.EFLAGS, R.CS, R.SS, R.EBX, R.ECX, R.EDX, R.ESI, R.CR3)


def enabled() -> bool:
    """The off switch: CPUVIRT_PARA_FAST=0 keeps every para event in Python."""
    return os.environ.get("CPUVIRT_PARA_FAST", "1") != "0"


class _Trap(ctypes.Structure):
    _fields_ = [
        ("present", ctypes.c_uint8),
        ("flags", ctypes.c_uint8),
        ("cs", ctypes.c_uint16),
        ("address", ctypes.c_uint32),
    ]


class _State(ctypes.Structure):
    """Mirror of pv_t (checked against pv_sizeof at load)."""

    _fields_ = [
        ("d", ctypes.c_void_p),
        ("peek", ctypes.c_void_p),
        ("linear", ctypes.c_void_p),
        ("books_soft", ctypes.c_void_p),
        ("books_fault", ctypes.c_void_p),
        ("reg_read", ctypes.c_void_p),
        ("reg_write", ctypes.c_void_p),
        ("context_save", ctypes.c_void_p),
        ("context_restore", ctypes.c_void_p),
        ("context", ctypes.c_void_p),
        ("context_hflags", ctypes.c_void_p),
        ("context_is_int", ctypes.c_void_p),
        ("context_old_exception", ctypes.c_void_p),
        ("context_error_code", ctypes.c_void_p),
        ("reg", ctypes.c_int32 * len(_REGS)),
        ("python_intr", ctypes.c_void_p),
        ("refused", ctypes.c_void_p),
        ("enabled", ctypes.c_uint32),
        ("trap_table_set", ctypes.c_uint32),
        ("kstack_set", ctypes.c_uint32),
        ("kstack_ss", ctypes.c_uint32),
        ("kstack_esp", ctypes.c_uint32),
        ("traced", ctypes.c_uint32),
        ("shared", ctypes.c_void_p),
        ("in_upcall", ctypes.c_void_p),
        ("has_error_code", ctypes.c_uint32 * 8),
        ("iret_seen", ctypes.c_uint32),
        ("iret_eip", ctypes.c_uint32),
        ("clock_now", ctypes.c_void_p),
        ("clock_extra", ctypes.c_void_p),
        ("hypercall_cycles", ctypes.c_uint64),
        ("irets", ctypes.c_uint64),
        ("irets_total", ctypes.c_uint64),
        ("bounced", ctypes.c_uint64),
        ("ram", ctypes.c_void_p),
        ("ram_hpa", ctypes.c_uint64),
        ("frame_type", ctypes.c_void_p),
        ("frame_count", ctypes.c_void_p),
        ("nr_pages", ctypes.c_uint32),
        ("hv_start", ctypes.c_uint32),
        ("uva_seen", ctypes.c_uint32),
        ("mmu_seen", ctypes.c_uint32),
        ("uvas", ctypes.c_uint64),
        ("uvas_total", ctypes.c_uint64),
        ("mmus", ctypes.c_uint64),
        ("mmus_total", ctypes.c_uint64),
        ("request_cycles", ctypes.c_uint64),
        ("walks", ctypes.c_void_p),
        ("walk_refs", ctypes.c_void_p),
        ("base", ctypes.c_void_p),
        ("mmuext_seen", ctypes.c_uint32),
        ("pad2", ctypes.c_uint32),
        ("mmuexts", ctypes.c_uint64),
        ("mmuexts_total", ctypes.c_uint64),
        ("flush_page", ctypes.c_void_p),
        ("cpu", ctypes.c_void_p),
        ("trap", _Trap * 256),
    ]


# The hypercalls C answers (xen.h numbers): (number, the C counter since the last fold, the flag that
# Python has handled one, so that the counters' keys keep Python's order).
HYPERVISOR_mmu_update, HYPERVISOR_update_va_mapping, HYPERVISOR_mmuext_op = 1, 14, 26
HYPERVISOR_iret = IRET  # startinfo.py: the hypercall page's iret slot
C_HYPERCALLS = (
    (HYPERVISOR_iret, "irets", "iret_seen"),
    (HYPERVISOR_update_va_mapping, "uvas", "uva_seen"),
    (HYPERVISOR_mmu_update, "mmus", "mmu_seen"),
    (HYPERVISOR_mmuext_op, "mmuexts", "mmuext_seen"),
)


def _lib():
    return load("cpuvirt.modes.para._pvfast", {"pv_sizeof": _State})


class PvFast:
    """The C paths of one ParaVcpu (install), armed at the run's start (start)."""

    def __init__(self, vcpu, delivery: FastDelivery, lib):
        self.vcpu = vcpu
        self.delivery = delivery
        self._lib = lib
        self._hook: int | None = None
        st = self._state = _State()
        self._pstate = ctypes.cast(ctypes.pointer(st), ctypes.c_void_p)
        d = delivery._state
        dlib = delivery._lib
        st.d = ctypes.addressof(d)
        st.peek = ctypes.cast(dlib.delivery_peek, ctypes.c_void_p).value
        st.linear = ctypes.cast(dlib.delivery_linear, ctypes.c_void_p).value
        st.books_soft = ctypes.cast(dlib.delivery_books_soft, ctypes.c_void_p).value
        st.books_fault = ctypes.cast(dlib.delivery_books_fault, ctypes.c_void_p).value
        st.reg_read = ctypes.cast(_ucmod.uclib.uc_reg_read, ctypes.c_void_p).value
        st.reg_write = ctypes.cast(_ucmod.uclib.uc_reg_write, ctypes.c_void_p).value
        st.context_save, st.context_restore = d.context_save, d.context_restore
        st.context, st.context_hflags = d.context, d.context_hflags
        st.context_is_int, st.context_old_exception = d.context_is_int, d.context_old_exception
        st.context_error_code = d.context_error_code
        st.reg[:] = _REGS
        for v in HAS_ERROR_CODE:
            st.has_error_code[v >> 5] |= 1 << (v & 31)
        st.in_upcall = ctypes.addressof(vcpu._upcall_flag)  # ParaVcpu._in_upcall
        st.hypercall_cycles, st.request_cycles = HYPERCALL_CYCLES, REQUEST_CYCLES
        st.walks = ctypes.addressof(d) + type(d).walks.offset
        st.walk_refs = ctypes.addressof(d) + type(d).walk_refs.offset
        clock = vcpu.clock._state
        kind = type(clock)
        st.clock_now = ctypes.addressof(clock) + kind.left.offset
        st.clock_extra = ctypes.addressof(clock) + kind.extra.offset

    @classmethod
    def prepare(cls, vcpu) -> "PvFast | None":
        """At install_hooks, before the vCPU's own hooks: the C reader, and the #PF hook among the
        TLB-fill hooks before Mmu.fill (off until start). None when the switch is off or an
        extension is not built."""
        if not enabled():
            return None
        lib = _lib()
        delivery = FastDelivery.install_direct(vcpu, HYPERVISOR_VIRT_START) if lib is not None else None
        if delivery is None:
            return None
        delivery._add_pf_hook()
        return cls(vcpu, delivery, lib)

    def install_sites(self) -> None:
        """After the I/O sites: the C hook in front of every iret the intercepts hook."""
        self.delivery.install_sites(self.vcpu, iret_only=True)

    # -- what ParaVcpu tells the C side ---------------------------------------------------------------
    def set_trap_table(self, table: dict[int, tuple[int, int, int]], is_set: bool) -> None:
        st = self._state
        ctypes.memset(ctypes.addressof(st.trap), 0, ctypes.sizeof(st.trap))
        for vector, (flags, cs, address) in table.items():
            if 0 <= vector < 256:
                t = st.trap[vector]
                t.present, t.flags, t.cs, t.address = 1, flags & 0xFF, cs & 0xFFFF, address & 0xFFFFFFFF
        st.trap_table_set = int(is_set)

    def set_kernel_stack(self, stack: tuple[int, int] | None) -> None:
        st = self._state
        st.kstack_set = int(stack is not None)
        if stack is not None:
            st.kstack_ss, st.kstack_esp = stack[0] & 0xFFFF, stack[1] & 0xFFFFFFFF

    def set_traced(self, traced: bool) -> None:
        self._state.traced = int(traced)

    def set_shared_info(self, events, hypercall_va: int) -> None:
        """At boot: vcpu_info[0] of the shared-info page, and the iretd stub of the hypercall page."""
        st = self._state
        self._shared = ctypes.c_char.from_buffer(events.buf, events.off + VCPU_UPCALL_PENDING)
        st.shared = ctypes.addressof(self._shared)
        st.iret_eip = (hypercall_va + IRET_STUB) & 0xFFFFFFFF

    def seen(self, nr: int) -> None:
        """Python handled hypercall `nr`: its counters' keys are in place (their order is Python's)."""
        for number, _, flag in C_HYPERCALLS:
            if nr == number:
                setattr(self._state, flag, 1)

    def set_paging(self, paging) -> None:
        """At boot: direct paging's frame types and counts (memory/direct.py), where C updates them too."""
        st = self._state
        self._types = ctypes.c_char.from_buffer(paging.type)
        self._counts_buf = paging.count
        address, n = paging.count.buffer_info()
        if paging.count.itemsize != 4 or n != paging.nr_pages:
            return  # update_va_mapping stays Python's
        ram = paging.ram
        self._ram = ctypes.c_char.from_buffer(ram.buf)
        st.ram, st.ram_hpa = ctypes.addressof(self._ram), ram.hpa
        st.frame_type, st.nr_pages, st.hv_start = ctypes.addressof(self._types), n, HYPERVISOR_VIRT_START
        st.frame_count = address
        st.base = ctypes.addressof(paging._base)
        flush = paging.on_flush_page
        if isinstance(flush, PageFlush):
            st.flush_page, st.cpu = flush.function, flush.cpu

    # -- the run ------------------------------------------------------------------------------------------
    def start(self) -> None:
        """At the run's start: the INTR hook in C unless a trace is written (its lines are Python's)."""
        vcpu = self.vcpu
        if vcpu.trace is not None or self._hook is not None or not self._state.shared:
            return
        fast, st = self.delivery, self._state
        d = fast._state
        clock = vcpu.clock._state

        @hook_guard()
        def soft_done(owner, vector: int, start: int, eip: int) -> None:
            """What ParaVcpu does around a bounced `int n` besides the bounce (trace off)."""
            owner.left_block_at(eip)
            owner.tally("interrupt", f"int {vector:#x}")
            owner.clock.if_may_have_changed()

        @hook_guard()
        def fault_done(owner, vector: int, eip: int) -> None:
            owner.left_block_at(eip)
            owner.tally("exception", MNEMONIC.get(vector, f"vector {vector}"))
            owner.clock.if_may_have_changed()

        @hook_guard()
        def refused(owner, vector: int) -> None:
            raise RuntimeError(f"engine refused a register write bouncing vector {vector}")

        @hook_guard()
        def pf_done(owner, eip: int, access: int) -> None:
            """What the run loop and ParaVcpu.page_fault do around a #PF besides CR2 and the bounce."""
            if access == PF_REFUSED:
                raise RuntimeError("engine refused a register write bouncing vector 14")
            owner.left_block_at(eip)
            owner.charge_fault(access)
            owner.tally("page_fault", "#PF")

        self._soft_done = _SOFT_DONE(lambda vector, start, eip: soft_done(vcpu, vector, start, eip))
        self._fault_done = _FAULT_DONE(lambda vector, eip: fault_done(vcpu, vector, eip))
        self._refused = _REFUSED(lambda vector: refused(vcpu, vector))
        d.soft_done = ctypes.cast(self._soft_done, ctypes.c_void_p).value
        d.fault_done = ctypes.cast(self._fault_done, ctypes.c_void_p).value
        st.refused = ctypes.cast(self._refused, ctypes.c_void_p).value
        self._pf_done = _PF_DONE(lambda eip, access: pf_done(vcpu, eip, access))
        d.pf_done = ctypes.cast(self._pf_done, ctypes.c_void_p).value
        d.clock_now = ctypes.addressof(clock) + type(clock).left.offset
        d.clock_deadline = ctypes.addressof(clock) + type(clock).deadline.offset
        d.clock_stop_next = ctypes.addressof(clock) + type(clock).stop_next.offset
        d.fetch_fault_cycles = FETCH_FAULT_CYCLES
        d.pv_pf = ctypes.cast(self._lib.pv_page_fault, ctypes.c_void_p).value
        d.pv = ctypes.addressof(st)
        d.pf_enabled = int(bool(d.loop_exit) and hasattr(fast, "_pf_hook"))
        d.clock_watch_if = ctypes.addressof(clock) + type(clock).watch_if.offset
        d.clock_check_if = ctypes.addressof(clock) + type(clock).check_if.offset
        fast.books = EventBooks(fast._lib, vcpu)
        d.books = fast.books.address
        vcpu.fold_counts = self.fold
        self._python_intr = vcpu.hooks.intr_function(vcpu._intr)
        st.python_intr = ctypes.cast(self._python_intr, ctypes.c_void_p).value
        vcpu.hooks.remove(vcpu._intr_hook)
        handle = add_c_hook(
            fast._uch, UC_HOOK_INTR, self._lib.pv_intr_hook, self._pstate, what="install para's C INTR hook"
        )
        vcpu._intr_hook = self._hook = handle
        vcpu.uc._callbacks[handle] = self  # its state lives as long as the engine may call it
        st.enabled = 1

    def fold(self) -> None:
        """Add what C counted to Vcpu.counts and Vcpu.reasons (the keys the Python path uses)."""
        books = self.delivery.books
        if books is not None:
            books.fold()
        st, vcpu = self._state, self.vcpu
        for number, count, _ in C_HYPERCALLS:
            n = getattr(st, count)
            if n:
                setattr(st, count, 0)
                vcpu._counts["hypercall"] += n
                vcpu._reasons["hypercall", number] += n

    @property
    def bounced(self) -> int:
        """Events bounced in C."""
        return self._state.bounced

    @property
    def irets(self) -> int:
        """HYPERVISOR_iret hypercalls done in C."""
        return self._state.irets_total

    @property
    def uvas(self) -> int:
        """update_va_mapping hypercalls done in C."""
        return self._state.uvas_total

    @property
    def mmu_updates(self) -> int:
        """mmu_update hypercalls (of one request) done in C."""
        return self._state.mmus_total

    @property
    def mmuext_ops(self) -> int:
        """mmuext_op hypercalls (of one op) done in C."""
        return self._state.mmuexts_total

    @property
    def iret_sites(self) -> int:
        """iretd instructions left to the engine by the C site hook."""
        return self.delivery.irets
