"""Seeing sensitive instructions that do not trap in the engine (DESIGN.md section 3).

At ring 0 Unicorn executes `mov cr3`, `hlt`, `invlpg`, `lgdt`, `rdmsr`... without telling anyone, yet a
VMCS control, or a deprivileging hypervisor, must see them. The way used here:

- Every new block goes through the clock's block-count callback, which decodes it anyway: an instance
  found there without a hook gets one, and the engine is stopped before the block runs so that it is
  translated again with the hook (`retranslate`). Only instructions that run get hooks: one stop per
  new block that holds one, against the false positives of scanning bytes (kvm-unit-tests' vmexit:
  447 hooks, 171 of them `hlt` decoded from data, against 27; the engine walks every hook at each
  hooked instruction, so its CR-write loops ran 2.2x faster with 27).
- The clock knows a block by (linear address, length) and counts it again whenever the engine
  translates it again (engine/_vclock.c), and drops its counts of a linear page's blocks when that page
  first serves fetches from another frame (another process's code at the same address, a page reused:
  Mmu.on_code_remap), so every frame's code is seen by the block check as it runs. Such pages were
  also scanned for opcode bytes once (the second line from before that drop): decoding at every
  candidate offset hooked bytes that never run as instructions (xv6's usertests under hw: 217 hooks,
  95 of them `hlt` decoded from user pages, against 27 without the scan; the engine walked all of
  them at every hooked instruction, 12% of the host's time) and found nothing the block check missed.
- A hook that fires re-checks the instruction's bytes, because the same linear address may hold other
  code after a CR3 switch or a rewrite: xv6's processes all run at linear 0.
- Hooks are bounded (the engine walks all of them at every translated instruction): the guest is
  stopped at limits.INTERCEPT_SITES, aligned-SSE sites have their own cap (cpu/ssealign.py).
"""

from __future__ import annotations

from typing import Callable

from capstone import CS_ARCH_X86, CS_MODE_16, CS_MODE_32, Cs

from cpuvirt import limits
from cpuvirt.cpu import ssealign

# Instruction prefixes (SDM Vol. 2, 2.1.1).
PREFIXES = frozenset(b"\x66\x67\xf2\xf3\x2e\x3e\x26\x36\x64\x65\xf0")

# Far transfers that may change privilege or task (cpu/tasks.py): jmp/call ptr16:32, jmp/call m16:32 and
# iret. Every mode sees them.
FAR_TRANSFERS = frozenset(("ljmp", "lcall", "jmp", "call", "iret", "iretd"))


def is_far_transfer(mnem: str, ops: str) -> bool:
    """capstone's names: ljmp/lcall (direct, or 16-bit indirect), `jmp ptr [m]` / `call ptr [m]`
    (32-bit indirect far: a near indirect one says `dword ptr`), iret/iretd."""
    if mnem in ("jmp", "call"):
        return ops.startswith("ptr ")
    return mnem in FAR_TRANSFERS


def _is_wanted(mnem: str, ops: str, wanted: frozenset[str]) -> bool:
    if ssealign.MARKER in wanted and ssealign.is_aligned_sse(mnem, ops):
        return True
    if mnem in wanted:
        if mnem in ("jmp", "call"):
            return ops.startswith("ptr ")
        if mnem == "mov":
            return ("cr" in ops or "dr" in ops) and ("mov cr4" not in wanted or ops.startswith("cr4,"))
        return True
    return False


class Intercepts:
    """One-address code hooks on the instructions in `wanted` (capstone mnemonics; "mov" means a mov
    to or from a control or debug register; adding "mov cr4" narrows that to mov to CR4).
    `on_hit(address, size, mnemonic, op_str)` runs before the
    instruction executes; it may move EIP past it (the instruction is then skipped) or leave it to run.
    With ssealign.MARKER in `wanted`, the legacy-SSE instructions that require an aligned m128 operand
    are hooked too (cpu/ssealign.py), in C when `sse` is set."""

    def __init__(self, hooks, mmu, wanted: frozenset[str], on_hit):
        self.hooks = hooks  # the owner's EngineHooks: each site's code hook runs under the guard
        self.mmu = mmu
        self.wanted = wanted
        self.on_hit = on_hit
        # linear address -> (size, mnemonic, operands, the instruction's bytes): a cache of decodes
        self.sites: dict[int, tuple[int, str, str, bytes]] = {}
        self.hooked: set[int] = set()  # addresses with a hook (at most limits.INTERCEPT_SITES)
        self.page_frame: dict[int, int] = {}  # linear code page -> the frame it last fetched from
        self.shared_pages: dict[int, bool] = {}  # linear pages that held code from several frames
        self.retranslate: list[tuple[int, int]] = []
        self._cs = Cs(CS_ARCH_X86, CS_MODE_32)
        # (address, size, mnemonic, operands, code, python hook) -> True when it put a C hook in front
        # of the site's _hit (cpu/fastdelivery.py: the common iret and mov to CR4)
        self.fast_site: Callable[..., bool] | None = None
        self._cs16 = Cs(CS_ARCH_X86, CS_MODE_16)
        self.code16: Callable[[], bool] | None = None  # is the guest running 16-bit code now? (real mode)
        self.sse: ssealign.SseAlign | None = None  # the C hook of aligned-SSE sites
        self.on_limit: Callable[[str], None] | None = None  # told once when limits.INTERCEPT_SITES is reached
        self._hit_function = None  # the guarded ctypes function of _hit, made once

    # -- code frames and blocks ------------------------------------------------------------------
    def note_frame(self, page: int, hpa: int) -> None:
        """A (linear page, host frame) pair serves a fetch (Mmu.fill; the C fills answer only the pair
        Python saw last). A page seen with a second frame has its SSE sites checked in Python from then
        on: the C checks compare bytes in the frame they were decoded from, which proves nothing now."""
        last = self.page_frame.get(page)
        if last == hpa:
            return
        limits.put(self.page_frame, page, hpa)
        if last is not None and page not in self.shared_pages:
            limits.put(self.shared_pages, page, True)
            if self.sse is not None:
                self.sse.python_only(page, page + 0x1000)

    def check_block(self, insns) -> bool:
        """Called with a newly seen block's instructions; True if one lacked a hook (retranslate it).
        An instance already hooked whose bytes changed is decoded again (its C check re-aimed)."""
        missing = False
        for addr, size, mnem, ops in insns:
            if not _is_wanted(mnem, ops, self.wanted):
                continue
            code = self.mmu.fetch_bytes(addr, size) or b""
            if addr not in self.hooked:
                missing |= self._hook(addr, size, mnem, ops, code, self._code_pointer(addr, size))
            else:
                site = self.sites.get(addr)
                if site is None or site[3] != code:
                    self._rehook(addr, (size, mnem, ops, code))
        return missing

    def check_code(self, address: int, code: bytes) -> bool:
        """check_block for code the clock counted without showing it to the observer (a hypervisor's
        own run of it); True if an instance needs its block translated again."""
        return self.check_block(list(self._cs.disasm_lite(code, address)))

    def _ram_pointer(self, hpa: int) -> int:
        ram = self.mmu.ram
        return ram.host_address + (hpa - ram.hpa) if ram.contains(hpa) else 0

    def _code_pointer(self, addr: int, size: int) -> int:
        """Where the instruction at linear `addr` is in host memory now (0: not one guest-RAM frame, or
        a page that held several frames' code), found without side effects."""
        if (addr & 0xFFF) + size > 0x1000 or (addr & ~0xFFF) in self.shared_pages:
            return 0
        c = self.mmu.counters
        walks, refs = c.walks, c.walk_refs
        try:
            hpa = self.mmu.gva_to_hpa(addr, 2, False, side_effects=False)  # 2: a fetch
        except Exception:  # noqa: BLE001 - a fault, a nested fault: no pointer, Python checks it
            hpa = None
        finally:
            c.walks, c.walk_refs = walks, refs
        return 0 if hpa is None or not self.mmu.ram.contains(hpa, size) else self._ram_pointer(hpa)

    def _hook(self, addr: int, size: int, mnem: str, ops: str, code: bytes, code_ptr: int = 0) -> bool:
        """Put a hook on the instance at `addr`; False when none was added (the SSE cap). At
        limits.INTERCEPT_SITES the guest is stopped instead (`on_limit`), before the block runs."""
        limits.put(self.sites, addr, (size, mnem, ops, code))
        if addr in self.hooked:
            return False
        if len(self.hooked) >= limits.INTERCEPT_SITES:
            if self.on_limit is not None:
                self.on_limit(
                    f"more than {limits.INTERCEPT_SITES:,} intercepted instruction sites "
                    "(the hypervisor's bound on code hooks: docs/security.md)"
                )
            return True  # the block is dropped before it runs (check_block), and the guest stopped
        if self._hit_function is None:
            self._hit_function = self.hooks.code_function(self._hit)
        if self.sse is not None and ssealign.is_aligned_sse(mnem, ops):
            if not self.sse.site(addr, size, code, self._hit_function, code_ptr):
                return False  # beyond limits.SSE_SITES: not checked
            self.hooked.add(addr)
            return True
        self.hooked.add(addr)
        # a C hook answers the common iret or mov to CR4 and hands the rest to _hit (cpu/fastdelivery.py)
        if self.fast_site is not None and self.fast_site(addr, size, mnem, ops, code, self._hit_function):
            return True
        self.hooks.code(self._hit, addr, addr)
        return True

    def _rehook(self, address: int, site: tuple[int, str, str, bytes]) -> None:
        """The code at a hooked address changed: remember the new instruction, and re-aim its C SSE
        check (it may be another instruction now, or an aligned-SSE one with another operand)."""
        limits.put(self.sites, address, site)
        if self.sse is not None and address in self.sse.sites:
            self.sse.site(address, site[0], site[3], None, self._code_pointer(address, site[0]))

    # -- a hooked instruction is about to run ----------------------------------------------------------
    def _hit(self, uc, address, size, _data) -> None:
        site = self.sites.get(address)
        if site is None or site[0] != size or (self.mmu.fetch_bytes(address, size) or b"") != site[3]:
            code = self.mmu.fetch_bytes(address, 15) or b""
            site = None
            cs = self._cs16 if self.code16 is not None and self.code16() else self._cs
            for _, sz, mnem, ops in cs.disasm_lite(code, address, 1):
                site = (sz, mnem, ops, code[:sz])
            if site is None:
                return
            self._rehook(address, site)
        if _is_wanted(site[1], site[2], self.wanted):
            self.on_hit(address, site[0], site[1], site[2])
