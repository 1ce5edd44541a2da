"""The glue between translated code and the hypervisor: callouts, chaining, inline-cache fills.

One UC_HOOK_CODE covers the TC's callout area. Translated code reaches a callout by jumping to its slot;
the hook (`hook_callout`) reads the slot's Site and:
- chain: translates the target (or finds it), patches the jump that led here, continues there;
- ret / jmp_ind / call_ind (an inline-cache miss): finds the guest target on the stack, does what the
  branch does to ESP and the stack, fills an inline-cache entry, continues at the target's translation;
  a site that keeps missing has its block invalidated, to be translated again with a wider cache;
- sensitive / adaptive: hands the guest instruction to the hypervisor (`on_callout`), which emulates it
  (guest registers, guest EIP), then continues at the translation of the new guest EIP.
The engine is never stopped for any of these.
"""

from __future__ import annotations

from typing import Callable

from cpuvirt.bt.coherence import invalidate
from cpuvirt.bt.fastcallout import ADAPTIVE, INVLPG, PYTHON, FastCallouts
from cpuvirt.bt.tcache import CALLOUT_SLOTS, Block, Site, TCache
from cpuvirt.bt.translate import GuestCode, TranslateFault, Translator
from cpuvirt.engine import regs as R
from cpuvirt.engine.hooks import EngineHooks


def _no_callout(site: Site) -> int | None:
    raise RuntimeError(f"{site.kind} callout before the mode installed on_callout")


class BtRuntime:
    def __init__(
        self,
        hooks: EngineHooks,
        regs: R.Regs,
        tc: TCache,
        code: GuestCode,
        read32,
        write32,
        kernel_ring: int | None = None,
    ):
        """`hooks`: the owner's EngineHooks; the callout hook runs under their guard (an exception stops
        the engine and is kept as the owner's `error`). `kernel_ring`: the real ring translated code
        runs at (the C callout hook serves that ring only; None: not known, is_kernel decides)."""
        self.uc = hooks.owner.uc
        self.regs = regs
        self.tc = tc
        self.translator = Translator(tc, code)
        self.read32, self.write32 = read32, write32
        # callback(site) for sensitive instructions: emulate, set guest EIP; the mode installs it
        self.on_callout: Callable[[Site], int | None] = _no_callout
        # callback(TranslateFault, guest_eip) -> False when the run stops
        self.on_fetch_fault: Callable[[TranslateFault, int], bool] | None = None
        self.is_kernel = lambda: True  # is the guest now at virtual CPL 0 (its code runs translated)?
        # the same, asked at a callout slot: the mode may answer it more cheaply there
        self.is_kernel_at_slot = lambda: self.is_kernel()
        self.current: Site | None = None  # the Site being served (the hypervisor's view of "where")
        # A callout the mode served may be linked (served in C from then on: fastcallout.py): the
        # mode sets link_as to its kind while serving it, and the runtime links once it knows where
        # the guest goes on.
        self.link_as = PYTHON
        self.link_arg = 0  # the site's ModRM byte (mov to CR) or imm8 port (in/out)
        self.link_io = 0  # an in/out's size | IO_DX (fastcallout.py)
        # a site that sets EIP itself (the kernel's segment loads, CR2 reads, iretd: modes/full/evfast.py)
        # is linked to the translation of link_geip, or, when None, to none (an iretd to ring 3)
        self.link_geip: int | None = None
        # an adaptive store (ADAPTIVE) or invlpg (INVLPG): its form (x86/emulate.py store_site, memory_site) and,
        # for a store, its site's untraced run and the run that makes it native (FastCallouts.link_store)
        self.link_store: tuple[tuple, int, int] | None = None
        self._slot = 0  # the callout slot being served (`slot`)
        python_hook = hooks.code_function_with_data(self._hook_callout_from_c)
        self.fast = FastCallouts.install(self.uc, tc.base, python_hook, kernel_ring)
        if self.fast is None:
            self._hook = hooks.code(self.hook_callout, tc.base, tc.base + CALLOUT_SLOTS - 1)
        else:
            tc.on_invalidate = self.fast.unlink

    # -- guest EIP -> TC --------------------------------------------------------------------------------
    def lookup(self, geip: int) -> int:
        """TC address of the translation of a guest EIP, translating on demand."""
        c = self.tc.counters
        c.lookups += 1
        b = self.tc.blocks.get(geip)
        if b is None or not b.alive:
            c.misses += 1
            b = self.translator.translate(geip)
        return b.tc

    @property
    def slot(self) -> int:
        """The callout slot being served (set as a callout comes in)."""
        return self._slot

    def enter(self, geip: int | None = None) -> bool:
        """Point EIP at the translation of the guest EIP in EIP (or `geip`), if the guest kernel runs.
        A fetch fault is delivered (on_fetch_fault) and the handler entered in turn; each delivery
        spends budget, and the loop ends as soon as on_fetch_fault says the run stops (False)."""
        regs = self.regs
        while True:
            eip = regs.read(R.EIP) if geip is None else geip
            if not self.is_kernel() or self.tc.contains(eip):
                if geip is not None:
                    regs.write(R.EIP, eip)
                return True
            try:
                regs.write(R.EIP, self.lookup(eip))
                return True
            except TranslateFault as f:
                regs.write(R.EIP, eip)
                if self.on_fetch_fault is None:
                    raise
                if not self.on_fetch_fault(f, eip):  # delivers #PF: EIP is now the handler's (guest) EIP
                    return False
                geip = None

    def install_stub(self, geip: int, code: bytes) -> int:
        """A hand-written fragment standing for the translation of `geip` (tests, exits)."""
        b = Block(geip)
        b.tc = self.tc.emit(code)
        b.tc_end = b.tc + len(code)
        self.tc.add(b)
        return b.tc

    # -- the callout hook ---------------------------------------------------------------------------------
    def hook_callout(self, uc, address, _size, _data) -> None:
        site = self.tc.site_at(address)
        if site is None or not self.is_kernel_at_slot():
            return  # guest user code at these linear addresses: not ours
        self.current = site
        self._slot = address
        try:
            self._serve(site)
        finally:
            self.current = None

    def _hook_callout_from_c(self, address: int, kernel) -> None:
        """The slots the C hook hands on (fastcallout.py); `kernel` 2: the guest kernel runs (it read
        CS's RPL, and no 16-bit code runs in place), 1: it does not, 3: ask is_kernel_at_slot."""
        site = self.tc.site_at(address)
        if site is None or kernel == 1 or (kernel != 2 and not self.is_kernel_at_slot()):
            return  # guest user code at these linear addresses: not ours
        self.current = site
        self._slot = address
        try:
            self._serve(site)
        finally:
            self.current = None

    def _serve(self, site) -> None:
        regs, tc, c = self.regs, self.tc, self.tc.counters
        kind = site.kind
        if kind == "chain":
            flushes = c.flushes
            try:
                dest = self.lookup(site.target)
            except TranslateFault as f:
                self._fetch_fault(f, site.target)
                return
            if c.flushes == flushes:  # after a flush the jump that led here is gone
                c.chain_patches += 1
                tc.patch_rel32(site.patch_at, dest)
            regs.write(R.EIP, dest)
            return
        if kind in ("ret", "jmp_ind", "call_ind"):
            c.ic_misses += 1
            esp = regs.read(R.ESP)
            target = self.read32(esp)
            if kind == "ret":
                regs.write(R.ESP, (esp + 4 + site.pop) & 0xFFFFFFFF)
            elif kind == "jmp_ind":
                regs.write(R.ESP, (esp + 4) & 0xFFFFFFFF)
            else:
                self.write32(esp, site.ret_addr)
            flushes = c.flushes
            try:
                dest = self.lookup(target)
            except TranslateFault as f:
                self._fetch_fault(f, target)
                return
            if c.flushes == flushes:
                self.translator.fill_ic(site, target, dest)
                if self.translator.widen(site):
                    invalidate(tc, site.block)  # translated again, its inline cache a tree, when next reached
            regs.write(R.EIP, dest)
            return
        # a sensitive instruction: the hypervisor emulates it (guest registers, guest EIP) and says
        # where the guest kernel goes on, or None when it set EIP itself (an event, iret, a stop)
        c.callouts += 1
        self.link_as, self.link_io = PYTHON, 0
        flushes = c.flushes
        nxt = self.on_callout(site)
        if nxt is None:
            self.enter()
            if self.link_as != PYTHON and c.flushes == flushes and self.fast is not None and site.block.alive:
                self._link_event(site)
            return
        flushes = c.flushes
        try:
            dest = self.lookup(nxt)
        except TranslateFault as f:
            self._fetch_fault(f, nxt)
            return
        regs.write(R.EIP, dest)
        if self.link_as != PYTHON and c.flushes == flushes and self.fast is not None:
            b = tc.blocks.get(nxt)
            if b is not None and b.tc == dest and site.block.alive:
                self.fast.link(self._slot, self.link_as, dest, b, self.link_arg, self.link_io)

    def _link_event(self, site) -> None:
        """Link a site that set EIP itself (no look-up here: the counters stay the Python path's)."""
        fast = self.fast
        assert fast is not None
        g = self.link_geip
        if g is None:  # no translation to go on at (an iretd to ring 3)
            if fast.linked_as(self._slot) != self.link_as:
                fast.link(self._slot, self.link_as, 0, site.block, 0)
            return
        b = self.tc.blocks.get(g)
        if b is not None and b.alive:
            if self.link_as in (ADAPTIVE, INVLPG):
                assert self.link_store is not None
                fast.link_store(self._slot, *self.link_store)
            fast.link(self._slot, self.link_as, b.tc, b, self.link_arg, geip=g)

    def _fetch_fault(self, f: TranslateFault, geip: int) -> None:
        self.regs.write(R.EIP, geip)
        if self.on_fetch_fault is None:
            raise f
        if self.on_fetch_fault(f, geip):
            self.enter()
