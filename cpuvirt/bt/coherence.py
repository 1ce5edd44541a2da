"""Keeping translations coherent with the guest: invalidation of single blocks.

A block is invalidated when the guest code it came from changes (a traced write to its frame), when a
virtual-CPU field it baked in as an immediate changes, or when the linear page it came from maps
elsewhere. Its TC space is not reused until the next flush; its entry is overwritten with a jmp to a
chain callout for the same guest EIP, so every chained jump that still leads there translates the guest
code again once, after which the entry jumps straight to the new translation.

This is the mechanism, on the translation cache alone; when a block must go (which guest bytes or
virtual-CPU values it was made from, and what changed them) is the vCPU's bookkeeping, in
modes/full/coherence.py.
"""

from __future__ import annotations

from cpuvirt.bt.tcache import Block, Site, TCache
from cpuvirt.bt.translate import _rel32


def invalidate(tc: TCache, block: Block) -> None:
    if not block.alive:
        return
    block.alive = False
    if block.linked_slots and tc.on_invalidate is not None:
        tc.on_invalidate(block)  # callout slots the C hook continued here from go back to Python
    if tc.blocks.get(block.geip) is block:
        del tc.blocks[block.geip]
        if tc.mirror is not None:
            tc.mirror.drop(block)
    tc.counters.invalidations += 1
    if block.tc_end - block.tc < 5:
        return
    slot = tc.new_site(Site("chain", block, None, block.geip, block.tc + 1))
    tc.patch(block.tc, b"\xe9" + _rel32(block.tc + 5, slot))
