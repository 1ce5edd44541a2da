"""Translations kept true to the guest (mode `full`): stores into translated code, changed mappings,
changed virtual-CPU state.

Each guest frame a block was translated from is write-traced (kind CODE). A store there is done by the
hypervisor when it is a simple one, and only the blocks whose source bytes changed are invalidated
(bt/coherence.py); otherwise the frame is untraced and checked after the next block. A block that baked
in a virtual-CPU value (CR0, CR3, CR4, descriptor tables, CS, SS, IOPL) goes when that value changes, and
one whose linear page maps another frame goes when CR3 or the page tables say so.
A mixin of FullVcpu (vcpu.py): it works on the vCPU's TC, MMU and registers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from cpuvirt.bt.coherence import invalidate
from cpuvirt.bt.translate import IDENT, INLINE
from cpuvirt.cpu.deprivilege import KERNEL_RING
from cpuvirt.engine import regs as R
from cpuvirt.memory.mmu import GuestPageFault
from cpuvirt.memory.types import Access
from cpuvirt.modes.full.inplace import InPlaceBlocks
from cpuvirt.x86.emulate import arith_store
from cpuvirt.x86.flags import CR0_PE, CR0_PG, CR4, CR4_PSE, CR4_SMEP, EFLAGS_DF

if TYPE_CHECKING:  # a mixin of FullVcpu (vcpu.py): mypy reads it against the deprivileging vCPU
    from cpuvirt.bt.direct import Direct16
    from cpuvirt.bt.fastcallout import CodeLines
    from cpuvirt.bt.runtime import BtRuntime
    from cpuvirt.bt.tcache import TCache
    from cpuvirt.cpu.deprivilege import DeprivilegedVcpu as _VcpuBase
    from cpuvirt.modes.full.crfast import CrState
    from cpuvirt.modes.full.evfast import FullEvents
else:
    _VcpuBase = object

CODE = "code"  # the write-trace kind of translated guest frames
CR4_PAE = CR4.PAE.value


class Coherence(_VcpuBase):
    """The per-frame bookkeeping of what was translated from where, and the checks that use it."""

    # FullVcpu's state this mixin keeps (vcpu.py sets each up)
    tc: TCache
    rt: BtRuntime
    traced_stores: dict[int, int]
    code_store_faults: dict[int, int]
    code_lines: CodeLines | None
    _page_frame: dict[int, int]
    _dirty: set[int]
    _frame_blocks: dict[int, list]
    _frame_index: dict[int, dict]
    _dep_blocks: dict[str, list]  # virtual-CPU field -> [(seq, block)] that baked it in
    _maps_snap: tuple | None  # (_maps_key, [(hpa, bytes)] of the paging frames) at the last full check
    crfast: CrState | None  # crfast.py: the C table's mov-to-CR state
    evfast: FullEvents | None  # evfast.py: the kernel's segment loads, CR2 reads and iretd in C
    _block_seq: int
    _vsnap: dict[str, object]
    _prefix_len: dict
    sse_tc_site: Callable[[Any], None]
    _untraced_run: dict[int, int]
    _native_after: dict[int, int]
    direct16: Direct16
    in_place: InPlaceBlocks | None  # inplace.py: the blocks run in place, by frame

    # -- virtual-CPU state and mappings baked into translations --------------------------------------------
    def _snapshot(self) -> dict:
        v = self.virtual_cpu
        cs = self.regs.read(R.CS)
        if cs & 3 == KERNEL_RING:  # virtual CPL 0: CS and SS as they are now
            ss = self.regs.read(R.SS)
        else:
            cs, ss = self._vsnap.get("cs"), self._vsnap.get("ss")
        return {
            "cr0": v.cr0,
            "cr3": v.cr3,
            "cr4": v.cr4,
            "gdtr": v.gdtr,
            "idtr": v.idtr,
            "ldtr": v.ldtr.selector,
            "tr": v.tr.selector,
            "iopl": v.iopl,
            "cs": cs,
            "ss": ss,
        }

    def _virtual_changed(self) -> None:
        """After a callout: drop translations that baked in a virtual-CPU value that changed, and
        those whose guest page now maps another frame (CR0/CR3/CR4 writes, invlpg)."""
        snap = self._snapshot()
        old = self._vsnap
        cr = self.crfast
        if cr is not None and old:
            old["cr0"], old["cr4"] = cr.t.snap[0], cr.t.snap[1]  # the C hook checked its own writes
        if snap == old:
            return
        self._vsnap = snap
        if self.evfast is not None:
            self.evfast.snapshot(snap)
        if cr is not None:
            cr.t.snap[0], cr.t.snap[1] = snap["cr0"], snap["cr4"]
        changed = {k for k in snap if old.get(k) != snap[k]}
        if not old:
            return
        # the live blocks that baked in a changed field, in translation order (the TC's own order)
        found = {}
        for field in changed:
            deps = self._dep_blocks.pop(field, None)
            if deps:
                for seq, b in deps:
                    if b.alive:
                        found[seq] = b
        for seq in sorted(found):
            invalidate(self.tc, found[seq])
        if cr is not None:
            cr.deps(self._dep_blocks)
        if changed & {"cr0", "cr3", "cr4"}:
            self.check_code_mappings()

    def check_code_mappings(self, only_page: int | None = None) -> None:
        """Drop the translations whose linear page now maps another frame (or nothing). Skipped when
        the paging mode, CR3 and every page-table frame the last full check walked through hold what
        they held then: the walks would find what they found (CR0.WP and CR4.PGE toggles)."""
        if only_page is None and self._maps_unchanged():
            return
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
        if only_page is None:
            self._maps_snapshot()

    def _maps_key(self) -> tuple[int, int, int]:
        v = self.virtual_cpu
        return v.cr0 & (CR0_PG | CR0_PE), v.cr3, v.cr4 & (CR4_PSE | CR4_PAE | CR4_SMEP)

    def _set_maps(self, snap) -> None:
        self._maps_snap = snap
        if self.rt.fast is not None:
            ram = self.mmu.ram
            self.rt.fast.publish_maps(snap, lambda hpa: ram.host_address + (hpa - ram.hpa))

    def _maps_snapshot(self) -> None:
        """Keep the bytes of the page directory and page tables that map the code pages (32-bit
        paging; PAE is walked every time)."""
        self._set_maps(None)
        key = self._maps_key()
        cr0, cr3, cr4 = key
        frames: set[int] = set()
        if cr0 & CR0_PG:
            if cr4 & CR4_PAE:
                return
            mmu = self.mmu
            pd = cr3 & 0xFFFFF000
            frames.add(pd)
            for page in self._page_frame:
                pde = mmu.read_gpa32(pd | ((page >> 20) & 0xFFC))
                if pde & 1 and not (pde & 0x80 and cr4 & CR4_PSE):
                    frames.add(pde & 0xFFFFF000)
        snap = []
        for frame in sorted(frames):
            hpa = self.mmu.p2m.gpa_to_hpa(frame)
            if hpa is None or not self.mmu.ram.contains(hpa, 0x1000):
                return
            snap.append((hpa, self.mmu.ram.read(hpa, 0x1000)))
        self._set_maps((key, snap))

    def _maps_unchanged(self) -> bool:
        s = self._maps_snap
        if s is None or s[0] != self._maps_key():
            return False
        ram = self.mmu.ram
        return all(ram.read(hpa, 0x1000) == data for hpa, data in s[1])

    def _new_block(self, blk) -> None:
        for ins in blk.insns:
            if ins.text in ("sti", "popfd") and ins.kind == INLINE:
                # run natively in the TC: its window hook goes on the TC copy (vcpu.py, IF_SETTERS)
                self.clock.hook_if_setter(ins.tc, ins.text == "sti")
            elif ins.kind == IDENT and "xmmword" in ins.text:
                self.sse_tc_site(ins)  # the alignment check on the TC copy (vcpu.py)
        self._block_seq += 1
        reasons = self._reasons
        for ins in blk.insns:  # the cost model's translation counts (per translation, not per run)
            reasons["translate", ins.kind] += ins.size > 0
        entry = (self._block_seq, blk)
        for field in blk.deps:
            self._dep_blocks.setdefault(field, []).append(entry)
        if blk.deps and self.crfast is not None:
            self.crfast.deps(self._dep_blocks)
        for frame in blk.frames:
            blocks = self._frame_blocks.setdefault(frame, [])
            if len(blocks) >= 64:
                blocks[:] = [b for b in blocks if b.alive]
            blocks.append(blk)
            index = self._frame_index.setdefault(frame, {})
            for sgpa, raw in blk.source:
                if self.code_lines is not None:
                    self.code_lines.mark_tc(sgpa, len(raw))
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
        if self.rt.fast is not None:
            self.rt.fast.clear()  # slot numbers are reused: every slot goes back to Python
        self._frame_blocks.clear()
        self._frame_index.clear()
        if self.code_lines is not None:
            self.code_lines.clear_tc()
        self._dep_blocks.clear()
        self._page_frame.clear()
        self._set_maps(None)
        if self.crfast is not None:
            self.crfast.deps(self._dep_blocks)
        self._dirty.clear()
        self._prefix_len.clear()
        lo, hi = self.tc.base, self.tc.end  # the TC window
        for table in (self.machine.block_insns, self._io_sites):
            for a in [a for a in table if lo <= a < hi]:
                del table[a]
        if len(self.traced_stores) > 65536:
            self.traced_stores.clear()
        if len(self.code_store_faults) > 65536:
            self.code_store_faults.clear()
        if len(self.rt.translator.adaptive) > 65536:  # guest EIPs made adaptive: an optimization
            self.rt.translator.adaptive.clear()
            self._untraced_run.clear()
        if len(self._native_after) > 65536:
            self._native_after.clear()

    def _note_page(self, page: int, frame: int) -> None:
        if self._page_frame.get(page) != frame and self._maps_snap is not None:
            self._set_maps(None)  # a page the last snapshot did not cover
        self._page_frame[page] = frame
        if frame not in self.mmu.traces or CODE not in self.mmu.traces.kinds(frame):
            self.mmu.traces.trace_frame(frame, CODE, self._code_written)

    # -- coherence: stores into translated frames ------------------------------------------------------
    def _code_written(self, tw) -> bool:
        """A guest store to a frame holding translated code. Simple stores (mov, or/and/xor, xchg,
        stos) are done here and only the translations whose bytes changed are dropped, so that data
        sharing a page with code costs one exit per store; any other store untraces the frame and
        runs again natively, and the frame is checked after the next block."""
        if tw.done:  # already written (by the hypervisor, or another owner)
            self._check_range(tw.gpa, tw.size or 4)
            return False
        from cpuvirt.status import Unsupported
        from cpuvirt.x86.emulate import emulate_store

        mmu = self.mmu

        def read(gva, size):
            return int.from_bytes(mmu.read_linear(gva, size, False), "little")

        def write(gva, size, value):
            mmu.write_linear(gva, value.to_bytes(size, "little"), False)  # -> hv_wrote -> _check_range

        if self.vcpl() == 0 and tw.eip is not None and self.direct16.state is None:  # 32-bit forms only
            code = mmu.fetch_bytes(tw.eip, 15)
            try:
                length = self._rep_string(code)
                if length is None:
                    length = arith_store(code, tw.eip, self.regs, read, write)
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
        step = -size if regs.read(R.EFLAGS) & EFLAGS_DF else size
        n = count * size
        if op in (0xAA, 0xAB):
            value = (regs.read(R.EAX) & ((1 << 8 * size) - 1)).to_bytes(size, "little")
            lo = edi if step > 0 else (edi - n + size) & 0xFFFFFFFF
            mmu.write_linear(lo, value * count, False)
        else:
            if step < 0 or (esi < edi < esi + n):
                for k in range(count):  # backwards or overlapping: element by element
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
        if self.in_place is not None and not self._flush_translations:
            page, end = gpa & 0xFFFFF000, gpa + size
            while page < end:
                hpa = p2m.gpa_to_hpa(page)
                lo = max(gpa, page) - page
                if hpa is not None and self.in_place.overlaps(hpa, lo, min(end, page + 0x1000) - page - lo):
                    # The engine ran code from these bytes in place (ring 3, 16-bit code) and does not
                    # see the hypervisor's stores: its translations go before the guest runs again
                    # (modes/full/inplace.py; tests/test_io_gate.py: a site rewritten into `out`).
                    self._flush_translations = True
                    self.clock.pull_in(self.clock.now)
                    break
                page += 0x1000
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
