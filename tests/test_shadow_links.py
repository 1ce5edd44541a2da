"""ShadowPaging's reverse map (`rmap`: guest PDE/PTE address -> the (root, page) entries derived from it) and
`frame_refs` (guest frame -> how many links point into it) are bookkeeping that many paths keep in step with
the roots' entries: Python's own fills, zaps, invlpgs and trims, and the fold of what the C paths did (entries
memory/_tlbfill.c made, invlpgs, ptemods and zaps modes/_trapfast.c, bt/_callout.c and modes/hw/_fastexit.c
made, ShadowPaging._fold). After whole runs under every shadow-paging mode both must be exactly what the live
roots' entries say, and the C copy's `linked` bits must hold every linked word (a word linked in Python but not
in C would let a C store skip a zap)."""

from __future__ import annotations

from collections import Counter

import pytest

from cpuvirt.memory.shadow import PAGE_MASK
from cpuvirt.nanobench import build
from cpuvirt.runner import run_guest

MODES = [("trap", None), ("full", None), ("hw", {"ept": False})]


def expected_links(shadow) -> tuple[dict, Counter]:
    rmap: dict[int, set] = {}
    refs: Counter = Counter()
    for key, root in shadow.roots.items():
        for page, e in root.entries.items():
            for addr in (e[3], e[4]):
                if addr < 0:
                    continue
                rmap.setdefault(addr, set()).add((key, page))
                refs[addr & PAGE_MASK] += 1
    return rmap, refs


def _check(path, mode, options):
    hvs: list = []
    res = run_guest(str(path), mode, 32, 60_000_000, mode_options=options, on_start=hvs.append)
    assert res.outcome == "exit", res.message
    shadow = hvs[0].machine.mmu.strategy
    shadow._fold()
    rmap, refs = expected_links(shadow)
    assert {a: set(s) for a, s in shadow.rmap.items()} == rmap
    assert dict(shadow.frame_refs) == dict(refs)
    linked = shadow.mirror._linked if shadow.mirror is not None else None
    if linked is not None:
        for addr in rmap:
            k = addr >> 2
            assert linked[k >> 3] >> (k & 7) & 1, hex(addr)
    return shadow


@pytest.mark.parametrize("mode,options", MODES, ids=[m if o is None else "hw-noept" for m, o in MODES])
@pytest.mark.parametrize("guest", ["nanobench", "ptemod_c", "true_pf", "cr3_switch", "usermode"])
def test_reverse_map_matches_the_entries_after_a_run(guest, mode, options, test_guest, tmp_path):
    if guest == "nanobench":
        path = tmp_path / "nb.bin"
        path.write_bytes(build(300, False))
    elif guest == "usermode":
        path = guest
    else:
        path = test_guest(guest)
    shadow = _check(path, mode, options)
    assert shadow.rmap, "no links at all: the check would pass on anything"
