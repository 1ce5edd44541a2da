"""The simulated processor in VMX non-root operation: when it exits, what it records, how it re-enters.

The guest runs at ring 0 in the engine. Each place where a real VT-x processor would consult the VMCS
is a hook here: I/O, CPUID, RDTSC and exceptions arrive through the engine's hooks; instructions that
do not trap in the engine (mov to/from CR, hlt, invlpg, lgdt, rdmsr...) through one-address intercepts
(cpu/intercept.py); TLB fills go through the 2-D walk (memory/nested.py). When the controls say so, the
processor performs a VM exit: it fills the exit-information fields, hands the exit to the root-mode
handler (handlers.py, KVM's table), then performs a VM entry: checks the guest state (SDM 26.3), loads
the fields the handler changed, and injects the event the handler asked for (SDM 26.6).

Rules followed, by SDM Vol. 3C section: 25.1.3 (instructions that exit conditionally, CR0/CR4 masks and
read shadows), 25.2 (other causes: exception bitmap, #PF error-code mask/match, external interrupts,
interrupt window), 28.2 (exit-information fields), 26.3 (entry checks), 26.6 (event injection).
"""

from __future__ import annotations

import ctypes
import os
import time
from collections import Counter, defaultdict
from typing import Any

from unicorn import UC_CTL_IO_WRITE, UC_CTL_TLB_FLUSH

from cpuvirt import limits
from cpuvirt.cpu.fastdelivery import FastDelivery
from cpuvirt.cpu.faults import DeliveryFault
from cpuvirt.cpu.mmiosite import MmioSites
from cpuvirt.cpu.vcpu import EXIT_HYPERVISOR_STOP, IO_CYCLES, IO_INSTRUCTIONS, Vcpu
from cpuvirt.engine import regs as R
from cpuvirt.engine.clock import NEVER
from cpuvirt.engine.hooks import hook_guard
from cpuvirt.engine.hostmem import HostRegion, HvAllocator
from cpuvirt.machine.apic import APIC_BASE_GPA
from cpuvirt.machine.machine import Machine
from cpuvirt.memory.ept import EPT_R, EPT_W, EPT_X, Ept
from cpuvirt.memory.fastfill import EptFastFill
from cpuvirt.memory.mmu import NestedFault
from cpuvirt.memory.nested import EptWalk
from cpuvirt.memory.p2m import HV_HPA, RAM_HPA
from cpuvirt.memory.shadow import ShadowMiss, ShadowPaging
from cpuvirt.memory.shadowmirror import ShadowFastFill, ShadowMirror
from cpuvirt.memory.traces import TracedWrite
from cpuvirt.memory.types import GPA, GVA, HPA, PFEC_P, PFEC_U, PFEC_W, Access
from cpuvirt.modes.hw import apicv
from cpuvirt.modes.hw import exits as E
from cpuvirt.modes.hw.controls import CONTROLS, VmxSettings
from cpuvirt.modes.hw.exits import Exit, ExitReason
from cpuvirt.modes.hw.fastexit import LAST_INVLPG, LAST_PF, FastExits, PfExits
from cpuvirt.modes.hw.nonroot import INSTRUCTION_HANDLERS, PRIVILEGED, SENSITIVE, Sensitive
from cpuvirt.modes.hw.vmcs import Field as F
from cpuvirt.modes.hw.vmcs import Vmcs
from cpuvirt.x86.faultaddr import fault_address
from cpuvirt.x86.faultaddr import operand_address as operand_linear_address
from cpuvirt.x86.flags import CR0_ET, CR0_PE, CR0_PG, CR0_WP, CR4_PSE, EFLAGS_IF, EFLAGS_VM
from cpuvirt.x86.vectors import HAS_ERROR_CODE, MNEMONIC, Vector

HV_SIZE = 8 << 20
# The APIC-access page: a host-physical page right after the hypervisor's region, backed by no memory
# (the engine's MMIO callbacks of modes/hw/_apicv.c); EPT maps the guest's APIC page to it.
APIC_ACCESS_HPA = HV_HPA + HV_SIZE

# The simulated IA32_VMX_CR0_FIXED0/1 and CR4_FIXED0/1 (SDM appendix A.7, A.8), with "unrestricted
# guest": CR0.PE and CR0.PG may be 0, CR0.NE must be 1; CR4 has no fixed bits here.
CR0_FIXED0 = 1 << 5
# What the I/O exit path reads and writes, as plain ints (an IntEnum member costs a lookup each time).
_IO_BITMAPS, _UNCOND_IO = CONTROLS["use_io_bitmaps"], CONTROLS["unconditional_io_exiting"]
_IO_A, _IO_B = int(F.IO_BITMAP_A), int(F.IO_BITMAP_B)
_EXIT_REASON, _EXIT_QUAL, _EXIT_LEN = int(F.VM_EXIT_REASON), int(F.EXIT_QUALIFICATION), int(F.VM_EXIT_INSTRUCTION_LEN)
_EXIT_INTR_INFO, _EXIT_INTR_ERROR = int(F.VM_EXIT_INTR_INFO), int(F.VM_EXIT_INTR_ERROR_CODE)
_EXIT_INSN_INFO, _GUEST_RIP = int(F.VMX_INSTRUCTION_INFO), int(F.GUEST_RIP)
_IO_INSTRUCTION = ExitReason.IO_INSTRUCTION
_EPT_VIOLATION = ExitReason.EPT_VIOLATION
_SHADOW_CR0 = CR0_PG | CR0_WP  # host-owned under shadow paging for delivery_peek's guard (_mirror_shadow)
_GPA, _GLA = int(F.GUEST_PHYSICAL_ADDRESS), int(F.GUEST_LINEAR_ADDRESS)
_PF_EXIT_INFO = E.intr_info(Vector.PF, E.INTR_TYPE_HW_EXCEPTION, True)  # a #PF's VM_EXIT_INTR_INFO
_WINDOW_FIELD, _WINDOW_BIT = CONTROLS["interrupt_window_exiting"]
RFLAGS_RESERVED_ZERO = (1 << 3) | (1 << 5) | (1 << 15) | 0xFFC00000


class _BlockSites(MmioSites):
    """MmioSites with its decode of a block kept until the engine translates a new block there
    (forget_block), as hw keeps its CPUID/RDTSC sites: no fetch of the block's bytes per access."""

    def __init__(self, mmu, regs, clock):
        super().__init__(mmu, regs, clock)
        self._by_block: dict[int, list] = {}

    def _decode(self, block: int) -> list:
        insns = self._by_block.get(block)
        if insns is None:
            insns = super()._decode(block)
            limits.put(self._by_block, block, insns)
        return insns

    def forget(self, block: int) -> None:
        self._by_block.pop(block, None)


class _SavedRegs:
    """The general registers _tlbfill.c saved at an EPT violation it took, read as engine/regs.py's Regs is
    (what fault_address reads: base and index registers, ESP, ESI, EDI)."""

    __slots__ = ("values",)

    def __init__(self, saved):
        self.values = dict(zip((R.EAX, R.ECX, R.EDX, R.EBX, R.ESP, R.EBP, R.ESI, R.EDI), saved))

    def read(self, reg: int) -> int:
        return self.values[reg]


class EntryFailure(Exception):
    def __init__(self, why: str, qualification: int = 0):
        super().__init__(why)
        self.qualification = qualification


class VmxCpu(Vcpu):
    def __init__(self, machine, settings: VmxSettings, trace=None, max_insns: int = 0, dump_on=None):
        super().__init__(machine, trace=trace, max_insns=max_insns)
        from cpuvirt.modes.hw.handlers import RootHypervisor

        self.settings = settings
        self.vmcs = Vmcs()
        self._bind_live_fields()
        self.hv_mem = HostRegion(self.uc, HV_HPA, HV_SIZE)  # hypervisor-only host memory
        self.alloc = HvAllocator(self.hv_mem)
        self.exits = 0
        self.quick_io_exits = 0  # IO_INSTRUCTION exits taken by _quick_io_exit (among `exits`)
        self.stats: Counter = Counter()
        self.handler_time: dict = defaultdict(float)
        self.dump_on = dump_on  # (exit number or reason name) -> callback(dump text)
        self.hypervisor = RootHypervisor(self)
        self._default_cpuid = RootHypervisor.handle_cpuid  # the handler the C CPUID path answers as
        self._default_io = RootHypervisor.handle_io  # the handler the quick I/O exit does as
        self._default_ept = RootHypervisor.handle_ept_violation  # the handler the quick EPT exit does as
        self.quick_ept_exits = 0  # EPT_VIOLATION exits taken by ept_quick_hook or in C (among `exits`)
        self._default_exception = RootHypervisor.handle_exception_nmi  # what the quick shadow #PF exit does as
        self.quick_shadow_exits = 0  # hidden-#PF exits taken without a stop (among `exits`)
        self._ept_c: Any = None  # _tlbfill.c's state when it takes lazy-EPT exits itself (_install_quick_ept_c)
        self._pf_exits: PfExits | None = None  # no EPT: the #PF exits made in the TLB fill (fastexit.py)
        self._shadow_fill: ShadowFastFill | None = None  # no EPT: the shadow's C fill
        self._stop_watchers: list = []  # C states that make exits only while the stop would change nothing
        self._io_forms: dict = {}
        self.shadow: ShadowPaging | None = None  # without EPT: KVM's shadow MMU (memory/shadow.py)
        self.pf_access = 0  # access kind of the last shadow #PF (the handler walks for it)
        self._sites: dict = {}
        # the task switch a TASK_SWITCH exit is for: (view, selector, reason, next EIP, ext, its fault)
        self._task: tuple[Any, int, int, int, int, DeliveryFault | None] | None = None
        self.vapic: apicv.VirtualApic | None = None
        self.fast_fill: EptFastFill | None = None  # memory/fastfill.py: TLB fills under EPT in C
        self._apic_sites: _BlockSites | None = None  # cpu/mmiosite.py, made on the first APIC exit
        self._apic_lengths: dict[int, int] = {}
        self.apic_access = (4, 0)  # (size, value written) of the access an APIC_ACCESS exit is for
        self.fast_exits: FastExits | None = None  # fastexit.py: CPUID exits, guest-owned CR writes in C
        self._fast_delivery: FastDelivery | None = None  # EPT: deliveries, and events that do not exit, in C
        self._shadow_peek: FastDelivery | None = None  # no EPT: the C reader of guest code (install_shadow)
        self._launch()

    # -- VMLAUNCH: the hypervisor's set-up, then the first entry ---------------------------------------
    def _launch(self) -> None:
        v, s = self.vmcs, self.settings
        io_a, io_b, msr = self.alloc.page(), self.alloc.page(), self.alloc.page()
        for port in s.io_ports:
            page = io_a if port < 0x8000 else io_b
            off = (port & 0x7FFF) >> 3
            self.hv_mem.view[page - HV_HPA + off] |= 1 << (port & 7)
        for m in s.msrs:
            for base in (0, 2048):  # read bitmap, write bitmap (SDM 25.6.9)
                if m <= 0x1FFF:
                    bit = m
                elif 0xC0000000 <= m <= 0xC0001FFF:
                    bit = m - 0xC0000000 + 8192
                else:
                    continue
                self.hv_mem.view[msr - HV_HPA + base + bit // 8] |= 1 << (bit % 8)
        v.vmwrite(F.IO_BITMAP_A, io_a)
        v.vmwrite(F.IO_BITMAP_B, io_b)
        v.vmwrite(F.MSR_BITMAP, msr)
        v.vmwrite(F.VMCS_LINK_POINTER, 0xFFFFFFFFFFFFFFFF)  # no shadow VMCS (SDM 26.3.1.5)
        s.apply(v)
        if s.bits["enable_ept"]:
            self.ept = Ept(self.hv_mem, self.alloc)
            if not s.lazy_ept:
                self.ept.map_range(GPA(0), HPA(RAM_HPA), self.machine.mem_bytes)
            v.vmwrite(F.EPT_POINTER, self.ept.eptp)
            self.shadow = None
            # The common fills in C, asked before Mmu.fill (which install_hooks adds); on at VMLAUNCH.
            self.fast_fill = EptFastFill.install(self.mmu, self.ept)
            # Deliveries through the guest IDT in C (its #PF hook, too, goes before Mmu.fill)
            self._fast_delivery = FastDelivery.prepare_ept(self.delivery, self.ept)
        else:
            # KVM without EPT: shadow page tables, filled on #PF exits (memory/shadow.py).
            self.shadow = ShadowPaging(self.mmu, exit_on_miss=True)
            self.shadow.attach(self)
            if self.quick_shadow_pf:
                self.shadow.quick_miss = self.quick_shadow_miss
            fill = ShadowFastFill.install(self.mmu)  # before Mmu.fill's hook: the shadow's hits in C
            if fill is not None and fill.follow(self.shadow, None, 0xFFFFFFFF):  # keyed by the engine's CRs
                self._shadow_fill = fill
                if self.quick_shadow_pf and self.quick_shadow_pf_c:
                    fill.set_quick_exit(self.quick_shadow_exit)  # the common hidden faults' walk in C
                if self.shadow_ptemod_c or self.shadow_true_pf_c or self.shadow_hidden_pf_c:
                    self._pf_exits = PfExits.install(self.uc)  # after the shadow's fill, before Mmu.fill's
        self.install_hooks()
        if s.bits["enable_ept"]:
            self._setup_apic_virtualization()
        self.enable_intercepts(SENSITIVE, self.on_sensitive, lazy_io=True)
        fx = self.fast_exits
        self.vmcs.on_write = self._vmcs_written
        if fx is not None and self.intercepts is not None:
            self.intercepts.fast_site = fx.cr_site
            apic = self.machine.apic
            changed, base_changed = apic.on_change, apic.on_base_change

            def apic_changed() -> None:
                fx.disarm()  # the virtual-APIC page no longer mirrors the APIC: the next entry syncs it
                changed()

            def apic_base_changed() -> None:
                fx.load_table()  # CPUID's APIC bit follows IA32_APIC_BASE
                base_changed()

            apic.on_change, apic.on_base_change = apic_changed, apic_base_changed

    def _vmcs_written(self) -> None:
        """The C paths' copies of the VMCS are stale until the next entry."""
        if self.fast_exits is not None:
            self.fast_exits.disarm()
        if self._fast_delivery is not None:
            self._fast_delivery.disarm_vmx()
        self._shadow_policy = None

    events_in_c = True  # hw's INTR hook and guest #PF in C when they cause no exit (False: Python's)

    def install_fast_events(self) -> None:
        """At the run's start (a trace is attached after the mode is built): the events that cause no VM
        exit, `int n`, faults whose exception-bitmap bit is clear, a guest #PF that PFEC_MASK/MATCH do
        not send out, delivered through the guest IDT in C (cpu/_delivery.c) as the processor would;
        and the common iret, and the reads of guest code, in C too (as native has them). And the in/out
        hooks in C (fastexit.py hook_port_io), which decide whether an access exits."""
        fx = self.fast_exits
        if fx is not None and self.quick_io and self.trace is None:
            self._port_hooks = fx.hook_port_io(self._port_hooks)
        if fx is not None and self.fast_fill is not None and self.quick_ept and self.settings.lazy_ept:
            if self.trace is None and self.dump_on is None:
                self.fast_fill.set_quick_exit(self.ept_quick_hook)
                self._install_quick_ept_c(fx)
        shadow_peek = self._shadow_peek
        if shadow_peek is not None and self.events_in_c and self.trace is None and self.intercepts is not None:
            # Without EPT: the common iret in C too (delivery_iret_hook: nothing for cpuvirt to do, decided by
            # the guarded reader's peeks alone, as Vcpu.iret_image_rf and iret_site decide it)
            shadow_peek.install_sites(self, iret_only=True)
        fast = self._fast_delivery
        if fast is None or not self.events_in_c or self.trace is not None:
            return
        if self.mmu.traces.frames and fast is not shadow_peek:
            return  # (EPT) a traced frame's owners must hear of the delivery's writes: Python's
        if fx is not None:
            fast.set_quiet(*fx.quiet_function())
        fast.install_intr(self)
        self._arm_delivery()
        pf = self._pf_exits
        if pf is not None and fx is not None and fast is shadow_peek and self.shadow is not None:
            hidden = self.shadow_hidden_pf_c and self.quick_shadow_pf and self.quick_shadow_pf_c
            if pf.attach(
                fx, self._shadow_fill, self.shadow, fast.books, self.shadow_ptemod_c, self.shadow_true_pf_c, hidden
            ):
                self._watch_stops(pf.state)
        if self.intercepts is not None and fast is not shadow_peek:
            fast.install_sites(self, iret_only=True)  # an iret with nothing for cpuvirt to do, in C
        if self.mmu.crs_source is None:
            self.mmu.peek = fast.peek  # the intercepts' and decoders' reads of guest code, through EPT in C

    def _arm_delivery(self) -> None:
        """At each VM entry: what decides which events exit, for the C hooks (after a vmwrite)."""
        fast = self._fast_delivery
        if fast is not None and not fast.vmx_armed:
            v = self.vmcs._values
            fast.arm_vmx(
                v[F.EXCEPTION_BITMAP],
                v[F.PAGE_FAULT_ERROR_CODE_MASK],
                v[F.PAGE_FAULT_ERROR_CODE_MATCH],
                self.ctl("interrupt_window_exiting"),
            )

    def add_rdtsc_hook(self) -> None:
        """rdtsc without RDTSC exiting and CPUID exits answered in C when nothing needs Python
        (fastexit.py, which hooks both), the Python hooks behind."""
        self.fast_exits = FastExits.install(self)
        if self.fast_exits is None:
            super().add_rdtsc_hook()

    def add_cpuid_hook(self) -> None:
        if self.fast_exits is None:
            super().add_cpuid_hook()

    def _exit_info(
        self, reason: int, qualification: int, length: int, rip: int, intr_info: int = 0, intr_error: int = 0
    ) -> dict:
        """Write the exit-information fields and GUEST_RIP a VM exit leaves (SDM 27.2.1-27.2.4); returns the
        VMCS's values, for the caller's fields beyond these (the exit's own paths, Python's and the folds of
        C's, all write them here)."""
        w = self.vmcs._values
        w[_EXIT_REASON] = int(reason)
        w[_EXIT_QUAL] = qualification
        w[_EXIT_LEN] = length
        w[_EXIT_INTR_INFO] = intr_info
        w[_EXIT_INTR_ERROR] = intr_error
        w[_EXIT_INSN_INFO] = 0
        w[_GUEST_RIP] = rip
        return w

    def _count_exits(self, reason: ExitReason, n: int = 1) -> None:
        """n VM exits for `reason`: the exit counters and the cost model's `vmexit` events (not .counts: no
        fold of the C event books per exit)."""
        self.exits += n
        self.stats[reason] += n
        self._counts["vmexit"] += n

    def fold_fast_exits(self) -> None:
        """Make the CPUID exits (and, without EPT, the CR3 reloads) answered in C since the last call
        visible, as the Python path leaves them: the counters, the event count, and the VMCS
        exit-information fields of the last one; and the lazy-EPT violations _tlbfill.c took
        (_fold_quick_ept)."""
        fx = self.fast_exits
        if fx is None:
            return
        n, rip = fx.take_cpuid_exits()
        loads, after, q, length, cr3_rip, cr3 = fx.take_cr3_exits()
        invlpgs, la, ilen, irip = fx.take_invlpg_exits()
        if loads:
            # (only without EPT, where no EPT violation is taken in C)
            self._fold_cr3_loads(loads, q, length, cr3_rip, cr3)
            if after:
                rip = -1  # the CPUID exits' fields were overwritten by the later CR3 exit's
        if invlpgs:
            # (only without EPT too) vm_exit's counts; its fields, when it was the last exit C made
            self._count_exits(ExitReason.INVLPG, invlpgs)
            if fx.last_kind == LAST_INVLPG:
                self._exit_info(ExitReason.INVLPG, la, ilen, irip)
                self.vmcs._cache.clear()
                rip = -1
        if self._pf_exits is not None and self._pf_exits.state.exits:
            self._fold_pf_exits(fx.last_kind == LAST_PF)
            if fx.last_kind == LAST_PF:
                rip = -1
        st = self._ept_c
        if st is not None and st.c_exits:
            # EPT violations taken in C too: the last exit's fields are those of whichever came last (the
            # CPUID exits' fields, all overwritten by an EPT violation after them, are written only then)
            self._fold_cpuid(n, rip if n > st.last_cpuid else -1)
            return
        if n:
            self._fold_cpuid(n, rip)

    def _fold_pf_exits(self, last: bool) -> None:
        """The #PF exits _fastexit.c made (without EPT: ptemods, true faults, hidden faults' records): vm_exit's
        counts (and the quick ones' for the hidden faults, as _quick_pf_exit counts them); the last true
        fault's injection as vm_entry leaves its fields (the valid bit cleared); and, when one was the last exit
        C made, its fields as vm_exit and handle_exception_nmi (for a ptemod GUEST_RIP past the emulated store)
        leave them."""
        assert self._pf_exits is not None
        n, qual, code, rip, after, trues, guest_code, hidden = self._pf_exits.take()
        self._count_exits(ExitReason.EXCEPTION_NMI, n)
        self.quick_shadow_exits += hidden
        if trues:
            v = self.vmcs._values
            v[F.VM_ENTRY_INTR_INFO_FIELD] = _PF_EXIT_INFO & ~E.INTR_INFO_VALID
            v[F.VM_ENTRY_EXCEPTION_ERROR_CODE] = guest_code
            v[F.VM_ENTRY_INSTRUCTION_LEN] = 0
        if last:
            w = self._exit_info(ExitReason.EXCEPTION_NMI, qual, 0, rip, _PF_EXIT_INFO, code)
            w[_GUEST_RIP] = after
            self.vmcs._cache.clear()

    def _fold_cpuid(self, n: int, rip: int) -> None:
        """n CPUID exits answered in C (their counters), the last at rip (its exit fields, written after
        those of the EPT violations _tlbfill.c took; -1: none, an EPT violation came last)."""
        if n:
            self._count_exits(ExitReason.CPUID, n)
        if self._ept_c is not None and self._ept_c.c_exits:
            self._fold_quick_ept()
        if rip < 0:
            return
        self._exit_info(ExitReason.CPUID, 0, 2, rip)
        self.vmcs._cache.clear()

    def _fold_cr3_loads(self, n: int, q: int, length: int, rip: int, cr3: int) -> None:
        """n CR_ACCESS exits for CR3 loads of the shadow's current root made in C: what handle_cr and
        ShadowPaging.on_cr3_write count for them, and the last one's fields as vm_exit, handle_cr and
        skip_instruction leave them."""
        self._count_exits(ExitReason.CR_ACCESS, n)
        if self.shadow is not None:
            self.shadow.count_reloads(n)
        w = self._exit_info(ExitReason.CR_ACCESS, q, length, (rip + length) & 0xFFFFFFFF)  # (skip_instruction)
        w[F.GUEST_CR3] = cr3
        self.vmcs._cache.clear()

    # Without EPT: guest code read in C over the guest's tables while the shadow is current (cpu/_delivery.c
    # delivery_peek's shadow guard), for Mmu.fetch_bytes and fastexit.py's sites (the I/O gate's CPL-0 pass,
    # pause, CR reads and guest-owned CR writes); CPUVIRT_HW_SHADOW_PEEK=0 in the environment, or False here,
    # leaves every read of guest code to Mmu.read_linear through the shadow, and those sites to Python.
    shadow_peek_c = os.environ.get("CPUVIRT_HW_SHADOW_PEEK", "1") != "0"
    _shadow_policy: bool | None = None  # may the guard read at all, for the controls as they are (_mirror_shadow)

    # ... and deliveries through the guest IDT in C over the shadow's C copy (cpu/_delivery.c, sm_hv_gpa);
    # CPUVIRT_HW_SHADOW_DELIVERY_C=0 keeps them Python's
    shadow_delivery_c = os.environ.get("CPUVIRT_HW_SHADOW_DELIVERY_C", "1") != "0"

    # ... and the CR3-load exits that reload the shadow's current root made in C (_fastexit.c, under the
    # same guard); CPUVIRT_HW_CR3_C=0 keeps them Python's
    shadow_cr3_c = os.environ.get("CPUVIRT_HW_CR3_C", "1") != "0"
    # ... and its INVLPG exits (the page dropped from the shadow's C copy of the root); CPUVIRT_HW_INVLPG_C=0
    shadow_invlpg_c = os.environ.get("CPUVIRT_HW_INVLPG_C", "1") != "0"
    # ... and the #PF exits of ptemods, the store emulated in the TLB fill (fastexit.py PfExits);
    # CPUVIRT_HW_PTEMOD_C=0 keeps them Python's
    shadow_ptemod_c = os.environ.get("CPUVIRT_HW_PTEMOD_C", "1") != "0"
    # ... and those of true faults, the #PF injected and delivered there too; CPUVIRT_HW_PF_C=0 keeps them Python's
    shadow_true_pf_c = os.environ.get("CPUVIRT_HW_PF_C", "1") != "0"
    # ... and the record of the hidden faults' exits that _tlbfill.c's fill walks (quick_shadow_exit's, with no
    # Python); CPUVIRT_HW_HIDDEN_PF_C=0 keeps them Python's
    shadow_hidden_pf_c = os.environ.get("CPUVIRT_HW_HIDDEN_PF_C", "1") != "0"

    def _install_shadow_peek(self, shadow: ShadowPaging) -> None:
        fast = self._shadow_peek = FastDelivery.install_shadow(self)
        if fast is None:
            return
        mirror = ShadowMirror.of(shadow) if self.shadow_delivery_c else None
        if mirror is not None:
            fast.deliver_through_shadow(self.delivery, mirror)
            self._fast_delivery = fast  # install_fast_events puts its INTR hook in front of Python's
        self.mmu.peek = fast.peek
        if self.fast_exits is not None:
            self.fast_exits.set_peek(fast)
            if self.shadow_cr3_c:
                self.fast_exits.guard_cr3_loads(fast._state)
            smirror = ShadowMirror.of(shadow)
            if self.shadow_cr3_c and self.shadow_invlpg_c and smirror is not None:
                ram = self.mmu.ram
                self.fast_exits.guard_invlpg(
                    smirror.address, ctypes.addressof(ctypes.c_char.from_buffer(ram.buf)), self.mmu.p2m.ram_bytes
                )
        dirtied, chained = fast.shadow_dirtied, shadow.on_dirty

        def on_dirty(wp: bool) -> None:
            dirtied()
            if chained is not None:
                chained(wp)

        shadow.on_dirty = on_dirty  # type: ignore[assignment]  # (declared None in shadow.py)

    def _mirror_shadow(self, fast: FastDelivery) -> None:
        """At each VM entry: may delivery_peek read guest code over the guest's tables until the next one?
        Only while the shadow's root and mode can change only through Python (CR3 loads exit, no CR3-target
        values, PG, WP and PSE host-owned: a change of them is an exit, after which this runs again), no
        frame is untraced (`unsync`: its shadow entries may be stale, and the engine runs what they map), and
        the shadow has a root and mode (C compares them with the running CR3 and CRs)."""
        sh = self.shadow
        if sh is None:
            return
        policy = self._shadow_policy
        if policy is None:  # the controls changed (a vmwrite, _vmcs_written) since the last look
            v = self.vmcs._values
            policy = self._shadow_policy = bool(
                self.ctl("cr3_load_exiting")
                and not v[F.CR3_TARGET_COUNT]
                and v[F.CR0_GUEST_HOST_MASK] & _SHADOW_CR0 == _SHADOW_CR0
                and v[F.CR4_GUEST_HOST_MASK] & CR4_PSE
            )
        mode, key = sh._mode, sh._cur_key
        fast.mirror_shadow(policy and mode is not None and key is not None and not sh.unsync, mode or 0, key or 0)

    def _arm_fast_exits(self) -> None:
        """After a VM entry made in Python: let C answer what needs nothing else (fastexit.py), and
        decide which events exit from the VMCS as it is now (cpu/_delivery.c)."""
        self._arm_delivery()
        if self._shadow_peek is not None:
            self._mirror_shadow(self._shadow_peek)
        fx = self.fast_exits
        if fx is None:
            return
        if (
            self.outcome is None
            and not self._blocked
            and self.trace is None
            and self.dump_on is None
            and getattr(self.hypervisor.handlers.get(ExitReason.CPUID), "__func__", None) is self._default_cpuid
            and getattr(self.machine.cpuid, "__func__", None) is Machine.cpuid
        ):
            if not fx.armed or self.vapic is not None:
                # Armed already: no vmwrite since (each disarms, _vmcs_written), nothing to copy again; the
                # virtual-APIC state is synced at every entry, so with APIC virtualization always.
                fx.arm(self.vmcs._values, self.vapic, self.ctl)
        else:
            fx.disarm()
        if self._ept_c is not None:
            self._arm_quick_ept()
        pf = self._pf_exits
        if pf is not None and pf.state.s:
            v = self.vmcs._values
            pf.arm(
                self._quick_exits_armed(ExitReason.EXCEPTION_NMI, self._default_exception),
                bool(v[_WINDOW_FIELD] >> _WINDOW_BIT & 1),
                v[F.EXCEPTION_BITMAP],
                v[F.PAGE_FAULT_ERROR_CODE_MASK],
                v[F.PAGE_FAULT_ERROR_CODE_MATCH],
            )

    def finish(self, kind: str, status: int, message: str = "") -> None:
        if self.fast_exits is not None:
            self.fast_exits.disarm()
            self.fold_fast_exits()
        super().finish(kind, status, message)

    def _setup_apic_virtualization(self) -> None:
        """As KVM does for a guest with an in-kernel xAPIC: a virtual-APIC page (use TPR shadow) and,
        with "virtualize APIC accesses", the APIC-access page mapped in EPT at the guest's APIC base,
        read and write but not execute (a fetch from it is then an EPT violation, which the SDM ranks
        before any APIC-access exit)."""
        v, s = self.vmcs, self.settings
        if not s.bits["use_tpr_shadow"]:
            return
        page = self.alloc.page()
        v.vmwrite(F.VIRTUAL_APIC_PAGE_ADDR, page)
        if not (s.bits["virtualize_apic_accesses"] and s.bits["activate_secondary_controls"]):
            return  # no CR8 in 32-bit mode: the TPR shadow alone changes nothing
        v.vmwrite(F.APIC_ACCESS_ADDR, APIC_ACCESS_HPA)
        self.ept.map(GPA(APIC_BASE_GPA), HPA(APIC_ACCESS_HPA), EPT_R | EPT_W)
        off = page - HV_HPA
        self.vapic = apicv.VirtualApic(
            self.uc,
            self.machine.apic,
            self.hv_mem.view[off : off + 0x1000],
            self.hv_mem.host_address + off,
            APIC_ACCESS_HPA,
            True,
            bool(s.bits["apic_register_virtualization"]),
            self.apic_exit,
        )
        v.vmwrite(F.TPR_THRESHOLD, self.vapic.tpr_threshold)

    def guest_entry(self) -> None:
        """Called once the loader has set the boot state: the hypervisor's view of the guest's CRs."""
        v = self.vmcs
        cr0 = self.regs.read(R.CR0)
        v.vmwrite(F.CR0_READ_SHADOW, cr0)
        v.vmwrite(F.CR4_READ_SHADOW, self.regs.read(R.CR4))
        v.vmwrite(F.GUEST_CR0, cr0 | CR0_FIXED0)  # KVM too forces CR0.NE behind the shadow
        v.vmwrite(F.GUEST_ACTIVITY_STATE, 0)
        if self.settings.bits["enable_ept"]:
            # From VMLAUNCH on, every guest-physical access goes through EPT (the loader before it
            # wrote guest memory from the host side); drop what the engine cached before.
            self.mmu.strategy = EptWalk(self.mmu, self.ept)
            if self.fast_fill is not None:
                self.fast_fill.enable()
            if self.delivery.fast is None and self._fast_delivery is not None:
                self._fast_delivery.attach_ept(self.delivery)  # deliveries through the guest IDT in C, walks via EPT
            if self.fast_exits is not None and self.delivery.fast is not None:
                self.fast_exits.set_peek(self.delivery.fast)  # CR write sites check their bytes in C
        elif self.shadow_peek_c and self.shadow is not None and self._shadow_peek is None:
            self._install_shadow_peek(self.shadow)
        self.uc.ctl(UC_CTL_TLB_FLUSH, UC_CTL_IO_WRITE)
        self.vm_entry(None)

    def _bind_live_fields(self) -> None:
        regs, v = self.regs, self.vmcs

        def scalar(field, reg):
            v.bind_live(field, lambda: regs.read(reg), lambda val: regs.write(reg, val))

        def table(field, reg, index):
            def write(val):
                t = list(regs.table(reg))
                t[index] = val
                regs.set_table(reg, tuple(t))

            v.bind_live(field, lambda: regs.table(reg)[index], write)

        for field, reg in (
            (F.GUEST_RIP, R.EIP),
            (F.GUEST_RSP, R.ESP),
            (F.GUEST_RFLAGS, R.EFLAGS),
            (F.GUEST_CR0, R.CR0),
            (F.GUEST_CR3, R.CR3),
            (F.GUEST_CR4, R.CR4),
            (F.GUEST_CS_SELECTOR, R.CS),
            (F.GUEST_SS_SELECTOR, R.SS),
            (F.GUEST_DS_SELECTOR, R.DS),
            (F.GUEST_ES_SELECTOR, R.ES),
            (F.GUEST_FS_SELECTOR, R.FS),
            (F.GUEST_GS_SELECTOR, R.GS),
        ):
            scalar(field, reg)
        table(F.GUEST_GDTR_BASE, R.GDTR, 1)
        table(F.GUEST_GDTR_LIMIT, R.GDTR, 2)
        table(F.GUEST_IDTR_BASE, R.IDTR, 1)
        table(F.GUEST_IDTR_LIMIT, R.IDTR, 2)
        table(F.GUEST_TR_SELECTOR, R.TR, 0)
        table(F.GUEST_TR_BASE, R.TR, 1)
        table(F.GUEST_LDTR_SELECTOR, R.LDTR, 0)

    # -- controls --------------------------------------------------------------------------------------
    def ctl(self, name: str) -> bool:
        field, bit = CONTROLS[name]
        return bool(self.vmcs._values[field] >> bit & 1)

    def set_ctl(self, name: str, on: bool) -> None:
        field, bit = CONTROLS[name]
        word = self.vmcs._values[field]
        self.vmcs.vmwrite(field, word | (1 << bit) if on else word & ~(1 << bit))

    def _bitmap_bit(self, field: F, bit: int) -> bool:
        page = self.vmcs._values[field]
        return bool(self.hv_mem.view[page - HV_HPA + bit // 8] >> (bit % 8) & 1)

    # -- VM exit and VM entry -------------------------------------------------------------------------
    def vm_exit(
        self,
        reason: ExitReason,
        rip: int,
        *,
        qualification: int = 0,
        length: int = 0,
        insn: str | None = None,
        intr_info: int = 0,
        intr_error: int | None = None,
        gpa: int | None = None,
        gla: int | None = None,
        instr_info: int = 0,
        detail: dict | None = None,
        implicit_rip: bool = False,
        value: int | None = None,
    ) -> Exit:
        self.fold_fast_exits()
        v = self.vmcs
        v.on_exit()
        # The guest's RIP at the exit: the instruction (or, for I/O, CPUID and RDTSC, whose hooks
        # run inside the engine before it has moved EIP, the instruction the engine is completing).
        w = self._exit_info(reason, qualification, length, rip, intr_info, intr_error or 0)
        w[F.VMX_INSTRUCTION_INFO] = instr_info
        v._cache[F.GUEST_RIP] = rip
        if gpa is not None:
            w[F.GUEST_PHYSICAL_ADDRESS] = gpa
        if gla is not None:
            w[F.GUEST_LINEAR_ADDRESS] = gla
        self._count_exits(reason)
        if insn is None:
            insn = self.insn_at(rip) if self.trace is not None or self.dump_on is not None else ""
        x = Exit(
            reason,
            qualification,
            length,
            rip,
            insn,
            detail or {},
            implicit_rip,
            None if reason != ExitReason.IO_INSTRUCTION or qualification & 8 else value,
        )
        if self.dump_on is not None:
            x.vmcs_at_exit = v.dump(CONTROLS)  # the state at the exit, not after the handler emulated it
        if self._shadow_peek is not None:
            # The handler may change the shadow (a CR3 load, an invlpg, a fill) before the engine's CRs:
            # its own reads of guest code are Python's, until the entry mirrors the shadow again.
            self._shadow_peek.shadow_dirtied()
        t0 = time.perf_counter()
        handler = self.hypervisor.handlers.get(reason, self.hypervisor.unhandled)
        handler(x)
        self.handler_time[reason] += time.perf_counter() - t0
        if x.block:
            self._blocked = True
        if self.trace is not None:
            d = dict(x.detail)
            if reason == ExitReason.IO_INSTRUCTION and x.value is not None:
                d["value"] = f"{x.value:#x}"
            if length:
                d["instruction_length"] = length
            self.trace.event(self.clock.instructions, 0, "vmexit", reason.name, int(reason), rip, x.insn, d, x.action)
        if self.dump_on is not None:
            self.dump_on(self, x)
        if self.outcome is None:
            self.vm_entry(x)
        return x

    def vm_entry(self, x: Exit | None) -> None:
        v = self.vmcs
        if x is not None and x.implicit_rip:
            v.dirty.discard(F.GUEST_RIP)  # the engine finishes the instruction itself
        try:
            self._entry_checks()
        except EntryFailure as ef:
            v._values[F.VM_EXIT_REASON] = E.ENTRY_FAILURE | ExitReason.ENTRY_FAIL_GUEST_STATE
            v._values[F.EXIT_QUALIFICATION] = ef.qualification
            rip = v.vmread(F.GUEST_RIP)
            self.stats[ExitReason.ENTRY_FAIL_GUEST_STATE] += 1
            self.record(
                "entry_failure",
                "ENTRY_FAIL_GUEST_STATE",
                E.ENTRY_FAILURE | 33,
                rip,
                {"why": str(ef)},
                "VM entry failed: the hypervisor stops the guest",
            )
            self.finish("entry_failure", EXIT_HYPERVISOR_STOP, f"VM entry failed (exit reason 0x80000021): {ef}")
            return
        info = v._values[F.VM_ENTRY_INTR_INFO_FIELD]
        # The RIP to inject at: what the handler wrote, else what the exit saved (for int3 the
        # engine's EIP is already past the instruction). Read before loading clears the exit's cache.
        rip = v.vmread(F.GUEST_RIP) if info & E.INTR_INFO_VALID else 0
        v.load_dirty()
        if info & E.INTR_INFO_VALID:
            v._values[F.VM_ENTRY_INTR_INFO_FIELD] = info & ~E.INTR_INFO_VALID
            vector, kind = info & 0xFF, (info >> 8) & 7
            code = v._values[F.VM_ENTRY_EXCEPTION_ERROR_CODE] if info & E.INTR_INFO_DELIVER_CODE else None
            eip = rip
            soft = kind in (E.INTR_TYPE_SOFT_INTR, E.INTR_TYPE_SOFT_EXCEPTION, E.INTR_TYPE_PRIV_SW_EXCEPTION)
            ret = (eip + v._values[F.VM_ENTRY_INSTRUCTION_LEN]) & 0xFFFFFFFF if soft else eip
            # Injected software interrupts and exceptions (types 4, 6) get the gate-DPL check, as
            # `int n` would; a privileged software exception (type 5) does not (SDM 26.6.1.1).
            dpl_check = kind in (E.INTR_TYPE_SOFT_INTR, E.INTR_TYPE_SOFT_EXCEPTION)
            if kind == E.INTR_TYPE_NMI:
                self.nmi_blocked = True  # blocked until the guest's next iret (SDM 6.7.1)
            self.deliver(
                vector,
                ret,
                code,
                soft=dpl_check,
                external=kind == E.INTR_TYPE_EXT_INTR,
                fault_eip=eip if dpl_check else None,
            )
        if self.vapic is not None:
            self._sync_vapic(self.vapic)
        self._arm_fast_exits()

    def _sync_vapic(self, vapic: apicv.VirtualApic) -> None:
        """The hypervisor's side of APIC virtualization before the guest runs again: the virtual-APIC
        page shows the emulated APIC's registers, TPR_THRESHOLD is up to date."""
        vapic.sync()
        self.vmcs._values[F.TPR_THRESHOLD] = vapic.tpr_threshold

    def _entry_checks(self) -> None:
        """SDM 26.3.1: the guest-state checks, on every field the hypervisor wrote since the exit.

        Fields it did not write still hold what the processor saved, which passed these checks at the
        last entry; reading them back from the engine mid-block (e.g. RFLAGS inside an I/O hook,
        where the engine has not materialised its lazy flags) would not be reliable anyway.
        """
        v = self.vmcs
        dirty = v.dirty
        if F.GUEST_CR0 in dirty:
            cr0 = v.vmread(F.GUEST_CR0)
            if cr0 & CR0_FIXED0 != CR0_FIXED0:
                raise EntryFailure(f"GUEST_CR0 {cr0:#x} lacks a bit IA32_VMX_CR0_FIXED0 requires (NE)")
            if cr0 & CR0_PG and not cr0 & CR0_PE:
                raise EntryFailure(f"GUEST_CR0 {cr0:#x} has PG set without PE")
        if F.GUEST_RFLAGS in dirty:
            rflags = v.vmread(F.GUEST_RFLAGS)
            if not rflags & 2 or rflags & RFLAGS_RESERVED_ZERO:
                raise EntryFailure(f"GUEST_RFLAGS {rflags:#x}: bit 1 must be 1 and reserved bits 0")
            if rflags & EFLAGS_VM:
                raise EntryFailure("GUEST_RFLAGS.VM = 1: virtual-8086 guests are not supported")
        if dirty & {F.GUEST_CS_SELECTOR, F.GUEST_SS_SELECTOR}:
            if (v.vmread(F.GUEST_CS_SELECTOR) ^ v.vmread(F.GUEST_SS_SELECTOR)) & 3:
                raise EntryFailure("CS.RPL differs from SS.RPL")
        info = v._values[F.VM_ENTRY_INTR_INFO_FIELD]
        if info & E.INTR_INFO_VALID:
            vector, kind = info & 0xFF, (info >> 8) & 7
            if info & 0x7FFFF000 or kind == 1:
                raise EntryFailure(f"VM-entry interruption information {info:#x}: reserved bits or type")
            if kind == E.INTR_TYPE_NMI and vector != 2 or kind == E.INTR_TYPE_HW_EXCEPTION and vector > 31:
                raise EntryFailure(f"VM-entry interruption information {info:#x}: bad vector for its type")
            if info & E.INTR_INFO_DELIVER_CODE and (kind != E.INTR_TYPE_HW_EXCEPTION or vector not in HAS_ERROR_CODE):
                raise EntryFailure(f"VM-entry interruption information {info:#x}: error code for a vector without one")
        if v._values[F.GUEST_ACTIVITY_STATE] not in (0, 1):
            raise EntryFailure("guest activity state must be active or HLT")

    # -- sensitive instructions (one-address intercepts; EIP is the instruction) ---------------------------
    def on_sensitive(self, address: int, size: int, mnem: str, ops: str) -> None:
        """The intercept hook: a sensitive instruction is about to run in non-root operation."""
        if self.outcome is not None:
            return
        if mnem in PRIVILEGED and self.regs.cpl() != 0:
            return  # the engine raises #GP(0): no exit for it to take first
        if mnem in IO_INSTRUCTIONS:
            self.io_gate(address, size, mnem, ops)  # I/O permission before any I/O exit
            return
        handler = INSTRUCTION_HANDLERS.get(mnem)  # nonroot.py: exit or not, SDM 25.1.3
        if handler is not None:
            handler(self, Sensitive(address, size, mnem, ops, self.code_at(address, size)))
        if self.outcome is not None or self._blocked:
            self.uc.emu_stop()

    def code_at(self, address: int, size: int) -> bytes:
        """The bytes of the intercepted instruction at address (as the intercept hook checked them)."""
        site = self.intercepts.sites.get(address) if self.intercepts is not None else None
        if site is not None and site[0] == size:
            return site[3]
        return self.mmu.fetch_bytes(address, size) or b""

    def guest_cr0(self) -> int:
        """CR0 through the guest/host mask and the read shadow (SDM 25.3), with ET as hardware reads it."""
        v = self.vmcs._values
        mask = v[F.CR0_GUEST_HOST_MASK]
        return (self.regs.read(R.CR0) & ~mask) | (v[F.CR0_READ_SHADOW] & mask) | CR0_ET

    def msr_exits(self, msr: int, write: bool) -> bool:
        if not self.ctl("use_msr_bitmaps"):
            return True
        if msr <= 0x1FFF:
            bit = msr
        elif 0xC0000000 <= msr <= 0xC0001FFF:
            bit = msr - 0xC0000000 + 8192
        else:
            return True
        return self._bitmap_bit(F.MSR_BITMAP, bit + (2048 * 8 if write else 0))

    def operand_address(self, address: int) -> int:
        la = operand_linear_address(self.mmu.fetch_bytes(address, 15), address, self.regs)
        return 0 if la is None else la

    # -- I/O, CPUID, RDTSC (engine hooks) ------------------------------------------------------------
    def _io_exits(self, port: int, size: int) -> bool:
        """SDM 25.1.3: with I/O bitmaps, a bit set for any port the access touches (wrapping at 0xFFFF);
        without, unconditional I/O exiting."""
        w = self.vmcs._values
        field, bit = _IO_BITMAPS
        if w[field] >> bit & 1:
            view, base = self.hv_mem.view, HV_HPA
            for p in range(port, port + size):
                p &= 0xFFFF
                page = w[_IO_A] if p < 0x8000 else w[_IO_B]
                if view[page - base + ((p & 0x7FFF) >> 3)] >> (p & 7) & 1:
                    return True
            return False
        field, bit = _UNCOND_IO
        return bool(w[field] >> bit & 1)

    def _io_form(self, addr: int) -> tuple[bool, bool, bool]:
        """(string, rep, immediate) of the I/O instruction at addr."""
        form = self._io_forms.get(addr)
        if form is None:
            code = self.mmu.fetch_bytes(addr, 15) or b""
            form = (False, False, False)
            for _, _, mnem, ops in self._cs().disasm_lite(code, addr, 1):
                string = mnem.split()[-1].startswith(("ins", "outs"))
                form = (
                    string,
                    mnem.startswith("rep"),
                    not string and "dx" not in ops.split(",")[0 if mnem.startswith("out") else -1],
                )
            self._io_forms[addr] = form
        return form

    # The quick I/O exit (below); CPUVIRT_NO_QUICK_IO=1 in the environment, or False here, turns it off.
    quick_io = not os.environ.get("CPUVIRT_NO_QUICK_IO")

    def port_io(self, port: int, size: int, is_in: bool, value: int = 0) -> int:
        """IN/OUT in non-root operation: an IO_INSTRUCTION exit when the controls say so (SDM 25.1.3)."""
        if not self._io_exits(port, size):
            return super().port_io(port, size, is_in, value)  # straight to the device
        return self._exit_for_io(port, size, is_in, value)

    def _exit_for_io(self, port: int, size: int, is_in: bool, value: int, from_c: int = 0) -> int:
        """An access the controls make exit: the quick exit when it may be, else the full one. `from_c`:
        _fastexit.c's hook spent the access's time already (bit 0) and has CPUID exits to fold (bit 1),
        and makes the entry check after a quick exit."""
        site = self.io_site()
        if self.quick_io and self._quick_io_ready():
            result = self._quick_io_exit(port, size, is_in, value, site, from_c)
            if result is not None:
                return result
        return self._io_exit(port, size, is_in, value, site, from_c)

    @hook_guard(returns=0)
    def io_exit_hook(self, port: int, size: int, flags: int, value: int) -> int:
        """Called by _fastexit.c's in/out hooks for an access they found to exit (the controls and bitmaps
        they copied when armed), its time spent: hook_in / hook_out without port_io's own test. flags:
        1 = in, 2 = exits made in C since the last fold (CPUID, CR3, INVLPG, #PF)."""
        if self.outcome is not None:
            self.clock.advance(-IO_CYCLES)  # as hook_in: nothing once the run has ended
            return 0
        self.mmu.crs = None
        from_c = 1 | (flags & 2)
        if flags & 1:
            return self._exit_for_io(port, size, True, value, from_c)
        self._exit_for_io(port, size, False, value, from_c)
        if self.outcome is not None:
            self.uc.emu_stop()
        return 0

    @hook_guard()
    def io_entry(self) -> None:
        """The VM entry after a quick exit C handed Python, when fastexit_quiet says it changes something."""
        if self.outcome is None:
            self.vmcs.dirty.discard(F.GUEST_RIP)  # the engine finishes the instruction itself
            self.vm_entry(None)

    def _io_exit(self, port: int, size: int, is_in: bool, value: int, site: tuple[int, int], from_c: int = 0) -> int:
        """The IO_INSTRUCTION exit through vm_exit: the handler, then the VM entry."""
        if not from_c:
            self.clock.advance(IO_CYCLES)
        addr, length = site
        string, rep, imm = self._io_form(addr)
        q = E.io_qualification(port, size, is_in, string, rep, imm)
        d = None
        if self.trace is not None:  # decoded only for a reader
            d = E.decode_io_qualification(q)
            if not is_in:
                d["value"] = f"{value:#x}"
        x = self.vm_exit(
            ExitReason.IO_INSTRUCTION, addr, qualification=q, length=length, detail=d, implicit_rip=True, value=value
        )
        return x.value if is_in and x.value is not None else 0

    def _quick_io_ready(self) -> bool:
        """May this I/O exit skip vm_exit's generic machinery? Only while the C exit paths are armed (no
        trace, no VMCS dump, no vmwrite since the last entry...) and the I/O handler is the default one."""
        return self._quick_exits_armed(_IO_INSTRUCTION, self._default_io)

    def _quick_exits_armed(self, reason, default) -> bool:
        """The C exit paths are armed (no trace, no VMCS dump, no vmwrite since the last entry) and
        `reason`'s handler is `default`: what a quick exit (I/O, EPT violation) does is what it would do."""
        fx = self.fast_exits
        return (
            fx is not None
            and fx.armed
            and self.trace is None
            and self.dump_on is None
            and getattr(self.hypervisor.handlers.get(reason), "__func__", None) is default
        )

    def _quick_io_exit(
        self, port: int, size: int, is_in: bool, value: int, site: tuple[int, int], from_c: int = 0
    ) -> int | None:
        """An IO_INSTRUCTION exit that leaves what _io_exit leaves (the exit-information fields, GUEST_RIP,
        the counters, the clock, the device access), without an Exit, the handler's dispatch and timing,
        and without the VM entry when it would change nothing (fastexit_quiet: armed, the virtual-APIC
        page in step). None: string I/O, left to _io_exit."""
        addr, length = site
        form = self._io_forms.get(addr) or self._io_form(addr)
        if form[0]:
            return None  # string I/O
        if not from_c:
            self.clock.advance(IO_CYCLES)
            self.fold_fast_exits()
        elif from_c & 2 or (self._ept_c is not None and self._ept_c.c_exits):
            self.fold_fast_exits()
        v = self.vmcs
        q = (size - 1) | (8 if is_in else 0) | (form[1] << 5) | (form[2] << 6) | (port << 16)
        self._exit_info(_IO_INSTRUCTION, q, length, addr)
        v._cache.clear()
        self._count_exits(_IO_INSTRUCTION)
        self.quick_io_exits += 1
        if is_in:
            value = self.machine.bus.read(port, size)
        else:
            self.machine.bus.write(port, size, value)
            value = 0
        fx = self.fast_exits
        if from_c and fx is not None:
            fx.quick_exit_made()  # _fastexit.c makes the entry check below (io_entry)
        elif self.outcome is None and (fx is None or not fx.quiet()):
            v.dirty.discard(F.GUEST_RIP)  # the engine finishes the instruction itself
            self.vm_entry(None)
        return value

    def hook_cpuid(self, uc, _data) -> bool:
        """CPUID always exits (SDM 25.1.2)."""
        if self.outcome is not None:
            return False
        self.mmu.crs = None
        eax, ecx = self.regs.read(R.EAX), self.regs.read(R.ECX)
        x = self.vm_exit(
            ExitReason.CPUID,
            self._insn_site(),
            length=2,
            implicit_rip=True,
            detail={"leaf": f"{eax:#x}", "subleaf": f"{ecx:#x}"} if self.trace is not None else None,
        )
        return bool(x.value)

    def _insn_site(self) -> int:
        """Address of the cpuid/rdtsc whose engine hook is running (EIP is stale there): the first
        one in the running block (both end their blocks in the engine), cached per block."""
        block = self.clock.last_block
        site = self._sites.get(block)
        if site is None:
            code = self.mmu.fetch_bytes(block, 256) or b""
            site = block
            for addr, _, mnem, _ in self._cs().disasm_lite(code, block):
                site = addr
                if mnem in ("cpuid", "rdtsc", "rdtscp"):
                    break
            self._sites[block] = site
            if self.fast_exits is not None:
                self.fast_exits.put_site(block, site)  # C answers this block's cpuid exits from now on
        return site

    def forget_block(self, address: int) -> None:
        super().forget_block(address)
        self._sites.pop(address, None)
        if self.fast_exits is not None:
            self.fast_exits.drop_site(address)
        if self._apic_lengths:
            self._apic_lengths.clear()  # code at an APIC-access site may have changed
        if self._apic_sites is not None:
            self._apic_sites.forget(address)

    rdtsc_in_c = False  # RDTSC exiting and TSC offsetting are decided here, per rdtsc
    cpuid_in_c = False  # CPUID always exits

    @hook_guard(returns=1)
    def rdtsc(self, _uc, _data) -> int:
        self.mmu.crs = None
        tsc = self.clock.now
        if self.ctl("rdtsc_exiting"):
            x = self.vm_exit(ExitReason.RDTSC, self._insn_site(), length=2, implicit_rip=True)
            tsc = x.value if x.value is not None else tsc
        elif self.ctl("use_tsc_offsetting"):
            tsc = (tsc + self.vmcs._values[F.TSC_OFFSET]) & 0xFFFFFFFFFFFFFFFF
        self.regs.write(R.EAX, tsc & 0xFFFFFFFF)
        self.regs.write(R.EDX, tsc >> 32)
        return 1

    # -- the APIC-access page (modes/hw/apicv.py, _apicv.c): what it does not virtualize exits -----------
    @hook_guard(returns=0)
    def apic_exit(self, kind: int, offset: int, size: int, value: int) -> int:
        """Called by the APIC-access page's MMIO callbacks, in the middle of the guest instruction that
        made the access (the engine completes it afterwards, as for I/O exits).

        - APIC_ACCESS (44), fault-like: RIP is the instruction; the handler emulates the access on the
          emulated APIC (KVM: handle_apic_access -> instruction emulation) and its value is the read's.
        - APIC_WRITE (56) and TPR_BELOW_THRESHOLD (43), trap-like (SDM 29.4.3.3, 29.1.2): the write is
          in the virtual-APIC page already; RIP is the next instruction.
        """
        if self.outcome is not None:
            return 0xFFFFFFFF if kind == apicv.ACCESS_READ else 0
        self.mmu.crs = None
        site, length = self._apic_site(offset, kind != apicv.ACCESS_READ)
        if kind in (apicv.ACCESS_READ, apicv.ACCESS_WRITE):
            access = E.APIC_ACCESS_LINEAR_WRITE if kind == apicv.ACCESS_WRITE else E.APIC_ACCESS_LINEAR_READ
            q = E.apic_access_qualification(offset, access)
            self.apic_access = (size, value)
            d = None
            if self.trace is not None:
                d = E.decode_apic_access_qualification(q)
                d["size"] = size
            x = self.vm_exit(
                ExitReason.APIC_ACCESS, site, qualification=q, length=length, detail=d, implicit_rip=True, value=value
            )
            return (x.value or 0) if kind == apicv.ACCESS_READ else 0
        next_rip = (site + length) & 0xFFFFFFFF
        if kind == apicv.APIC_WRITE:
            d = None
            if self.trace is not None:
                d = E.decode_apic_write_qualification(offset)
                d["written_by"] = f"{site:#x}"  # trap-like: RIP is already past that instruction
            self.vm_exit(ExitReason.APIC_WRITE, next_rip, qualification=offset & 0xFFF, detail=d, implicit_rip=True)
        else:
            vapic = self.vapic
            self.vm_exit(
                ExitReason.TPR_BELOW_THRESHOLD,
                next_rip,
                implicit_rip=True,
                detail={"vtpr": f"{vapic.page[0x80]:#x}", "tpr_threshold": vapic.tpr_threshold}
                if self.trace is not None and vapic is not None
                else None,
            )
        return 0

    def _apic_site(self, offset: int, is_write: bool) -> tuple[int, int]:
        """(address, length) of the instruction whose access to the APIC page is being served: the
        engine's EIP is the block's start inside MMIO callbacks (cpu/mmiosite.py finds the instruction)."""
        sites = self._apic_sites
        if sites is None:
            sites = self._apic_sites = _BlockSites(self.mmu, self.regs, self.clock)
        site = sites.site(APIC_BASE_GPA | offset, is_write)
        length = self._apic_lengths.get(site)
        if length is None:
            code = self.mmu.fetch_bytes(site, 15) or b""
            length = next((n for _, n, _, _ in self._cs().disasm_lite(code, site, 1)), 0)
            limits.put(self._apic_lengths, site, length)
        return site, length

    # -- exceptions ----------------------------------------------------------------------------------------
    def _exception_exits(self, vector: int, error_code: int | None = None) -> bool:
        bitmap = self.vmcs._values[F.EXCEPTION_BITMAP]
        if vector != Vector.PF:
            return bool(bitmap >> vector & 1)
        v = self.vmcs._values
        match = ((error_code or 0) & v[F.PAGE_FAULT_ERROR_CODE_MASK]) == v[F.PAGE_FAULT_ERROR_CODE_MATCH]
        return match if bitmap >> 14 & 1 else not match

    def _exception_exit(
        self, vector: int, rip: int, error_code: int | None, kind: int, length: int = 0, qualification: int = 0
    ) -> None:
        info = E.intr_info(vector, kind, error_code is not None)
        d = E.decode_intr_info(info)
        d["name"] = MNEMONIC.get(vector, str(vector))
        if error_code is not None:
            d["error_code"] = error_code
        if vector == Vector.PF:
            d["linear_address"] = f"{qualification:#x}"
        self.vm_exit(
            ExitReason.EXCEPTION_NMI,
            rip,
            qualification=qualification,
            length=length,
            intr_info=info,
            intr_error=error_code,
            detail=d,
        )

    def hook_intr(self, uc, intno, data):
        if self._intr_depth or self.outcome is not None:
            return super().hook_intr(uc, intno, data)
        error_code, soft = self.faults.take()
        eip = self.regs.read(R.EIP)
        self.left_block_at(eip)
        hw = not soft and intno not in (Vector.BP, Vector.OF)
        if soft and intno not in (Vector.BP, Vector.OF) or not self._exception_exits(intno):
            return self._direct(uc, intno, error_code, soft, eip)
        self._intr_depth += 1
        self.mmu.crs = None
        try:
            if hw:
                ec = error_code if intno in HAS_ERROR_CODE else None
                self._exception_exit(intno, eip, ec, E.INTR_TYPE_HW_EXCEPTION)
            else:  # int3 / into: software exceptions, EIP after them
                self._exception_exit(intno, eip - 1, None, E.INTR_TYPE_SOFT_EXCEPTION, length=1)
        finally:
            self._intr_depth -= 1
        if self.outcome is not None or self._blocked:
            uc.emu_stop()

    def _direct(self, uc, intno, error_code, soft, eip):
        """No exit: the processor delivers the event through the guest IDT itself (as Vcpu does)."""
        self._intr_depth += 1
        self.mmu.crs = None
        try:
            Vcpu._deliver_engine_event(self, intno, error_code, soft, eip)
        finally:
            self._intr_depth -= 1

    def hook_invalid(self, uc, _data) -> bool:
        self.mmu.crs = None
        eip = self.regs.read(R.EIP)
        self.left_block_at(eip)
        code = self.mmu.fetch_bytes(eip, 15) or b""
        _, length, mnem, _ = next(self._cs().disasm_lite(code, eip, 1), (eip, 0, "", ""))
        reason = E.VMX_INSTRUCTIONS.get(mnem)
        if reason is not None:
            self.vm_exit(reason, eip, length=length)
        elif self._exception_exits(Vector.UD):
            self._exception_exit(Vector.UD, eip, None, E.INTR_TYPE_HW_EXCEPTION)
        else:
            self.record("exception", "#UD", 6, eip, {"vector": 6}, "delivered through the guest IDT")
            self.deliver(Vector.UD, eip)
        if self.outcome is not None or self._blocked:
            uc.emu_stop()
        return True

    # -- refused TLB fills: guest #PF or EPT violation -----------------------------------------------
    def exact_linear(self, pending, eip: int) -> int:
        """Without EPT every guest #PF is an exit whose qualification (CR2) is the exact address: decoded
        in C (delivery_fault_linear, x86/faultaddr.py's rules, through the guarded reader) when it can."""
        fast = self._shadow_peek
        if fast is not None:
            gla = fast.fault_linear(eip, pending.gva, pending.access)
            if gla is not None:
                return gla
        return super().exact_linear(pending, eip)

    def on_refused_fill(self, pending, eip: int) -> None:
        if isinstance(pending, NestedFault):
            self._ept_exit(pending, eip)
            return
        if pending.unbacked_fetch:
            return super().on_refused_fill(pending, eip)
        gva = self.exact_linear(pending, eip)
        if self.shadow is not None and isinstance(pending, (ShadowMiss, TracedWrite)):
            # The shadow page table refused the access (not present, or write-protected because the
            # frame is a traced guest page table): a hardware #PF, which exits if the bitmap says so.
            code = pending.error_code
            if isinstance(pending, TracedWrite):
                code = PFEC_P | PFEC_W | (PFEC_U if (self.regs.read(R.SS) & 3) == 3 else 0)
            self.pf_access = pending.access
            if self._exception_exits(Vector.PF, code):
                self._exception_exit(Vector.PF, eip, code, E.INTR_TYPE_HW_EXCEPTION, qualification=gva)
            else:  # a hypervisor that does not intercept #PF: the guest sees the shadow's fault
                self.page_fault(gva, pending.access, code, eip)
            return
        if self._exception_exits(Vector.PF, pending.error_code):
            self._exception_exit(Vector.PF, eip, pending.error_code, E.INTR_TYPE_HW_EXCEPTION, qualification=gva)
        else:
            self.page_fault(gva, pending.access, pending.error_code, eip)

    def _ept_exit(self, nf: NestedFault, eip: int) -> None:
        viol = nf.detail
        assert nf.access is not None and nf.gva is not None  # with_linear ran in the fill hook
        bit = {0: EPT_R, 1: EPT_W, 2: EPT_X}[nf.access]
        gla = self.exact_linear(nf, eip) if nf.final else nf.gva
        if nf.final:  # the fill hook saw only the page: the exact address comes from the operand
            nf.gpa = (nf.gpa & ~0xFFF) | (gla & 0xFFF)
        if viol.misconfig:
            self.vm_exit(ExitReason.EPT_MISCONFIG, eip, gpa=nf.gpa, detail={"gpa": f"{nf.gpa:#x}"})
            return
        q = E.ept_qualification(bit, viol.perms, True, nf.final)
        d = E.decode_ept_qualification(q)
        d.update({"gpa": f"{nf.gpa:#x}", "gla": f"{gla:#x}"})
        self.vm_exit(ExitReason.EPT_VIOLATION, eip, qualification=q, gpa=nf.gpa, gla=gla, detail=d)

    # -- the quick EPT-violation exit (lazy EPT: guest RAM not mapped yet) ------------------------------
    # CPUVIRT_NO_QUICK_EPT=1 in the environment, or False here, turns it off.
    quick_ept = not os.environ.get("CPUVIRT_NO_QUICK_EPT")

    @hook_guard(returns=0)
    def ept_quick_hook(self, vaddr: int, access_type: int, gpa: int, _unused: int) -> int:
        """Called by _tlbfill.c's EPT fill in the middle of the guest's access, when its final guest-physical
        page has no EPT entry and lies in guest RAM: take the EPT_VIOLATION exit as the full path
        (on_refused_fill -> _ept_exit -> vm_exit -> handle_ept_violation's lazy allocation -> vm_entry, then the
        engine's retry) would leave it, without stopping the engine: the exit-information fields, GUEST_RIP,
        the guest-physical and linear addresses, the counters; then map the page. 1: done, C makes the fill.
        0: something else would happen at the stop (a deadline or an interrupt due, the window, a handler
        replaced, a vmwrite since the last entry...), and the full exit follows."""
        if self.outcome is not None or not self._quick_ept_ready():
            return 0
        page = gpa & ~0xFFF
        m = self.machine
        if not self.settings.lazy_ept or page >= m.mem_bytes:
            return 0
        eip = self.regs.read(R.EIP)
        if not self._stop_changes_nothing(eip):
            return 0
        acc = access_type - 16  # UC_MEM_READ=16, WRITE=17, FETCH=18 -> Access
        if acc != 2:  # a data access: the exact address from the instruction's operands (exact_linear)
            gla = fault_address(self.mmu.fetch_bytes(eip, 15), eip, vaddr & 0xFFFFF000, self.regs)
        elif (eip & 0xFFFFF000) == (vaddr & 0xFFFFF000):
            gla = eip
        else:
            gla = vaddr
        gpa = page | (gla & 0xFFF)
        mmio = getattr(m, "mmio", None)
        if mmio is not None and mmio.find(gpa) is not None:
            return 0  # a device register: emulated by the handler
        self.fold_fast_exits()
        # no entry: no permissions; linear address valid, final
        w = self._exit_info(_EPT_VIOLATION, (1, 2, 4)[acc] | 0x180, 0, eip)
        w[_GPA] = gpa
        w[_GLA] = gla
        self.vmcs._cache.clear()
        self._count_exits(_EPT_VIOLATION)
        self.quick_ept_exits += 1
        self.ept.map(GPA(page), HPA(RAM_HPA + page))
        return 1

    def _stop_changes_nothing(self, eip: int) -> bool:
        """Would the stop of a full exit at eip, in the middle of the running block, change nothing but the
        exit itself? It takes the block's instructions from eip on off the clock, the run loop arms the next
        deadline and the engine runs a block from eip: the quick exits (EPT violation, shadow #PF) are taken
        only when that stop would deliver nothing, arm the same deadline and retranslate nothing."""
        m = self.machine
        st = self.clock._state
        if st.stopped or st.stop_next or st.check_if or st.discard or self._after_one_block:
            return False
        if self._flush_translations or self._window_retranslate:
            return False
        if self.intercepts is not None and self.intercepts.retranslate:
            return False
        entry = m.block_insns.get(self.clock.last_block)
        if entry is None:
            return False
        addrs, end = entry
        if not addrs[0] <= eip < end:
            return False
        before = self.clock.now - sum(1 for a in addrs if a >= eip)  # the clock after left_block_at(eip)
        d = m.next_timer_deadline()
        d = NEVER if d is None or d <= before else d
        if m.pending_nmi() and not self.nmi_blocked:
            return False
        if m.pending_interrupt() is not None and self.regs.read(R.EFLAGS) & EFLAGS_IF:
            return False
        return min(d, self.budget) == st.deadline and bool(st.watch_if) == self.waits_for_window()

    # The same exit with no Python per exit (_tlbfill.c quick_in_c), folded in as the CPUID exits answered in C
    # are; CPUVIRT_QUICK_EPT_C=0 in the environment, or False here, leaves every quick EPT exit to ept_quick_hook.
    quick_ept_c = os.environ.get("CPUVIRT_QUICK_EPT_C", "1") != "0"

    def _install_quick_ept_c(self, fx: FastExits) -> None:
        """Point _tlbfill.c at what it decides with: the fast exits' armed flag, fastexit_quiet and CPUID count,
        the clock's deadline and stop flags; bump its epoch whenever a device changes the CPU's interrupt or
        timer state, an MMIO range moves or the I/O gate arms (until the run loop arms the clock again)."""
        if not self.quick_ept_c or self.fast_fill is None:
            return
        st = self._ept_c = self.fast_fill.state
        fxs = fx._state
        base = ctypes.addressof(fxs)
        st.fx_armed = base + type(fxs).armed.offset
        st.fx_cpuid = base + type(fxs).cpuid_exits.offset
        st.quiet_fn, st.quiet_state = fx.quiet_function()
        st.eip_reg = R.EIP
        for i, reg in enumerate(R.GPR_ORDER):
            st.gpr[i] = reg
        self._watch_stops(st)
        self._arm_quick_ept()

    def _watch_stops(self, st) -> None:
        """A C state that makes exits only while the full exit's stop would change nothing (_tlbfill.c
        quick_in_c, _fastexit.c fastexit_pf_hook): point it at the clock's deadline and stop flags, and bump its
        epoch whenever a device changes the CPU's interrupt or timer state, an MMIO range moves or the I/O gate
        arms (until the run loop arms the clock again, _next_deadline)."""
        cs = self.clock._state
        cbase = ctypes.addressof(cs)
        ct = type(cs)
        st.clk_deadline = cbase + ct.deadline.offset
        st.clk_stopped, st.clk_discard = cbase + ct.stopped.offset, cbase + ct.discard.offset
        st.clk_stop_next, st.clk_check_if = cbase + ct.stop_next.offset, cbase + ct.check_if.offset
        st.epoch, st.armed_epoch = 1, 0  # nothing taken before the run loop arms the clock
        self._stop_watchers.append(st)
        if len(self._stop_watchers) > 1:
            return  # (the device hooks below bump every watcher's)
        watchers = self._stop_watchers
        m = self.machine
        inner = m.on_interrupts_changed

        def bump() -> None:
            for w in watchers:
                w.epoch += 1

        def changed() -> None:
            bump()
            if inner is not None:
                inner()

        m.on_interrupts_changed = changed
        mmio = m.mmio
        register, unregister = mmio.register, mmio.unregister

        def moved_register(gpa: int, size: int, device) -> None:
            bump()
            register(gpa, size, device)

        def moved_unregister(gpa: int) -> None:
            bump()
            unregister(gpa)

        mmio.register, mmio.unregister = moved_register, moved_unregister  # type: ignore[method-assign]

    def _arm_quick_ept(self) -> None:
        """At each VM entry: may _tlbfill.c take the lazy-EPT exit itself until the next one? (With the fast
        exits armed: no trace, no VMCS dump, no vmwrite since.)"""
        st = self._ept_c
        if st is None:
            return
        fx = self.fast_exits
        ok = (
            fx is not None
            and fx.armed
            and getattr(self.hypervisor.handlers.get(_EPT_VIOLATION), "__func__", None) is self._default_ept
            and not self.vmcs._values[_WINDOW_FIELD] >> _WINDOW_BIT & 1
        )
        if ok:
            limit = self.machine.mem_bytes
            for lo, _hi, _dev in self.machine.mmio.ranges:
                limit = min(limit, lo)
            st.c_limit = limit
            if fx is not None:
                st.peek, st.peek_state = fx._state.peek, fx._state.peek_state
            fast = self._fast_delivery
            if fast is not None and fast.books is not None and not st.books:  # (made with the C INTR hook)
                st.covers = ctypes.cast(fast._lib.delivery_books_covers, ctypes.c_void_p).value
                st.books = fast.books.address
        st.c_armed = int(ok)

    def _next_deadline(self) -> int:
        d = super()._next_deadline()
        for st in self._stop_watchers:  # the deadline the clock gets now, and the device state it was computed from
            st.armed_deadline, st.armed_epoch = d, st.epoch
        return d

    def arm_io_gate(self) -> None:
        super().arm_io_gate()
        for st in self._stop_watchers:
            st.epoch += 1  # the run loop drops the engine's translations first

    def _fold_quick_ept(self) -> None:
        """The EPT violations _tlbfill.c took since the last fold: the counters, and the exit-information
        fields of the last one as _ept_exit and vm_exit leave them (after the CPUID exits folded with them
        when one of those came later)."""
        st = self._ept_c
        n = st.c_exits
        st.c_exits = 0
        self._count_exits(_EPT_VIOLATION, n)
        self.quick_ept_exits += n
        eip, vaddr, acc = st.last_eip, st.last_vaddr, st.last_type - 16
        if acc != 2:
            regs = _SavedRegs(st.last_regs)
            gla = fault_address(bytes(st.last_code[:15]), eip, vaddr & 0xFFFFF000, regs)  # type: ignore[arg-type]
        elif (eip & 0xFFFFF000) == (vaddr & 0xFFFFF000):
            gla = eip
        else:
            gla = vaddr
        w = self._exit_info(_EPT_VIOLATION, (1, 2, 4)[acc] | 0x180, 0, eip)
        w[_GPA] = (st.last_gpa & ~0xFFF) | (gla & 0xFFF)
        w[_GLA] = gla
        self.vmcs._cache.clear()

    def _quick_ept_ready(self) -> bool:
        """May this EPT violation skip the stop and vm_exit's machinery? Only while the C exit paths are armed
        (no trace, no VMCS dump, no vmwrite since the last entry, the virtual-APIC page in step), the EPT
        handler is the default one and no interrupt-window exiting waits."""
        return (
            self._quick_exits_armed(_EPT_VIOLATION, self._default_ept)
            and not self.vmcs._values[_WINDOW_FIELD] >> _WINDOW_BIT & 1
            and (fx := self.fast_exits) is not None  # (armed says so; for the type checker)
            and fx.quiet()
        )

    # -- the quick shadow #PF exit (no EPT: a hidden fault) -----------------------------------------------
    # CPUVIRT_NO_QUICK_SHADOW_PF=1 in the environment, or False here, turns it off.
    quick_shadow_pf = not os.environ.get("CPUVIRT_NO_QUICK_SHADOW_PF")
    # ... its walk and fill made by _tlbfill.c (quick_shadow_exit); CPUVIRT_QUICK_SHADOW_PF_C=0 keeps them Python's
    quick_shadow_pf_c = os.environ.get("CPUVIRT_QUICK_SHADOW_PF_C", "1") != "0"

    def quick_shadow_miss(self, gva: int, access: int, user: bool, code: int) -> bool:
        """Called by ShadowPaging.gva_to_gpa from the TLB fill, in the middle of the guest's access, when the
        shadow has no entry that allows it: take the #PF exit a hidden fault makes as the full path
        (on_refused_fill -> _exception_exit -> vm_exit -> handle_exception_nmi -> shadow_page_fault ->
        vm_entry, then the engine's retry) would leave it, without stopping the engine: the exit-information
        fields, GUEST_RIP, the counters (_quick_pf_exit), the shadow filled by ShadowPaging.page_fault. True:
        done (the fill answers from the shadow, as the retry would). False: a true fault, a write to a traced
        page table, or something else that would happen at the stop, and the full exit follows."""
        shadow = self.shadow
        assert shadow is not None  # (installed with it)
        if not shadow.quiet_fill(GVA(gva), Access(access), user):
            return False
        gla = self._quick_pf_exit(gva, access, code)
        if gla is None:
            return False
        kind, _ = shadow.page_fault(GVA(gla), access, user)
        assert kind == "hidden", kind  # (ShadowPaging.quiet_fill said so, and nothing ran in between)
        self.mmu.counters.fills += 1  # the engine's retry after the entry is a fill of its own
        return True

    @hook_guard(returns=0)
    def quick_shadow_exit(self, vaddr: int, access_type: int, code: int) -> int:
        """The same exit for _tlbfill.c's shadow fill, which has walked the guest's tables and found the miss
        would only fill the shadow (its conditions are quiet_fill's): 1 = recorded, C fills the shadow."""
        if self.mmu.regs.loading_descriptor.value:  # (a hypervisor's segment load: served without an exit)
            return 0
        return int(self._quick_pf_exit(vaddr, access_type - 16, code) is not None)

    def _quick_pf_exit(self, gva: int, access: int, code: int) -> int | None:
        """Record the #PF exit of a hidden fault at the running instruction, if a stop there would change
        nothing else (see quick_shadow_miss): its exact linear address (CR2), or None."""
        if self.outcome is not None or not self._exception_exits(Vector.PF, code):
            return None
        if not self._quick_exits_armed(ExitReason.EXCEPTION_NMI, self._default_exception):
            return None
        if not self.fast_exits.quiet():  # type: ignore[union-attr]  # (armed says it is there)
            return None
        if self.vmcs._values[_WINDOW_FIELD] >> _WINDOW_BIT & 1 and self.regs.read(R.EFLAGS) & EFLAGS_IF:
            return None  # the stop would take the INTERRUPT_WINDOW exit (before_entry); with IF = 0 it waits
        eip = self.regs.read(R.EIP)
        if not self._stop_changes_nothing(eip):
            return None
        gla = self.exact_linear(ShadowMiss(gva, access, code), eip)
        self.fold_fast_exits()
        self._exit_info(ExitReason.EXCEPTION_NMI, gla, 0, eip, _PF_EXIT_INFO, code)
        self.vmcs._cache.clear()
        self._count_exits(ExitReason.EXCEPTION_NMI)
        self.quick_shadow_exits += 1
        self.pf_access = access  # what on_refused_fill leaves for shadow_page_fault, which walks for it
        return gla

    # -- interrupts, the interrupt window, HLT -------------------------------------------------------------
    _blocked = False

    def waits_for_window(self) -> bool:
        """Interrupt-window exiting (SDM 25.2) waits for IF = 1 like a pending interrupt does: the
        window hooks stop the engine where IF becomes 1, and before_entry takes the exit."""
        if self.ctl("interrupt_window_exiting") and not self.regs.read(R.EFLAGS) & EFLAGS_IF:
            return True
        return super().waits_for_window()

    def before_entry(self) -> None:
        """Exits due before the next guest instruction (SDM 25.2): the interrupt window, which is
        open when RFLAGS.IF = 1 and no STI / MOV SS shadow blocks interrupts."""
        self.fold_fast_exits()
        if self.vapic is not None:
            self._sync_vapic(self.vapic)  # timers and interrupt delivery changed the APIC since the last entry
        if self.ctl("interrupt_window_exiting") and self.regs.read(R.EFLAGS) & EFLAGS_IF:
            if self.faults.interrupt_shadow():
                self._after_one_block = True
                self._arm_fast_exits()
                return
            self.vm_exit(ExitReason.INTERRUPT_WINDOW, self.regs.read(R.EIP))
        self._arm_fast_exits()

    def inject_pending_interrupt(self, eip: int) -> bool:
        m = self.machine
        if self.fast_exits is not None:
            self.fast_exits.disarm()  # acknowledging changes the APIC: synced at the next entry
        if getattr(m, "pending_nmi", None) is not None and m.pending_nmi() and not self.nmi_blocked:
            if not self.ctl("nmi_exiting"):
                return super().inject_pending_interrupt(eip)  # delivered to the guest directly
            m.acknowledge_nmi()
            info = E.intr_info(Vector.NMI, E.INTR_TYPE_NMI, False)
            d = E.decode_intr_info(info)
            d["name"] = "NMI"
            self.vm_exit(ExitReason.EXCEPTION_NMI, eip, intr_info=info, detail=d)
            return True
        if m.pending_interrupt() is None:
            return False
        if not self.ctl("external_interrupt_exiting"):
            return super().inject_pending_interrupt(eip)
        if self.vmcs._values[F.VM_ENTRY_INTR_INFO_FIELD] & E.INTR_INFO_VALID:
            return False
        if self.ctl("interrupt_window_exiting"):
            # Waiting for the window (e.g. woken from HLT with IF = 1): it is open now or not at all.
            if not self.regs.read(R.EFLAGS) & EFLAGS_IF or self.faults.interrupt_shadow():
                return False
            x = self.vm_exit(ExitReason.INTERRUPT_WINDOW, eip)
            return x.action.startswith("window open: injected")
        # The processor records blocking by STI/MOV SS in the guest-state area (SDM 24.4.2).
        self.vmcs._values[F.GUEST_INTERRUPTIBILITY_INFO] = 1 if self.faults.interrupt_shadow() else 0
        x = self.vm_exit(ExitReason.EXTERNAL_INTERRUPT, eip)
        if self.vmcs._values[F.GUEST_INTERRUPTIBILITY_INFO] & 3 and self.ctl("interrupt_window_exiting"):
            self._after_one_block = True  # the window opens after the shadowed instruction
        return x.action.startswith("injected")

    def halt_requested(self) -> bool:
        return self._blocked

    def on_hlt(self, eip: int) -> None:
        self._blocked = False
        super().on_hlt(eip)

    def deliver(self, vector, return_eip, error_code=None, soft=False, external=False, fault_eip=None):
        from cpuvirt.cpu.faults import TripleFault
        from cpuvirt.status import Unsupported

        try:
            self.delivery.deliver(vector, return_eip, error_code, soft, external, fault_eip)
        except TripleFault as tf:
            self.vm_exit(ExitReason.TRIPLE_FAULT, return_eip, detail={"why": str(tf)})
        except Unsupported as u:
            self.finish("error", EXIT_HYPERVISOR_STOP, f"unsupported at {return_eip:#x}: {u}")

    def switch_task(self, view, sel: int, reason: int, next_eip: int, ext: int = 0) -> None:
        """Task switches cause VM exits unconditionally (SDM 25.1.2): TASK_SWITCH, qualification =
        the new TSS selector and its source (28.2.1); the handler performs the switch (KVM's
        kvm_task_switch), and a fault it raises is delivered as the processor would."""
        q = (sel & 0xFFFF) | (reason << 30)
        source = ("CALL", "IRET", "JMP", "task gate in IDT")[reason]
        self._task = (view, sel, reason, next_eip, ext, None)
        self.vm_exit(
            ExitReason.TASK_SWITCH,
            self.regs.read(R.EIP),
            qualification=q,
            detail={"selector": f"{sel:#x}", "source": source},
        )
        fault = self._task[5]
        self._task = None
        if fault is not None:
            raise fault

    def perform_task_switch(self) -> str:
        """For the root-mode handler: switch tasks as the exit described (cpu/tasks.py)."""
        from cpuvirt.cpu import tasks

        assert self._task is not None, "a TASK_SWITCH exit without a task switch"
        view, sel, reason, next_eip, ext, _ = self._task
        try:
            tasks.switch_task(view, sel, reason, next_eip, ext)
        except DeliveryFault as f:
            self._task = (view, sel, reason, next_eip, ext, f)
            return f"task switch to {sel:#x} raised {MNEMONIC.get(f.vector, f.vector)}"
        return f"switched to the task of TSS {sel:#x}"

    def summary_stats(self) -> list[tuple[str, int, int, float, float]]:
        """kvm_stat-like rows: (reason, number, count, share, mean handler time in us; exits answered
        in C count with no handler time)."""
        self.fold_fast_exits()
        total = sum(self.stats.values()) or 1
        rows = []
        for reason, n in self.stats.most_common():
            mean = self.handler_time[reason] / n * 1e6 if n else 0.0
            rows.append((reason.name, int(reason), n, n / total, mean))
        return rows
