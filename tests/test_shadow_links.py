"""ShadowPaging's reverse map (`rmap`: guest PDE/PTE address -> the (root, page) entries derived from it) and
`frame_refs` (guest frame -> how many links point into it) are bookkeeping that many paths keep in step with
the roots' entries: Python's own fills, zaps, invlpgs and trims, and the fold of what the C paths did (entries
memory/_tlbfill.c made, invlpgs, ptemods and zaps modes/_trapfast.c, bt/_callout.c and modes/hw/_fastexit.c
made, ShadowPaging._fold). After whole runs under every shadow-paging mode both must be exactly what the live
roots' entries say, and the C copy's `linked` bits must be exactly the linked words (a word linked in Python but
not in C would let a C store skip a zap; one linked in C only would make C believe entries derive from it); the per-site counts of traced writes must add up to the ptemods and
fallbacks counted."""

from __future__ import annotations

import gc
from collections import Counter

import pytest

from cpuvirt.memory.shadow import PAGE_MASK, link
from cpuvirt.nanobench import build
from cpuvirt.runner import run_guest
from tests.conftest import requires_qemu
from tests.qemu import assert_same_console_as_qemu

MODES = [("trap", None), ("full", None), ("hw", {"ept": False})]


def expected_links(shadow) -> tuple[dict, Counter]:
    rmap: dict[int, set[int]] = {}
    refs: Counter = Counter()
    for key, root in shadow.roots.items():
        for page, e in root.entries.items():
            for addr in (e[3], e[4]):
                if addr < 0:
                    continue
                rmap.setdefault(addr, set()).add(link(key, page))
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
    # its members are kept where the garbage collector does not look (C's fold makes them too): dicts of ints
    assert not any(gc.is_tracked(links) for links in shadow.rmap.values())
    assert all(type(links) is dict and set(links.values()) == {None} for links in shadow.rmap.values())
    assert dict(shadow.frame_refs) == dict(refs)
    c = shadow.counters  # each traced write counted at its site: emulated (a ptemod) or not (a fallback)
    assert sum(shadow.traced_writes.values()) == c.ptemods + c.ptemod_fallbacks
    linked = shadow.mirror._linked if shadow.mirror is not None else None
    if linked is not None:  # after the fold, exactly rmap's words (a stale bit would make C think a word linked)
        data = bytes(linked)
        bits = {8 * i + b for i in range(len(data)) if data[i] for b in range(8) if data[i] >> b & 1}
        assert bits == {addr >> 2 for addr in rmap}, sorted(hex(k << 2) for k in bits ^ {a >> 2 for a in rmap})[:8]
    return shadow


@pytest.mark.parametrize("mode,options", MODES, ids=[m if o is None else "hw-noept" for m, o in MODES])
@pytest.mark.parametrize("guest", ["nanobench", "ptemod_c", "true_pf", "cr3_switch", "usermode", "shared_pt", "ptemod_alias"])
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


@pytest.mark.parametrize("mode,options", MODES, ids=[m if o is None else "hw-noept" for m, o in MODES])
def test_a_store_into_a_shared_page_table_zaps_the_other_roots_entry(mode, options, test_guest):
    """tests/guests/shared_pt.S: what space 2 reads after space 1's store into their shared page table is the
    new frame, as natively (a stale entry in the C copy of space 2's root would read the old one)."""
    path = test_guest("shared_pt")
    native = run_guest(str(path), "native", 32, 20_000_000)
    ours = run_guest(str(path), mode, 32, 20_000_000, mode_options=options)
    assert b"PASS" in native.console and b"FAIL" not in native.console
    assert ours.console == native.console


@requires_qemu
def test_shared_pt_console_is_qemus(test_guest):
    assert b"PASS" in assert_same_console_as_qemu(test_guest("shared_pt"), [], [])


# the switches that keep each mode's C ptemods and invlpgs Python's
C_OFF = {"trap": ("CPUVIRT_TRAP_PTEMOD_C", "CPUVIRT_INVLPG_C"), "full": ("CPUVIRT_ADAPTIVE_C", "CPUVIRT_INVLPG_C")}


@pytest.mark.parametrize("mode,options", MODES, ids=[m if o is None else "hw-noept" for m, o in MODES])
def test_a_zap_of_two_pages_flushes_both_in_c_and_in_python(mode, options, test_guest, monkeypatch):
    """tests/guests/ptemod_alias.S: a store into a PTE that maps two linear pages of the current space. The zap
    flushes exactly those pages from the engine's TLB (not the whole TLB), and the C paths (trap's and hw's
    ptemods, full's adaptive stores) flush the same pages as Python's: the same TLB fills, hits and console."""
    from cpuvirt.modes.hw.vmx import VmxCpu
    from tests.runs import run_record

    path = test_guest("ptemod_alias")
    records = []
    for c in (True, False):
        for name in C_OFF.get(mode, ()):
            monkeypatch.setenv(name, "1" if c else "0")
        monkeypatch.setattr(VmxCpu, "shadow_ptemod_c", c)
        hvs: list = []
        res = run_guest(str(path), mode, 32, 20_000_000, mode_options=options, on_start=hvs.append)
        shadow = hvs[0].machine.mmu.strategy
        records.append((run_record(res), shadow.counters.zapped))
    (c, c_zapped), (py, py_zapped) = records
    assert c == py
    assert c_zapped == py_zapped >= 2 * 64  # two pages a round
    native = run_guest(str(path), "native", 32, 20_000_000)
    assert b"PASS" in native.console and c["console"] == native.console


@requires_qemu
def test_ptemod_alias_console_is_qemus(test_guest):
    assert b"PASS" in assert_same_console_as_qemu(test_guest("ptemod_alias"), [], [])
