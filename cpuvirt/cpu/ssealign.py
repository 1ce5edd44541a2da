"""#GP(0) for legacy-SSE instructions whose 128-bit memory operand is not 16-byte aligned.

Unicorn 2.1.3 checks no SSE alignment, so cpuvirt does (SDM Vol. 2A 2.4; Vol. 1 11.6.7, "Alignment of
128-Bit Data"): every legacy-SSE instruction with an m128 operand requires a 16-byte aligned linear
address, except movups, movupd, movdqu, lddqu and the SSE4.2 string compares; the scalar and
64-bit-operand forms (movss, movsd, movlps, cvtps2pd...) have no m128 operand and no requirement.

The sites are found by cpu/intercept.py's block check like every other intercepted
instruction. On each one goes a C hook (_ssealign.c, `SseAlign.site`) that computes the linear address
from the addressing form decoded here once; only a misaligned operand, or code the C hook does not
decode (16-bit, real-address or virtual-8086 mode), reaches Python: `misaligned_operand`, which
decodes the instruction as the CPU sees it now and gives the address the CPU would check.
Under `full` the translator copies these instructions unchanged into the translation cache, where
they get the same hook (modes/full/vcpu.py).

A site follows its code: the C hook compares the instruction's bytes in the guest frame it was decoded
from with the bytes it decoded, and hands a change to Python, which decodes it again and re-aims the
site (cpu/intercept.py `_rehook`); a linear page that has held code from several frames has its
sites checked in Python only. Sites are bounded (cpuvirt/limits.py SSE_SITES, docs/security.md): the
guest's own beyond the cap get no hook (unchecked, counted in `unchecked`); translation-cache copies
have a cap of their own and are removed at each TC flush, which full makes before a translation that
could exceed it. `fxsave`/`fxrstor` need no hook: the engine raises their #GP(0) itself.
"""

from __future__ import annotations

import ctypes
import functools

from capstone import CS_ARCH_X86, CS_MODE_16, CS_MODE_32, Cs
from capstone.x86 import X86_OP_MEM
from unicorn import UC_HOOK_CODE
from unicorn.unicorn_py3 import unicorn as _ucmod

from cpuvirt import limits
from cpuvirt.cpu.emulator import Context, Op, memory_operand
from cpuvirt.engine import regs as R
from cpuvirt.engine.cext import add_c_hook, load
from cpuvirt.status import Unsupported

# m128 operands that need no alignment (SDM Vol. 2: the instructions' own pages)
UNALIGNED_OK = frozenset(("movups", "movupd", "movdqu", "lddqu", "pcmpestri", "pcmpestrm", "pcmpistri", "pcmpistrm"))
MARKER = "sse align"  # in Intercepts.wanted: hook these instructions


def is_aligned_sse(mnem: str, ops: str) -> bool:
    """capstone's view: a legacy (non-VEX) instruction with an xmmword memory operand that must be aligned."""
    return "xmmword ptr" in ops and mnem not in UNALIGNED_OK and not mnem.startswith("v")


_SEG_REG = (R.ES, R.CS, R.SS, R.DS, R.FS, R.GS)  # QEMU's segment order (R_ES..R_GS), as the C hook indexes
_cs: dict[bool, Cs] = {}


def _decoder(code32: bool) -> Cs:
    cs = _cs.get(code32)
    if cs is None:
        cs = _cs[code32] = Cs(CS_ARCH_X86, CS_MODE_32 if code32 else CS_MODE_16)
        cs.detail = True
    return cs


def _memory_operand(code: bytes, code32: bool, sse: bool) -> Op | None:
    """The aligned-SSE instruction's m128 operand (with `sse` False: any instruction's first memory
    operand), as the instruction emulator types operands; None if there is none to check."""
    insn = next(_decoder(code32).disasm(code, 0, 1), None)
    if insn is None or (sse and not is_aligned_sse(insn.mnemonic, insn.op_str)):
        return None
    for o in insn.operands:
        if o.type == X86_OP_MEM and (o.size == 16 or not sse):
            try:
                return memory_operand(insn, o, not code32)
            except Unsupported:
                return None
    return None


def operand_form(code: bytes, code32: bool = True, sse: bool = True):
    """(base reg, index reg, scale, disp, QEMU segment index, 32-bit addressing) of the aligned-SSE
    instruction's m128 operand, or None if `code` is not one (the C hook's form of the operand). With
    `sse` False: of any instruction's first memory operand (None if it has none)."""
    op = _memory_operand(code, code32, sse)
    if op is None:
        return None
    return op.base, op.index, op.scale, op.disp, _SEG_REG.index(op.seg), op.asize == 4


def operand_linear(code: bytes, code32: bool, regs, seg_base) -> int | None:
    """The linear address of the instruction's first memory operand as the CPU forms it: 16- or
    32-bit addressing, the segment's base (`seg_base(segment register)`); None without one."""
    op = _memory_operand(code, code32, sse=False)
    return None if op is None else Context(regs, None, segs=seg_base).ea(op)


def misaligned_operand(code: bytes, code32: bool, regs, seg_base) -> int | None:
    """The linear address of the instruction's m128 operand when it is not 16-byte aligned (the
    CPU raises #GP(0)); None when aligned or when `code` is not an aligned-SSE instruction.
    `seg_base(segment register)` gives a segment's base as the engine holds it."""
    op = _memory_operand(code, code32, sse=True)
    if op is None:
        return None
    linear = Context(regs, None, segs=seg_base).ea(op)
    return linear if linear & 15 else None


_OTHER = ()  # _site_form: the bytes are no aligned-SSE instruction


@functools.lru_cache(maxsize=4096)
def _site_form(code: bytes):
    """What the C hook needs of the whole instruction `code`, decoded as 32-bit code: the m128
    operand's (base, index, scale, disp, segment index) with 32-bit addressing; _OTHER if it is
    another instruction; None if only Python can check it (16-bit addressing, another length).
    Cached: a guest's SSE sites repeat the same few encodings."""
    insn = next(_decoder(True).disasm(code, 0, 1), None)
    if insn is None or insn.size != len(code):
        return None
    if not is_aligned_sse(insn.mnemonic, insn.op_str):
        return _OTHER
    form = operand_form(code, True)
    return None if form is None or not form[5] else form[:5]


class _State(ctypes.Structure):
    """Mirror of align_t."""

    _fields_ = [
        ("reg_read", ctypes.c_void_p),
        ("context_save", ctypes.c_void_p),
        ("context", ctypes.c_void_p),
        ("context_hflags", ctypes.c_void_p),
        ("context_segs", ctypes.c_void_p),
        ("checks", ctypes.c_uint64),
        ("passed", ctypes.c_uint64),
    ]


class _Site(ctypes.Structure):
    """Mirror of align_site_t."""

    _fields_ = [
        ("s", ctypes.c_void_p),
        ("python", ctypes.c_void_p),
        ("base", ctypes.c_int32),
        ("index", ctypes.c_int32),
        ("scale", ctypes.c_uint32),
        ("disp", ctypes.c_uint32),
        ("seg", ctypes.c_uint32),
        ("size", ctypes.c_uint32),
        ("valid", ctypes.c_uint32),
        ("check", ctypes.c_uint32),
        ("code", ctypes.c_void_p),
        ("bytes", ctypes.c_uint8 * 16),
    ]


def _short_context(uc, ctx, need: int):
    """A uc_context that saves only the first bytes of the CPU state (the hflags and segment caches
    the hook reads are near its start): each save copies a few hundred bytes, not the 5.6 KiB of a
    whole context. Unicorn 2.1.3's uc_context begins with the size of the state it copies, followed
    by the rest of its header and then the state. That layout is not part of Unicorn's API, so it is
    checked on this engine: the short save must copy exactly `need` bytes, equal to the whole save's,
    and write nothing past them; None if it does not (the whole context is used then)."""
    total = ctx.size
    whole = bytes(ctypes.string_at(ctx.context, total))
    data_size = int.from_bytes(whole[:8], "little")
    header = total - data_size
    if not 0 < header <= 256 or need <= header or need > total:
        return None
    buf = (ctypes.c_char * total).from_buffer_copy(whole[:header] + b"\xaa" * data_size)
    ctypes.memmove(buf, (need - header).to_bytes(8, "little"), 8)
    _ucmod.uclib.uc_context_save(uc._uch, buf)
    got = bytes(buf)
    _ucmod.uclib.uc_context_save(uc._uch, ctx.context)
    whole = bytes(ctypes.string_at(ctx.context, total))
    if got[header:need] != whole[header:need] or got[need:] != b"\xaa" * (total - need):
        return None
    return buf


class SseAlign:
    """The C hooks of one engine. `SseAlign.create(uc, hflags_offset)` is None without the built
    extension or the context offsets (every site then has the Python hook alone)."""

    def __init__(self, lib, uc, hflags_offset: int, segs: int):
        self.uc = uc
        self._lib = lib
        st = self._state = _State()
        st.reg_read = ctypes.cast(_ucmod.uclib.uc_reg_read, ctypes.c_void_p).value
        st.context_save = ctypes.cast(_ucmod.uclib.uc_context_save, ctypes.c_void_p).value
        self._context = uc.context_save()
        st.context = ctypes.cast(self._context.context, ctypes.c_void_p).value
        self._short = _short_context(uc, self._context, max(hflags_offset + 4, segs + 6 * 24))
        if self._short is not None:
            st.context = ctypes.addressof(self._short)
        st.context_hflags = st.context + hflags_offset
        st.context_segs = st.context + segs
        self.sites: dict[int, tuple[_Site, int, object]] = {}  # address -> (site, hook handle, Python hook)
        self.unchecked = 0  # sites left unhooked at the cap
        self.tc_sites = 0  # sites on translation-cache copies (full), capped apart from the guest's own
        self._tc: set[int] = set()
        self._graveyard: list[_Site] = []  # sites whose hooks were removed, kept until the next flush

    @classmethod
    def create(cls, uc, hflags_offset: int | None) -> "SseAlign | None":
        from cpuvirt.cpu.segcache import segs_offset

        segs = segs_offset()
        lib = load("cpuvirt.cpu._ssealign", {"align_sizeof": _State, "align_site_sizeof": _Site})
        if lib is None or segs is None or hflags_offset is None:
            return None
        return cls(lib, uc, hflags_offset, segs)

    @property
    def checks(self) -> int:
        return self._state.checks

    @property
    def passed(self) -> int:
        return self._state.passed

    def site(
        self, address: int, size: int, code: bytes, python_hook=None, code_ptr: int = 0, trusted: bool = False
    ) -> bool:
        """Hook the instruction `code` at `address` (decoded as 32-bit code) in C, with `python_hook`
        behind it; a second call for the same address re-aims its hook at `code` (None: the same
        Python hook), which may be no aligned-SSE instruction any more (the hook then does nothing
        while the bytes stay). `code_ptr`: where `code` is in host memory (guest RAM), compared by
        the hook before each use; 0 leaves the site to Python, unless `trusted` (a translation-cache
        copy, re-aimed at each flush). False when the cap is reached (`limits.SSE_SITES`): not hooked."""
        old = self.sites.get(address)
        if old is None and (self.tc_sites if trusted else len(self.sites) - self.tc_sites) >= limits.SSE_SITES:
            self.unchecked += 1
            return False
        if python_hook is None:
            assert old is not None, "a new site needs its Python hook"
            python_hook = old[2]
        site = old[0] if old is not None else _Site()
        site.s = ctypes.addressof(self._state)
        site.python = ctypes.cast(python_hook, ctypes.c_void_p).value
        site.size, site.valid, site.check = size, 1, 1
        site.code = code_ptr or None
        site.bytes[:] = (code[:16] + bytes(16))[:16]
        form = _site_form(code) if len(code) == size <= 16 and (code_ptr or trusted) else None
        if form is None:
            site.size = 0  # not decodable here, or its bytes cannot be compared: always the Python hook
        elif form is _OTHER:
            site.check = 0  # rewritten into another instruction: nothing to check while it stays
        else:
            base, index, scale, disp, seg = form
            site.base = base if base is not None else -1
            site.index = index if index is not None else -1
            site.scale, site.disp, site.seg = scale, disp & 0xFFFFFFFF, seg
        if old is not None:
            self.sites[address] = (site, old[1], python_hook)
            return True
        handle = add_c_hook(
            self.uc._uch,
            UC_HOOK_CODE,
            self._lib.align_hook,
            ctypes.addressof(site),
            address,
            address,
            what=f"hook the SSE instruction at {address:#x}",
        )
        self.sites[address] = (site, handle, python_hook)  # alive as long as the engine may call them
        if trusted:
            self.tc_sites += 1
            self._tc.add(address)
        return True

    def tc_room(self, n: int) -> bool:
        """Can n more translation-cache sites be hooked (else the translator flushes the TC first)?"""
        return self.tc_sites + n <= limits.SSE_SITES

    def python_only(self, lo: int, hi: int) -> None:
        """The sites in [lo, hi) go to Python at every execution: their linear page has held code from
        more than one frame, so bytes compared in one frame prove nothing about the code running."""
        for address, entry in self.sites.items():
            if lo <= address < hi:
                entry[0].size = 0

    def invalidate(self, lo: int, hi: int) -> None:
        """The translation cache [lo, hi) was flushed: its sites' hooks are removed (the engine's
        translations of it are dropped too, and a new translation hooks its own copies again). The
        engine frees removed hooks only when emu_start returns, and walks them until then: the
        caller ends the engine run soon (full: at the next block boundary)."""
        self._graveyard.clear()  # removed at the previous flush: the engine no longer calls them
        for address in [a for a in self._tc if lo <= a < hi]:
            site, handle, _ = self.sites.pop(address)
            site.valid = 0
            self._tc.discard(address)
            self.tc_sites -= 1
            _ucmod.uclib.uc_hook_del(self.uc._uch, ctypes.c_size_t(handle))
            self._graveyard.append(site)
