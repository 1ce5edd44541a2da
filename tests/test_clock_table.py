"""The virtual clock's block table (engine/_vclock.c): a block's instruction count is asked of Python once,
then found in C at every execution, even when other hot blocks hash to the same place. Direct-mapped, two
hot blocks of xv6's kernel shared one slot and were counted by Python 182,000 times in 800 M
instructions; the table is two-way set-associative now. The counts stay exact when three blocks share a
set (each miss asks Python again), and when one linear page comes to map another frame's code (the
table is keyed by linear address: the page's counts are dropped then)."""

from __future__ import annotations

import struct

import pytest
from capstone import CS_ARCH_X86, CS_MODE_32, Cs
from unicorn import UC_ARCH_X86, UC_MODE_32, UC_PROT_ALL, Uc
from unicorn import x86_const as X

from cpuvirt.engine.clock import VirtualClock
from cpuvirt.runner import run_guest
from cpuvirt.toolchain.assemble import new_keystone
from tests.conftest import requires_qemu
from tests.qemu import assert_same_console_as_qemu

LOOP = 0x100
# Hashed as the table does ((a ^ a >> 14) & 0x3FFE): 0x1000, 0x5001 and 0x9002 share a set, and the first
# two shared a slot of the direct-mapped table ((a ^ a >> 14) & 0x3FFF).
F1, F2, F3 = 0x1000, 0x5001, 0x9002
ROUNDS = 1000


def _run(calls: list[int]) -> tuple[int, int, dict]:
    """Run ROUNDS of `call f` for each f in calls; (virtual time, instructions, Python counts per block)."""
    ks = new_keystone()
    uc = Uc(UC_ARCH_X86, UC_MODE_32)
    uc.mem_map(0, 0x20000, UC_PROT_ALL)
    body = "; ".join(f"call {f:#x}" for f in calls)
    loop = f"mov ecx, {ROUNDS}; mov esp, 0x1f000; again: {body}; dec ecx; jnz again; hlt"
    uc.mem_write(LOOP, bytes(ks.asm(loop, LOOP)[0]))
    for f in calls:
        uc.mem_write(f, bytes(ks.asm("inc eax; ret", f)[0]))
    cs = Cs(CS_ARCH_X86, CS_MODE_32)
    asked: dict[tuple[int, int], int] = {}
    executed = [0]

    def count(address: int, size: int) -> int:
        asked[(address, size)] = asked.get((address, size), 0) + 1
        return len(list(cs.disasm_lite(bytes(uc.mem_read(address, size)), address)))

    clock = VirtualClock(uc, count)
    end = LOOP + len(ks.asm(loop, LOOP)[0]) - 1  # the hlt
    uc.emu_start(LOOP, end)
    executed[0] = 2 + ROUNDS * (len(calls) * 3 + 2)  # mov, mov; per round each call + inc + ret, dec, jnz
    assert uc.reg_read(X.UC_X86_REG_EAX) == ROUNDS * len(calls)
    return clock.now, executed[0], asked


# The table's behaviour is looked at with the clock's stubs off (CPUVIRT_CLOCK_STUBS=0): a block with a stub
# (tests/test_clock_stubs.py) no longer looks its count up.


def test_two_hot_blocks_that_share_a_set_are_counted_by_python_once(monkeypatch):
    monkeypatch.setenv("CPUVIRT_CLOCK_STUBS", "0")
    now, executed, asked = _run([F1, F2])
    assert now == executed
    assert asked[(F1, 2)] == 1 and asked[(F2, 2)] == 1, asked
    assert sum(asked.values()) <= 8, asked  # each block once (the loop's few blocks included)


@pytest.mark.parametrize("stubs", ["0", "1"])
def test_three_blocks_in_one_set_are_counted_again_but_exactly(stubs, monkeypatch):
    monkeypatch.setenv("CPUVIRT_CLOCK_STUBS", stubs)
    now, executed, asked = _run([F1, F2, F3])
    assert now == executed  # misses ask Python again; every execution still counts its instructions
    if stubs == "0":
        assert sum(asked[(f, 2)] for f in (F1, F2, F3)) > ROUNDS  # (two ways: the three evict one another)


MAILBOX = 0x7F00
A_INSNS, B_INSNS = 8, 4  # the two functions of tests/guests/remap_count.S


def _machine(hv):
    return hv.machine if hasattr(hv, "machine") else hv.vcpu.machine


@pytest.mark.parametrize("mode", ("native", "hw", "hw-noept", "trap"))
def test_a_linear_page_mapping_other_code_is_counted_again(mode, test_guest):
    """remap_count.S runs two functions of the same length and different instruction counts at one linear
    address (a CR3 switch, then a PTE store and invlpg): each call's rdtsc delta is that of the code that
    ran (Mmu.on_code_remap -> VirtualClock.drop_page). Before, the page kept the count of the code it
    showed first."""
    seen: dict = {}
    opts = {"ept": False} if mode == "hw-noept" else None
    r = run_guest(
        str(test_guest("remap_count")),
        mode.split("-")[0],
        max_insns=5_000_000,
        mode_options=opts,
        on_start=lambda hv: seen.setdefault("hv", hv),
    )
    console = r.console.decode()
    assert (r.outcome, r.status) == ("exit", 0) and "FAIL" not in console, console
    a, b, space1, space2, back, remapped_b, remapped_a = struct.unpack(
        "<7I", _machine(seen["hv"]).read_gpa(MAILBOX, 28)
    )
    assert a - b == A_INSNS - B_INSNS  # the measuring code is the same for every function
    assert space1 == a and back == a and remapped_a == a
    assert space2 == b, "after the CR3 switch the page kept the count of space 1's code"
    assert remapped_b == b, "after the PTE store and invlpg the page kept the count of the code before"
    assert _machine(seen["hv"]).clock.remapped > 0


@requires_qemu
def test_remap_count_console_is_qemus(test_guest):
    """The functions' results at the remapped address (the guest's own checks) are the same on QEMU."""
    console = assert_same_console_as_qemu(test_guest("remap_count"), [], [])
    assert console.count(b"PASS") == 6 and b"FAIL" not in console


def test_emptying_the_page_to_frame_cache_sends_every_pairing_back_to_python(test_guest, monkeypatch):
    """Mmu.code_pages is a cache with a cap (limits.py). A page it forgot could map another frame again
    through a pairing the C fill still answers (no drop of the clock's counts), so emptying it also makes
    every pairing Mmu.fill's again (FastFill.forget_pairs)."""
    from cpuvirt import limits

    seen: dict = {}
    r = run_guest(
        str(test_guest("remap_count")), "native", max_insns=5_000_000, on_start=lambda hv: seen.setdefault("hv", hv)
    )
    assert (r.outcome, r.status) == ("exit", 0)
    mmu = seen["hv"].machine.mmu
    fast = mmu.counters.fast
    assert fast is not None and any(fast.fetched) and mmu.code_pages
    monkeypatch.setattr(limits, "CACHE_ENTRIES", len(mmu.code_pages))
    frame = next(iter(mmu.code_pages.values()))
    mmu._code_remapped(0x12345000, frame)  # a page not known, with the cache full
    assert not any(fast.fetched) and mmu.code_pages == {0x12345000: frame}


@pytest.mark.parametrize("mode", ["trap", "full"])
@pytest.mark.parametrize("guest", ["interrupts", "paging"])
def test_blocks_are_counted_again_when_their_lists_are_emptied(guest, mode, monkeypatch):
    """Machine.block_insns (each block's instruction addresses, for an event that leaves a block early)
    empties at its cap (limits.CACHE_ENTRIES); the clock then forgets its counts, so that every block is
    decoded again as it runs. Before, a block the clock kept counting by itself had no list after the cap
    and its early exits retired the whole block: with a cap of 16, paging under trap retired 78,275
    instructions instead of 78,243."""
    from cpuvirt import limits
    from cpuvirt.runner import run_guest

    whole = run_guest(guest, mode, 32, 0)
    monkeypatch.setattr(limits, "CACHE_ENTRIES", 16)
    capped = run_guest(guest, mode, 32, 0)
    assert (capped.console, capped.icount, capped.vtime) == (whole.console, whole.icount, whole.vtime)
