"""The Python side of cpu/_evdeliver.h: event delivery through the guest's IDT in C, shared by mode `trap`
(modes/trapfast.py) and mode `full` (modes/full/deliverfast.py); and of cpu/_blockcopy.h, the copy of
Machine.block_insns kept for Vcpu.left_block_at by those and by native's and hw's C delivery
(cpu/fastdelivery.py EventBooks): `BlockCopy`, one entry of it, and `BlockCopyKeeper`."""

from __future__ import annotations

import ctypes

from cpuvirt.x86.vectors import MNEMONIC, Vector

# the vectors the C deliveries take as faults (#DE; #GP from ring 3 only), in trap and full alike
FAULTS = (int(Vector.DE), int(Vector.GP))

BLOCK_SLOTS, BLOCK_MAX_INSNS = 4096, 58


class BlockCopy(ctypes.Structure):
    """Mirror of block_t."""

    _fields_ = [
        ("end", ctypes.c_uint64),
        ("address", ctypes.c_uint32),
        ("first", ctypes.c_uint32),
        ("n", ctypes.c_uint16),
        ("offset", ctypes.c_uint16 * BLOCK_MAX_INSNS),
        ("ambiguous", ctypes.c_uint16),
        ("pad", ctypes.c_uint16 * 2),
    ]


def block_set(address: int) -> int:
    """The first slot of the set of Machine.block_insns' entry `address` in the copy (ed_block_set: two
    slots a set)."""
    return (((address & 0xFFFFFFFF) * 2654435761) & 0xFFFFFFFF) >> 21 << 1


class BlockCopyKeeper:
    """The Python side of the copy of Machine.block_insns (a BlockMirror, machine/blocks.py): calls the C
    put/drop/clear of one table and keeps its sets exact about what they lost. C marks a set ambiguous
    when a put into a full set drops a live entry (the C path must then ask Python); here each set's
    live table entries are known, so a set is ambiguous only while the table holds an entry mapped to
    it that neither slot holds, and when an entry a slot held goes, another of the set's entries is put
    back. (Without this an ambiguous set stayed so until the table was cleared.)"""

    def __init__(self, table: dict, put, drop, clear, blocks):
        self._table = table  # Machine.block_insns
        self._put, self._drop, self._clear = put, drop, clear  # the C functions, bound to their table
        self._blocks = blocks  # the C slots (a ctypes array of BlockCopy)
        self._keys: dict[int, set[int]] = {}  # set -> the table's entries mapped there

    @classmethod
    def keep(cls, table, lib, prefix: str, state, blocks) -> "BlockCopyKeeper":
        """The keeper of one C copy, `lib.<prefix>_put/_drop/_clear` on `state` (its slots: `blocks`),
        attached to `table` (Machine.block_insns) from now on."""
        put, drop, clear = (getattr(lib, f"{prefix}_{op}") for op in ("put", "drop", "clear"))
        keeper = cls(
            table,
            lambda a, words, n, end: put(state, a, words, n, end),
            lambda a: drop(state, a),
            lambda: clear(state),
            blocks,
        )
        table.attach(keeper)
        return keeper

    def _c_put(self, address: int, entry: tuple) -> None:
        addrs, end = entry
        words = (ctypes.c_uint32 * len(addrs))(*(a & 0xFFFFFFFF for a in addrs))
        self._put(address & 0xFFFFFFFF, words, len(addrs), end)

    def _held(self, s: int) -> set[int]:
        b = self._blocks
        return {b[k].address for k in (s, s + 1) if b[k].n}

    def _settle(self, s: int, keys: set[int]) -> None:
        """Fill a free slot of set `s` from the table's entries not held, then flag what is still lost."""
        held = self._held(s)
        missing = sorted(keys - held)
        if missing and len(held) < 2:
            entry = self._table.get(missing[0])
            if entry is not None:
                self._c_put(missing[0], entry)
                held = self._held(s)
        self._blocks[s].ambiguous = 1 if keys - held else 0

    def put(self, address: int, addrs: tuple[int, ...], end: int) -> None:
        s = block_set(address)
        keys = self._keys.setdefault(s, set())
        keys.add(address)
        self._c_put(address, (addrs, end))
        self._blocks[s].ambiguous = 1 if keys - self._held(s) else 0

    def drop(self, address: int) -> None:
        s = block_set(address)
        self._drop(address & 0xFFFFFFFF)
        keys = self._keys.get(s)
        if keys is None:
            return
        keys.discard(address)
        if not keys:
            del self._keys[s]
            self._blocks[s].ambiguous = 0
            return
        self._settle(s, keys)

    def clear(self) -> None:
        self._keys.clear()
        self._clear()

    def entry(self, address: int) -> tuple[tuple[int, ...], int] | None:
        """The copy's entry for the block at `address` (Machine.block_insns' form), or None."""
        s = block_set(address)
        for b in (self._blocks[s], self._blocks[s + 1]):
            if b.n and b.address == address & 0xFFFFFFFF:
                return tuple(b.first + b.offset[k] for k in range(b.n)), b.end
        return None


def fold_event_counts(table, soft_seen, fault_seen, counts, reasons) -> None:
    """Add the `int n` and faults a C delivery counted (`table.soft_count`, `table.fault_count`, for the
    vectors Python has delivered once: their keys are in place) to Vcpu.counts and Vcpu.reasons, and count
    from zero. Shared by trap's and full's C deliveries."""
    for v in soft_seen:
        n = table.soft_count[v]
        if n:
            table.soft_count[v] = 0
            counts["interrupt"] += n
            reasons["interrupt", f"int {v:#x}"] += n
    for v in fault_seen:
        n = table.fault_count[v]
        if n:
            table.fault_count[v] = 0
            counts["exception"] += n
            reasons["exception", MNEMONIC[v]] += n


def note_delivered(table, soft_seen: list, fault_seen: list, reasons, intno: int, soft: bool) -> None:
    """Python delivered this event: once its Vcpu.reasons key is in place, the C delivery may deliver
    the same kind and count it (`table.soft_seen` / `fault_seen`; the lists, for fold_event_counts, in
    the order the keys appeared: the summary prints them in that order)."""
    if soft:
        if 0 <= intno < 256 and not table.soft_seen[intno] and ("interrupt", f"int {intno:#x}") in reasons:
            table.soft_seen[intno] = 1
            soft_seen.append(intno)
    elif intno in FAULTS and not table.fault_seen[intno] and ("exception", MNEMONIC[intno]) in reasons:
        table.fault_seen[intno] = 1
        fault_seen.append(intno)
