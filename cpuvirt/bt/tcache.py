"""The translation cache (TC): translated guest-kernel code in hypervisor memory (Adams & Agesen 2006).

Layout of the TC's linear window W (fetched by translated code only; see modes/full/vcpu.py for how the
TLB-fill hook keeps the guest out of it):

- W .. W + CALLOUT_SLOTS: the callout area, one byte (int3) per callout site. One UC_HOOK_CODE covers
  the whole area: translated code reaches a callout by jumping to its slot, the hook looks up the site
  by slot and moves EIP on, so a callout costs one hook call and never an engine stop.
- the rest: code fragments, in 4 KiB chunks, one chunk at a time per 1 KiB of guest code (`alloc`); when
  full, everything is flushed (as early VMware did).

Why chunks: the engine chains a jump straight to its target only when the target is on the jump's 4 KiB
page (or its block's); any other jump looks the target up in a hash table (QEMU's `lookup_tb_ptr`).
Bump order put a loop's body and its exit, translated minutes apart, on different pages, and made full
look targets up twice as often as native on xv6. A chunk holds the translations of one stretch of guest
code, so a jump that stays near in the guest stays on one TC page (docs/binary-translation.md).

Translated code is never read as data: chaining and inline caches are patched into the code itself
(`patch`), which needs the engine's translation of the patched range dropped (ctl_remove_cache).
"""

from __future__ import annotations

import bisect
import struct
from dataclasses import asdict, dataclass
from typing import Callable, Protocol

CALLOUT_SLOTS = 0x10000
TC_SIZE = 0x200000  # 2 MiB: slots + code
CHUNK = 0x1000  # TC bytes a stretch of guest code gets at a time: the engine's page
CHUNK_SKIP = 1024 + 15  # space a new chunk may leave unused before it (_fresh)
STRETCH_SHIFT = 10  # guest code shares a chunk per 1 KiB: translations are ~3x the guest bytes
INT3 = 0xCC


@dataclass(slots=True)
class Counters:
    """What the translator and its cache did, by event (stats read them by name, in this order)."""

    translations: int = 0
    bytes: int = 0
    chained: int = 0
    chain_patches: int = 0
    lookups: int = 0
    misses: int = 0
    ic_misses: int = 0
    callouts: int = 0
    evictions: int = 0
    flushes: int = 0
    invalidations: int = 0
    code_stores: int = 0
    adaptive: int = 0
    unadapted: int = 0
    widened: int = 0  # compare trees built for inline caches (Translator.widen), first or again

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class Insn:
    """One guest instruction and what it became."""

    __slots__ = ("geip", "size", "text", "kind", "tc", "tc_end", "esp_fix")

    def __init__(self, geip, size, text, kind):
        self.geip, self.size, self.text, self.kind = geip, size, text, kind
        self.tc = self.tc_end = 0
        self.esp_fix: dict[int, int] = {}  # TC address inside the sequence -> ESP correction on a fault


class Block:
    """A translated unit: at most 12 guest instructions, or up to a terminator."""

    __slots__ = (
        "geip",
        "gend",
        "tc",
        "tc_end",
        "insns",
        "frames",
        "source",
        "deps",
        "alive",
        "sites",
        "starts",
        "linked_slots",
    )

    def __init__(self, geip):
        self.geip = geip
        self.gend = geip
        self.tc = self.tc_end = 0
        self.insns: list[Insn] = []
        self.frames: set[int] = set()  # guest-physical frames the code came from
        self.source: list[tuple[int, bytes]] = []  # (guest-physical address, bytes) translated from
        self.deps: set[str] = set()  # virtual-CPU fields baked in as immediates
        self.alive = True
        self.sites: list[int] = []  # callout slots owned
        self.starts: dict[int, Insn] = {}  # TC address -> guest instruction starting there
        self.linked_slots: set[int] | None = None  # callout slots the C hook continues here from

    def insn_at(self, tc_addr: int):
        """(Insn, esp correction) for a TC address inside this block, or (None, 0)."""
        for ins in self.insns:
            if ins.tc <= tc_addr < ins.tc_end:
                return ins, ins.esp_fix.get(tc_addr, 0)
        return None, 0


class Site:
    """A callout slot's meaning: `kind` and its arguments."""

    __slots__ = (
        "kind",
        "block",
        "insn",
        "target",
        "patch_at",
        "ic",
        "hits",
        "ic_next",
        "ret_addr",
        "pop",
        "raw",
        "after_sti",
        "tree",
        "seen",
        "slot",
    )

    def __init__(self, kind, block=None, insn=None, target=None, patch_at=None):
        self.kind, self.block, self.insn, self.target, self.patch_at = kind, block, insn, target, patch_at
        self.ic: list[int] = []  # TC addresses of inline-cache entries (indirect branches, ret)
        self.hits: list[int] = []  # TC addresses of their hit stubs
        self.ic_next = 0
        self.ret_addr = None
        self.pop = 0
        self.raw = b""
        self.after_sti = False
        self.tree: dict[int, int] | None = None  # a compare-tree inline cache: guest target -> its hit stub
        self.seen: set[int] = set()  # targets missed since the site was translated (Translator.widen)
        self.slot = 0  # an inline cache's miss callout slot (where its trees' miss paths go)


class TcMirrorLike(Protocol):
    """A copy of TCache.blocks and of its blocks' instruction starts (TCache.mirror)."""

    def put(self, block: Block) -> None: ...

    def drop(self, block: Block) -> None: ...

    def clear(self) -> None: ...


class TCache:
    """Code memory plus the maps guest EIP -> block and TC address -> block."""

    def __init__(self, write, base: int, size: int = TC_SIZE, remove_cache=None):
        self._write = write  # write(linear TC address, bytes): to the TC's backing
        self.remove_cache = remove_cache  # drop the engine's translations of [lo, hi)
        self.on_flush: Callable[[], None] | None = None  # drop what the hypervisor keeps per translation
        self.hook_room: Callable[[int], bool] | None = None  # room for n more hooked TC instructions?
        self.on_invalidate: Callable[[Block], None] | None = None  # a block with linked_slots went
        # a copy of `blocks` and of the blocks' instruction starts kept elsewhere (modes/full/deliverfast.py
        # TcMirror: put(block) when added, drop(block) when no longer the live entry, clear() on a reset)
        self.mirror: TcMirrorLike | None = None
        self.base = base
        self.size = size
        self.code_base = base + CALLOUT_SLOTS
        self.end = base + size
        self.counters = Counters()
        self.reset()

    def reset(self) -> None:
        self.next = self.code_base  # the chunks end here: [code_base, next) is the code area in use
        self.blocks: dict[int, Block] = {}  # guest EIP -> live block
        if self.mirror is not None:
            self.mirror.clear()
        self.order: list[Block] = []  # in the order translated
        self._by_tc: list[Block] = []  # by TC address
        self.tc_starts: list[int] = []  # their TC addresses, sorted
        self._chunks: dict[int, tuple[int, int]] = {}  # guest stretch -> (free from, chunk end)
        self.sites: list[Site | None] = []
        self._write(self.base, bytes([INT3]) * CALLOUT_SLOTS)

    def contains(self, addr: int) -> bool:
        return self.base <= addr < self.end

    def in_code(self, addr: int) -> bool:
        return self.code_base <= addr < self.next

    # -- allocation ----------------------------------------------------------------------------------
    def room(self, nbytes: int, nslots: int) -> bool:
        if self.hook_room is not None and not self.hook_room(nslots):
            return False  # the code hooks on TC copies are at their cap: a flush frees them
        room = self.next + CHUNK_SKIP + max(nbytes, CHUNK) <= self.end  # (_fresh may skip to the next page)
        return room and len(self.sites) + nslots <= CALLOUT_SLOTS

    def flush(self) -> None:
        """Drop every translation (the TC is full, or a test asks)."""
        self.counters.flushes += 1
        self.counters.evictions += sum(1 for b in self.order if b.alive)
        for b in self.order:
            b.alive = False
        used_hi = self.next
        self.reset()
        if self.on_flush is not None:
            self.on_flush()  # bookkeeping per block goes with the blocks: bounded by the TC
        if self.remove_cache is not None:
            # the callout slots always hold the same bytes: only code fragments are dropped
            self.remove_cache(self.code_base, used_hi)

    def new_site(self, site: Site) -> int:
        self.sites.append(site)
        return self.base + len(self.sites) - 1

    def site_at(self, addr: int) -> Site | None:
        i = addr - self.base
        return self.sites[i] if 0 <= i < len(self.sites) else None

    def place(self, geip: int | None) -> int:
        """Where the next translation of guest code at `geip` goes: the free space of its stretch's chunk,
        or new space (None: no stretch). `alloc` then takes what the code used."""
        if geip is not None:
            at, end = self._chunks.get(geip >> STRETCH_SHIFT, (0, 0))
            if end - at >= 64:
                return at
        return self._fresh(geip is not None)

    def _chunky(self) -> bool:
        """New chunks while the code area is under half full; past that, plain bump allocation, so that a
        guest whose code is spread thin flushes at most about twice as often as bump order alone would."""
        return (self.next - self.code_base) * 2 < self.end - self.code_base

    def _fresh(self, chunk: bool) -> int:
        """Where new space starts: 16-aligned; a chunk on a page of its own unless 1 KiB of this one is left."""
        at = (self.next + 15) & ~15
        if chunk and self._chunky() and CHUNK - (at & (CHUNK - 1)) < CHUNK_SKIP - 15:
            at = (at + CHUNK - 1) & ~(CHUNK - 1)
        return at

    def alloc(self, geip: int | None, at: int, nbytes: int) -> bool:
        """Take [at, at + nbytes) as `place(geip)` offered it; False when it does not fit there (the caller
        lays the code out again at `place`, now new space, which holds anything)."""
        key = None if geip is None else geip >> STRETCH_SHIFT
        chunk = self._chunks.get(key) if key is not None else None
        if key is not None and chunk is not None and chunk[0] == at:
            if at + nbytes > chunk[1]:
                del self._chunks[key]  # full: the stretch's next translation starts a chunk
                return False
            self._chunks[key] = (at + nbytes, chunk[1])
            return True
        assert at == self._fresh(key is not None), (hex(at), hex(self.next))
        end = at + nbytes
        if key is not None and self._chunky():
            end = max(end, (at + CHUNK) & ~(CHUNK - 1))  # to the engine's page boundary
            self._chunks[key] = (at + nbytes, end)
        self.next = end
        return True

    def take(self, geip: int | None, nbytes: int) -> int:
        """Room for nbytes of code known in size beforehand, near the translations of `geip`."""
        at = self.place(geip)
        if not self.alloc(geip, at, nbytes):
            at = self.place(geip)
            self.alloc(geip, at, nbytes)
        return at

    def emit(self, data: bytes) -> int:
        """Write position-independent code in space of its own."""
        at = self.take(None, len(data))
        self.write_at(at, data)
        return at

    def write_at(self, at: int, data: bytes) -> None:
        self._write(at, data)
        self.counters.bytes += len(data)

    def patch(self, addr: int, data: bytes) -> None:
        self._write(addr, data)
        if self.remove_cache is not None:
            self.remove_cache(addr, addr + len(data))

    def patch_rel32(self, at: int, target: int) -> None:
        """Point the rel32 field at `at` (the last 4 bytes of a jmp/jcc) to `target`."""
        self.patch(at, struct.pack("<i", target - (at + 4)))

    def add(self, block: Block) -> None:
        self.blocks[block.geip] = block
        if self.mirror is not None:
            self.mirror.put(block)
        self.order.append(block)
        i = bisect.bisect_right(self.tc_starts, block.tc)
        self.tc_starts.insert(i, block.tc)
        self._by_tc.insert(i, block)
        self.counters.translations += 1

    # -- lookups ---------------------------------------------------------------------------------------
    def block_at(self, tc_addr: int) -> Block | None:
        i = bisect.bisect_right(self.tc_starts, tc_addr) - 1
        if i < 0:
            return None
        b = self._by_tc[i]
        return b if b.tc <= tc_addr < b.tc_end else None

    def guest_eip(self, tc_addr: int) -> tuple[int, int, bool] | None:
        """(guest EIP, ESP correction, at an instruction start) for a TC address, or None. At a
        callout slot the guest is about to run the site's instruction (a chain: the target; an
        indirect branch: its target is still pushed, 4 bytes below the guest's ESP)."""
        if self.base <= tc_addr < self.code_base:
            site = self.site_at(tc_addr)
            if site is None:
                return None
            if site.kind == "chain":
                return site.target, 0, True
            return site.insn.geip, 4 if site.kind in ("jmp_ind", "call_ind") else 0, True
        b = self.block_at(tc_addr)
        if b is None:
            return None
        ins = b.starts.get(tc_addr)
        if ins is not None:
            return ins.geip, 0, True
        ins, fix = b.insn_at(tc_addr)
        if ins is None:
            return None
        return ins.geip, fix, False
