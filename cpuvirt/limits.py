"""Caps on what the hypervisor keeps per guest (docs/security.md, "Bounds: memory").

A guest can run code at any of 2^32 addresses, so every table keyed by a guest address (decoded
blocks and sites, kept to avoid decoding twice) is a cache with a cap: when full it is emptied and
refilled on demand. Nothing correct depends on an entry being there; a refill costs a decode.
"""

from __future__ import annotations

CACHE_ENTRIES = 1 << 17  # entries per cache of decoded blocks / sites / linear pages


# Machine._count_block's decodes, kept for the blocks the engine translates again (the same bytes at the
# same address in the same mode: xv6's usertests counts 2,633 distinct blocks 1.56 M times). Each holds
# the block's bytes and capstone's tuples (about 4 KiB for 16 instructions), so the cache is smaller
# than the others: DECODED_BLOCKS entries of at most DECODED_BLOCK_INSNS instructions (32 MiB at most);
# a longer block is decoded each time.
DECODED_BLOCKS = 4096
DECODED_BLOCK_INSNS = 32


def put(table: dict, key, value, cap: int | None = None) -> None:
    """table[key] = value, emptying the table first when it holds `cap` (CACHE_ENTRIES) entries."""
    if len(table) >= (CACHE_ENTRIES if cap is None else cap) and key not in table:
        table.clear()
    table[key] = value


# One-address code hooks on intercepted instructions (cpu/intercept.py). The engine looks at every code
# hook when it translates an instruction and each time a hooked one runs, so their number is a host
# cost on all translation: it is bounded, not cached (a dropped hook could not be put back before its
# instruction runs again).
INTERCEPT_SITES = 32768  # beyond, the hypervisor stops the guest (status 123)
SSE_SITES = 4096  # alignment-checked SSE sites (cpu/ssealign.py); beyond, further sites are not checked
