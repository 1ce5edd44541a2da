"""The translator: guest kernel code -> code fragments in the translation cache (Adams & Agesen 2006).

On demand, one block at a time: at most MAX_INSNS guest instructions, or up to a terminator (a
branch, a callout) or the end of the guest page. Each guest instruction becomes one of:

- IDENT: copied unchanged (32-bit code has no PC-relative data addressing, so this is most code).
- chain: a direct branch becomes a jmp/jcc to the target's translation; until the target exists it
  points at a callout slot that translates it and patches the jump (chaining).
- inline: an indirect branch or `ret` becomes an inline cache in code (compare the target with up to
  IC_ENTRIES guest addresses, jump to their translations; a miss is a callout that fills an entry;
  a site that keeps missing becomes a compare tree over every target it has seen: `ret` of a function
  called from many places, such as xv6's `popcli`, has a hundred live return targets);
  cli/sti/popf run natively (real IOPL 1 carries the virtual IF); pushf is rewritten so the image shows
  the virtual IOPL; reads of virtual-CPU state (mov from CR0/3/4, sgdt, sidt, sldt, str, smsw,
  mov r/m from cs/ss, push cs/ss) become stores of the current virtual value as an immediate, and the
  block records the field it depends on.
- callout: everything else that is sensitive jumps to a callout slot; the hypervisor emulates it.
"""

from __future__ import annotations

import struct
from typing import Callable, Protocol

from capstone import CS_ARCH_X86, CS_MODE_32, Cs

from cpuvirt.bt.tcache import Block, Insn, Site, TCache

MAX_INSNS = 12
IC_ENTRIES = 4
WIDEN_AFTER = 4 * IC_ENTRIES  # misses of a 4-entry site before it becomes a compare tree
IC_TREE_MAX = 256  # targets a tree holds at most
IC_TREE_LEAF = 3  # targets compared one by one at a leaf
IC_REBUILDS = 64  # times one site's tree is built again with the targets it missed, at most
IC_TREE_SITES = 4096  # sites whose trees' targets are kept (at most IC_TREE_MAX each): beyond, all are forgotten
IC_SAVE = b"\x51\x50\x8b\x4c\x24\x08\x9f\x0f\x90\xc0"  # push ecx; push eax; mov ecx, [esp + 8]; lahf; seto al
IC_RESTORE = b"\x04\x7f\x9e\x58\x59"  # add al, 0x7f (OF back); sahf (SF ZF AF PF CF back); pop eax; pop ecx
IC_CMP_SIZE = 8  # cmp ecx, G; jne <next entry>
IC_HIT_SIZE = 17  # IC_RESTORE; lea esp, [esp + k] | mov [esp], RET; jmp T
PREFIXES = frozenset(b"\x66\x67\xf2\xf3\x2e\x3e\x26\x36\x64\x65\xf0")
IOPL_MASK = 0x3000

IDENT, INLINE, CALLOUT, CHAIN = "IDENT", "inline", "callout", "chain"
_BRANCH_HINTS = frozenset((0x2E, 0x3E, 0xF2, 0xF3))


class TranslateFault(Exception):
    """The guest code itself cannot be fetched (a #PF on instruction fetch at `gva`)."""

    def __init__(self, gva: int, error_code: int):
        super().__init__(f"instruction fetch fault at {gva:#x}")
        self.gva, self.error_code = gva, error_code


def _rel32(at_end: int, target: int) -> bytes:
    return struct.pack("<i", (target - at_end + 0x80000000) % 0x100000000 - 0x80000000)


def _imm32(v: int) -> bytes:
    return struct.pack("<I", v & 0xFFFFFFFF)


def _tree_leaves(targets: list[int]) -> list[list[int]]:
    """A compare tree's leaves: the sorted targets IC_TREE_LEAF at a time (one empty leaf for none)."""
    return [targets[i : i + IC_TREE_LEAF] for i in range(0, len(targets), IC_TREE_LEAF)] or [[]]


def _tree_compares_size(leaves: list[list[int]], lo: int, hi: int) -> int:
    """Bytes of the compares for leaves[lo:hi]: 12 a node (cmp, jae), 12 a leaf's target (cmp, je), 5 a jmp."""
    if hi - lo == 1:
        return 12 * len(leaves[lo]) + 5
    mid = (lo + hi) // 2
    return 12 + _tree_compares_size(leaves, lo, mid) + _tree_compares_size(leaves, mid, hi)


def tree_size(n: int) -> int:
    """Bytes of a compare tree over n targets: its compares, n hit stubs and the miss path."""
    leaves = _tree_leaves(list(range(n)))
    return _tree_compares_size(leaves, 0, len(leaves)) + n * IC_HIT_SIZE + len(IC_RESTORE) + 5


def _empty_stub(hit: int, miss: int) -> bytes:
    """An inline cache's hit stub with no target yet: a jump to the miss path, padded to IC_HIT_SIZE."""
    return b"\xe9" + _rel32(hit + 5, miss) + b"\xcc" * (IC_HIT_SIZE - 5)


def _miss_path(at: int, slot: int) -> bytes:
    """An inline cache's miss path at `at`: EFLAGS, EAX and ECX back, then its miss callout."""
    return IC_RESTORE + b"\xe9" + _rel32(at + len(IC_RESTORE) + 5, slot)


# room a translation may need: 12 instructions and, as its terminator, an inline cache holding a full tree
BLOCK_ROOM = 4096 + tree_size(IC_TREE_MAX)


def _parse_modrm(b: bytes, i: int):
    """(mod, reg, rm, sib_byte_or_None, disp, disp_size, length of modrm+sib+disp)."""
    modrm = b[i]
    mod, reg, rm = modrm >> 6, (modrm >> 3) & 7, modrm & 7
    n = 1
    sib = None
    if mod != 3 and rm == 4:
        sib = b[i + 1]
        n += 1
    if mod == 1:
        dsize = 1
    elif mod == 2 or (mod == 0 and rm == 5) or (mod == 0 and sib is not None and sib & 7 == 5):
        dsize = 4
    else:
        dsize = 0
    raw = b[i + n : i + n + dsize]
    disp = struct.unpack("<b", raw)[0] if dsize == 1 else (struct.unpack("<i", raw)[0] if dsize == 4 else 0)
    return mod, reg, rm, sib, disp, dsize, n + dsize


def _encode_mem(reg: int, mod: int, rm: int, sib, disp: int, dsize: int, add: int) -> bytes:
    """A ModRM memory operand with `reg` in the reg field and the displacement increased by `add`."""
    disp += add
    absolute = (mod == 0 and rm == 5) or (mod == 0 and sib is not None and sib & 7 == 5)
    if absolute:
        out = bytes([(0 << 6) | (reg << 3) | rm]) + (bytes([sib]) if sib is not None else b"")
        return out + _imm32(disp)
    if mod == 0 and disp == 0:
        nmod, d = 0, b""
    elif -128 <= disp <= 127:
        nmod, d = 1, struct.pack("<b", disp)
    else:
        nmod, d = 2, struct.pack("<i", disp)
    return bytes([(nmod << 6) | (reg << 3) | rm]) + (bytes([sib]) if sib is not None else b"") + d


def _stores_fpu_pointers(raw: bytes, p: int, prefixes: bytes) -> bool:
    """D9 /6 (fnstenv), DD /6 (fnsave), with or without a 9B wait, and 0F AE /0 (fxsave), to memory,
    in their 32-bit formats (the 16-bit ones, under 0x66, are left alone)."""
    if 0x66 in prefixes:
        return False
    if p < len(raw) and raw[p] == 0x9B:
        p += 1
    if p + 1 >= len(raw):
        return False
    op, modrm = raw[p], raw[p + 1]
    if op in (0xD9, 0xDD):
        return modrm >> 6 != 3 and (modrm >> 3) & 7 == 6
    return op == 0x0F and modrm == 0xAE and p + 2 < len(raw) and raw[p + 2] >> 6 != 3 and (raw[p + 2] >> 3) & 7 == 0


class GuestCode(Protocol):
    """What the translator needs from the hypervisor (full mode's `_Code`, the tests' bare engine)."""

    def fetch(self, gva: int, size: int) -> tuple[bytes, list[int]]:
        """Up to `size` code bytes at a guest-linear address, with the guest-physical frames they
        came from; stops early at a page that cannot be fetched (raise TranslateFault if none can)."""
        ...

    def virtual(self, field: str) -> int:
        """Current value of a virtual-CPU field: cr0 cr3 cr4 gdtr_base gdtr_limit idtr_base idtr_limit
        ldtr tr cs ss iopl."""
        ...


class Translator:
    def __init__(self, tc: TCache, code: GuestCode, callout_kinds: frozenset[str] | None = None):
        self.tc = tc
        self.code = code
        self.cs = Cs(CS_ARCH_X86, CS_MODE_32)
        self.adaptive: set[int] = set()  # guest EIPs retranslated as callouts (adaptive BT)
        # guest EIPs whose inline cache is a compare tree -> the guest targets it compares with (sorted)
        self.tree_targets: dict[int, list[int]] = {}
        self._rebuilds: dict[int, int] = {}  # guest EIP -> trees built for it
        self.trace_translate: Callable[[Block], None] | None = None  # when translations are traced
        self.on_block: Callable[[Block], None] | None = None  # for every new translation
        self._after_sti = False

    # -- the entry point ---------------------------------------------------------------------------------
    def translate(self, geip: int) -> Block:
        tc = self.tc
        if not tc.room(BLOCK_ROOM, 64):
            tc.flush()
        data, frames = self.code.fetch(geip, MAX_INSNS * 15)
        if not data:
            raise TranslateFault(geip, 0)
        # Laid out where the TC puts this stretch of guest code; if it does not fit there, laid out again
        # in a fresh chunk (the callout slots the first layout took are given back).
        slots = len(tc.sites)
        tc_start = tc.place(geip)
        blk, out, pending, next_eip = self._layout(geip, data, frames, tc_start)
        if not tc.alloc(geip, tc_start, len(out)):
            del tc.sites[slots:]
            tc_start = tc.place(geip)
            blk, out, pending, next_eip = self._layout(geip, data, frames, tc_start)
            fits = tc.alloc(geip, tc_start, len(out))
            assert fits, "new TC space holds a block of any size"
        page_end = (geip | 0xFFF) + 1
        blk.gend = next_eip
        # The guest bytes the block came from, by guest-physical span, for coherence checks.
        total = (next_eip - geip) & 0xFFFFFFFF
        first = min(total, page_end - geip)
        blk.source = [(frames[0] | (geip & 0xFFF), data[:first])]
        if total > first and len(frames) > 1:
            blk.source.append((frames[1], data[first:total]))
        # Link exits: to the target's translation if it exists, else to a chain callout.
        for off, target, _ in pending:
            at = tc_start + off
            t = tc.blocks.get(target)
            if t is not None and t.alive:
                dest = t.tc
                tc.counters.chained += 1
            else:
                dest = tc.new_site(Site("chain", blk, None, target, at))
                blk.sites.append(dest)
            out[off : off + 4] = _rel32(at + 4, dest)
        tc.write_at(tc_start, bytes(out))
        blk.tc, blk.tc_end = tc_start, tc_start + len(out)
        tc.add(blk)
        if self.on_block is not None:
            self.on_block(blk)
        if self.trace_translate is not None:
            self.trace_translate(blk)
        return blk

    def _layout(self, geip: int, data: bytes, frames: list[int], tc_start: int):
        """The block's code as it runs at `tc_start`, its exits still to link: (block, code, exits, guest
        EIP after it)."""
        blk = Block(geip)
        blk.frames.update(frames)
        # Stop at the end of the first page: the next page may map elsewhere or fault later.
        page_end = (geip | 0xFFF) + 1
        out = bytearray()
        pending: list[tuple[int, int, str]] = []  # (offset in out of a rel32, guest target, kind)
        insns = self.cs.disasm_lite(data, geip)  # lazily: only up to the block's end is decoded
        count = 0
        next_eip = geip
        terminated = False
        for addr, size, mnem, ops in insns:
            if count >= MAX_INSNS or (addr >= page_end and count):
                break
            raw = data[addr - geip : addr - geip + size]
            ins = Insn(addr, size, f"{mnem} {ops}".strip(), IDENT)
            ins.tc = tc_start + len(out)
            self._after_sti = bool(blk.insns) and blk.insns[-1].text == "sti"
            ends = self._one(blk, ins, raw, mnem, ops, out, pending, tc_start)
            terminated = ends is True
            ins.tc_end = tc_start + len(out)
            blk.insns.append(ins)
            blk.starts[ins.tc] = ins
            count += 1
            next_eip = (addr + size) & 0xFFFFFFFF
            if ends:
                break
        if not blk.insns:
            # Not even one whole instruction could be fetched: the next page faults.
            raise TranslateFault(page_end & 0xFFFFFFFF, 0)
        if not terminated:
            ins = Insn(next_eip, 0, "(fall through)", CHAIN)
            ins.tc = tc_start + len(out)
            out += b"\xe9\0\0\0\0"
            pending.append((len(out) - 4, next_eip, "chain"))
            ins.tc_end = tc_start + len(out)
            blk.insns.append(ins)
        return blk, out, pending, next_eip

    # -- one guest instruction -----------------------------------------------------------------------------
    def _one(self, blk, ins, raw: bytes, mnem: str, ops: str, out: bytearray, pending, tc_start) -> bool | str:
        """Append the translation of one instruction; True if it ends the block."""
        p = 0
        while p < len(raw) and raw[p] in PREFIXES:
            p += 1
        prefixes = raw[:p]
        # Branch hints (cs/ds on jcc), bnd and `rep ret` change nothing a branch does in 32-bit code
        # without MPX/CET: such branches are translated as unprefixed ones (compilers emit them).
        hints_only = not prefixes or set(prefixes) <= _BRANCH_HINTS
        op = raw[p] if p < len(raw) else 0
        op2 = raw[p + 1] if p + 1 < len(raw) else None
        nxt = (ins.geip + ins.size) & 0xFFFFFFFF

        def here():
            return tc_start + len(out)

        if ins.geip in self.adaptive:
            return self._callout(blk, ins, raw, out, tc_start, "adaptive")
        # -- direct control flow ------------------------------------------------------------------
        if op in (0xE9, 0xEB) and hints_only:
            target = (
                nxt
                + (
                    struct.unpack("<i", raw[p + 1 : p + 5])[0]
                    if op == 0xE9
                    else struct.unpack("<b", raw[p + 1 : p + 2])[0]
                )
            ) & 0xFFFFFFFF
            ins.kind = CHAIN
            out += b"\xe9\0\0\0\0"
            pending.append((len(out) - 4, target, "jmp"))
            return True
        if (0x70 <= op <= 0x7F or (op == 0x0F and op2 is not None and 0x80 <= op2 <= 0x8F)) and hints_only:
            if op == 0x0F and op2 is not None:
                cc, disp = op2 & 0xF, struct.unpack("<i", raw[p + 2 : p + 6])[0]
            else:
                cc, disp = op & 0xF, struct.unpack("<b", raw[p + 1 : p + 2])[0]
            target = (nxt + disp) & 0xFFFFFFFF
            ins.kind = CHAIN
            out += bytes([0x0F, 0x80 | cc]) + b"\0\0\0\0"
            pending.append((len(out) - 4, target, "jcc"))
            out += b"\xe9\0\0\0\0"
            pending.append((len(out) - 4, nxt, "fall"))
            return True
        if op in (0xE0, 0xE1, 0xE2, 0xE3) and hints_only:
            target = (nxt + struct.unpack("<b", raw[p + 1 : p + 2])[0]) & 0xFFFFFFFF
            ins.kind = CHAIN
            out += bytes([op, 5]) + b"\xe9\0\0\0\0"
            pending.append((len(out) - 4, nxt, "fall"))
            out += b"\xe9\0\0\0\0"
            pending.append((len(out) - 4, target, "loop"))
            return True
        if op == 0xE8 and hints_only:
            target = (nxt + struct.unpack("<i", raw[p + 1 : p + 5])[0]) & 0xFFFFFFFF
            ins.kind = CHAIN
            out += b"\x68" + _imm32(nxt)  # push the guest return address
            out += b"\xe9\0\0\0\0"
            pending.append((len(out) - 4, target, "call"))
            return True
        # -- indirect control flow: inline caches ----------------------------------------------------------
        if op in (0xC3, 0xC2) and hints_only:
            pop = struct.unpack("<H", raw[p + 1 : p + 3])[0] if op == 0xC2 else 0
            ins.kind = INLINE
            self._inline_cache(blk, ins, raw, out, tc_start, "ret", pop=pop)
            return True
        if (
            op == 0xFF
            and op2 is not None
            and (op2 >> 3) & 7 in (2, 4)
            and 0x66 not in prefixes
            and 0x67 not in prefixes
        ):
            is_call = (op2 >> 3) & 7 == 2
            ins.kind = INLINE
            # push r/m32 (same operand, /6) puts the target on the stack: the lookup compares it.
            start = here()
            out += prefixes + bytes([0xFF, (op2 & 0xC7) | (6 << 3)]) + raw[p + 2 :]
            ins.esp_fix[start] = 0
            self._inline_cache(
                blk, ins, raw, out, tc_start, "call_ind" if is_call else "jmp_ind", ret_addr=nxt, esp_base=4
            )
            return True
        # -- sensitive instructions --------------------------------------------------------------------
        if op in (0xFA, 0xFB, 0x9D) and not prefixes:
            # cli / sti / popf: real IF = virtual IF, real IOPL 1 lets them run natively at ring 1.
            ins.kind = INLINE
            out += raw
            # popf may open the interrupt window: end the block there (falling through), so the run
            # loop's poll sees a guest-instruction boundary soon after. After sti the engine ends its
            # block itself (the interrupt shadow covers the next instruction, which stays in this block).
            return "fall" if op == 0x9D else False
        if op == 0x9C and not prefixes:
            ins.kind = INLINE
            iopl = self.code.virtual("iopl")
            blk.deps.add("iopl")
            start = here()
            # Real IOPL is exactly 1 while translated code runs: the pushed image becomes the virtual
            # IOPL by adding a constant, with lea, which leaves EFLAGS alone (no popf either).
            seq = b"\x9c\x51\x8b\x4c\x24\x04" + b"\x8d\x89" + _imm32((iopl << 12) - 0x1000)
            seq += b"\x89\x4c\x24\x04\x59"
            out += seq
            ins.esp_fix[start + 1] = 4  # the push ecx faults with ESP already 4 lower
            return False
        if op == 0x0F and op2 == 0x20:  # mov r32, crN
            cr = (raw[p + 2] >> 3) & 7
            rm = raw[p + 2] & 7
            if cr in (0, 3, 4):
                ins.kind = INLINE
                blk.deps.add(f"cr{cr}")
                out += bytes([0xB8 + rm]) + _imm32(self.code.virtual(f"cr{cr}"))
                return False
            return self._callout(blk, ins, raw, out, tc_start, "sensitive")
        if op == 0x0F and op2 in (0x00, 0x01) and p + 2 < len(raw):
            reg = (raw[p + 2] >> 3) & 7
            mod = raw[p + 2] >> 6
            if op2 == 0x01 and reg in (0, 1) and mod != 3 and 0x67 not in prefixes:  # sgdt / sidt m
                name = "gdtr" if reg == 0 else "idtr"
                blk.deps.add(name)
                ins.kind = INLINE
                m = _parse_modrm(raw, p + 2)
                segs = bytes(b for b in prefixes if b not in (0x66, 0x67, 0xF2, 0xF3, 0xF0))
                limit, base = self.code.virtual(name + "_limit"), self.code.virtual(name + "_base")
                # the dword first: a fault on it leaves memory untouched
                out += segs + b"\xc7" + _encode_mem(0, m[0], m[2], m[3], m[4], m[5], 2) + _imm32(base)
                out += (
                    segs
                    + b"\x66\xc7"
                    + _encode_mem(0, m[0], m[2], m[3], m[4], m[5], 0)
                    + struct.pack("<H", limit & 0xFFFF)
                )
                return False
            if (op2 == 0x00 and reg in (0, 1)) or (op2 == 0x01 and reg == 4):  # sldt / str / smsw
                field = {(0, 0): "ldtr", (0, 1): "tr", (1, 4): "cr0"}[(op2, reg)]
                blk.deps.add(field)
                value = self.code.virtual(field)
                ins.kind = INLINE
                return self._store_imm(raw, p, prefixes, out, value, word_mem=True)
            return self._callout(blk, ins, raw, out, tc_start, "sensitive")
        if op == 0x8C and p + 1 < len(raw) and (raw[p + 1] >> 3) & 7 in (1, 2):  # mov r/m, cs|ss
            field = "cs" if (raw[p + 1] >> 3) & 7 == 1 else "ss"
            blk.deps.add(field)
            ins.kind = INLINE
            return self._store_imm(raw, p - 1, prefixes, out, self.code.virtual(field), word_mem=True)
        if op in (0x0E, 0x16) and not prefixes:  # push cs / push ss
            field = "cs" if op == 0x0E else "ss"
            blk.deps.add(field)
            ins.kind = INLINE
            out += b"\x68" + _imm32(self.code.virtual(field))
            return False
        if _stores_fpu_pointers(raw, p, prefixes):
            # fnstenv/fstenv/fnsave/fsave/fxsave store the last x87 instruction's address, which is
            # where it ran: in the TC. The store runs here, then a callout rewrites that field.
            out += raw
            return self._callout(blk, ins, raw, out, tc_start, "fpu_env")
        if self._is_sensitive(op, op2, raw, p, mnem):
            return self._callout(blk, ins, raw, out, tc_start, "sensitive")
        out += raw
        return mnem in ("ud2",)

    @staticmethod
    def _is_sensitive(op, op2, raw, p, mnem) -> bool:
        if op in (
            0xF4,
            0xCF,
            0xCD,
            0xCC,
            0xCE,
            0xE4,
            0xE5,
            0xE6,
            0xE7,
            0xEC,
            0xED,
            0xEE,
            0xEF,
            0x8E,
            0x1F,
            0x07,
            0x17,
            0xEA,
            0x9A,
            0xCA,
            0xCB,
            0xF1,
        ):
            return True
        if op == 0xFF and op2 is not None and (op2 >> 3) & 7 in (2, 3, 4, 5):
            return True  # indirect near with 16-bit forms, and far indirect jmp/call
        if op == 0xC2 or op == 0xC3:
            return True  # ret with prefixes
        if op in (0x70, 0xEB, 0xE9, 0xE8) or 0x70 <= op <= 0x7F or 0xE0 <= op <= 0xE3:
            return True  # branches with odd prefixes: let the hypervisor do them
        if op == 0x0F and op2 is not None:
            if op2 in (
                0x00,
                0x01,
                0x06,
                0x08,
                0x09,
                0x20,
                0x21,
                0x22,
                0x23,
                0x30,
                0x32,
                0x33,
                0xA1,
                0xA9,
                0xA2,
                0x31,
                0x02,
                0x03,
                0x34,
                0x35,
                0x05,
                0x07,
            ):
                return True
            if 0x80 <= op2 <= 0x8F:
                return True
        return False

    def _store_imm(self, raw, p, prefixes, out, value, word_mem) -> bool:
        """Replace an instruction whose ModRM (at raw[p + 2]) names the destination with a store of
        `value`: a 16-bit store to memory, or a register load (32-bit, or 16-bit under 0x66)."""
        m = _parse_modrm(raw, p + 2)
        mod, rm = m[0], m[2]
        segs = bytes(b for b in prefixes if b not in (0x66, 0x67, 0xF2, 0xF3, 0xF0))
        if mod == 3:
            if 0x66 in prefixes:
                out += b"\x66" + bytes([0xB8 + rm]) + struct.pack("<H", value & 0xFFFF)
            else:
                out += bytes([0xB8 + rm]) + _imm32(value)
        else:
            out += segs + b"\x66\xc7" + _encode_mem(0, mod, rm, m[3], m[4], m[5], 0) + struct.pack("<H", value & 0xFFFF)
        return False

    def _callout(self, blk, ins, raw, out, tc_start, kind) -> bool:
        ins.kind = CALLOUT
        site = Site(kind, blk, ins)
        site.raw = raw
        site.after_sti = self._after_sti  # `sti; hlt`: its slot is still inside the sti shadow
        slot = self.tc.new_site(site)
        blk.sites.append(slot)
        at = tc_start + len(out) + 5
        out += b"\xe9" + _rel32(at, slot)
        return True

    def _inline_cache(self, blk, ins, raw, out, tc_start, kind, pop=0, ret_addr=None, esp_base=0):
        """An inline cache that gives EFLAGS back as it found them, and whose every branch the engine chains:

            push ecx; push eax; mov ecx, [esp + 8]    ; ECX = the guest target
            lahf; seto al                             ; EFLAGS saved in AX
            the compares (below), each match jumping to its hit stub:
                hit_G: add al, 0x7f; sahf; pop eax; pop ecx;
                       <ret: lea esp, [esp + 4 + n] | jmp: lea esp, [esp + 4] | call: mov [esp], RET>;
                       jmp <translation of G>
            miss: add al, 0x7f; sahf; pop eax; pop ecx; jmp <miss callout>

        `add al, 0x7f` overflows exactly when AL (OF, from seto) is 1, and sahf then loads the other five
        status flags from AH. The flag-free compare used before, `lea ecx, [ecx - G]; jecxz`, cost far
        more than this: the engine ends its block at every jecxz (and loop) and goes back to its main loop
        to find the next one, without chaining (docs/binary-translation.md, "Inline caches and the
        engine's main loop"). A site starts with IC_ENTRIES entries filled round robin (`cmp ecx, G;
        jne <next>` each, its hit stub after it; an empty entry compares with 0 and its stub jumps to the
        miss path). One that keeps missing becomes a compare tree over every target it has seen
        (`_tree_code`). The guest's stack read is the only access that can fault; ESP is `esp_base`
        below the guest's at the first push."""
        tc = self.tc
        base = tc_start + len(out)
        out += IC_SAVE
        ins.esp_fix[base] = esp_base
        ins.esp_fix[base + 1] = esp_base + 4  # push eax: ESP already 4 lower
        ins.esp_fix[base + 2] = esp_base + 8  # the guest's stack read (ret) can fault
        site = Site(kind, blk, ins)
        site.raw, site.pop, site.ret_addr = raw, pop, ret_addr
        site.slot = tc.new_site(site)
        blk.sites.append(site.slot)
        first = base + len(IC_SAVE)
        targets = self.tree_targets.get(ins.geip)
        if targets is not None:
            site.patch_at = first
            out += self._tree_code(site, targets, first)
            return
        step = IC_CMP_SIZE + IC_HIT_SIZE
        miss = first + IC_ENTRIES * step
        for k in range(IC_ENTRIES):
            e = first + k * step
            site.ic.append(e)
            site.hits.append(e + IC_CMP_SIZE)
            out += b"\x81\xf9" + _imm32(0) + b"\x75" + bytes([IC_HIT_SIZE])  # cmp ecx, 0; jne next
            out += _empty_stub(e + IC_CMP_SIZE, miss)
        out += _miss_path(miss, site.slot)

    def _tree_code(self, site: Site, targets: list[int], first: int) -> bytes:
        """The compares of a site with many targets (a `ret` of a function called from many places: xv6's
        `popcli` returns to 121), placed at `first`: a binary search over the sorted targets, `cmp ecx, G;
        jae <upper half>` at each node and `cmp ecx, G; je <hit stub>` for the IC_TREE_LEAF or fewer of a
        leaf, then `jmp <miss>`; the hit stubs; the miss path. A hit costs about 2 log2(n) compares where 16
        round-robin entries cost 2 per entry passed and missed whenever the site had more live targets than
        entries (each miss a callout, two patches and the engine's translation of them). The stubs of targets
        already translated jump to their translation at once; the others start as jumps to the miss path and
        are filled by fill_ic. Sets site.tree (target -> its hit stub)."""
        size = len(targets)
        leaves = _tree_leaves(targets)
        stubs = first + _tree_compares_size(leaves, 0, len(leaves))
        miss = stubs + size * IC_HIT_SIZE
        tree = site.tree = {t: stubs + k * IC_HIT_SIZE for k, t in enumerate(targets)}
        out = bytearray()

        def emit(lo: int, hi: int) -> None:
            at = first + len(out)
            if hi - lo == 1:
                for t in leaves[lo]:
                    out.extend(b"\x81\xf9" + _imm32(t))  # cmp ecx, t; je hit_t
                    out.extend(b"\x0f\x84" + _rel32(first + len(out) + 6, tree[t]))
                out.extend(b"\xe9" + _rel32(first + len(out) + 5, miss))
                return
            mid = (lo + hi) // 2
            upper = at + 12 + _tree_compares_size(leaves, lo, mid)
            out.extend(b"\x81\xf9" + _imm32(leaves[mid][0]) + b"\x0f\x83" + _rel32(at + 12, upper))  # jae upper
            emit(lo, mid)
            emit(mid, hi)

        emit(0, len(leaves))
        assert first + len(out) == stubs
        for t in targets:
            b = self.tc.blocks.get(t)
            out += self._hit_stub(site, tree[t], b.tc) if b is not None and b.alive else _empty_stub(tree[t], miss)
        out += _miss_path(miss, site.slot)
        assert len(out) == tree_size(size)
        return bytes(out)

    @staticmethod
    def _hit_stub(site: Site, hit: int, dest: int) -> bytes:
        code = IC_RESTORE
        if site.kind == "ret":
            code += b"\x8d\xa4\x24" + _imm32(4 + site.pop)  # lea esp, [esp + 4 + n]
        elif site.kind == "jmp_ind":
            code += b"\x8d\xa4\x24" + _imm32(4)
        else:
            code += b"\xc7\x04\x24" + _imm32(site.ret_addr)  # mov [esp], guest return address
        code += b"\xe9" + _rel32(hit + len(code) + 5, dest)
        assert len(code) == IC_HIT_SIZE
        return code

    def fill_ic(self, site: Site, target: int, dest: int) -> None:
        """Serve a miss: put (guest target -> TC dest) into the next round-robin entry of a small site, or
        into a tree's stub for that target; a target a tree does not hold is only recorded (widen)."""
        site.ic_next += 1
        if len(site.seen) < IC_TREE_MAX:  # (bounded: a guest may return to any number of places)
            site.seen.add(target)
        if site.tree is not None:
            hit = site.tree.get(target)
            if hit is not None:
                site.seen.discard(target)
                self.tc.patch(hit, self._hit_stub(site, hit, dest))
            return
        k = (site.ic_next - 1) % len(site.ic)
        e, hit = site.ic[k], site.hits[k]
        self.tc.patch(hit, self._hit_stub(site, hit, dest))
        self.tc.patch(e + 2, _imm32(target))  # cmp ecx, target

    def widen(self, site: Site) -> bool:
        """After a miss: True when the site's block is to be translated again, its inline cache a compare
        tree over the targets it has seen (a 4-entry site that has missed WIDEN_AFTER times). A tree that
        has missed targets it does not hold (1 new target up to its 8th build, then 2, 3, ...; IC_REBUILDS
        builds and IC_TREE_MAX targets at most) is built again here, in new TC space beside the
        site's block, and its first compare becomes a jump to the new one: the block stays (a block translated again
        would leave its old entry forwarding to the new one, and its window hooks, behind). Each tree built
        is counted (`widened`)."""
        held = site.tree
        narrow = held is None
        if site.insn is None or narrow and site.ic_next < WIDEN_AFTER:
            return False
        geip = site.insn.geip
        built = self._rebuilds.get(geip, 0)
        if built >= IC_REBUILDS or held is not None and (len(site.seen) < 1 + built // 8 or len(held) >= IC_TREE_MAX):
            return False
        if len(self.tree_targets) >= IC_TREE_SITES and geip not in self.tree_targets:  # bounded host memory
            self.tree_targets.clear()
            self._rebuilds.clear()
        targets = sorted(set(held or ()) | site.seen)[:IC_TREE_MAX]
        if not narrow:
            tc = self.tc
            if not tc.room(tree_size(len(targets)), 0):
                return False  # (the next flush starts over)
            at = tc.take(geip, tree_size(len(targets)))  # beside the site's block
            tc.write_at(at, self._tree_code(site, targets, at))
            tc.patch(site.patch_at, b"\xe9" + _rel32(site.patch_at + 5, at))  # the old first compare
        self.tree_targets[geip] = targets
        self._rebuilds[geip] = built + 1
        site.seen = set()
        self.tc.counters.widened += 1
        return narrow
