"""The instruction addresses of each block the engine runs (Machine.block_insns), with an optional mirror.

The clock counts a block whole when it begins; an event that leaves it early takes the instructions
that did not retire back off the count (Vcpu.left_block_at), which needs the block's instruction
addresses. Python decodes them when the clock first counts the block. Native's C event path
(cpu/fastdelivery.py EventBooks) keeps a copy of this table so that it can do the same without
Python: every change of the table is told to the mirror, so the copy never holds an entry the table
has dropped or replaced.
"""

from __future__ import annotations

from typing import Protocol


class BlockMirror(Protocol):
    def put(self, address: int, addrs: tuple[int, ...], end: int) -> None: ...

    def drop(self, address: int) -> None: ...

    def clear(self) -> None: ...


class BlockInsns(dict):
    """block address -> (instruction addresses, end address); a dict whose every change is also made
    on `mirror` when one is attached. Changes other than set, delete, pop and clear are not offered."""

    mirror: BlockMirror | None = None

    def __setitem__(self, address: int, entry: tuple) -> None:
        super().__setitem__(address, entry)
        if self.mirror is not None:
            self.mirror.put(address, entry[0], entry[1])

    def __delitem__(self, address: int) -> None:
        super().__delitem__(address)
        if self.mirror is not None:
            self.mirror.drop(address)

    def pop(self, address, *default):
        entry = super().pop(address, *default)
        if self.mirror is not None:
            self.mirror.drop(address)
        return entry

    def clear(self) -> None:
        super().clear()
        if self.mirror is not None:
            self.mirror.clear()

    def _refused(self, *args, **kwargs):
        raise TypeError("BlockInsns: use item assignment, del, pop or clear (the mirror must see each change)")

    update = setdefault = popitem = __ior__ = _refused  # type: ignore[assignment]
