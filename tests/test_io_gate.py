"""The I/O permission check holds at every in/out site, whatever CPL ran the site first.

tests/guests/io_gate_smc.S runs an `out` site at ring 0, then calls it from ring 3 with IOPL 0 (#GP,
saved EIP at the out) and with IOPL 3 (allowed), then rewrites another site in place (in -> nops ->
out -> in al, dx) and calls it from ring 3. Native (and hw) hook in/out only once the guest first
leaves ring 0 (Vcpu.enable_intercepts, lazy_io); the clock's C block cache asks the block observer
about a block only the first time its (address, size) runs, so a site translated at ring 0 before
then was never hooked and ran at ring 3 unchecked (`arm_io_gate` now empties that cache).
"""
from __future__ import annotations

import pytest

from cpuvirt.runner import run_guest

# the checks on the site first run at ring 0 (the hole), then the ones on the rewritten site
SHARED_SITE = (
    "ring 3 runs (nothing of I/O)",
    "ring 3, IOPL 0: an out site first run at ring 0 raises #GP",
    "that #GP is a fault at the out",
    "the same site at ring 0 still works",
)
IOPL3 = ("ring 3, IOPL 3: the same site is allowed", "ring 3, IOPL 3: the rewritten site is allowed")
REWRITTEN = (
    "ring 3, IOPL 0: a site rewritten to out raises #GP",
    "that #GP is at the rewritten site",
    "ring 3, IOPL 0: a site rewritten to in al, dx raises #GP",
)


def _results(path: str, mode: str) -> dict[str, bool]:
    r = run_guest(path, mode, max_insns=5_000_000)
    out = {}
    for line in r.console.decode().splitlines():
        verdict, _, name = line.partition(" ")
        if verdict in ("PASS", "FAIL"):
            out[name.split(": expected")[0]] = verdict == "PASS"
    assert len(out) == 10, r.console.decode()
    return out


@pytest.fixture(scope="module")
def guest(test_guest):
    return str(test_guest("io_gate_smc"))


@pytest.mark.parametrize("mode", ("native", "hw", "trap", "full"))
def test_site_first_run_at_ring_0_is_checked_at_ring_3(guest, mode):
    res = _results(guest, mode)
    assert all(res[name] for name in SHARED_SITE), res
    assert res["ring 3: a site rewritten to nops runs"], res


@pytest.mark.parametrize("mode", ("native", "hw", "full"))
def test_iopl_3_allows_ring_3_io(guest, mode):
    """Not trap: its kernel's iretd to ring 3 runs in place at ring 1, where IOPL cannot change (the
    image's IOPL 3 is dropped, a popf-like hole: docs/deprivileging.md); full emulates the iret."""
    res = _results(guest, mode)
    assert all(res[name] for name in IOPL3), res


@pytest.mark.parametrize("mode", ("native", "hw", "full"))
def test_site_rewritten_in_place_into_io_is_checked(guest, mode):
    """The clock counts a block again whenever the engine translates it again (engine/_vclock.c
    vclock_translated_hook), so the rewritten block is shown to the block observer. Under full the
    kernel's store into its (translated) code frame is the hypervisor's, which the engine does not see:
    its translations are dropped when the store overwrites bytes a block ran in place
    (modes/full/inplace.py), or ring 3 ran the old bytes."""
    res = _results(guest, mode)
    assert all(res[name] for name in REWRITTEN), res


def test_site_rewritten_in_place_is_checked_where_it_was_hooked_before(guest):
    """trap hooks in/out from the start: the rewritten site kept its hook, which decodes it anew."""
    res = _results(guest, "trap")
    assert all(res[name] for name in REWRITTEN), res
