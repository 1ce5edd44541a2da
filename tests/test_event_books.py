"""Native's event bookkeeping in C (cpu/_delivery.c books_t, cpu/fastdelivery.py EventBooks) against
the Python callbacks it replaces (soft_done, fault_done, pf_done), and its copy of Machine.block_insns.

The C bookkeeping takes an event's unretired instructions off the clock from a copy of the block table,
counts the event per vector, and adds its counts to Vcpu.counts/reasons when they are read. A wrong
instruction count, a stale copy or a lost counter shows as a different virtual time, instruction
count or event count from the same guest run with the Python callbacks.
"""

import pytest

from cpuvirt import limits
from cpuvirt.cpu.fastdelivery import EventBooks, FastDelivery, _lib
from cpuvirt.machine.machine import Machine
from cpuvirt.modes import get_mode

pytestmark = pytest.mark.skipif(_lib() is None,
                                reason="the C delivery is not built (python setup.py build_ext --inplace)")


def test_the_c_copy_follows_every_change_of_the_block_table(monkeypatch):
    """Set, replace, delete, pop, clear (limits.put empties a full table): the copy holds exactly the
    entries the table holds (or none for a block it cannot keep: more than 58 instructions)."""
    m = Machine(4)
    hv = get_mode("native")(m)
    vcpu = hv.vcpu
    vcpu.delivery.fast.install_intr(vcpu)
    books = vcpu.delivery.fast.books
    assert isinstance(books, EventBooks)
    table = m.block_insns
    entries = {0x1000: ((0x1000, 0x1002, 0x1007), 0x1009), 0x2000: ((0x2000,), 0x2001),
               0x3000: (tuple(range(0x3000, 0x3000 + 2 * 70, 2)), 0x3000 + 140)}
    for address, entry in entries.items():
        table[address] = entry
    assert books.entry(0x1000) == entries[0x1000] and books.entry(0x2000) == entries[0x2000]
    assert books.entry(0x3000) is None                       # too long: Python's to account
    table[0x1000] = ((0x1000, 0x1001), 0x1003)               # retranslated
    assert books.entry(0x1000) == ((0x1000, 0x1001), 0x1003)
    table[0x2000] = entries[0x3000]                          # replaced by one the copy cannot keep
    assert books.entry(0x2000) is None
    del table[0x1000]
    assert books.entry(0x1000) is None
    table[0x1000] = entries[0x1000]
    table.pop(0x1000)
    assert books.entry(0x1000) is None
    table[0x1000] = entries[0x1000]
    monkeypatch.setattr(limits, "CACHE_ENTRIES", len(table))
    limits.put(table, 0x5000, ((0x5000,), 0x5001))           # full: emptied first
    assert books.entry(0x1000) is None and books.entry(0x5000) == ((0x5000,), 0x5001)
    with pytest.raises(TypeError):
        table.update({0x6000: ((0x6000,), 0x6001)})


@pytest.mark.parametrize("guest", ["nanobench", "usermode", "exceptions", "interrupts"])
def test_a_guest_counts_the_same_with_the_books_in_c(guest, monkeypatch):
    """Whole guests (system calls from ring 3, #DE, #PF, timer interrupts) with the bookkeeping in C
    and with the Python callbacks: the same console, instructions, virtual time, event counts (in the
    same order, by reason) and MMU counters; and C did keep the books of most events."""
    from cpuvirt.runner import run_guest

    vcpus = []

    def run():
        return run_guest(guest, "native", on_start=lambda hv: vcpus.append(hv.vcpu))

    with_books = run()
    monkeypatch.setattr(FastDelivery, "keep_books", False)
    without = run()
    a, b = vcpus
    assert a.delivery.fast.books is not None and b.delivery.fast.books is None
    for field in ("outcome", "status", "console", "icount", "vtime", "counts", "mmu", "tally"):
        assert getattr(with_books, field) == getattr(without, field), field
    assert list(a.counts.items()) == list(b.counts.items())
    assert list(a.reasons.items()) == list(b.reasons.items())
    events = sum(with_books.counts.get(k, 0) for k in ("exception", "interrupt", "page_fault"))
    if guest == "nanobench":  # 5,000 each of int 0x80, #DE and #PF: all but the first of each in C
        assert a.delivery.fast.books.folded > 0.95 * events, (a.delivery.fast.books.folded, events)
        # and its 10,000 in/out at ring 0, intercepted since the guest ran at ring 3: checked in C
        assert a.delivery.fast.io_passed() > 9_000 and b.delivery.fast.io_passed() > 9_000


@pytest.mark.parametrize("guest", ["nanobench", "interrupts", "apic"])
def test_a_guest_runs_the_same_with_port_io_timed_in_c(guest, monkeypatch):
    """in/out with the access's time spent by the C hook (VirtualClock.hook_port_io, Vcpu.timed_in and
    timed_out) and with the Python hooks (hook_in, hook_out, port_io): the same console, instructions,
    virtual time (the PIT reads the clock during the access), event counts and MMU counters."""
    from cpuvirt.cpu.vcpu import Vcpu
    from cpuvirt.runner import run_guest

    vcpus = []

    def run():
        return run_guest(guest, "native", on_start=lambda hv: vcpus.append(hv.vcpu))

    timed = run()
    monkeypatch.setattr(Vcpu, "time_port_io_in_c", lambda self: None)
    python = run()
    assert hasattr(vcpus[0].clock, "_port_io") and not hasattr(vcpus[1].clock, "_port_io")
    assert timed.counts.get("io", 0) > 100
    for field in ("outcome", "status", "console", "icount", "vtime", "counts", "mmu", "tally"):
        assert getattr(timed, field) == getattr(python, field), field
