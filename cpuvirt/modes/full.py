"""Mode `full`: VMware-style binary translation of the guest kernel (Adams & Agesen 2006; docs/binary-translation.md).

The guest kernel (virtual CPL 0) never runs in place: its code is translated block by block into a
translation cache (cpuvirt/bt) in hypervisor memory and runs from there at ring 1, with real IOPL 1 so
that cli/sti/popf act natively on the real IF, which carries the virtual IF. Guest user code (CPL 3)
runs directly. What the translator cannot leave native becomes a callout into this hypervisor, which
emulates it through the shared deprivileging core (cpu/deprivilege.py).

The TC is reached through a linear window (TC_WINDOW) that the TLB-fill hook serves only to fetches at
CPL 1: any read or write there, and any access at CPL 3, is served from the guest's own mapping, as if
the window were not there. Translated code never reads the TC as data.
"""
from __future__ import annotations

import ctypes
import struct

from unicorn import UC_PROT_EXEC

from cpuvirt import limits
from cpuvirt.bt.coherence import invalidate
from cpuvirt.bt.direct import PM16, WANTED, Direct16, RunsCode16
from cpuvirt.bt.runtime import BtRuntime
from cpuvirt.bt.tcache import CALLOUT_SLOTS, TC_SIZE, TCache
from cpuvirt.bt.translate import INLINE, GuestCode, TranslateFault
from cpuvirt.cpu.deprivilege import HV_CR0, HV_IDTR, KERNEL_RING, SHADOW_GDT_WINDOW, DeprivilegedVcpu, GuestFault
from cpuvirt.cpu.events import Unsupported, Vector
from cpuvirt.cpu.vcpu import EXIT_BUDGET, EXIT_ERROR, EXIT_HYPERVISOR_STOP
from cpuvirt.engine import regs as R
from cpuvirt.machine.clock import _COUNT_CB
from cpuvirt.memory.mmu import GuestPageFault
from cpuvirt.memory.types import Access
from cpuvirt.modes.base import Mode

TC_WINDOW = 0xFF000000            # linear window of the translation cache (execute-only, CPL 1)
assert TC_WINDOW + TC_SIZE <= SHADOW_GDT_WINDOW
CODE = "code"                     # the write-trace kind of translated guest frames
ADAPTIVE_THRESHOLD = 4            # traced-page faults at one guest store before it becomes a callout
_FIELDS = ("cr0", "cr3", "cr4", "gdtr", "idtr", "ldtr", "tr", "cs", "ss", "iopl")


_ARITH = ("add", "sub", "inc", "dec")
_arith_forms: dict = {}


def _arith_store(code: bytes, eip: int, regs, read, write) -> int | None:
    """`add/sub [m], reg/imm` and `inc/dec [m]` (counters kept beside code), with the flags the CPU
    sets; None for any other instruction. Complements x86/emulate.emulate_store."""
    from capstone.x86 import X86_OP_IMM, X86_OP_MEM, X86_OP_REG

    from cpuvirt.x86.emulate import _get
    from cpuvirt.x86.faultaddr import _decoder, _operand_addresses
    key = (eip, code)
    form = _arith_forms.get(key)
    if form is None:
        insn = next(_decoder().disasm(code or b"", eip, 1), None)
        form = False
        if insn is not None and insn.mnemonic in _ARITH and insn.operands and insn.operands[0].type == X86_OP_MEM \
                and insn.prefix[0] not in (0xF2, 0xF3):
            ops = insn.operands
            src = None
            if len(ops) == 2:
                if ops[1].type == X86_OP_REG:
                    src = ("reg", insn.reg_name(ops[1].reg))
                elif ops[1].type == X86_OP_IMM:
                    src = ("imm", ops[1].imm)
            if len(ops) == 1 or src is not None:
                form = (insn.mnemonic, insn.size, ops[0].size, src)
        if len(_arith_forms) > 4096:
            _arith_forms.clear()
        limits.put(_arith_forms, key, form)
    if not form:
        return None
    m, length, size, src = form
    bits = 8 * size
    mask = (1 << bits) - 1
    b = 1 if src is None else ((_get(regs, src[1]) if src[0] == "reg" else src[1]) & mask)
    gva = _operand_addresses(code, eip, regs)[0][0]
    a = read(gva, size)
    sub = m in ("sub", "dec")
    r = (a - b if sub else a + b) & mask
    write(gva, size, r)
    fl = regs.read(R.EFLAGS)
    keep_cf = m in ("inc", "dec")
    fl &= ~(0x4 | 0x10 | 0x40 | 0x80 | 0x800 | (0 if keep_cf else 0x1))
    if not keep_cf and ((a < b) if sub else (a + b > mask)):
        fl |= 0x1
    if bin(r & 0xFF).count("1") % 2 == 0:
        fl |= 0x4
    if (a ^ b ^ r) & 0x10:
        fl |= 0x10
    if r == 0:
        fl |= 0x40
    if r >> (bits - 1):
        fl |= 0x80
    sa, sb, sr = a >> (bits - 1), b >> (bits - 1), r >> (bits - 1)
    if (sa != sb and sr != sa) if sub else (sa == sb and sr != sa):
        fl |= 0x800
    regs.write(R.EFLAGS, fl)
    return length


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


class FullVcpu(RunsCode16, DeprivilegedVcpu):
    event_kind = "callout"

    def __init__(self, machine, trace=None, max_insns: int = 0, verbose: bool = False):
        super().__init__(machine, trace=trace, max_insns=max_insns)
        self.verbose = verbose
        self.tc_hpa = self.alloc.page()
        for _ in range(TC_SIZE // 0x1000 - 1):
            self.alloc.page()
        hv = self.hv_mem
        base_hpa = self.tc_hpa
        self._hv_fetch = False
        self.tc = TCache(lambda a, d: hv.write(base_hpa + (a - TC_WINDOW), bytes(d)), TC_WINDOW,
                         remove_cache=self._remove_cache)
        self.tc.on_flush = self._forget_translations
        self.code = _Code(self)
        self.rt = BtRuntime(self.uc, self.regs, self.tc, self.code, self._read32, self._write32)
        self.rt.on_callout = self._callout_then_window
        self.rt.on_fetch_fault = self._fetch_fault
        self.rt.on_error = self._hook_error
        # 16-bit code (real mode, 16-bit protected mode) runs in place, never translated (bt/direct.py)
        self.direct16 = Direct16(self, KERNEL_RING, HV_CR0, HV_IDTR)
        self.rt.is_kernel = lambda: self.direct16.state is None and self.vcpl() == 0
        if verbose:
            self.rt.translator.trace_translate = self._record_translate
        self._page_frame: dict[int, int] = {}          # linear code page -> guest frame it came from
        self._dirty: set[int] = set()                  # code frames written since they were checked
        self._frame_blocks: dict[int, list] = {}       # guest frame -> blocks translated from it
        self._frame_index: dict[int, dict] = {}        # guest frame -> gpa >> 6 -> [(seq, block)] there
        self._block_seq = 0
        self.rt.translator.on_block = self._new_block
        self._vsnap: dict[str, object] = {}
        self.traced_stores: dict[int, int] = {}        # guest EIP -> traced-page faults (adaptive BT)
        self.adaptive_stores = 0                        # stores done by adaptive callouts instead
        self.code_page_faults = 0                       # stores into frames holding translated code
        inner = self.mmu.fill
        tc_end = TC_WINDOW + TC_SIZE

        def fill(uc, vaddr, access, entry, data):
            if TC_WINDOW <= vaddr < tc_end and access == 18 and (self._hv_fetch or (
                    self.regs.read(R.SS) & 3 == KERNEL_RING and self.direct16.state is None)):
                entry.paddr = base_hpa + ((vaddr - TC_WINDOW) & ~0xFFF)
                entry.perms = UC_PROT_EXEC
                return True
            return inner(uc, vaddr, access, entry, data)
        self.mmu.fill = fill
        self._mmio_decode = False
        self._prefix_len: dict = {}                     # (callout site, bytes) -> prefix length
        self._cpuid_in = R.Batch(self.uc, (R.EAX, R.ECX))
        self._cpuid_out = R.Batch(self.uc, (R.EAX, R.EBX, R.ECX, R.EDX))
        self._rdtsc_out = R.Batch(self.uc, (R.EAX, R.EDX))
        self._guest_fetch_bytes = self.mmu.fetch_bytes
        self.mmu.fetch_bytes = self._fetch_bytes
        # The clock counts each new engine block's instructions: TC blocks are decoded from the TC.
        clock = self.clock
        clock._count_cb = _COUNT_CB(self._count_block)
        clock._state.count_cb = ctypes.cast(clock._count_cb, ctypes.c_void_p).value

    # -- the deprivileging core's hooks ------------------------------------------------------------
    def real_iopl(self, vcpl: int) -> int:
        return 1 if vcpl == 0 else 0

    def enter_kernel(self, guest_eip: int) -> None:
        """Guest-kernel code runs from its translation (made now if needed); 16-bit code in place."""
        if self.direct16.state is not None:
            self.regs.write(R.EIP, guest_eip)
            return
        try:
            self.regs.write(R.EIP, self.rt.lookup(guest_eip))
        except TranslateFault:
            self.regs.write(R.EIP, guest_eip)           # settled (the fetch #PF delivered) before entry

    def after_transfer(self) -> None:
        """A gate or task switch from user code changed virtual-CPU state translations baked in."""
        self._virtual_changed()

    def virtual_field(self, field: str) -> int:
        v = self.v
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

    def _snapshot(self) -> dict:
        v = self.v
        cs = self.regs.read(R.CS)
        if cs & 3 == KERNEL_RING:                      # virtual CPL 0: CS and SS as they are now
            ss = self.regs.read(R.SS)
        else:
            cs, ss = self._vsnap.get("cs"), self._vsnap.get("ss")
        return {"cr0": v.cr0, "cr3": v.cr3, "cr4": v.cr4, "gdtr": v.gdtr, "idtr": v.idtr,
                "ldtr": v.ldtr.selector, "tr": v.tr.selector, "iopl": v.iopl, "cs": cs, "ss": ss}

    def _virtual_changed(self) -> None:
        """After a callout: drop translations that baked in a virtual-CPU value that changed, and
        those whose guest page now maps another frame (CR0/CR3/CR4 writes, invlpg)."""
        snap = self._snapshot()
        old = self._vsnap
        if snap == old:
            return
        self._vsnap = snap
        changed = {k for k in snap if old.get(k) != snap[k]}
        if not old:
            return
        for b in [b for b in self.tc.blocks.values() if b.deps & changed]:
            invalidate(self.tc, b)
        if changed & {"cr0", "cr3", "cr4"}:
            self.check_code_mappings()

    def check_code_mappings(self, only_page: int | None = None) -> None:
        strategy = self.mmu.strategy
        self.mmu.crs = None
        stale = set()
        for page, frame in list(self._page_frame.items()):
            if only_page is not None and page != only_page:
                continue
            gpa, _ = strategy.gva_to_gpa(page, Access.FETCH, False, False)
            if gpa is None or gpa & 0xFFFFF000 != frame:
                stale.add(page)
                del self._page_frame[page]
        if stale:
            for b in list(self.tc.blocks.values()):
                if {b.geip & 0xFFFFF000, (b.gend - 1) & 0xFFFFF000} & stale:
                    invalidate(self.tc, b)

    def _new_block(self, blk) -> None:
        for ins in blk.insns:
            if ins.text in ("sti", "popfd") and ins.kind == INLINE:
                # run natively in the TC: its window hook goes on the TC copy (vcpu.py, IF_SETTERS)
                self.clock.hook_if_setter(ins.tc, ins.text == "sti")
        self._block_seq += 1
        for ins in blk.insns:       # the cost model's translation counts (per translation, not per run)
            self.reasons["translate", ins.kind] += ins.size > 0
        entry = (self._block_seq, blk)
        for frame in blk.frames:
            blocks = self._frame_blocks.setdefault(frame, [])
            if len(blocks) >= 64:
                blocks[:] = [b for b in blocks if b.alive]
            blocks.append(blk)
            index = self._frame_index.setdefault(frame, {})
            for sgpa, raw in blk.source:
                for k in range(sgpa >> 6, ((sgpa + len(raw) - 1) >> 6) + 1 if raw else sgpa >> 6):
                    lst = index.setdefault(k, [])
                    if len(lst) >= 64:
                        lst[:] = [e for e in lst if e[1].alive]
                    lst.append(entry)

    def _forget_translations(self) -> None:
        """The TC was flushed: every block is dead, so what was kept per block and per code page
        goes too (without this, dead blocks stayed referenced and host memory grew with every
        translation ever made). Code frames are untraced; they are traced again when translated."""
        traces = self.mmu.traces
        for frame in self._frame_blocks:
            if frame in traces and CODE in traces.kinds(frame):
                traces.untrace_frame(frame, CODE)
        for frame in self._page_frame.values():
            if frame in traces and CODE in traces.kinds(frame):
                traces.untrace_frame(frame, CODE)
        self._frame_blocks.clear()
        self._frame_index.clear()
        self._page_frame.clear()
        self._dirty.clear()
        self._prefix_len.clear()
        lo, hi = TC_WINDOW, TC_WINDOW + TC_SIZE
        for table in (self.m.block_insns, self._io_sites):
            for a in [a for a in table if lo <= a < hi]:
                del table[a]
        if len(self.traced_stores) > 65536:
            self.traced_stores.clear()
        if len(self.rt.translator.adaptive) > 65536:      # guest EIPs made adaptive: an optimization
            self.rt.translator.adaptive.clear()

    def _note_page(self, page: int, frame: int) -> None:
        self._page_frame[page] = frame
        if frame not in self.mmu.traces or CODE not in self.mmu.traces.kinds(frame):
            self.mmu.traces.trace_frame(frame, CODE, self._code_written)

    # -- coherence: stores into translated frames ------------------------------------------------------
    def _code_written(self, tw) -> bool:
        """A guest store to a frame holding translated code. Simple stores (mov, or/and/xor, xchg,
        stos) are done here and only the translations whose bytes changed are dropped, so that data
        sharing a page with code costs one exit per store; any other store untraces the frame and
        runs again natively, and the frame is checked after the next block."""
        if tw.done:                          # already written (by the hypervisor, or another owner)
            self._check_range(tw.gpa, tw.size or 4)
            return False
        from cpuvirt.cpu.events import Unsupported
        from cpuvirt.x86.emulate import emulate_store
        mmu = self.mmu

        def read(gva, size):
            return int.from_bytes(mmu.read_linear(gva, size, False), "little")

        def write(gva, size, value):
            mmu.write_linear(gva, value.to_bytes(size, "little"), False)   # -> hv_wrote -> _check_range

        if self.vcpl() == 0 and tw.eip is not None and self.direct16.state is None:   # 32-bit forms only
            code = mmu.fetch_bytes(tw.eip, 15)
            try:
                length = self._rep_string(code)
                if length is None:
                    length = _arith_store(code, tw.eip, self.regs, read, write)
                if length is None:
                    length, _, _, _, _ = emulate_store(code, tw.eip, self.regs, read, write)
            except (Unsupported, GuestPageFault):
                pass
            else:
                self.tc.counters.code_stores += 1
                self.regs.write(R.EIP, (tw.eip + length) & 0xFFFFFFFF)
                return True
        frame = tw.gpa & 0xFFFFF000
        self.mmu.traces.untrace_frame(frame, CODE)
        self._dirty.add(frame)
        self.clock.pull_in(self.clock.now)
        return False

    def _rep_string(self, code: bytes) -> int | None:
        """`rep stos` / `rep movs` (flat segments) done here in one go: loaders zero .bss and copy code
        with them, a store per element that would each fault. None: not one of them."""
        p = 0
        wide = rep = False
        while p < len(code) and code[p] in (0x66, 0xF3, 0x3E):
            wide |= code[p] == 0x66
            rep |= code[p] == 0xF3
            p += 1
        if not rep or p >= len(code) or code[p] not in (0xAA, 0xAB, 0xA4, 0xA5):
            return None
        op = code[p]
        size = 1 if op in (0xAA, 0xA4) else (2 if wide else 4)
        regs, mmu = self.regs, self.mmu
        count = regs.read(R.ECX)
        edi, esi = regs.read(R.EDI), regs.read(R.ESI)
        step = -size if regs.read(R.EFLAGS) & R.EFLAGS_DF else size
        n = count * size
        if op in (0xAA, 0xAB):
            value = (regs.read(R.EAX) & ((1 << 8 * size) - 1)).to_bytes(size, "little")
            lo = edi if step > 0 else (edi - n + size) & 0xFFFFFFFF
            mmu.write_linear(lo, value * count, False)
        else:
            if step < 0 or (esi < edi < esi + n):
                for k in range(count):           # backwards or overlapping: element by element
                    d = k * step
                    mmu.write_linear((edi + d) & 0xFFFFFFFF, mmu.read_linear((esi + d) & 0xFFFFFFFF, size), False)
            else:
                mmu.write_linear(edi, mmu.read_linear(esi, n), False)
            regs.write(R.ESI, (esi + count * step) & 0xFFFFFFFF)
        regs.write(R.EDI, (edi + count * step) & 0xFFFFFFFF)
        regs.write(R.ECX, 0)
        return p + 1

    def _check_range(self, gpa: int, size: int) -> None:
        """The guest bytes at gpa .. gpa + size - 1 were written: drop translations that changed."""
        ram, p2m = self.mmu.ram, self.mmu.p2m
        end = gpa + size
        blocks = self._frame_blocks.get(gpa & 0xFFFFF000, ())
        first, last = gpa >> 6, (end - 1) >> 6
        if blocks and last - first < 64:
            # only the blocks whose source bytes share a 64-byte line with the write, in the order
            # they were translated (the order of `blocks`): the others cannot overlap it
            index = self._frame_index.get(gpa & 0xFFFFF000, {})
            found = {}
            for k in range(first, last + 1):
                for seq, b in index.get(k, ()):
                    found[seq] = b
            blocks = [found[k] for k in sorted(found)]
        for b in blocks:
            if not b.alive:
                continue
            for sgpa, raw in b.source:
                if sgpa < end and gpa < sgpa + len(raw):
                    hpa = p2m.gpa_to_hpa(sgpa)
                    if hpa is None or ram.read(hpa, len(raw)) != raw:
                        invalidate(self.tc, b)
                        break

    def check_dirty(self) -> None:
        """Compare the translations from written frames with the guest's bytes now: drop those that
        changed, trace the frames again."""
        if not self._dirty:
            return
        dirty, self._dirty = self._dirty, set()
        ram, p2m = self.mmu.ram, self.mmu.p2m
        traces = self.mmu.traces
        for frame in dirty:
            blocks = [b for b in self._frame_blocks.get(frame, ()) if b.alive]
            for b in blocks:
                for gpa, raw in b.source:
                    hpa = p2m.gpa_to_hpa(gpa)
                    if hpa is None or ram.read(hpa, len(raw)) != raw:
                        invalidate(self.tc, b)
                        break
            blocks = [b for b in blocks if b.alive]
            self._frame_blocks[frame] = blocks
            if blocks:
                traces.trace_frame(frame, CODE, self._code_written)

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

    def _hook_error(self, e: BaseException) -> None:
        self.error = e
        self.uc.emu_stop()

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
            return
        tc_eip, esp = eip, self.regs.read(R.ESP)
        code = self.tc_bytes(eip, 15)
        # the exact linear address is computed from the TC instruction, with the registers as they are
        from cpuvirt.x86.faultaddr import fault_address
        gva = pending.gva if pending.access == 2 else fault_address(code, eip, pending.gva & 0xFFFFF000, self.regs)
        geip = self.guest_position(eip)
        from cpuvirt.memory.traces import TracedWrite
        if type(pending) is TracedWrite:
            pending.gpa = (pending.gpa & ~0xFFF) | (gva & 0xFFF)
            pending.gva, pending.eip = gva, geip
            kinds = self.mmu.traces.kinds(pending.gpa)
            n = 0
            if kinds - {CODE}:                 # a guest page table (shadow paging's trace)
                n = self.traced_stores[geip] = self.traced_stores.get(geip, 0) + 1
            else:
                self.code_page_faults += 1
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

    def _make_adaptive(self, geip: int) -> None:
        """Adaptive BT: a store that keeps faulting on a traced page becomes a callout that does the
        store through the shadow paging (no fault at all)."""
        from cpuvirt.cpu.events import Unsupported
        from cpuvirt.x86.emulate import _store_form
        tr = self.rt.translator
        if geip in tr.adaptive or not hasattr(self.mmu.strategy, "guest_store"):
            return
        try:
            _store_form(self.mmu.fetch_bytes(geip, 15), geip)
        except Unsupported:
            return                       # not a store the callout can do: it keeps faulting
        tr.adaptive.add(geip)
        self.tc.counters.adaptive += 1
        for b in list(self.tc.blocks.values()):
            if any(i.geip == geip and i.size for i in b.insns):
                invalidate(self.tc, b)

    def on_deadline(self, eip: int) -> None:
        self.check_dirty()
        if not (self.tc.contains(eip) and self.rt.is_kernel()):
            super().on_deadline(eip)
            self.settle()
            return
        if self.clock.now >= self.budget:
            self.finish("budget", EXIT_BUDGET, self.budget_message())
            return
        self.m.update_timers()
        pending = self.m.pending_nmi() or self.m.pending_interrupt() is not None
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

    # -- callouts ------------------------------------------------------------------------------------
    def _callout_then_window(self, site) -> int | None:
        try:
            return self._callout(site)
        finally:
            self.clock.if_may_have_changed()      # an emulated iret/popf may have set IF

    def _callout(self, site) -> int | None:
        """Emulate the guest instruction of a callout; returns the guest EIP to go on at (the next
        instruction) or None when the emulation set EIP and the ring itself."""
        ins = site.insn
        geip = ins.geip
        self.mmu.crs = None
        if site.kind == "adaptive":
            self._adaptive_store(geip)
            return None
        if site.kind == "fpu_env":
            self._fpu_pointers_to_guest(geip, site.raw)
            return (geip + ins.size) & 0xFFFFFFFF
        fast = self._special(geip, ins, site)
        if fast is not False:
            return fast
        self.regs.write(R.EIP, geip)
        if self.emulate_at(geip) is None:
            self.finish("error", EXIT_HYPERVISOR_STOP, f"full: no emulation for the guest-kernel instruction "
                        f"'{ins.text}' at {geip:#x}")
            return None
        self._virtual_changed()
        if ins.text.startswith("invlpg"):
            self.check_code_mappings()
        return None

    def _special(self, geip, ins, site):
        """Callouts the core does not emulate: int n / int3 / into, in/out, cpuid, rdtsc. Returns the
        next guest EIP, None (an event was delivered: EIP is set), or False (not one of them)."""
        raw = site.raw
        key = (site, raw)
        p = self._prefix_len.get(key)
        if p is None:
            p = 0
            while p < len(raw) and raw[p] in (0x66, 0x67, 0xF3, 0xF2, 0x2E, 0x3E, 0x26, 0x36, 0x64, 0x65, 0xF0):
                p += 1
            if len(self._prefix_len) > 8192:
                self._prefix_len.clear()
            self._prefix_len[key] = p
        op = raw[p]
        regs = self.regs
        nxt = (geip + ins.size) & 0xFFFFFFFF
        if op == 0x0F and raw[p + 1] == 0xA2:
            leaf, subleaf = self._cpuid_in.read()
            if self.trace is None:
                self.counts[self.event_kind] += 1
                self.reasons[self.event_kind, "cpuid"] += 1
            else:
                self.record(self.event_kind, "cpuid", None, geip, {"leaf": f"{leaf:#x}"}, "emulated: the CPU model")
            self._cpuid_out.write(*self.m.cpuid(leaf, subleaf))
            return nxt
        if op in (0xCD, 0xCC, 0xCE):
            if op == 0xCE and not regs.read(R.EFLAGS) & 0x800:
                return nxt
            # int3 and into are software interrupts too (gate DPL checked), as the engine reports them
            vector = raw[p + 1] if op == 0xCD else (3 if op == 0xCC else 4)
            detail = {"vector": vector, "software": True}
            if op == 0xCD:                  # `int n`: EAX is the system-call number by OS convention
                detail["eax"] = f"{regs.read(R.EAX):#x}"
            self.record("interrupt", f"int {vector:#x}", vector, geip, detail, "delivered through the guest IDT")
            self.deliver(vector, nxt, soft=True, fault_eip=geip)
            return None
        if op in (0xE4, 0xE5, 0xE6, 0xE7, 0xEC, 0xED, 0xEE, 0xEF):
            size = 1 if op & 1 == 0 else (2 if 0x66 in raw[:p] else 4)
            port = raw[p + 1] if op < 0xE8 else regs.read(R.EDX) & 0xFFFF
            is_in = op in (0xE4, 0xE5, 0xEC, 0xED)
            mask = (1 << (8 * size)) - 1
            if is_in:        # a callout runs at virtual CPL 0 (hook_callout checked it)
                value = self.kernel_port_io(port, size, True) & mask
                eax = regs.read(R.EAX)
                regs.write(R.EAX, (eax & ~mask) | value)
            else:
                self.kernel_port_io(port, size, False, regs.read(R.EAX) & mask)
            if self.outcome is not None:
                return None
            return nxt
        if op == 0x0F and (raw[p + 1] in (0x05, 0x07) or (
                raw[p + 1] == 0x01 and p + 2 < len(raw)
                and raw[p + 2] >> 6 == 3 and (raw[p + 2] >> 3) & 7 not in (4, 6))):
            # syscall, sysret, and the 0F 01 register forms this CPU model does not have (vmcall,
            # vmlaunch, monitor, mwait, xgetbv, rdtscp, swapgs...): #UD, as native gives
            self.invalid_opcode(geip)
            return None
        if op == 0xF1:
            # icebp: #DB as a trap (EIP after it), as the engine raises it under native
            self.record("exception", "#DB", 1, geip, {"vector": 1}, "delivered through the guest IDT")
            self.deliver(1, nxt)
            return None
        if op == 0x0F and raw[p + 1] == 0x31:
            if self.trace is None:
                self.counts[self.event_kind] += 1
                self.reasons[self.event_kind, "rdtsc"] += 1
            else:
                self.record(self.event_kind, "rdtsc", None, geip, {}, "emulated: the virtual clock")
            now = self.clock.now
            self._rdtsc_out.write(now & 0xFFFFFFFF, (now >> 32) & 0xFFFFFFFF)
            return nxt
        return False

    def _fpu_pointers_to_guest(self, geip: int, raw: bytes) -> None:
        """After the guest kernel's fnstenv/fnsave/fxsave (done natively in the TC): the stored
        x87 instruction pointer is where the last x87 instruction ran, a TC address; it becomes the
        guest EIP it translates, and FCS the guest's selector (SDM Vol. 1 8.1.8, figures 8-9/8-10 for
        the 32-bit protected-mode layouts; table 10-2 for fxsave's)."""
        fx = raw.lstrip(b"\x9b\x2e\x3e\x26\x36\x64\x65")[:1] == b"\x0f"
        fip_at, fcs_at = (8, 12) if fx else (12, 16)
        try:
            addr = self.memory_operand(geip)
            fip, fcs = struct.unpack("<IH", self.read_guest(addr + fip_at, 4) + self.read_guest(addr + fcs_at, 2))
            g = self.tc.guest_eip(fip) if self.tc.in_code(fip) else None
            if g is not None:
                self.write_guest(addr + fip_at, struct.pack("<I", g[0]))
            self.write_guest(addr + fcs_at, struct.pack("<H", self.guest_selector(fcs)))
        except (GuestFault, GuestPageFault, Unsupported):
            return                       # the store itself would have faulted first: not reached
        if self.trace is None:
            self.counts[self.event_kind] += 1
        else:
            self.record(self.event_kind, "fpu_pointers", None, geip, {"fip": f"{fip:#x}"},
                        "the stored x87 instruction pointer shown as the guest's")

    def _adaptive_store(self, geip: int) -> None:
        """The store of an adaptive callout, done through shadow paging's guest_store."""
        from cpuvirt.x86.emulate import emulate_store
        mmu = self.mmu

        def read(gva, size):
            return int.from_bytes(mmu.read_linear(gva, size, False), "little")

        def write(gva, size, value):
            mmu.strategy.guest_store(gva, size, value)

        try:
            length, gva, size, value, what = emulate_store(mmu.fetch_bytes(geip, 15), geip, self.regs, read, write)
        except GuestPageFault as pf:
            self.v.cr2 = pf.gva
            self.record("page_fault", "#PF", 14, geip, {"cr2": f"{pf.gva:#x}", "error_code": pf.error_code,
                                                        "access": "write", "fault": "true"},
                        "delivered #PF through the guest IDT")
            self.deliver(Vector.PF, geip, pf.error_code)
            return
        self.adaptive_stores += 1
        self.record(self.event_kind, "store", None, geip, {"address": f"{gva:#x}", "size": size,
                                                           "value": f"{value:#x}", "adaptive": True},
                    f"adaptive: {what} through the shadow page tables, no fault")
        self.regs.write(R.EIP, (geip + length) & 0xFFFFFFFF)

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

    def _block_io_sites(self, block: int):
        if not self.tc.in_code(block):
            return super()._block_io_sites(block)
        sites = self._io_sites.get(block)
        if sites is None:
            from cpuvirt.cpu.vcpu import _BLOCK_ENDERS, _IO_MNEMONICS
            sites = []
            for addr, size, mnem, _ in self._cs().disasm_lite(self.tc_bytes(block, 256), block):
                m = mnem.split()[-1]
                if m in _IO_MNEMONICS:
                    sites.append((addr, size, mnem.startswith("rep")))
                if m in _BLOCK_ENDERS:
                    break
            limits.put(self._io_sites, block, sites)
        return sites

    def tc_bytes(self, addr: int, n: int) -> bytes:
        n = max(0, min(n, TC_WINDOW + TC_SIZE - addr))
        return self.hv_mem.read(self.tc_hpa + (addr - TC_WINDOW), n)

    def _count_block(self, address: int, size: int) -> int:
        if not (TC_WINDOW <= address < TC_WINDOW + TC_SIZE) or self.regs.read(R.CS) & 3 != KERNEL_RING:
            return self.m._count_block(address, size)
        try:
            if address < TC_WINDOW + CALLOUT_SLOTS:
                return 1
            insns = list(self._cs().disasm_lite(self.tc_bytes(address, size), address))
            self.forget_block(address)
            if insns:
                last = insns[-1]
                limits.put(self.m.block_insns, address, (tuple(i[0] for i in insns), last[0] + last[1]))
            return max(len(insns), 1)
        except Exception:   # never let an exception cross into C
            return 1

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
        self.record("translate", "block", None, blk.geip,
                    {"guest_insns": sum(1 for i in blk.insns if i.size), "tc": f"{blk.tc:#x}",
                     "tc_bytes": blk.tc_end - blk.tc,
                     "kinds": [i.kind for i in blk.insns if i.size]}, "translated into the TC")

    def stats(self) -> dict:
        return {"tc": self.tc.counters.as_dict(), "traced_store_faults": sum(self.traced_stores.values()),
                "adaptive_stores": self.adaptive_stores, "code_page_faults": self.code_page_faults}


class FullMode(Mode):
    name = "full"
    description = "binary translation: kernel code translated into a TC at ring 1, user code direct"

    def __init__(self, machine, trace=None, max_insns: int = 0, verbose: bool = False, observer=None):
        """`verbose`: record a `translate` event per block; `observer(mode)`: called once built (the
        `bt` verb and tests look at the translation cache after the run)."""
        self.machine = machine
        self.vcpu = FullVcpu(machine, trace=trace, max_insns=max_insns, verbose=verbose)
        if observer is not None:
            observer(self)
        self.vcpu.install_hooks()
        self.vcpu.enable_io_gate()
        self.vcpu.intercepts.wanted |= WANTED          # real mode's way out (bt/direct.py)
        from cpuvirt.memory.shadow import ShadowPaging
        self.shadow = ShadowPaging(machine.mmu)       # installs itself as the memory strategy
        self.shadow.attach(self.vcpu)

    def translation_stats(self) -> dict:
        """The translation cache's counters, for `run --stats` (runner.RunResult.mmu["translation"])."""
        return self.vcpu.stats()

    def boot(self) -> None:
        vcpu, mmio = self.vcpu, self.machine.mmio
        inner = mmio.on_access
        if inner is not None:
            # The MMIO trace finds the accessing instruction by decoding the running engine block,
            # which is TC code: let it read the TC while it does (see FullVcpu.fetch_bytes).
            def on_access(*args):
                vcpu._mmio_decode = True
                try:
                    return inner(*args)
                finally:
                    vcpu._mmio_decode = False
            mmio.on_access = on_access
        self.vcpu.deprivilege()
        self.vcpu._vsnap = self.vcpu._snapshot()
