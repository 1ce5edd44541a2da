"""Native mode's (and hw's, under EPT) common event deliveries in C (_delivery.c); EventDelivery stays
the complete path.

The C function delivers a protected-mode event through a present 32-bit interrupt or trap gate, at
the same privilege or into ring 0 from an outer ring, when nothing on the way faults and every byte is
guest RAM; for anything else it changes nothing and EventDelivery delivers in Python, with the same
result either way (tests/test_fast_delivery.py). Its page walks are added to the MMU's counters.
Optional: without the built extension every delivery is Python's.
"""

from __future__ import annotations

import ctypes

from unicorn import UC_HOOK_CODE, UC_HOOK_INTR, UC_HOOK_TLB_FILL
from unicorn.unicorn_py3 import unicorn as _ucmod

from cpuvirt.cpu.evdeliver import BLOCK_SLOTS, BlockCopy, BlockCopyKeeper
from cpuvirt.engine import regs as R
from cpuvirt.engine.cext import add_c_hook, first_fill_hook, load
from cpuvirt.engine.hooks import hook_guard
from cpuvirt.engine.internals import cpu_field, engine_cpu_state, engine_env, register_offsets
from cpuvirt.x86.cpuid import CR4_RESERVED
from cpuvirt.x86.vectors import HAS_ERROR_CODE, MNEMONIC

_REGS = (
    R.EAX,
    R.ESP,
    R.EIP,
    R.EFLAGS,
    R.CS,
    R.SS,
    R.CR0,
    R.CR3,
    R.CR4,
    R.GDTR,
    R.IDTR,
    R.TR,
    R.CR2,
    R.ECX,
    R.EDX,
    R.EBX,
    R.EBP,
    R.ESI,
    R.EDI,
)
DELIVERED, ENGINE_REFUSED = 1, -1
F_ERROR_CODE, F_SOFT, F_EXTERNAL = 1, 2, 4
_SOFT_DONE = ctypes.CFUNCTYPE(None, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_uint32)
_FAULT_DONE = ctypes.CFUNCTYPE(None, ctypes.c_uint32, ctypes.c_uint32)
_PF_DONE = ctypes.CFUNCTYPE(None, ctypes.c_uint32, ctypes.c_uint32)
PF_REFUSED = 0xFFFFFFFF


class _State(ctypes.Structure):
    """Mirror of delivery_t (checked against delivery_sizeof at load)."""

    _fields_ = [
        ("ram", ctypes.c_void_p),
        ("ram_bytes", ctypes.c_uint64),
        ("reg_read", ctypes.c_void_p),
        ("reg_write", ctypes.c_void_p),
        ("context_save", ctypes.c_void_p),
        ("context_restore", ctypes.c_void_p),
        ("context", ctypes.c_void_p),
        ("context_hflags", ctypes.c_void_p),
        ("context_ss", ctypes.c_void_p),
        ("reg", ctypes.c_int32 * len(_REGS)),
        ("enabled", ctypes.c_uint32),
        ("walks", ctypes.c_uint64),
        ("walk_refs", ctypes.c_uint64),
        ("delivered", ctypes.c_uint64),
        ("fallbacks", ctypes.c_uint64),
        ("python_intr", ctypes.c_void_p),
        ("soft_done", ctypes.c_void_p),
        ("fault_done", ctypes.c_void_p),
        ("context_is_int", ctypes.c_void_p),
        ("context_old_exception", ctypes.c_void_p),
        ("context_error_code", ctypes.c_void_p),
        ("has_error_code", ctypes.c_uint32 * 8),
        ("soft_delivered", ctypes.c_uint64),
        ("faults_delivered", ctypes.c_uint64),
        ("nmi_blocked", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
        ("clock_watch_if", ctypes.c_void_p),
        ("clock_check_if", ctypes.c_void_p),
        ("irets", ctypes.c_uint64),
        ("pf_enabled", ctypes.c_uint32),
        ("busy", ctypes.c_uint32),
        ("cpu_offset", ctypes.c_uint64),
        ("loop_exit", ctypes.c_void_p),
        ("pf_done", ctypes.c_void_p),
        ("pf_fills", ctypes.c_uint64),
        ("pf_faults", ctypes.c_uint64),
        ("ept", ctypes.c_uint32),
        ("pad2", ctypes.c_uint32),
        ("hv", ctypes.c_void_p),
        ("hv_hpa", ctypes.c_uint64),
        ("hv_size", ctypes.c_uint64),
        ("pml4", ctypes.c_uint64),
        ("ram_hpa", ctypes.c_uint64),
        ("clock_now", ctypes.c_void_p),
        ("clock_deadline", ctypes.c_void_p),
        ("clock_stop_next", ctypes.c_void_p),
        ("fetch_fault_cycles", ctypes.c_uint64),
        ("books", ctypes.c_void_p),
        ("vmx", ctypes.c_uint32),
        ("vmx_armed", ctypes.c_uint32),
        ("exception_bitmap", ctypes.c_uint32),
        ("pfec_mask", ctypes.c_uint32),
        ("pfec_match", ctypes.c_uint32),
        ("window_exiting", ctypes.c_uint32),
        ("quiet", ctypes.c_void_p),
        ("quiet_state", ctypes.c_void_p),
        ("machine_addrs", ctypes.c_uint32),
        ("hv_start", ctypes.c_uint32),
        ("iret_any_cpl", ctypes.c_uint32),
        ("pad3", ctypes.c_uint32),
        ("pv_pf", ctypes.c_void_p),
        ("pv", ctypes.c_void_p),
        ("shadow", ctypes.c_uint32),
        ("shadow_ok", ctypes.c_uint32),
        ("shadow_mode", ctypes.c_uint32),
        ("shadow_key", ctypes.c_uint32),
        ("mirror", ctypes.c_void_p),
        ("env", ctypes.c_void_p),
        ("at", ctypes.c_uint32 * len(_REGS)),
        ("pad4", ctypes.c_uint32),
    ]


class _Books(ctypes.Structure):
    """Mirror of books_t (checked against delivery_books_sizeof at load)."""

    _fields_ = [
        ("clock_now", ctypes.c_void_p),
        ("clock_extra", ctypes.c_void_p),
        ("clock_last_block", ctypes.c_void_p),
        ("clock_watch_if", ctypes.c_void_p),
        ("clock_check_if", ctypes.c_void_p),
        ("pending", ctypes.c_uint64),
        ("soft", ctypes.c_uint64 * 256),
        ("fault", ctypes.c_uint64 * 256),
        ("pf", ctypes.c_uint64 * 3),
        ("misses", ctypes.c_uint64),
        ("soft_seen", ctypes.c_uint8 * 256),
        ("fault_seen", ctypes.c_uint8 * 256),
        ("pf_seen", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
        ("block", BlockCopy * BLOCK_SLOTS),
    ]


class _IretSite(ctypes.Structure):
    """Mirror of iret_site_t."""

    _fields_ = [
        ("s", ctypes.c_void_p),
        ("python", ctypes.c_void_p),
        ("size", ctypes.c_uint32),
        ("wide", ctypes.c_uint32),
        ("bytes", ctypes.c_uint8 * 16),
    ]


class _Cr4Site(ctypes.Structure):
    """Mirror of cr4_site_t."""

    _fields_ = [
        ("s", ctypes.c_void_p),
        ("python", ctypes.c_void_p),
        ("size", ctypes.c_uint32),
        ("src_reg", ctypes.c_int32),
        ("reserved", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
        ("passed", ctypes.c_uint64),
        ("bytes", ctypes.c_uint8 * 16),
    ]


class _IoSite(ctypes.Structure):
    """Mirror of io_site_t."""

    _fields_ = [
        ("s", ctypes.c_void_p),
        ("python", ctypes.c_void_p),
        ("size", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
        ("passed", ctypes.c_uint64),
        ("bytes", ctypes.c_uint8 * 16),
    ]


def _lib():
    lib = load(
        "cpuvirt.cpu._delivery",
        {
            "delivery_sizeof": _State,
            "delivery_iret_site_sizeof": _IretSite,
            "delivery_cr4_site_sizeof": _Cr4Site,
            "delivery_books_sizeof": _Books,
            "delivery_io_site_sizeof": _IoSite,
        },
    )
    if lib is None:
        return None
    lib.delivery_books_put.restype = ctypes.c_int
    lib.delivery_books_put.argtypes = (
        ctypes.c_void_p,
        ctypes.c_uint32,
        ctypes.POINTER(ctypes.c_uint32),
        ctypes.c_uint32,
        ctypes.c_uint64,
    )
    lib.delivery_books_drop.restype = None
    lib.delivery_books_drop.argtypes = (ctypes.c_void_p, ctypes.c_uint32)
    lib.delivery_books_clear.restype = None
    lib.delivery_books_clear.argtypes = (ctypes.c_void_p,)
    lib.delivery_fast.restype = ctypes.c_int
    lib.delivery_peek.restype = ctypes.c_int
    lib.delivery_peek.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_void_p)
    lib.delivery_fast.argtypes = (
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_uint32,
        ctypes.c_uint32,
        ctypes.c_uint32,
        ctypes.c_int,
    )
    lib.delivery_fault_linear.restype = ctypes.c_int
    lib.delivery_fault_linear.argtypes = (
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_uint32,
        ctypes.c_uint32,
        ctypes.c_int,
        ctypes.c_void_p,
    )
    return lib


def _engine_cpu(uc) -> tuple[int, int] | None:
    """(offset of uc_struct's CPUState pointer, address of QEMU's cpu_loop_exit) for this engine, checked
    (engine_cpu_state). None: the #PF stays Python's (the engine must stop to leave a faulting instruction)."""
    found = cpu_field()
    loop_exit = getattr(_ucmod.uclib, "cpu_loop_exit_x86_64", None)
    if found is None or loop_exit is None or engine_cpu_state(uc) is None:
        return None
    address = ctypes.cast(loop_exit, ctypes.c_void_p).value
    return None if address is None else (found[0], address)


class EventBooks:
    """The bookkeeping of the events native delivers in C, done in C too (_delivery.c, books_t): the
    unretired instructions of the block an event leaves (from a copy of Machine.block_insns, kept as
    the BlockMirror of machine/blocks.py), the time of a fetch fault, the interrupt-window check, and
    the event counters, which `fold` adds to the vCPU's when they are read (Vcpu.counts). The first
    event of each kind, and any whose block the copy does not hold, still go to the Python callback."""

    def __init__(self, lib, vcpu):
        self._lib = lib
        self.vcpu = vcpu
        self.folded = 0  # events counted in C, added to the vCPU's counters so far
        b = self._books = _Books()
        self._pbooks = ctypes.c_void_p(ctypes.addressof(b))
        clock = vcpu.clock._state
        kind, base = type(clock), ctypes.addressof(clock)
        b.clock_now = base + kind.left.offset
        b.clock_extra = base + kind.extra.offset
        b.clock_last_block = vcpu.clock.last_block_address
        b.clock_watch_if = base + kind.watch_if.offset
        b.clock_check_if = base + kind.check_if.offset
        # the copy of Machine.block_insns (cpu/_blockcopy.h)
        self.blocks = BlockCopyKeeper.keep(vcpu.machine.block_insns, self._lib, "delivery_books", self._pbooks, b.block)

    @property
    def address(self) -> int:
        return ctypes.addressof(self._books)

    @property
    def misses(self) -> int:
        """Events left to Python because their block was not in the copy."""
        return self._books.misses

    def fold(self) -> None:
        """Add the events counted in C to Vcpu.counts and Vcpu.reasons (the keys soft_done,
        fault_done and pf_done use), and start counting from zero."""
        b = self._books
        if not b.pending:
            return
        b.pending = 0
        counts, reasons = self.vcpu._counts, self.vcpu._reasons
        total = 0
        for vector, n in enumerate(b.soft):
            if n:
                b.soft[vector] = 0
                counts["interrupt"] += n
                reasons["interrupt", f"int {vector:#x}"] += n
                total += n
        for vector, n in enumerate(b.fault):
            if n:
                b.fault[vector] = 0
                counts["exception"] += n
                reasons["exception", MNEMONIC.get(vector, f"vector {vector}")] += n
                total += n
        n = b.pf[0] + b.pf[1] + b.pf[2]
        if n:
            b.pf[0] = b.pf[1] = b.pf[2] = 0
            counts["page_fault"] += n
            reasons["page_fault", "#PF"] += n
            total += n
        self.folded += total

    def entry(self, address: int) -> tuple[tuple[int, ...], int] | None:
        """The copy's entry for the block at `address` (Machine.block_insns' form), or None."""
        return self.blocks.entry(address)


def _io_instructions() -> frozenset[str]:
    from cpuvirt.cpu.vcpu import IO_INSTRUCTIONS

    return IO_INSTRUCTIONS


class FastDelivery:
    """`FastDelivery.install(delivery)` gives an EventDelivery over a native MMU (the guest's own page
    tables over a flat p2m, the real registers) its C path; None if the extension is not built."""

    _hv: ctypes.c_char  # hw: the first byte of the hypervisor region holding the EPT tables (install_ept)
    keep_books = True  # the events' bookkeeping in C too (EventBooks); False: Python's callbacks do it
    books: EventBooks | None = None

    def __init__(self, lib, mmu, faults):
        self.mmu = mmu
        st = self._state = _State()
        st.ram = ctypes.addressof(ctypes.c_char.from_buffer(mmu.ram.buf))
        st.ram_bytes = mmu.p2m.ram_bytes
        st.ram_hpa = mmu.ram.hpa
        st.reg_read = ctypes.cast(_ucmod.uclib.uc_reg_read, ctypes.c_void_p).value
        st.reg_write = ctypes.cast(_ucmod.uclib.uc_reg_write, ctypes.c_void_p).value
        st.context_save = ctypes.cast(_ucmod.uclib.uc_context_save, ctypes.c_void_p).value
        st.context_restore = ctypes.cast(_ucmod.uclib.uc_context_restore, ctypes.c_void_p).value
        self._context = mmu.uc.context_save()  # its own: the ring-0 SS load sets CPL through it
        st.context = ctypes.cast(self._context.context, ctypes.c_void_p).value
        st.context_hflags = st.context + faults.layout.hflags
        st.context_ss = st.context + faults.layout.ss_selector
        st.context_is_int = st.context + faults.layout.exception_is_int
        st.context_old_exception = st.context + faults.layout.old_exception
        st.context_error_code = st.context + faults.layout.error_code
        for v in HAS_ERROR_CODE:
            st.has_error_code[v >> 5] |= 1 << (v & 31)
        st.reg[:] = _REGS
        env, at = engine_env(mmu.uc), register_offsets()
        if env is not None and at:  # rd() reads these in the CPU state, the rest through the API
            st.env = env
            st.at[:] = [at[r] + 1 if r in at else 0 for r in _REGS]
        st.enabled = 1
        self._pstate = ctypes.cast(ctypes.pointer(st), ctypes.c_void_p)
        self._fn = lib.delivery_fast
        self._peek = lib.delivery_peek
        self._buf = ctypes.create_string_buffer(32)
        self._uch = mmu.uc._uch
        self._lib = lib
        self._python_intr = None  # set once install_intr has put the C INTR hook in place

    @classmethod
    def install(cls, delivery) -> "FastDelivery | None":
        mmu = delivery.mmu
        lib = _lib()
        if lib is None or mmu.ram.hpa != mmu.p2m.ram_hpa or mmu.p2m.ram_bytes > mmu.ram.size:
            return None
        fast = cls(lib, mmu, delivery.view.vcpu.faults)
        delivery.fast = fast
        mmu.counters.walkers.append(fast)
        mmu.peek = fast.peek
        fast._add_pf_hook()
        return fast

    @classmethod
    def install_direct(cls, vcpu, hv_start: int) -> "FastDelivery | None":
        """para's C reader and iret sites over direct paging (memory/direct.py): page-table entries
        hold machine addresses, linear addresses from `hv_start` up (the GDT/LDT window) stay
        Python's. Nothing is delivered through an IDT here (`delivery.fast` stays None, no #PF hook):
        para's events are bounced by para (modes/para/pvfast.py, on this state). It answers
        Mmu.fetch_bytes, and install_sites(vcpu, iret_only=True) puts its iret hook in front of
        every iret, which at CPL > 0 stays in C when the EFLAGS image has neither VM nor RF."""
        mmu = vcpu.mmu
        lib = _lib()
        if lib is None or mmu.ram.hpa != mmu.p2m.ram_hpa or mmu.p2m.ram_bytes > mmu.ram.size:
            return None
        fast = cls(lib, mmu, vcpu.faults)
        st = fast._state
        st.machine_addrs, st.hv_start, st.iret_any_cpl = 1, hv_start, 1
        mmu.counters.walkers.append(fast)
        mmu.peek = fast.peek
        return fast

    @classmethod
    def install_shadow(cls, vcpu) -> "FastDelivery | None":
        """hw without EPT: the C reader of guest code (delivery_peek) over the guest's own tables, for
        Mmu.fetch_bytes and fastexit.py's sites, guarded by the shadow's state (delivery_t `shadow`: the
        VmxCpu mirrors it at each VM entry, mirror_shadow). Nothing else: deliveries, iret and #PF stay
        Python's (through shadow entries their walks are counted otherwise), and it counts nothing."""
        mmu = vcpu.mmu
        lib = _lib()
        if lib is None or vcpu.faults.layout is None:
            return None
        if mmu.ram.hpa != mmu.p2m.ram_hpa or mmu.p2m.ram_bytes > mmu.ram.size:
            return None
        fast = cls(lib, mmu, vcpu.faults)
        fast._state.shadow = 1
        return fast

    def deliver_through_shadow(self, delivery, mirror) -> None:
        """hw without EPT: deliveries (and delivery_linear) in C too, their accesses through the C copy of
        shadow paging's current root (memory/shadowmirror.py) as ShadowPaging.gva_to_gpa answers them with
        no side effect; a page without such an entry, or a write to a traced frame, is Python's. The INTR
        hook follows with install_intr (hw's rules: only the events that cause no VM exit)."""
        st = self._state
        st.mirror = mirror.address
        st.vmx = 1
        delivery.fast = self
        self.mmu.counters.walkers.append(self)

    def mirror_shadow(self, ok: bool, mode: int, key: int) -> None:
        """What delivery_peek's shadow guard compares with: may it read (ok), and the shadow's paging mode
        (CR0.PG | CR4.PSE) and root (CR3's frame) when Python last looked."""
        st = self._state
        st.shadow_mode, st.shadow_key = mode, key
        st.shadow_ok = int(ok)

    def shadow_dirtied(self) -> None:
        """ShadowPaging.on_dirty: a frame untraced, a trim, a WP grant: Python reads until the next entry."""
        self._state.shadow_ok = 0

    @classmethod
    def install_ept(cls, delivery, ept) -> "FastDelivery | None":
        """The same C path for hw with EPT, from VMLAUNCH on (when Mmu's strategy becomes EptWalk):
        every guest-physical reference of a delivery goes through `ept`'s tables and is counted as
        EptWalk counts it; anything EPT does not map read/write (an EPT violation, the APIC-access
        page, a device) is left to EventDelivery. The deliveries only: hw's INTR hook and guest #PF
        stay Python's unless install_intr(vcpu, vmx=...) follows (and prepare_ept came first)."""
        fast = cls.prepare_ept(delivery, ept)
        if fast is not None:
            fast.attach_ept(delivery)
        return fast

    @classmethod
    def prepare_ept(cls, delivery, ept) -> "FastDelivery | None":
        """install_ept's C state, made at hw's VMLAUNCH set-up: its #PF hook must be among the TLB-fill
        hooks before Mmu.fill (the vCPU adds that one next); nothing is delivered in C before
        attach_ept (at the first VM entry, when guest-physical memory goes behind EPT)."""
        mmu = delivery.mmu
        lib = _lib()
        if lib is None or mmu.ram.hpa != mmu.p2m.ram_hpa or mmu.p2m.ram_bytes > mmu.ram.size:
            return None
        fast = cls(lib, mmu, delivery.view.vcpu.faults)
        region = ept.region
        st = fast._state
        fast._hv = ctypes.c_char.from_buffer(region.buf)
        st.hv = ctypes.addressof(fast._hv)
        st.hv_hpa, st.hv_size, st.pml4 = region.hpa, region.size, ept.pml4
        st.ept = 1
        st.vmx = 1  # hw's rules in the INTR and #PF hooks (they are off until install_intr)
        fast._add_pf_hook()
        return fast

    def attach_ept(self, delivery) -> None:
        """From now on the delivery's common case is C's (install_ept's second half)."""
        delivery.fast = self
        self.mmu.counters.walkers.append(self)

    # -- hw: the copy of the VMCS the INTR and #PF hooks decide with (VmxCpu keeps it) --------------------
    def arm_vmx(self, exception_bitmap: int, pfec_mask: int, pfec_match: int, window_exiting: bool) -> None:
        """At a VM entry: the controls that decide which events exit (SDM Vol. 3C 25.2)."""
        st = self._state
        st.exception_bitmap, st.pfec_mask, st.pfec_match = exception_bitmap, pfec_mask, pfec_match
        st.window_exiting = int(window_exiting)
        st.vmx_armed = 1

    def disarm_vmx(self) -> None:
        """A vmwrite: every event is Python's until the next VM entry copies the controls again."""
        self._state.vmx_armed = 0

    @property
    def vmx_armed(self) -> bool:
        return bool(self._state.vmx_armed)

    def set_quiet(self, fn, state: int) -> None:
        """modes/hw/_fastexit.c fastexit_quiet and its state: may a guest #PF skip the run loop's trip?"""
        st = self._state
        st.quiet, st.quiet_state = fn, state

    def _add_pf_hook(self) -> None:
        """delivery_pf_hook among the TLB-fill hooks, before Mmu.fill (the vCPU adds that one later):
        off until install_intr turns it on."""
        found = _engine_cpu(self.mmu.uc)
        if found is None:
            return
        st = self._state
        st.cpu_offset, st.loop_exit = found
        uc = self.mmu.uc
        first_fill_hook(uc)
        handle = add_c_hook(
            self._uch, UC_HOOK_TLB_FILL, self._lib.delivery_pf_hook, self._pstate, what="install the C #PF hook"
        )
        self._pf_hook = handle
        self.mmu.uc._callbacks[handle] = self  # its state lives as long as the engine may call it

    def install_intr(self, vcpu) -> None:
        """Put delivery_intr_hook in front of the vCPU's INTR hook: `int n` and the faults the engine
        raises, through a gate the C path takes, are then delivered without Python but for one call
        that counts them (soft_done, fault_done). Only
        for the native Vcpu's own event handling, and hw's (prepare_ept: the events that cause no VM
        exit), and never while tracing (an event's trace line needs Python)."""
        if vcpu.trace is not None or self._python_intr is not None:
            return
        st = self._state
        if_check = not st.vmx  # native's hook_intr looks at IF afterwards; hw's Python path does not
        self._python_intr = vcpu.hooks.intr_function(vcpu.hook_intr)
        vcpu.hooks.remove(vcpu._intr_hook)

        @hook_guard()
        def soft_done(owner, vector: int, start: int, eip: int) -> None:
            """What Vcpu.hook_intr does around an `int n` besides the delivery (trace off)."""
            owner.left_block_at(eip)
            owner.tally("interrupt", f"int {vector:#x}")
            if if_check:
                owner.clock.if_may_have_changed()

        @hook_guard()
        def fault_done(owner, vector: int, eip: int) -> None:
            """The same for a fault (Vcpu._deliver_engine_event's other branch)."""
            owner.left_block_at(eip)
            owner.tally("exception", MNEMONIC.get(vector, f"vector {vector}"))
            if if_check:
                owner.clock.if_may_have_changed()

        @hook_guard()
        def pf_done(owner, eip: int, access: int) -> None:
            """What the run loop does around a #PF besides CR2 and the delivery (Vcpu.page_fault)."""
            if access == PF_REFUSED:
                raise RuntimeError("engine refused a register write delivering vector 14")
            owner.left_block_at(eip)
            owner.charge_fault(access)
            owner.tally("page_fault", "#PF")
            if if_check:
                owner.clock.if_may_have_changed()

        self._soft_done = _SOFT_DONE(lambda vector, start, eip: soft_done(vcpu, vector, start, eip))
        self._fault_done = _FAULT_DONE(lambda vector, eip: fault_done(vcpu, vector, eip))
        self._pf_done = _PF_DONE(lambda eip, access: pf_done(vcpu, eip, access))
        st.pf_done = ctypes.cast(self._pf_done, ctypes.c_void_p).value
        from cpuvirt.cpu.vcpu import FETCH_FAULT_CYCLES

        clock = vcpu.clock._state
        kind = type(clock)
        st.clock_now = ctypes.addressof(clock) + kind.left.offset
        st.clock_deadline = ctypes.addressof(clock) + kind.deadline.offset
        st.clock_stop_next = ctypes.addressof(clock) + kind.stop_next.offset
        st.fetch_fault_cycles = FETCH_FAULT_CYCLES
        st.pf_enabled = int(st.loop_exit is not None and hasattr(self, "_pf_hook"))
        st.python_intr = ctypes.cast(self._python_intr, ctypes.c_void_p).value
        st.soft_done = ctypes.cast(self._soft_done, ctypes.c_void_p).value
        st.fault_done = ctypes.cast(self._fault_done, ctypes.c_void_p).value
        if self.keep_books:
            self.books = EventBooks(self._lib, vcpu)
            st.books = self.books.address
            vcpu.fold_counts = self.books.fold
        handle = add_c_hook(
            self._uch, UC_HOOK_INTR, self._lib.delivery_intr_hook, self._pstate, what="install the C INTR hook"
        )
        vcpu._intr_hook = handle
        self.mmu.uc._callbacks[handle] = self

    def install_sites(self, vcpu, iret_only: bool = False) -> None:
        """Put a C hook in front of every iret, in/out and mov-to-CR4 site the vCPU's intercepts hook
        from now on (delivery_iret_hook, delivery_io_hook, delivery_cr4_hook): their common case needs
        nothing from cpuvirt. `iret_only` (hw, whose I/O and CR writes decide exits): the iret sites,
        after any C site hook the intercepts had."""
        clock = vcpu.clock._state
        st = self._state
        st.clock_watch_if = ctypes.addressof(clock) + type(clock).watch_if.offset
        st.clock_check_if = ctypes.addressof(clock) + type(clock).check_if.offset
        st.nmi_blocked = int(vcpu.nmi_blocked)
        vcpu.on_nmi_blocked = self._set_nmi_blocked
        self._sites: dict[int, tuple] = {}
        if not iret_only:
            vcpu.intercepts.fast_site = self._site
            return
        before = vcpu.intercepts.fast_site

        def site(address: int, size: int, mnem: str, ops: str, code: bytes, python_hook) -> bool:
            if before is not None and before(address, size, mnem, ops, code, python_hook):
                return True
            return mnem in ("iret", "iretd") and self._site(address, size, mnem, ops, code, python_hook)

        vcpu.intercepts.fast_site = site

    def _site(self, address: int, size: int, mnem: str, ops: str, code: bytes, python_hook) -> bool:
        """Hook one intercepted instruction in C if it is of a kind answered there; False if not."""
        if mnem in ("iret", "iretd"):
            self._iret_site(address, size, mnem == "iretd", code, python_hook)
            return True
        if mnem in _io_instructions():
            self._io_site(address, size, code, python_hook)
            return True
        dst, _, src = (t.strip() for t in ops.partition(","))
        if mnem == "mov" and dst == "cr4" and src in R.GPR_NAMES:
            self._cr4_site(address, size, R.GPR_ORDER[R.GPR_NAMES.index(src)], code, python_hook)
            return True
        return False

    def _cr4_site(self, address: int, size: int, src_reg: int, code: bytes, python_hook) -> None:
        site = _Cr4Site()
        site.s = ctypes.addressof(self._state)
        site.python = ctypes.cast(python_hook, ctypes.c_void_p).value
        site.size, site.src_reg, site.reserved = size, src_reg, CR4_RESERVED
        site.bytes[: len(code[:16])] = code[:16]
        if len(code) != size:
            site.size = 0  # bytes unknown: always the Python hook
        self._add_site(address, site, self._lib.delivery_cr4_hook, python_hook)

    def _io_site(self, address: int, size: int, code: bytes, python_hook) -> None:
        site = _IoSite()
        site.s = ctypes.addressof(self._state)
        site.python = ctypes.cast(python_hook, ctypes.c_void_p).value
        site.size = size
        site.bytes[: len(code[:16])] = code[:16]
        if len(code) != size:
            site.size = 0  # bytes unknown: always the Python hook
        self._add_site(address, site, self._lib.delivery_io_hook, python_hook)

    def io_passed(self) -> int:
        """in/out instructions whose I/O permission check passed in C (CPL 0 outside V86 mode)."""
        return sum(site.passed for site, _ in self._sites.values() if isinstance(site, _IoSite))

    def cr4_passed(self) -> int:
        """mov-to-CR4 instructions answered in C (nothing to do)."""
        return sum(site.passed for site, _ in self._sites.values() if isinstance(site, _Cr4Site))

    def _set_nmi_blocked(self, value: bool) -> None:
        self._state.nmi_blocked = int(value)

    def _iret_site(self, address: int, size: int, wide: bool, code: bytes, python_hook) -> None:
        site = _IretSite()
        site.s = ctypes.addressof(self._state)
        site.python = ctypes.cast(python_hook, ctypes.c_void_p).value
        site.size, site.wide = size, int(wide)
        site.bytes[: len(code[:16])] = code[:16]
        if len(code) != size:
            site.size = 0  # bytes unknown: always the Python hook
        self._add_site(address, site, self._lib.delivery_iret_hook, python_hook)

    def _add_site(self, address: int, site, hook, python_hook) -> None:
        handle = add_c_hook(
            self._uch,
            UC_HOOK_CODE,
            hook,
            ctypes.addressof(site),
            address,
            address,
            what=f"hook the intercepted instruction at {address:#x}",
        )
        self._sites[handle] = (site, python_hook)  # alive as long as the engine may call them
        self.mmu.uc._callbacks[handle] = self

    @property
    def irets(self) -> int:
        return self._state.irets

    @property
    def soft_delivered(self) -> int:
        return self._state.soft_delivered

    @property
    def faults_delivered(self) -> int:
        return self._state.faults_delivered

    def peek(self, gva: int, size: int) -> bytes | None:
        """Guest RAM bytes at a linear address with no side effect (Mmu.fetch_bytes), or None when the
        C reader cannot answer (a fault, a device, unbacked memory, more than 32 bytes)."""
        if size <= 32 and self._peek(self._pstate, self._uch, gva & 0xFFFFFFFF, size, self._buf):
            return self._buf.raw[:size]
        return None

    def deliver(self, vector: int, return_eip: int, error_code: int | None, soft: bool, external: bool) -> bool:
        """True when the C path delivered the event; False: nothing changed, deliver it in Python."""
        if self.mmu.traces.frames and not self._state.mirror:
            return False  # a write-traced frame may be written: Mmu.write_linear tells its owners
        flags = (F_SOFT if soft else 0) | (F_EXTERNAL if external else 0)
        if error_code is not None:
            flags |= F_ERROR_CODE
        r = self._fn(self._pstate, self._uch, vector, return_eip & 0xFFFFFFFF, (error_code or 0) & 0xFFFFFFFF, flags)
        if r == ENGINE_REFUSED:
            raise RuntimeError(f"engine refused a register write delivering vector {vector}")
        return r == DELIVERED

    def counts(self) -> tuple[int, int, int]:
        """(fills, walks, walk_refs) for Mmu.counters: the walks of the events it delivered, and the
        fills of the #PFs it delivered (Mmu.fill counts a refused fill as a fill)."""
        st = self._state
        return st.pf_fills, st.walks, st.walk_refs

    @property
    def faults(self) -> int:
        """Guest #PFs found and delivered by delivery_pf_hook (Mmu.counters' `faults` counts them)."""
        return self._state.pf_faults

    def fault_linear(self, eip: int, page: int, access: int) -> int | None:
        """The C answer to Vcpu.exact_linear for a #PF on `page` at `eip` (None: Python's to find)."""
        out = ctypes.c_uint32()
        if self._lib.delivery_fault_linear(
            self._pstate, self._uch, eip & 0xFFFFFFFF, page & 0xFFFFF000, access, ctypes.byref(out)
        ):
            return out.value
        return None

    @property
    def delivered(self) -> int:
        return self._state.delivered

    @property
    def fallbacks(self) -> int:
        return self._state.fallbacks
