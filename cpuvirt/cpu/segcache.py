"""The hidden part of the engine's segment registers (base, limit, flags), read from a saved context.

Unicorn's register interface gives segment selectors only. Code that must form a linear address
from a segment as the CPU does (an instruction emulated from 16-bit code, whose segments are rarely
flat, or whose limits outlived a return to real mode: "big real mode") reads the caches here, one
context save per use. The caches' offset in the context is found at start-up
(cpu/deprivilege.segs_offset, never hard-coded); `available` is False if it could not be found.
"""
from __future__ import annotations

import ctypes

from cpuvirt.cpu.deprivilege import _SEG_INDEX, _SegmentCache, segs_offset
from cpuvirt.engine import regs as R
from cpuvirt.engine.regs import _uclib


class EngineSegments:
    __slots__ = ("uc", "_ctx", "_segs")

    def __init__(self, uc):
        self.uc = uc
        off = segs_offset()
        self._ctx = self._segs = None
        if off is not None:
            self._ctx = uc.context_save()
            addr = ctypes.cast(self._ctx.context, ctypes.c_void_p).value
            self._segs = (_SegmentCache * 6).from_address(addr + off)

    @property
    def available(self) -> bool:
        return self._segs is not None

    def refresh(self) -> None:
        """Read the engine's current caches (call once per use: they change with every load)."""
        _uclib.uc_context_save(self.uc._uch, self._ctx.context)

    def base(self, reg: int) -> int:
        return self._segs[_SEG_INDEX[reg]].base & 0xFFFFFFFF

    def stack32(self) -> bool:
        """SS.B: is the stack pointer ESP (else SP)?"""
        return bool(self._segs[_SEG_INDEX[R.SS]].flags >> 22 & 1)

    def code32(self) -> bool:
        """CS.D: does the code segment default to 32-bit operands and addresses?"""
        return bool(self._segs[_SEG_INDEX[R.CS]].flags >> 22 & 1)
