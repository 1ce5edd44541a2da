"""The vCPU of mode `full`: guest-kernel code runs from the translation cache, user code in place.

The TC is reached through a linear window (TC_WINDOW) that the TLB-fill hook serves only to fetches at
CPL 1: any read or write there, and any access at CPL 3, is served from the guest's own mapping, as if
the window were not there. Translated code never reads the TC as data. An engine EIP inside the TC is
shown everywhere (traces, faults, I/O sites) as the guest EIP it translates.
"""

from __future__ import annotations

import ctypes
import struct

from unicorn import UC_MEM_FETCH, UC_PROT_EXEC

from cpuvirt.bt.direct import PM16, Direct16, RunsCode16
from cpuvirt.bt.fastcallout import CodeLines, CodePages
from cpuvirt.bt.runtime import BtRuntime
from cpuvirt.bt.tcache import CALLOUT_SLOTS, TC_SIZE, TCache
from cpuvirt.bt.translate import GuestCode, TranslateFault
from cpuvirt.cpu.deprivilege import HV_CR0, HV_IDTR, KERNEL_RING, SHADOW_GDT_WINDOW, DeprivilegedVcpu
from cpuvirt.cpu.vcpu import EXIT_BUDGET, EXIT_ERROR
from cpuvirt.engine import regs as R
from cpuvirt.engine.clock import _COUNT_CB
from cpuvirt.memory.types import Access
from cpuvirt.modes.full.adaptive import ADAPTIVE_THRESHOLD, AdaptiveStores
from cpuvirt.modes.full.callouts import Callouts
from cpuvirt.modes.full.coherence import CODE, Coherence
from cpuvirt.modes.full.crfast import CrState
from cpuvirt.modes.full.deliverfast import FullDelivery, FullFaults
from cpuvirt.modes.full.evfast import FullEvents
from cpuvirt.modes.full.inplace import InPlaceBlocks
from cpuvirt.x86.vectors import Vector

TC_WINDOW = 0xFF000000  # linear window of the translation cache (execute-only, CPL 1)
assert TC_WINDOW + TC_SIZE <= SHADOW_GDT_WINDOW


class _Code(GuestCode):
    """The guest's code as the translator reads it: supervisor fetches through the guest's walk."""

    def __init__(self, vcpu: "FullVcpu"):
        self.vcpu = vcpu

    def fetch(self, gva, size):
        mmu = self.vcpu.mmu
        out = bytearray()
        frames = []
        while size > 0:
            n = min(size, 0x1000 - (gva & 0xFFF))
            gpa, ok = mmu.strategy.gva_to_gpa(gva, Access.FETCH, False, True)
            if gpa is None:
                if not out:
                    raise TranslateFault(gva, ok)
                break
            hpa = mmu.strategy.gpa_to_hpa(gpa & 0xFFFFF000, Access.FETCH)
            if hpa is None or not mmu.ram.contains(hpa, 0x1000):
                if not out:
                    raise TranslateFault(gva, None)
                break
            frames.append(gpa & 0xFFFFF000)
            self.vcpu._note_page(gva & 0xFFFFF000, gpa & 0xFFFFF000)
            out += mmu.ram.read(hpa | (gpa & 0xFFF), n)
            gva = (gva + n) & 0xFFFFFFFF
            size -= n
        return bytes(out), frames

    def virtual(self, field):
        return self.vcpu.virtual_field(field)


class FullVcpu(RunsCode16, Coherence, Callouts, AdaptiveStores, DeprivilegedVcpu):
    event_kind = "callout"
    fdeliver: FullDelivery | None = None  # the common deliveries in C (deliverfast.py), once installed
    pf_fast: FullFaults | None = None  # the common true #PF in C (deliverfast.py), once attached

    def install_delivery(self, shadow) -> None:
        """The common events delivered in C (deliverfast.py), once shadow paging is the strategy."""
        if self.evfast is not None:
            self.fdeliver = self.c_delivery = FullDelivery.install(self, shadow)

    def __init__(self, machine, trace=None, max_insns: int = 0, verbose: bool = False):
        super().__init__(machine, trace=trace, max_insns=max_insns)
        self.verbose = verbose
        self.tc_hpa = self.alloc.page()
        for _ in range(TC_SIZE // 0x1000 - 1):
            self.alloc.page()
        hv = self.hv_mem
        base_hpa = self.tc_hpa
        self._hv_fetch = False
        self.tc = TCache(
            lambda a, d: hv.write(base_hpa + (a - TC_WINDOW), bytes(d)), TC_WINDOW, remove_cache=self._remove_cache
        )
        self.tc.on_flush = self._forget_translations
        self.code = _Code(self)
        self.rt = BtRuntime(self.hooks, self.regs, self.tc, self.code, self._read32, self._write32, KERNEL_RING)
        self.rt.on_callout = self._callout_then_window
        # mov to CR0/CR4 served in C (crfast.py): CR0 and CR4 live in the C callout table
        self.crfast: CrState | None = None
        # ... and the kernel's segment loads, CR2 reads and iretd (evfast.py): the virtual GDTR, CR2,
        # IOPL, the hypervisor's TLB and `_loaded` in the same table
        self.evfast: FullEvents | None = None
        self._entered: int | None = None  # the guest EIP enter_kernel last went to
        if self.rt.fast is not None:
            table = self.rt.fast.table
            self.crfast = CrState(table)
            self.evfast = FullEvents(self, table)
            if getattr(self.mmu, "crs_source", None) is not None:
                self.mmu.crs_source = self.virtual_cpu.crs
        self.rt.on_fetch_fault = self._fetch_fault
        # 16-bit code (real mode, 16-bit protected mode) runs in place, never translated (bt/direct.py)
        self.direct16 = Direct16(self, KERNEL_RING, HV_CR0, HV_IDTR)
        self.rt.is_kernel = lambda: self.direct16.state is None and self.vcpl() == 0
        # At a callout slot (linear 0xFF000000 and up) the CPU cannot be in virtual-8086 mode, whose
        # linear addresses end below 0x110000: CS's RPL alone says the ring (no EFLAGS read, which
        # costs the engine a computation of the lazy flags).
        regs = self.regs
        self.rt.is_kernel_at_slot = lambda: self.direct16.state is None and regs.read(R.CS) & 3 == KERNEL_RING
        if verbose:
            self.rt.translator.trace_translate = self._record_translate
        self.in_place: InPlaceBlocks | None = None  # watch_in_place_code
        # linear code page -> guest frame it came from (with a bit per page for the C callout hook's invlpg)
        self._page_frame: dict[int, int] = CodePages(self.rt.fast.table) if self.rt.fast is not None else {}
        # the RAM lines that hold code (for the C hook's adaptive stores into code frames)
        self.code_lines = CodeLines(self.rt.fast.table, self.mmu.p2m.ram_bytes) if self.rt.fast is not None else None
        self.code_store_faults: dict[int, int] = {}  # guest EIP -> stores into code frames (adaptive BT)
        self._dirty: set[int] = set()  # code frames written since they were checked
        self._frame_blocks: dict[int, list] = {}  # guest frame -> blocks translated from it
        self._frame_index: dict[int, dict] = {}  # guest frame -> gpa >> 6 -> [(seq, block)] there
        self._dep_blocks: dict[str, list] = {}  # virtual-CPU field -> [(seq, block)] that baked it in
        self._maps_snap = None  # coherence.py: the paging frames at the last full mapping check
        self._block_seq = 0
        self.rt.translator.on_block = self._new_block
        self._vsnap: dict[str, object] = {}
        self.traced_stores: dict[int, int] = {}  # guest EIP -> traced-page faults (adaptive BT)
        self.adaptive_stores = 0  # stores done by adaptive callouts instead
        self._untraced_run: dict[int, int] = {}  # adaptive guest EIP -> its stores in a row to untraced frames
        self._native_after: dict[int, int] = {}  # guest EIP -> untraced run that makes it native again
        self.code_page_faults = 0  # stores into frames holding translated code
        inner = self.mmu.fill
        tc_end = TC_WINDOW + TC_SIZE

        def fill(uc, vaddr, access, entry, data):
            if (
                TC_WINDOW <= vaddr < tc_end
                and access == UC_MEM_FETCH
                and (self._hv_fetch or (self.regs.read(R.SS) & 3 == KERNEL_RING and self.direct16.state is None))
            ):
                entry.paddr = base_hpa + ((vaddr - TC_WINDOW) & ~0xFFF)
                entry.perms = UC_PROT_EXEC
                return True
            return inner(uc, vaddr, access, entry, data)

        self.mmu.fill = fill
        self._mmio_decode = False
        self._sse_tc_python = set()
        self._prefix_len: dict = {}  # (callout site, bytes) -> prefix length
        self._cpuid_in = R.Batch(self.uc, (R.EAX, R.ECX))
        self._cpuid_out = R.Batch(self.uc, (R.EAX, R.EBX, R.ECX, R.EDX))
        self._rdtsc_out = R.Batch(self.uc, (R.EAX, R.EDX))
        self._guest_fetch_bytes = self.mmu.fetch_bytes
        self.mmu.fetch_bytes = self._fetch_bytes
        # The clock counts each new engine block's instructions: TC blocks are decoded from the TC.
        clock = self.clock
        clock._count_cb = _COUNT_CB(self._count_block)
        clock._state.count_cb = ctypes.cast(clock._count_cb, ctypes.c_void_p).value

    def install_hooks(self) -> None:
        super().install_hooks()
        self._link_fast_callouts()  # callouts.py: cpuid and rdtsc answered in C once linked
        if self.evfast is not None:
            self.evfast.attach()
        if self.rt.fast is not None:
            # where the vCPU folds events counted in C into its counters when they are read (the
            # runner and the cost model also call sync_counts themselves)
            before = getattr(self, "fold_counts", None)

            def fold() -> None:
                if before is not None:
                    before()
                self.sync_counts()

            self.fold_counts = fold

    # -- the deprivileging core's hooks ------------------------------------------------------------
    def real_iopl(self, vcpl: int) -> int:
        return 1 if vcpl == 0 else 0

    def enter_kernel(self, guest_eip: int) -> None:
        """Guest-kernel code runs from its translation (made now if needed); 16-bit code in place."""
        if self.direct16.state is not None:
            self.regs.write(R.EIP, guest_eip)
            return
        self._entered = guest_eip
        try:
            self.regs.write(R.EIP, self.rt.lookup(guest_eip))
        except TranslateFault:
            self.regs.write(R.EIP, guest_eip)  # settled (the fetch #PF delivered) before entry

    def after_transfer(self) -> None:
        """A gate or task switch from user code changed virtual-CPU state translations baked in."""
        self._virtual_changed()

    def virtual_field(self, field: str) -> int:
        v = self.virtual_cpu
        if field in ("cr0", "cr3", "cr4"):
            return getattr(v, field)
        if field in ("gdtr_base", "idtr_base"):
            return getattr(v, field[:4])[0]
        if field in ("gdtr_limit", "idtr_limit"):
            return getattr(v, field[:4])[1]
        if field in ("ldtr", "tr"):
            return getattr(v, field).selector
        if field == "cs":
            return self.guest_selector(self.regs.read(R.CS))
        if field == "ss":
            return self.guest_selector(self.regs.read(R.SS))
        if field == "iopl":
            return v.iopl
        raise KeyError(field)

    # -- aligned-SSE instructions copied into the TC (cpu/ssealign.py) ---------------------------------------
    def sse_tc_site(self, ins) -> None:
        """A translated block copied an instruction that may need an aligned m128 operand: its TC copy
        gets the alignment check (the guest's own address never executes). Its Python side maps the
        TC address back to the guest's for the #GP."""
        from cpuvirt.cpu.ssealign import is_aligned_sse

        mnem, _, ops = ins.text.partition(" ")
        if not is_aligned_sse(mnem, ops):
            return
        ic = self.intercepts
        assert ic is not None  # built with the vCPU (cpu/vcpu.py)
        if self._sse_tc_hook is None:
            self._sse_tc_hook = self.hooks.code_function(self._sse_tc_hit)
            inner = self.tc.on_flush

            def on_flush():
                inner()
                if ic.sse is not None:
                    ic.sse.invalidate(TC_WINDOW, TC_WINDOW + TC_SIZE)
                    self.clock.pull_in(self.clock.now)  # the engine frees the removed hooks on return

            self.tc.on_flush = on_flush
            # a translation starts with room for its copies' hooks, else the TC is flushed first
            sse = ic.sse
            if sse is not None:
                self.tc.hook_room = sse.tc_room
        if ic.sse is not None:
            # a TC copy changes only with a flush, which re-aims every site (`invalidate` above)
            ic.sse.site(ins.tc, ins.size, self.tc_bytes(ins.tc, ins.size), self._sse_tc_hook, trusted=True)
        elif ins.tc not in self._sse_tc_python:
            self._sse_tc_python.add(ins.tc)
            self.hooks.code(self._sse_tc_hit, ins.tc, ins.tc)

    _sse_tc_hook: object = None
    _sse_tc_python: set[int]

    def _sse_tc_hit(self, _uc, address: int, size: int, _data) -> None:
        if not (self.tc.in_code(address) and self.rt.is_kernel()):
            return
        self.mmu.crs = None
        self.sse_align_site(address, size)
        if self.regs.read(R.EIP) != address:  # #GP delivered: the guest's handler runs from the TC
            self.left_block_at(address)
            self.settle()
        self.clock.if_may_have_changed()

    def sse_code(self, address: int, size: int) -> bytes | None:
        if self.tc.in_code(address) and self.rt.is_kernel():
            return self.tc_bytes(address, size)
        return super().sse_code(address, size)

    def sse_fault_eip(self, address: int) -> int:
        return self.guest_position(address)

    # -- entering translated code ----------------------------------------------------------------------
    def settle(self) -> None:
        """Before the engine runs again: kernel code must run from the TC."""
        if self.outcome is None:
            self.rt.enter()

    def before_entry(self) -> None:
        super().before_entry()
        self.settle()

    def _next_deadline(self) -> int:
        d = super()._next_deadline()
        # Frames written since last checked: stop after one block (the store runs in it), check then.
        return min(d, self.clock.now) if self._dirty else d

    def _fetch_fault(self, f: TranslateFault, geip: int) -> bool:
        """The translator cannot fetch the guest's code: #PF, or a stop for unbacked memory. False
        when the run ends (stopped, or the budget spent by faults that retire nothing)."""
        if f.error_code is None:
            self.stop_unbacked_fetch(f.gva)
            return False
        self.page_fault(f.gva, Access.FETCH, f.error_code, geip)
        if self.outcome is None and self.clock.now >= self.budget:
            self.finish("budget", EXIT_BUDGET, self.budget_message())
        return self.outcome is None

    # -- where was the guest? -----------------------------------------------------------------------------
    def guest_position(self, eip: int) -> int:
        """Guest EIP for an engine EIP: a TC address maps to its guest instruction (ESP corrected
        when the fault came from inside an inline sequence); any other address is the guest's own."""
        if not (self.tc.contains(eip) and self.rt.is_kernel()):
            return eip
        g = self.tc.guest_eip(eip)
        if g is None:
            raise RuntimeError(f"internal: EIP {eip:#x} in the translation cache maps to no guest instruction")
        geip, fix, _ = g
        if fix:
            self.regs.write(R.ESP, (self.regs.read(R.ESP) + fix) & 0xFFFFFFFF)
        self.regs.write(R.EIP, geip)
        return geip

    def on_engine_event(self, intno, error_code, soft, eip) -> None:
        """A fault or `int n` in translated code is the guest's, at the guest EIP it translates.
        In 16-bit protected-mode code (run in place at ring 1) a #GP may be a privileged instruction:
        emulated, as trap-and-emulate does."""
        if intno == Vector.GP and not soft and self.direct16.state == PM16 and self.vcpl() == 0:
            if self.direct16.emulate_trap(eip):
                self.settle()
                return
        self.left_block_at(eip)
        self._deliver_engine_event(intno, error_code, soft, self.guest_position(eip))
        self.settle()
        if self.fdeliver is not None:
            self.fdeliver.seen(intno, soft)

    def hook_invalid(self, uc, _data) -> bool:
        self.mmu.crs = None
        eip = self.regs.read(R.EIP)
        self.left_block_at(eip)
        geip = self.guest_position(eip)
        self.record("exception", "#UD", 6, geip, {"vector": 6}, "delivered through the guest IDT")
        self.deliver(Vector.UD, geip)
        self.settle()
        return True

    def on_refused_fill(self, pending, eip: int) -> None:
        if not (self.tc.in_code(eip) and self.rt.is_kernel()):
            super().on_refused_fill(pending, eip)
            self.settle()
            if self.pf_fast is not None:
                self.pf_fast.note(self._reasons)
            return
        tc_eip, esp = eip, self.regs.read(R.ESP)
        code = self.tc_bytes(eip, 15)
        # the exact linear address is computed from the TC instruction, with the registers as they are
        from cpuvirt.x86.faultaddr import fault_address

        gva = (
            pending.gva
            if pending.access == Access.FETCH
            else fault_address(code, eip, pending.gva & 0xFFFFF000, self.regs)
        )
        geip = self.guest_position(eip)
        from cpuvirt.memory.traces import TracedWrite

        if type(pending) is TracedWrite:
            pending.gpa = (pending.gpa & ~0xFFF) | (gva & 0xFFF)
            pending.gva, pending.eip = gva, geip
            kinds = self.mmu.traces.kinds(pending.gpa)
            n = 0
            if kinds - {CODE}:  # a guest page table (shadow paging's trace)
                n = self.traced_stores[geip] = self.traced_stores.get(geip, 0) + 1
            else:  # data beside translated code: adaptive too, once it is emulated here
                self.code_page_faults += 1
                n = self.code_store_faults[geip] = self.code_store_faults.get(geip, 0) + 1
            from cpuvirt.memory.traces import TraceError

            try:
                self.mmu.traces.dispatch(pending, self)
            except TraceError as e:
                self.finish("error", EXIT_ERROR, str(e))
                return
            if self.regs.read(R.EIP) == geip:
                # not emulated (the frame was untraced): run the store again where it was
                self.regs.write(R.EIP, tc_eip)
                self.regs.write(R.ESP, esp)
            elif n >= ADAPTIVE_THRESHOLD:
                self._make_adaptive(geip)
            self.settle()
            return
        if pending.unbacked_fetch:
            self.stop_unbacked_fetch(pending.gva)
            return
        self.page_fault(gva, pending.access, pending.error_code, geip)
        self.settle()
        if self.pf_fast is not None:
            self.pf_fast.note(self._reasons)

    def on_deadline(self, eip: int) -> None:
        self.check_dirty()
        if not (self.tc.contains(eip) and self.rt.is_kernel()):
            super().on_deadline(eip)
            self.settle()
            return
        if self.clock.now >= self.budget:
            self.finish("budget", EXIT_BUDGET, self.budget_message())
            return
        self.machine.update_timers()
        pending = self.machine.pending_nmi() or self.machine.pending_interrupt() is not None
        if not pending:
            return
        g = self.tc.guest_eip(eip)
        site = self.tc.site_at(eip)
        if g is None or not g[2] or (site is not None and site.after_sti):
            # inside an inline sequence, or the callout right after `sti` (still in its shadow):
            # interrupts wait for the next guest-instruction boundary
            self._after_one_block = True
            return
        geip, fix, _ = g
        esp = self.regs.read(R.ESP)
        if fix:
            self.regs.write(R.ESP, (esp + fix) & 0xFFFFFFFF)
        if self.inject_pending_interrupt(geip):
            self.settle()
        elif fix:
            self.regs.write(R.ESP, esp)

    # -- I/O sites, MMIO sites, events and the clock see TC addresses --------------------------------------
    def record(self, kind, reason, code, eip, detail, action) -> None:
        # The runner (mmio, unbacked memory) and shadow paging (hidden faults) take the EIP from the
        # engine's state (the running block): a TC address, shown as the guest EIP it translates.
        if kind in ("mmio", "unbacked_memory", "page_fault") and self.tc.in_code(eip) and self.rt.is_kernel():
            g = self.tc.guest_eip(eip)
            if g is not None:
                eip = g[0]
        super().record(kind, reason, code, eip, detail, action)

    def _fetch_bytes(self, gva: int, size: int):
        if self._mmio_decode and self.tc.in_code(gva):
            return self.tc_bytes(gva, size)
        return self._guest_fetch_bytes(gva, size)

    def io_site(self) -> tuple[int, int]:
        site = self.rt.current
        if site is not None and site.insn is not None:
            return site.insn.geip, site.insn.size
        addr, length = super().io_site()
        if self.tc.in_code(addr):
            g = self.tc.guest_eip(addr)
            if g is not None:
                return g[0], length
        return addr, length

    def _block_code(self, block: int) -> bytes:
        if self.tc.in_code(block):
            return self.tc_bytes(block, 256)
        return super()._block_code(block)

    def tc_bytes(self, addr: int, n: int) -> bytes:
        n = max(0, min(n, TC_WINDOW + TC_SIZE - addr))
        return self.hv_mem.read(self.tc_hpa + (addr - TC_WINDOW), n)

    def _count_block(self, address: int, size: int) -> int:
        if not (TC_WINDOW <= address < TC_WINDOW + TC_SIZE) or self.regs.read(R.CS) & 3 != KERNEL_RING:
            return self.machine._count_block(address, size)
        try:
            if address < TC_WINDOW + CALLOUT_SLOTS:
                return 1
            # Translations are 32-bit code whatever the guest runs (16-bit code is never translated,
            # and _cs() decodes as 16-bit while a 16-bit code segment is loaded). A block holding an inline
            # cache is translated again at every patch of its TC range: Machine.decode_block's cache.
            machine = self.machine
            insns, entry = machine.decode_block(address, self.tc_bytes(address, size), True, self._tc_disasm())
            self.forget_block(address)
            if self.tc.block_at(address) is not None:
                machine.note_block(address, entry)
            # else a compare tree built out of line (bt/translate.py widen): counted, not noted, since
            # no event can leave it halfway (no access that faults; interrupts wait for a guest instruction's
            # boundary), and its engine blocks, a few hundred a tree and a new tree at each rebuild, would crowd
            # the C copy of Machine.block_insns out of the blocks events do leave (the ring-3 `int` stubs)
            return max(len(insns), 1)
        except Exception:  # never let an exception cross into C
            self.machine.block_insns.pop(address, None)
            return 1

    def _tc_disasm(self):
        cs = getattr(self, "_tc_cs", None)
        if cs is None:
            from capstone import CS_ARCH_X86, CS_MODE_32, Cs

            cs = self._tc_cs = Cs(CS_ARCH_X86, CS_MODE_32)
        return cs

    def watch_in_place_code(self) -> None:
        """Index the blocks the engine runs in place by frame (inplace.py), once the intercepts know
        each code page's frame (enable_io_gate made them)."""
        assert self.intercepts is not None
        self.in_place = InPlaceBlocks(
            self.intercepts.page_frame, TC_WINDOW, TC_WINDOW + TC_SIZE, self.code_lines, self.mmu.p2m.ram_hpa
        )
        self.machine.block_insns.attach(self.in_place)

    def _remove_cache(self, lo: int, hi: int) -> None:
        """Drop the engine's translations of TC code: the engine finds them through a fetch of the
        window, which the fill serves to ring 1 only; at another ring it is served for this call
        alone, then the TLB is flushed."""
        if self.regs.read(R.SS) & 3 == KERNEL_RING:
            self.uc.ctl_remove_cache(lo, hi)
            return
        self._hv_fetch = True
        try:
            self.uc.ctl_remove_cache(lo, hi)
        finally:
            self._hv_fetch = False
            from unicorn import UC_CTL_IO_WRITE, UC_CTL_TLB_FLUSH

            self.uc.ctl(UC_CTL_TLB_FLUSH, UC_CTL_IO_WRITE)

    def _read32(self, gva: int) -> int:
        return struct.unpack("<I", self.read_guest(gva, 4))[0]

    def _write32(self, gva: int, value: int) -> None:
        self.write_guest(gva, struct.pack("<I", value))

    def _record_translate(self, blk) -> None:
        self.record(
            "translate",
            "block",
            None,
            blk.geip,
            {
                "guest_insns": sum(1 for i in blk.insns if i.size),
                "tc": f"{blk.tc:#x}",
                "tc_bytes": blk.tc_end - blk.tc,
                "kinds": [i.kind for i in blk.insns if i.size],
            },
            "translated into the TC",
        )

    def stats(self) -> dict:
        self.sync_counts()
        return {
            "tc": self.tc.counters.as_dict(),
            "traced_store_faults": sum(self.traced_stores.values()),
            "adaptive_stores": self.adaptive_stores,
            "code_page_faults": self.code_page_faults,
        }
