"""What Unicorn keeps inside its saved context that cpuvirt needs, and the escalation workaround.

Unicorn never marks a fault handed to a hook as delivered (unicorn issue #1883): the second
contributory fault in one Uc arrives as #DF and the third silently ends emulation. The fix is to
clear QEMU's `old_exception` in the CPU state after each fault we deliver ourselves, through
context_save/context_restore. The same saved state also holds the fault's `error_code` and whether it
came from `int n` (`exception_is_int`), which the hook is not told.

The offsets of those fields in the context blob depend on the Unicorn build, so they are found once
per process by running two tiny probes and diffing the blobs (never hard-coded).
"""

from __future__ import annotations

import ctypes
import struct
from dataclasses import dataclass
from functools import lru_cache

from unicorn import UC_HOOK_BLOCK, UC_HOOK_INTR
from unicorn import x86_const as X

from cpuvirt.engine.internals import new_engine, probing
from cpuvirt.engine.regs import bare

# called with (c_void_p handle, uc_context pointer) only: no argtypes conversion (engine/regs.py bare)
_context_save, _context_restore = bare("uc_context_save"), bare("uc_context_restore")


@dataclass(frozen=True)
class ContextLayout:
    error_code: int
    exception_is_int: int
    old_exception: int
    size: int
    hflags: int  # QEMU's env->hflags; bit 3 (HF_INHIBIT_IRQ) is the sti / mov ss shadow
    ss_selector: int  # env->segs[R_SS].selector: where the TLB-fill hook finds the CPL (SS.RPL)


HF_INHIBIT_IRQ = 1 << 3


def _blob(ctx) -> bytes:
    return bytes(ctypes.string_at(ctx.context, ctx.size))


def _probe_uc(code: bytes):
    """A small engine at CPL 0 on a flat GDT with `code` at 0x2000, for the probes below."""
    uc = new_engine()
    uc.mem_map(0, 0x10000)
    gdt = b"\0" * 8 + struct.pack("<QQ", 0x00CF9A000000FFFF, 0x00CF92000000FFFF)
    uc.mem_write(0x1000, gdt)
    uc.reg_write(X.UC_X86_REG_GDTR, (0, 0x1000, len(gdt) - 1, 0))
    uc.reg_write(X.UC_X86_REG_CS, 0x08)
    uc.reg_write(X.UC_X86_REG_SS, 0x10)
    uc.reg_write(X.UC_X86_REG_ESP, 0x8000)
    uc.mem_write(0x2000, code)
    return uc


def _fault_blob(code: bytes) -> tuple[bytes, bytes]:
    """Run `code`; return the context before and inside the INTR hook."""
    uc = _probe_uc(code)
    before = _blob(uc.context_save())
    seen = {}

    def hook(u, intno, _):
        seen["blob"] = _blob(u.context_save())
        u.emu_stop()

    uc.hook_add(UC_HOOK_INTR, hook)
    uc.emu_start(0x2000, 0x2000 + len(code) + 16)
    return before, seen["blob"]


def _shadow_offset() -> int:
    """Run `nop; sti; nop; nop`: the engine ends the block after sti and runs the next instruction
    alone with HF_INHIBIT_IRQ set; the only field differing by exactly that bit is hflags."""
    uc = _probe_uc(bytes.fromhex("90fb909090f4"))
    blobs = []
    uc.hook_add(UC_HOOK_BLOCK, lambda u, a, s, d: blobs.append(_blob(u.context_save())))
    uc.emu_start(0x2000, 0x2005)
    if len(blobs) < 3:
        raise RuntimeError("cannot locate the interrupt-shadow flag in this Unicorn's context")
    before, shadow, after = blobs[:3]

    def ints(b, i):
        return struct.unpack_from("<I", b, i)[0]

    found = [
        i
        for i in range(0, len(before) - 3, 4)
        if ints(shadow, i) ^ ints(before, i) == HF_INHIBIT_IRQ and ints(after, i) == ints(before, i)
    ]
    if len(found) != 1:
        raise RuntimeError(f"cannot locate the interrupt-shadow flag in this Unicorn's context ({found})")
    return found[0]


def _ss_selector_offset() -> int:
    """Load SS with 0x10 and then with 0x18 (the same data descriptor twice): the one 32-bit field
    that goes from 0x10 to 0x18 is SS's selector."""
    uc = _probe_uc(b"\x90")
    data = struct.pack("<Q", 0x00CF92000000FFFF)
    uc.mem_write(0x1018, data)
    uc.reg_write(X.UC_X86_REG_GDTR, (0, 0x1000, 0x1F, 0))
    before = _blob(uc.context_save())
    uc.reg_write(X.UC_X86_REG_SS, 0x18)
    after = _blob(uc.context_save())
    found = [
        i
        for i in range(0, len(before) - 3, 4)
        if struct.unpack_from("<I", before, i)[0] == 0x10 and struct.unpack_from("<I", after, i)[0] == 0x18
    ]
    if len(found) != 1:
        raise RuntimeError(f"cannot locate SS's selector in this Unicorn's context ({found})")
    return found[0]


@lru_cache(maxsize=1)
def context_layout() -> ContextLayout:
    with probing():  # (the probe engines leave the TLB clock as they found it)
        return _context_layout()


def _context_layout() -> ContextLayout:
    # mov ax, 0x1234; mov ds, ax  -> #GP(0x1234): error_code 0x1234, old_exception 13, is_int 0
    b0, gp = _fault_blob(bytes.fromhex("66b834128ed8"))
    # int 0x30 -> is_int 1, error_code 0, old_exception untouched
    _, soft = _fault_blob(bytes.fromhex("cd30"))

    def ints(b, i):
        return struct.unpack_from("<i", b, i)[0]

    err = [i for i in range(0, len(b0) - 3, 4) if ints(gp, i) == 0x1234 and ints(b0, i) == 0 and ints(soft, i) == 0]
    isint = [i for i in range(0, len(b0) - 3, 4) if ints(soft, i) == 1 and ints(gp, i) == 0 and ints(b0, i) == 0]
    old = [i for i in range(0, len(b0) - 3, 4) if ints(b0, i) == -1 and ints(gp, i) == 13 and ints(soft, i) == -1]
    # exception_is_int sits right after error_code in QEMU's CPUX86State (EAX also holds 0x1234).
    err = [i for i in err if i + 4 in isint]
    if len(err) != 1 or len(old) != 1:
        raise RuntimeError(f"cannot locate fault fields in this Unicorn's context (candidates {err} {isint} {old})")
    return ContextLayout(err[0], err[0] + 4, old[0], len(b0), _shadow_offset(), _ss_selector_offset())


class FaultState:
    """Per-Uc access to the in-flight fault's details, reusing one context buffer."""

    __slots__ = ("_ctx", "_fields", "layout", "uc")

    def __init__(self, uc):
        self.uc = uc
        self.layout = context_layout()
        self._ctx = uc.context_save()
        # views into the saved context, made once (the buffer does not move): error_code,
        # exception_is_int, old_exception
        addr = ctypes.cast(self._ctx.context, ctypes.c_void_p).value
        lay = self.layout
        self._fields = (
            ctypes.c_int32.from_address(addr + lay.error_code),
            ctypes.c_int32.from_address(addr + lay.exception_is_int),
            ctypes.c_int32.from_address(addr + lay.old_exception),
        )

    def take(self) -> tuple[int, bool]:
        """Return (error_code, from_int_n) of the fault being handled, and mark it delivered."""
        ctx = self._ctx
        h = self.uc._uch
        if _context_save(h, ctx.context):
            raise RuntimeError("engine refused a context save")
        err, isint, slot = self._fields
        error_code = err.value & 0xFFFFFFFF
        is_int = isint.value != 0
        if slot.value != -1:
            slot.value = -1
            if _context_restore(h, ctx.context):
                raise RuntimeError("engine refused a context restore")
        return error_code, is_int

    def clear_interrupt_shadow(self) -> None:
        """The shadowed instruction was completed by the hypervisor (emulated and skipped): the
        shadow is over, though the engine, which never ran it, still holds the flag."""
        ctx = self._ctx
        self.uc.context_update(ctx)
        addr = ctypes.cast(ctx.context, ctypes.c_void_p).value
        slot = ctypes.c_uint32.from_address(addr + self.layout.hflags)
        if slot.value & HF_INHIBIT_IRQ:
            slot.value &= ~HF_INHIBIT_IRQ
            self.uc.context_restore(ctx)

    def interrupt_shadow(self) -> bool:
        """True right after sti or mov ss (SDM 6.8.3): no interrupt before the next instruction."""
        ctx = self._ctx
        self.uc.context_update(ctx)
        addr = ctypes.cast(ctx.context, ctypes.c_void_p).value
        return bool(ctypes.c_uint32.from_address(addr + self.layout.hflags).value & HF_INHIBIT_IRQ)

    def set_cpl(self, ring: int, ss: int | None = None) -> None:
        """Set the engine's CPL (the low bits of QEMU's hflags) so that a stack segment of that ring
        may be loaded next from a hook: the engine checks SS.RPL against the CPL it holds, and the SS
        load then sets the CPL from its descriptor anyway.

        With `ss`, SS's selector is set to it too (its descriptor cache stays until the load): the
        descriptor reads and the accessed-bit write of that load go through the TLB-fill hooks, which
        take the privilege of an access from SS.RPL, and they are implicit supervisor-mode accesses (SDM 4.6)."""
        ctx = self._ctx
        self.uc.context_update(ctx)
        addr = ctypes.cast(ctx.context, ctypes.c_void_p).value
        slot = ctypes.c_uint32.from_address(addr + self.layout.hflags)
        sel = ctypes.c_uint32.from_address(addr + self.layout.ss_selector)
        if slot.value & 3 != ring or (ss is not None and sel.value != ss):
            slot.value = (slot.value & ~3) | ring
            if ss is not None:
                sel.value = ss
            self.uc.context_restore(ctx)
