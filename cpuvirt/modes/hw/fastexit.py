"""hw's CPUID exits, guest-owned CR0/CR4 writes, CR3 loads, invlpg, CR2/CR3 reads that do not exit: C (_fastexit.c).

Under hw every `cpuid` is a VM exit (SDM Vol. 3C 25.1.2) whose root-mode handler only answers from
the CPU model, and a `mov cr0/cr4` that changes only guest-owned bits (the guest/host masks) exits
not at all yet must be intercepted to apply the masks. In Python each costs a hook, the exit's
bookkeeping and an entry (about 30 bare hook calls); kvm-unit-tests' vmexit makes hundreds of millions.

The C path is an exact shortcut of the Python one, used only while nothing else needs Python:
- VmxCpu arms it at the end of each VM entry it makes, when there is no trace, no VMCS dump, the
  default CPUID handler and model, and disarms it when the VMCS is written, the emulated APIC changes,
  an interrupt is acknowledged or the run ends (`armed` is then 0 and every hook calls Python's).
- A CPUID exit answered in C leaves a record (count, RIP of the last); `VmxCpu.fold_fast_exits` writes
  it into the VMCS exit fields, the exit counters and the event count before any of them is read
  (the next Python exit, the summary, the end of the run). The site of a cpuid is the one Python's
  `_insn_site` found for the running block: C answers only blocks Python has seen.
- A CR write site's C hook declines (calls the Python hook) unless it is 32-bit protected mode at
  CPL 0 without an interrupt shadow, EIP is the site, the bytes are still the site's, the write exits
  nowhere and sets no CR4 bit the model lacks. The same hook answers `invlpg` without INVLPG exiting and
  `mov r32, cr2/cr3` (a CR3 read without CR3-store exiting), where Python has nothing to do: a kernel's
  #PF handler reads CR2 and its page-table code runs invlpg.
- Without EPT (shadow paging, CR3-load exiting), a `mov cr3, r32` that reloads the root the shadow runs
  on (a kernel flushing its TLB) is the whole CR_ACCESS exit in C, under cpu/_delivery.c's shadow guard;
  it leaves a record folded as the CPUID one is (`take_cr3_exits`). CPUVIRT_HW_CR3_C=0 keeps it Python's.

- I/O: the engine's in/out hooks are C ones (`hook_port_io`, at the run's start, without a trace): while
  armed they decide from the I/O-exiting controls and bitmaps copied at the entry whether an access exits,
  and hand an exit to `VmxCpu.io_exit_hook` (the quick exit, vmx.py `_quick_io_exit`, or the full one);
  anything else goes to the Python hooks. The I/O-permission gate's code hook on an in/out (added once
  ring-3 code ran) passes CPL 0 in protected mode here, as `io_gate` does. CPUVIRT_NO_QUICK_IO=1 turns
  both off.

Optional: without the built extension, or without the C delivery's guest reader, Python does all.
"""

from __future__ import annotations

import ctypes

from unicorn import UC_CTL_IO_WRITE, UC_CTL_TLB_FLUSH, UC_HOOK_CODE, UC_HOOK_INSN
from unicorn import x86_const as X
from unicorn.unicorn_py3 import unicorn as _ucmod

from cpuvirt.cpu.ssealign import _short_context
from cpuvirt.cpu.truefault import TfCounts, TrueFaultHook
from cpuvirt.cpu.vcpu import IO_CYCLES, IO_INSTRUCTIONS
from cpuvirt.engine import regs as R
from cpuvirt.engine.cext import add_c_hook, load
from cpuvirt.engine.cpuid import _Leaf
from cpuvirt.engine.hooks import HOOK_INSN_IN_CFUNC, HOOK_INSN_OUT_CFUNC
from cpuvirt.memory.shadowmirror import ShadowMirror
from cpuvirt.modes.hw import exits as E
from cpuvirt.modes.hw.vmcs import Field as F
from cpuvirt.x86.cpuid import CR4_RESERVED
from cpuvirt.x86.sysreg import mov_system_register

_RDTSC_CB = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
_IO_EXIT_CB = ctypes.CFUNCTYPE(ctypes.c_uint32, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_uint32)
_IO_ENTRY_CB = ctypes.CFUNCTYPE(None)

MAX_LEAVES = 16
BLOCK_SITES = 256


class _BlockSite(ctypes.Structure):
    _fields_ = [("block", ctypes.c_uint64), ("site", ctypes.c_uint32), ("valid", ctypes.c_uint32)]


class _State(ctypes.Structure):
    """Mirror of fastexit_t (checked against fastexit_sizeof at load)."""

    _fields_ = [
        ("reg_read", ctypes.c_void_p),
        ("reg_write", ctypes.c_void_p),
        ("context_save", ctypes.c_void_p),
        ("context", ctypes.c_void_p),
        ("context_hflags", ctypes.c_void_p),
        ("peek", ctypes.c_void_p),
        ("peek_state", ctypes.c_void_p),
        ("cpuid_python", ctypes.c_void_p),
        ("rdtsc_python", ctypes.c_void_p),
        ("clock_now", ctypes.c_void_p),
        ("clock_last_block", ctypes.c_void_p),
        ("clock_watch_if", ctypes.c_void_p),
        ("clock_check_if", ctypes.c_void_p),
        ("eax", ctypes.c_int32),
        ("ebx", ctypes.c_int32),
        ("ecx", ctypes.c_int32),
        ("edx", ctypes.c_int32),
        ("eip", ctypes.c_int32),
        ("cr0", ctypes.c_int32),
        ("cr4", ctypes.c_int32),
        ("armed", ctypes.c_uint32),
        ("cr0_mask", ctypes.c_uint32),
        ("cr0_shadow", ctypes.c_uint32),
        ("cr4_mask", ctypes.c_uint32),
        ("cr4_shadow", ctypes.c_uint32),
        ("cr4_reserved", ctypes.c_uint32),
        ("cr3_load_exiting", ctypes.c_uint32),
        ("pause_exiting", ctypes.c_uint32),
        ("rdtsc_exiting", ctypes.c_uint32),
        ("tsc_offsetting", ctypes.c_uint32),
        ("pad0", ctypes.c_uint32),
        ("tsc_offset", ctypes.c_uint64),
        ("register_virt", ctypes.c_uint32),
        ("tpr_shadow", ctypes.c_uint32),
        ("icr_hi", ctypes.c_uint32),
        ("max_irr_class", ctypes.c_int32),
        ("tpr_threshold", ctypes.c_uint32),
        ("vapic", ctypes.c_void_p),
        ("cpuid_exits", ctypes.c_uint64),
        ("last_rip", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
        ("cpuid_total", ctypes.c_uint64),
        ("cr_total", ctypes.c_uint64),
        ("rdtsc_total", ctypes.c_uint64),
        ("pause_total", ctypes.c_uint64),
        ("count", ctypes.c_uint32),
        ("pad2", ctypes.c_uint32),
        ("fallback", _Leaf),
        ("leaves", _Leaf * MAX_LEAVES),
        ("sites", _BlockSite * BLOCK_SITES),
        ("invlpg_exiting", ctypes.c_uint32),
        ("cr3_store_exiting", ctypes.c_uint32),
        ("read_total", ctypes.c_uint64),
        ("io_gate_total", ctypes.c_uint64),
        ("in_python", ctypes.c_void_p),
        ("out_python", ctypes.c_void_p),
        ("io_exit_python", ctypes.c_void_p),
        ("quick_io", ctypes.c_uint32),
        ("io_bitmaps", ctypes.c_uint32),
        ("unconditional_io", ctypes.c_uint32),
        ("pad3", ctypes.c_uint32),
        ("io_bitmap_a", ctypes.c_void_p),
        ("io_bitmap_b", ctypes.c_void_p),
        ("io_exit_total", ctypes.c_uint64),
        ("clock_now_w", ctypes.c_void_p),
        ("clock_extra", ctypes.c_void_p),
        ("io_cycles", ctypes.c_uint64),
        ("io_entry_python", ctypes.c_void_p),
        ("quick_done", ctypes.c_uint32),
        ("pad4", ctypes.c_uint32),
        ("shadow_ok", ctypes.c_void_p),
        ("shadow_key", ctypes.c_void_p),
        ("cr3_exits", ctypes.c_uint64),
        ("last_kind", ctypes.c_uint32),
        ("last_cr3_qual", ctypes.c_uint32),
        ("last_cr3_len", ctypes.c_uint32),
        ("last_cr3_rip", ctypes.c_uint32),
        ("last_cr3_value", ctypes.c_uint32),
        ("cr3", ctypes.c_int32),
        ("cr3_exit_total", ctypes.c_uint64),
        ("mirror", ctypes.c_void_p),
        ("ram", ctypes.c_void_p),
        ("ram_bytes", ctypes.c_uint64),
        ("gpr_reg", ctypes.c_int32 * 8),
        ("invlpg_exits", ctypes.c_uint64),
        ("last_invlpg_qual", ctypes.c_uint32),
        ("last_invlpg_len", ctypes.c_uint32),
        ("last_invlpg_rip", ctypes.c_uint32),
        ("pad5", ctypes.c_uint32),
        ("invlpg_exit_total", ctypes.c_uint64),
        ("pf_exits", ctypes.c_void_p),
    ]


LAST_CPUID, LAST_CR3, LAST_INVLPG, LAST_PF = 0, 1, 2, 3  # _fastexit.c last_kind: which record C wrote last


class _CrSite(ctypes.Structure):
    """Mirror of cr_site_t."""

    _fields_ = [
        ("s", ctypes.c_void_p),
        ("python", ctypes.c_void_p),
        ("size", ctypes.c_uint32),
        ("cr", ctypes.c_int32),
        ("src_reg", ctypes.c_int32),
        ("qual", ctypes.c_uint32),
        ("passed", ctypes.c_uint64),
        ("bytes", ctypes.c_uint8 * 16),
    ]


def _guarded_in(vcpu):
    """The vCPU's `in` hook as EngineHooks.port_in wraps it (an exception stops the run, never crosses C)."""
    from cpuvirt.engine.hooks import _stop

    uc = vcpu.uc

    def hook(_h, port, size, _d):
        try:
            return vcpu.hook_in(uc, port, size, None)
        except BaseException as e:  # noqa: B036
            _stop(vcpu, e)
            return 0

    return hook


def _guarded_out(vcpu):
    from cpuvirt.engine.hooks import _stop

    uc = vcpu.uc

    def hook(_h, port, size, value, _d):
        try:
            vcpu.hook_out(uc, port, size, value, None)
        except BaseException as e:  # noqa: B036
            _stop(vcpu, e)

    return hook


class _PfState(ctypes.Structure):
    """Mirror of pfexit_t (checked against fastexit_pf_sizeof at load)."""

    _fields_ = [
        ("s", ctypes.c_void_p),
        ("ptemod_on", ctypes.c_uint32),
        ("pf_on", ctypes.c_uint32),
        ("hidden_on", ctypes.c_uint32),
        ("window", ctypes.c_uint32),
        ("loading", ctypes.c_void_p),
        ("fault_linear", ctypes.c_void_p),
        ("c_armed", ctypes.c_uint32),
        ("exception_bitmap", ctypes.c_uint32),
        ("pfec_mask", ctypes.c_uint32),
        ("pfec_match", ctypes.c_uint32),
        ("ss", ctypes.c_int32),
        ("eflags", ctypes.c_int32),
        ("epoch", ctypes.c_uint64),
        ("armed_epoch", ctypes.c_uint64),
        ("armed_deadline", ctypes.c_uint64),
        ("clk_deadline", ctypes.c_void_p),
        ("clk_stopped", ctypes.c_void_p),
        ("clk_discard", ctypes.c_void_p),
        ("clk_stop_next", ctypes.c_void_p),
        ("clk_check_if", ctypes.c_void_p),
        ("left_block", ctypes.c_void_p),
        ("books", ctypes.c_void_p),
        ("fills", ctypes.c_void_p),
        ("cpu_offset", ctypes.c_uint64),
        ("loop_exit", ctypes.c_void_p),
        ("uc_ctl", ctypes.c_void_p),
        ("tlb_flush_ctl", ctypes.c_int32),
        ("cr2", ctypes.c_int32),
        ("deliver", ctypes.c_void_p),
        ("pf", TfCounts),
        ("exits", ctypes.c_uint64),
        ("last_qual", ctypes.c_uint32),
        ("last_code", ctypes.c_uint32),
        ("last_rip", ctypes.c_uint32),
        ("last_next", ctypes.c_uint32),
        ("true_exits", ctypes.c_uint32),
        ("last_guest_code", ctypes.c_uint32),
        ("refused", ctypes.c_uint32),
        ("hidden_exits", ctypes.c_uint32),
        ("ptemod_total", ctypes.c_uint64),
        ("zap_total", ctypes.c_uint64),
        ("hidden_total", ctypes.c_uint64),
    ]


def _lib():
    lib = load(
        "cpuvirt.modes.hw._fastexit",
        {"fastexit_sizeof": _State, "fastexit_cr_site_sizeof": _CrSite, "fastexit_pf_sizeof": _PfState},
    )
    if lib is not None:
        lib.fastexit_put_site.argtypes = (ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32)
        lib.fastexit_drop_site.argtypes = (ctypes.c_void_p, ctypes.c_uint64)
    return lib


class FastExits:
    """One VmxCpu's C exit paths. `FastExits.install(vcpu)` adds the cpuid hook (C, with the guarded
    Python hook behind it) and returns None when the extension or the context layout is missing."""

    @classmethod
    def install(cls, vcpu) -> "FastExits | None":
        lib = _lib()
        hflags = vcpu.faults.layout.hflags if vcpu.faults.layout is not None else None
        if lib is None or hflags is None:
            return None
        return cls(lib, vcpu, hflags)

    def __init__(self, lib, vcpu, hflags: int):
        self._lib = lib
        self.vcpu = vcpu
        uc = vcpu.uc
        self._uch = uc._uch
        st = self._state = _State()
        self._pstate = ctypes.pointer(st)
        self._addr = ctypes.addressof(st)
        st.reg_read = ctypes.cast(_ucmod.uclib.uc_reg_read, ctypes.c_void_p).value
        st.reg_write = ctypes.cast(_ucmod.uclib.uc_reg_write, ctypes.c_void_p).value
        st.context_save = ctypes.cast(_ucmod.uclib.uc_context_save, ctypes.c_void_p).value
        self._context = uc.context_save()
        st.context = ctypes.cast(self._context.context, ctypes.c_void_p).value
        self._short = _short_context(uc, self._context, hflags + 4)
        if self._short is not None:
            st.context = ctypes.addressof(self._short)
        st.context_hflags = st.context + hflags
        clock = vcpu.clock._state
        base = ctypes.addressof(clock)
        st.clock_last_block = vcpu.clock.last_block_address
        st.clock_now = base + type(clock).left.offset
        st.clock_now_w = st.clock_now
        st.clock_extra = base + type(clock).extra.offset
        st.io_cycles = IO_CYCLES
        st.clock_watch_if = base + type(clock).watch_if.offset
        st.clock_check_if = base + type(clock).check_if.offset
        st.eax, st.ebx, st.ecx, st.edx = X.UC_X86_REG_EAX, X.UC_X86_REG_EBX, X.UC_X86_REG_ECX, X.UC_X86_REG_EDX
        st.eip, st.cr0, st.cr4 = X.UC_X86_REG_EIP, X.UC_X86_REG_CR0, X.UC_X86_REG_CR4
        st.cr3 = X.UC_X86_REG_CR3
        for i, reg in enumerate(R.GPR_ORDER):
            st.gpr_reg[i] = reg
        st.cr4_reserved = CR4_RESERVED
        st.quick_io = int(bool(vcpu.quick_io))
        self.load_table()
        self._python_cpuid = vcpu.hooks.cpuid_function(vcpu.hook_cpuid)
        st.cpuid_python = ctypes.cast(self._python_cpuid, ctypes.c_void_p).value
        handle = add_c_hook(
            self._uch,
            UC_HOOK_INSN,
            lib.fastexit_cpuid_hook,
            self._addr,
            insn=X.UC_X86_INS_CPUID,
            what="hook cpuid",
        )
        uc._callbacks[handle] = self
        self._python_rdtsc = _RDTSC_CB(vcpu.rdtsc)
        st.rdtsc_python = ctypes.cast(self._python_rdtsc, ctypes.c_void_p).value
        handle = add_c_hook(
            self._uch,
            UC_HOOK_INSN,
            lib.fastexit_rdtsc_hook,
            self._addr,
            insn=X.UC_X86_INS_RDTSC,
            what="hook rdtsc",
        )
        uc._callbacks[handle] = self
        self._sites: dict[int, tuple] = {}
        self._quiet = lib.fastexit_quiet
        self._quiet.argtypes = (ctypes.c_void_p,)
        self._vapic: object = None  # the VirtualApic whose page the C path reads
        self._vapic_page: ctypes.c_char | None = None  # that page, kept exported while C reads it

    def load_table(self) -> None:
        """The CPU model's answers (x86/cpuid.py through the machine), as the default handler gives them."""
        leaves, fallback = self.vcpu.machine.cpuid_table()
        if len(leaves) > MAX_LEAVES:
            raise ValueError(f"a CPUID table holds at most {MAX_LEAVES} leaves")
        st = self._state
        armed, st.armed = st.armed, 0
        st.count = 0
        st.fallback = _Leaf(0, *fallback)
        for i, (leaf, regs) in enumerate(sorted(leaves.items())):
            st.leaves[i] = _Leaf(leaf, *regs)
        st.count = len(leaves)
        st.armed = armed

    # -- the record Python folds in ------------------------------------------------------------------
    def take_cpuid_exits(self) -> tuple[int, int]:
        """(CPUID exits answered in C since the last call, RIP of the last of them)."""
        st = self._state
        n = st.cpuid_exits
        if n:
            st.cpuid_exits = 0
        return n, st.last_rip

    def take_cr3_exits(self) -> tuple[int, bool, int, int, int, int]:
        """(CR3-load exits made in C since the last call, whether the last of them came after the last
        CPUID exit C made, and that one's exit qualification, instruction length, RIP and CR3 value)."""
        st = self._state
        n = st.cr3_exits
        if n:
            st.cr3_exits = 0
        return n, st.last_kind == LAST_CR3, st.last_cr3_qual, st.last_cr3_len, st.last_cr3_rip, st.last_cr3_value

    def guard_cr3_loads(self, delivery_state: ctypes.Structure) -> None:
        """Let C make the CR3-load exits that reload the shadow's current root, under cpu/_delivery.c's
        shadow guard (its shadow_ok and shadow_key, which VmxCpu._mirror_shadow sets at each entry)."""
        st = self._state
        base, t = ctypes.addressof(delivery_state), type(delivery_state)
        st.shadow_ok = base + t.shadow_ok.offset
        st.shadow_key = base + t.shadow_key.offset

    def guard_invlpg(self, mirror_address: int, ram_address: int, ram_bytes: int) -> None:
        """Let C make the INVLPG exits of shadow paging too (under the same guard), dropping the page from the
        shadow's current root through its C copy (memory/shadowmirror.py ShadowMirror at `mirror_address`)."""
        st = self._state
        st.mirror, st.ram, st.ram_bytes = mirror_address, ram_address, ram_bytes

    def take_invlpg_exits(self) -> tuple[int, int, int, int]:
        """(INVLPG exits made in C since the last call, and the last one's exit qualification, instruction
        length and RIP)."""
        st = self._state
        n = st.invlpg_exits
        if n:
            st.invlpg_exits = 0
        return n, st.last_invlpg_qual, st.last_invlpg_len, st.last_invlpg_rip

    @property
    def last_kind(self) -> int:
        """Which of C's exit records was written last (LAST_CPUID, LAST_CR3, LAST_INVLPG, LAST_PF)."""
        return self._state.last_kind

    @property
    def invlpg_exits_made(self) -> int:
        """INVLPG exits made in C in the whole run."""
        return self._state.invlpg_exit_total

    @property
    def cr3_exits_made(self) -> int:
        """CR3-load exits made in C in the whole run."""
        return self._state.cr3_exit_total

    @property
    def armed(self) -> bool:
        return bool(self._state.armed)

    def disarm(self) -> None:
        self._state.armed = 0

    def quiet(self) -> bool:
        """Would a VM entry now change nothing? (fastexit_quiet: armed, the virtual-APIC page in step.)"""
        return bool(self._quiet(self._addr))

    def quiet_function(self) -> tuple[int, int]:
        """(address of fastexit_quiet, of its state): would a VM entry now change nothing?"""
        return ctypes.cast(self._lib.fastexit_quiet, ctypes.c_void_p).value or 0, self._addr

    def hook_port_io(self, port_hooks: tuple[int, int]) -> tuple[int, int]:
        """Put the C in/out hooks in place of the vCPU's Python ones (`port_hooks`, removed): an access
        that exits goes to VmxCpu.io_exit_hook, anything else to the Python hooks as before. Returns the
        two new handles."""
        vcpu, st, hooks = self.vcpu, self._state, self.vcpu.hooks
        for handle in port_hooks:
            hooks.remove(handle)
        self._port_cbs = (
            HOOK_INSN_IN_CFUNC(_guarded_in(vcpu)),
            HOOK_INSN_OUT_CFUNC(_guarded_out(vcpu)),
            _IO_EXIT_CB(vcpu.io_exit_hook),
            _IO_ENTRY_CB(vcpu.io_entry),
        )
        addresses = [ctypes.cast(cb, ctypes.c_void_p).value for cb in self._port_cbs]
        st.in_python, st.out_python, st.io_exit_python, st.io_entry_python = addresses
        handles = []
        lib = self._lib
        for fn, insn in ((lib.fastexit_in_hook, X.UC_X86_INS_IN), (lib.fastexit_out_hook, X.UC_X86_INS_OUT)):
            h = add_c_hook(self._uch, UC_HOOK_INSN, fn, self._addr, insn=insn, what="hook port I/O")
            vcpu.uc._callbacks[h] = self
            handles.append(h)
        return handles[0], handles[1]

    def quick_exit_made(self) -> None:
        """Python made the quick exit of the access C handed it: C makes the entry check (fastexit_quiet)."""
        self._state.quick_done = 1

    @property
    def io_exits_seen(self) -> int:
        """I/O accesses the C in/out hooks found to exit (each handed to VmxCpu.io_exit_hook)."""
        return self._state.io_exit_total

    def arm(self, values: dict, vapic, ctl) -> None:
        """Copy what the C path decides with (the VMCS's CR masks and shadows, the I/O-exiting controls
        and bitmaps, the APIC-virtualization state just synced) and let it answer."""
        st = self._state
        st.io_bitmaps = int(ctl("use_io_bitmaps"))
        st.unconditional_io = int(ctl("unconditional_io_exiting"))
        hv = self.vcpu.hv_mem
        if st.io_bitmaps:
            a, b = values[F.IO_BITMAP_A] - hv.hpa, values[F.IO_BITMAP_B] - hv.hpa
            if not (0 <= a <= hv.size - 4096 and 0 <= b <= hv.size - 4096):
                st.armed = 0
                return  # bitmaps outside the hypervisor's memory: Python decides (and reads them)
            st.io_bitmap_a, st.io_bitmap_b = hv.host_address + a, hv.host_address + b
        st.cr0_mask, st.cr0_shadow = values[F.CR0_GUEST_HOST_MASK], values[F.CR0_READ_SHADOW]
        st.cr4_mask, st.cr4_shadow = values[F.CR4_GUEST_HOST_MASK], values[F.CR4_READ_SHADOW]
        st.cr3_load_exiting = int(ctl("cr3_load_exiting"))
        st.pause_exiting = int(ctl("pause_exiting"))
        st.invlpg_exiting = int(ctl("invlpg_exiting"))
        st.cr3_store_exiting = int(ctl("cr3_store_exiting"))
        st.rdtsc_exiting = int(ctl("rdtsc_exiting"))
        st.tsc_offsetting = int(ctl("use_tsc_offsetting"))
        st.tsc_offset = values[F.TSC_OFFSET]
        if vapic is not None:
            apic = vapic.apic
            irr = apic.irr
            if self._vapic is not vapic:
                self._vapic, self._vapic_page = vapic, ctypes.c_char.from_buffer(vapic.page)
                st.vapic = ctypes.addressof(self._vapic_page)
            st.register_virt, st.tpr_shadow = int(vapic.register_virt), int(vapic.tpr_shadow)
            st.icr_hi = apic.icr_hi
            st.max_irr_class = (irr.bit_length() - 1) >> 4 if irr else -1
            st.tpr_threshold = vapic.tpr_threshold
        st.armed = 1

    # -- cpuid sites (vmx.py _insn_site's per-block cache) ----------------------------------------------
    def put_site(self, block: int, site: int) -> None:
        self._lib.fastexit_put_site(self._addr, block, site)

    def drop_site(self, block: int) -> None:
        self._lib.fastexit_drop_site(self._addr, block)

    # -- mov to CR0/CR4 sites (Intercepts.fast_site) -------------------------------------------------------
    def set_peek(self, delivery_fast) -> None:
        """The guest-byte reader of cpu/_delivery.c (delivery_peek, through the EPT walk)."""
        st = self._state
        st.peek = ctypes.cast(delivery_fast._lib.delivery_peek, ctypes.c_void_p).value
        st.peek_state = ctypes.addressof(delivery_fast._state)

    def cr_site(self, address: int, size: int, mnem: str, ops: str, code: bytes, python_hook) -> bool:
        """Put the C hook in front of a `mov cr0/cr3/cr4, r32`, `mov r32, cr2/cr3`, `invlpg` or `pause`
        site; False for anything else."""
        if not self._state.peek:
            return False
        qual = 0
        if mnem == "pause":
            cr, src = -1, 0
        elif mnem in IO_INSTRUCTIONS and self.vcpu.quick_io:  # the I/O gate's CPL-0 pass
            cr, src = -3, 0
        elif mnem == "invlpg":
            cr, src = -2, 0
        elif mnem == "mov" and ops.startswith(("cr0,", "cr3,", "cr4,")):
            form = mov_system_register(code)
            if form is None or form.gpr is None or form.debug or not form.to_system or form.number not in (0, 3, 4):
                return False
            cr, src = form.number, R.GPR_ORDER[form.gpr]
            qual = E.cr_qualification(3, E.CR_MOV_TO, form.gpr) if cr == 3 else 0
        elif mnem == "mov" and ops.endswith((", cr2", ", cr3")):
            form = mov_system_register(code)
            if form is None or form.gpr is None or form.debug or form.to_system or form.number not in (2, 3):
                return False
            cr, src = 0x100 | form.number, 0
        else:
            return False
        if self.vcpu.shadow is not None and (
            (cr == 3 and self.vcpu.ctl("cr3_load_exiting") and not self._state.shadow_ok)
            or (cr == -2 and self.vcpu.ctl("invlpg_exiting") and not self._state.mirror)
            or (cr == 0x103 and self.vcpu.ctl("cr3_store_exiting"))
        ):
            return False  # shadow paging: it exits (C would only hand it to Python), a plain Python hook
        site = _CrSite()
        site.s = self._addr
        site.python = ctypes.cast(python_hook, ctypes.c_void_p).value
        site.size, site.cr, site.src_reg = size, cr, src
        if cr == 3:
            site.qual = qual  # (what its CR_ACCESS exit's qualification says: CR3, MOV to, the register)
        site.bytes[: len(code[:16])] = code[:16]
        if len(code) != size or size > 16:
            site.size = 0  # bytes unknown: always the Python hook
        handle = add_c_hook(
            self._uch,
            UC_HOOK_CODE,
            self._lib.fastexit_cr_hook,
            ctypes.addressof(site),
            address,
            address,
            what=f"hook the mov to CR at {address:#x}",
        )
        self._sites[handle] = (site, python_hook)  # alive as long as the engine may call them
        self.vcpu.uc._callbacks[handle] = self
        return True

    def counts(self) -> tuple[int, int]:
        """(CPUID exits, guest-owned CR writes and CR3 loads) answered in C."""
        st = self._state
        return st.cpuid_total, st.cr_total

    def more_counts(self) -> tuple[int, int]:
        """(rdtsc, pause) answered in C."""
        st = self._state
        return st.rdtsc_total, st.pause_total

    @property
    def io_gate_passed(self) -> int:
        """in/out/ins/outs at CPL 0 let through the I/O permission gate in C."""
        return self._state.io_gate_total

    @property
    def reads_passed(self) -> int:
        """invlpg and mov from CR2/CR3 answered in C (nothing to do: no exit)."""
        return self._state.read_total


class PfExits(TrueFaultHook):
    """hw --no-ept's #PF exits made in the TLB fill (_fastexit.c fastexit_pf_hook) while the stop of the full
    exit would change nothing else: a ptemod's (the guest kernel's store into one of its page tables, which
    the shadow maps read-only, emulated with the whole exit: the handler's emulation, GUEST_RIP, the entry)
    and a true fault's (the walk, CR2, the injection and the entry's delivery through the guest's IDT); and
    the record of a hidden fault's, which the shadow's C fill asks for (fastexit_hidden_exit) before it asks
    VmxCpu.quick_shadow_exit.
    The hook must come before Mmu.fill's, so it is added when the mode is built (`install`, after the
    shadow's C fill) and does nothing until `attach` gives it the C exit state, the shadow fill's counter and
    the event books; VmxCpu arms it at each VM entry (`arm`) and folds its record (`take`).
    CPUVIRT_HW_PTEMOD_C=0 leaves every ptemod's exit to Python, CPUVIRT_HW_PF_C=0 every true fault's,
    CPUVIRT_HW_HIDDEN_PF_C=0 every hidden fault's record (VmxCpu.shadow_ptemod_c, shadow_true_pf_c,
    shadow_hidden_pf_c)."""

    STATE = _PfState
    _lib: ctypes.CDLL

    @classmethod
    def install(cls, uc) -> "PfExits | None":
        lib = _lib()
        if lib is None:
            return None
        hook = cls(uc, lib.fastexit_pf_hook, "install hw's C #PF-exit hook")
        hook._lib = lib
        return hook

    def attach(self, fast_exits: "FastExits", fill, shadow, books, ptemods: bool, faults: bool, hidden: bool) -> bool:
        """Make the exits from now on: `fill` the shadow's C fill (ShadowFastFill, whose count is Mmu.fill's and
        the shadow's hits), `books` the C event books (cpu/fastdelivery.py EventBooks: the running block's
        instructions). False when something it needs is missing (the exits stay Python's)."""
        from cpuvirt.cpu.fastdelivery import _engine_cpu

        vcpu = fast_exits.vcpu
        found = _engine_cpu(vcpu.uc)
        mirror = ShadowMirror.of(shadow)
        fst = fast_exits._state
        if found is None or mirror is None or fill is None or books is None or not fst.mirror or not fst.peek:
            return False
        mirror.track_links()  # which words of a page table a shadow entry derives from
        st = self.state
        st.cpu_offset, st.loop_exit = found
        st.uc_ctl = ctypes.cast(_ucmod.uclib.uc_ctl, ctypes.c_void_p).value
        st.tlb_flush_ctl = (UC_CTL_IO_WRITE << 30) | UC_CTL_TLB_FLUSH  # no argument
        st.ss, st.eflags, st.cr2 = X.UC_X86_REG_SS, X.UC_X86_REG_EFLAGS, X.UC_X86_REG_CR2
        st.deliver = ctypes.cast(books._lib.delivery_fast, ctypes.c_void_p).value  # (on fst.peek_state)
        st.fault_linear = ctypes.cast(books._lib.delivery_fault_linear, ctypes.c_void_p).value
        st.loading = ctypes.addressof(vcpu.regs.loading_descriptor)
        fstate = fill._state
        st.fills = ctypes.addressof(fstate) + type(fstate).fills.offset
        st.left_block = ctypes.cast(books._lib.delivery_books_left_block, ctypes.c_void_p).value
        st.books = books.address
        self._keep = (fast_exits, fill, books)  # what C points at, alive as long as the hook
        self.count_in(vcpu.mmu, shadow)
        st.ptemod_on, st.pf_on, st.hidden_on = int(ptemods), int(faults), int(hidden)
        fst.pf_exits = ctypes.addressof(st) + type(st).exits.offset  # (the quick I/O exit folds them first)
        st.s = fast_exits._addr
        if hidden:
            fstate.quick_c = ctypes.cast(self._lib.fastexit_hidden_exit, ctypes.c_void_p).value
            fstate.quick_c_state = ctypes.addressof(st)
        return True

    def arm(self, ok: bool, window: bool, exception_bitmap: int, pfec_mask: int, pfec_match: int) -> None:
        """At a VM entry: may C make the exits until the next one (while IF = 0 if `window`, interrupt-window
        exiting, is on), and the controls that say whether a #PF exits (SDM Vol. 3C 25.2)."""
        st = self.state
        st.exception_bitmap, st.pfec_mask, st.pfec_match = exception_bitmap, pfec_mask, pfec_match
        st.c_armed, st.window = int(ok), int(window)

    def take(self) -> tuple[int, int, int, int, int, int, int, int]:
        """(exits made in C since the last call, and the last one's exit qualification, error code, RIP and
        GUEST_RIP after its handler; the true faults among them, and the last one's error code for the guest;
        the hidden faults among them)."""
        st = self.state
        if st.refused:
            raise RuntimeError("engine refused a register write delivering vector 14")
        n, trues, hidden = st.exits, st.true_exits, st.hidden_exits
        if n:
            st.exits = st.true_exits = st.hidden_exits = 0
        return n, st.last_qual, st.last_code, st.last_rip, st.last_next, trues, st.last_guest_code, hidden

    @property
    def ptemods(self) -> int:
        """ptemod exits made in C in the whole run."""
        return self.state.ptemod_total

    @property
    def hidden_faults(self) -> int:
        """Hidden #PF exits recorded in C in the whole run."""
        return self.state.hidden_total

    @property
    def true_faults(self) -> int:
        """True #PF exits made in C in the whole run (TrueFaultHook.faults: the MMU's and the shadow's)."""
        return self.faults
