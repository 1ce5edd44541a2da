"""The instruction addresses of each block the engine runs (Machine.block_insns), with an optional mirror.

The clock counts a block whole when it begins; an event that leaves it early takes the instructions
that did not retire back off the count (Vcpu.left_block_at), which needs the block's instruction
addresses. Python decodes them when the clock first counts the block. The C event paths (native's
cpu/fastdelivery.py EventBooks, trap's modes/trapfast.py) keep a copy of this table so that they can do
the same without Python, and full indexes the blocks it runs in place (modes/full/inplace.py): every
change of the table is told to each mirror, so a copy never holds an entry the table has dropped or
replaced.
"""

from __future__ import annotations

from typing import Protocol


class BlockMirror(Protocol):
    def put(self, address: int, addrs: tuple[int, ...], end: int) -> None: ...

    def drop(self, address: int) -> None: ...

    def clear(self) -> None: ...


class BlockInsns(dict):
    """block address -> (instruction addresses, end address); a dict whose every change is also made
    on each attached mirror. Changes other than set, delete, pop and clear are not offered."""

    mirrors: tuple[BlockMirror, ...] = ()

    def attach(self, mirror: BlockMirror) -> None:
        """Keep `mirror` equal to this table from now on, starting with the entries it holds now."""
        for address, (addrs, end) in self.items():
            mirror.put(address, addrs, end)
        self.mirrors = (*self.mirrors, mirror)

    def __setitem__(self, address: int, entry: tuple) -> None:
        super().__setitem__(address, entry)
        for m in self.mirrors:
            m.put(address, entry[0], entry[1])

    def __delitem__(self, address: int) -> None:
        super().__delitem__(address)
        for m in self.mirrors:
            m.drop(address)

    def pop(self, address, *default):
        entry = super().pop(address, *default)
        for m in self.mirrors:
            m.drop(address)
        return entry

    def clear(self) -> None:
        super().clear()
        for m in self.mirrors:
            m.clear()

    def _refused(self, *args, **kwargs):
        raise TypeError("BlockInsns: use item assignment, del, pop or clear (the mirrors must see each change)")

    update = setdefault = popitem = __ior__ = _refused  # type: ignore[assignment]
