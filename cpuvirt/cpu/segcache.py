"""The hidden part of the engine's segment registers (base, limit, flags), read from a saved context.

Unicorn's register interface gives segment selectors only. Code that must form a linear address
from a segment as the CPU does (an instruction emulated from 16-bit code, whose segments are rarely
flat, or whose limits outlived a return to real mode: "big real mode") reads the caches here, one
context save per use. The caches' offset in the context is found at start-up
(`segs_offset` below, never hard-coded); `available` is False if it could not be found.
"""

from __future__ import annotations

import ctypes
import struct

from cpuvirt.engine import regs as R
from cpuvirt.engine.internals import new_engine, probing
from cpuvirt.engine.regs import _uclib


class _SegmentCache(ctypes.Structure):
    """QEMU's SegmentCache (the hidden part of a segment register) as the saved context holds it."""

    _fields_ = [
        ("selector", ctypes.c_uint32),
        ("base", ctypes.c_uint64),
        ("limit", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
    ]


_SEG_INDEX = {R.ES: 0, R.CS: 1, R.SS: 2, R.DS: 3, R.FS: 4, R.GS: 5}  # QEMU's R_ES..R_GS
_HF_CS32, _HF_SS32, _HF_ADDSEG = 1 << 4, 1 << 5, 1 << 6
_segs_offset_cache: list = []


def segs_offset() -> int | None:
    """Offset of env->segs[] in the saved context, found once per process by loading DS with a
    distinctive descriptor on a probe engine (never hard-coded); None if it cannot be found."""
    if _segs_offset_cache:
        return _segs_offset_cache[0]
    with probing():  # (the probe engine leaves the TLB clock as it found it)
        off = _probe_segs_offset()
    _segs_offset_cache.append(off)
    return off


def _probe_segs_offset() -> int | None:
    from unicorn import x86_const as X

    off = None
    try:
        uc = new_engine()
        uc.mem_map(0, 0x10000)
        lo, hi = 0xCDEF1234, 0x12CB92AB  # base 0x12abcdef, limit 0xb1234 pages, DPL 0 data
        gdt = b"\0" * 8 + struct.pack("<QQII", 0x00CF9A000000FFFF, 0x00CF92000000FFFF, lo, hi)
        uc.mem_write(0x1000, gdt)
        uc.reg_write(X.UC_X86_REG_GDTR, (0, 0x1000, len(gdt) - 1, 0))
        uc.reg_write(X.UC_X86_REG_CS, 0x08)
        uc.reg_write(X.UC_X86_REG_SS, 0x10)
        uc.reg_write(X.UC_X86_REG_DS, 0x18)
        ctx = uc.context_save()
        blob = bytes(ctypes.string_at(ctx.context, ctx.size))
        want = struct.pack("<I4xQII", 0x18, 0x12ABCDEF, 0xB1234FFF, hi | (1 << 8))
        found = [
            i for i in range(0, len(blob) - 23, 4) if blob[i : i + 4] == want[:4] and blob[i + 8 : i + 24] == want[8:]
        ]
        if len(found) == 1 and found[0] >= 3 * 24:
            cand = found[0] - 3 * 24
            cs = struct.unpack_from("<I4xQII", blob, cand + 24)
            if cs == (0x08, 0, 0xFFFFFFFF, 0x00CF9B00):
                off = cand
    except Exception:  # noqa: BLE001 - no direct loads then: the shadow-GDT window does them
        off = None
    return off


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


def live_segment(uc, reg: int) -> _SegmentCache | None:
    """`reg`'s cache as the engine holds it now, in its CPU state rather than a saved copy: a read costs
    no context save. Checked against the selector the engine reports; None where it cannot be found."""
    from cpuvirt.engine.internals import context_header, engine_env

    off = segs_offset()
    env = engine_env(uc) if off is not None else None
    header = context_header(uc, env) if env is not None else None
    if off is None or env is None or header is None:
        return None
    cache = _SegmentCache.from_address(env + off - header + _SEG_INDEX[reg] * ctypes.sizeof(_SegmentCache))
    return cache if cache.selector == uc.reg_read(reg) else None
