"""full delivers the common events through the guest's IDT in C (modes/full/deliverfast.py, bt/_callout.c
full_intr_hook over cpu/_evdeliver.h, the code trap delivers with): `int n`, #DE and #GP from ring 3 and #DE
in the kernel's translated code, and the #PF of a refused fill (FullVcpu.deliver), entering the
handler's translation when the C copy of the translation cache knows it. The C path must leave exactly what the Python path (CPUVIRT_FULL_DELIVERY_C=0) leaves
wherever it can be seen: the console, the event counts and reasons (in the same order), virtual time, the
memory, shadow-paging and translation-cache counters, the registers and counters at every engine event
Python handles, and the trace. The guests: the nanobench image, trap's hostile delivery guest
(tests/guests/trap_deliver.S: gates not present, below the caller's CPL, past the IDT limit, the IDT's and
TSS's pages dropped from the shadow, frames across a page, on a page whose D bit is clear, on a read-only
page under CR0.WP = 0, over a traced page table, the IDT remapped), and tests/guests/full_deliver.S (a
handler's code rewritten between events, its gate moved to another handler, a gate into a second kernel
code segment, #DE at several kernel sites), also with the translation cache flushed every few
translations."""

from __future__ import annotations

import dataclasses
import json

import pytest

from cpuvirt.bt.tcache import TCache
from cpuvirt.engine import regs as R
from cpuvirt.modes.full.vcpu import FullVcpu
from cpuvirt.runner import run_guest
from tests.runs import run_record

GPRS = (R.EAX, R.EBX, R.ECX, R.EDX, R.ESI, R.EDI, R.EBP, R.ESP, R.EIP, R.EFLAGS, R.CS, R.SS, R.DS, R.ES, R.FS, R.GS)
NB_N = 200
LOOPS = 60  # full_deliver.S


def _run(image, monkeypatch, c_path: bool, trace_path=None, budget: int = 50_000_000):
    """Run the guest under full; record, at every engine event Python handles, the event, the registers,
    virtual time and the counters a reader sees then, in order."""
    seen: list[tuple] = []
    cpus = []
    original = FullVcpu.on_engine_event

    def on_engine_event(self, intno, error_code, soft, eip):
        seen.append(
            (
                intno,
                eip,
                tuple(self.regs.read(r) for r in GPRS),
                self.clock.now,
                self.clock.instructions,
                tuple(self.counts.items()),
                tuple(self.reasons.items()),
                dataclasses.astuple(self.tc.counters),
                self.virtual_cpu.crs(),
                self.virtual_cpu.iopl,
            )
        )
        return original(self, intno, error_code, soft, eip)

    monkeypatch.setattr(FullVcpu, "on_engine_event", on_engine_event)
    monkeypatch.setenv("CPUVIRT_FULL_DELIVERY_C", "1" if c_path else "0")
    res = run_guest(str(image), "full", 32, budget, trace_path=trace_path, on_start=cpus.append)
    monkeypatch.undo()
    hv = cpus[-1]
    vcpu = hv.vcpu
    assert res.outcome == "exit" and res.status == 0, (res.message, res.console)
    vcpu._loaded.get(R.CS)  # takes in the loads C made
    end = (
        tuple(vcpu.regs.read(r) for r in GPRS),
        tuple(vcpu.counts.items()),
        tuple(vcpu.reasons.items()),
        dataclasses.astuple(vcpu.tc.counters),
        vcpu.virtual_cpu.crs(),
        dict(vcpu._loaded),
        hv.shadow.counters.as_dict(),
        vcpu.mmu.counters.as_dict(),
    )
    return res, seen, end, vcpu


def _same(c_run, py_run) -> None:
    c_res, c_seen, c_end, _ = c_run
    py_res, py_seen, py_end, _ = py_run
    assert run_record(c_res) == run_record(py_res)  # console, counts, icount, virtual time, memory counters, tally
    assert c_end == py_end  # registers, counts, reasons, TC, shadow and MMU counters, CRs, `_loaded`
    # every event Python handled in the C run, as a reader saw the vCPU then, was the same in the Python
    # run, in the same order: the C deliveries in between changed nothing else
    py_index: dict = {}
    for k, record in enumerate(py_seen):
        py_index.setdefault(record[:2] + record[3:5], []).append(k)
    last = -1
    for record in c_seen:
        candidates = [k for k in py_index.get(record[:2] + record[3:5], []) if k > last]
        assert candidates, (record[0], hex(record[1]))
        last = candidates[0]
        assert record == py_seen[last], (record[0], hex(record[1]))


def _mirror_is_true(vcpu) -> None:
    """What C knows of the translation cache is what Python's says: every guest EIP C would enter is
    the live translation's, every TC address C maps back is a translated instruction's start."""
    dl, tc = vcpu.fdeliver.dl, vcpu.tc
    entries = [(e.geip, e.tc) for e in dl.entry if e.tc]
    starts = [(s.tc, s.geip) for s in dl.start if s.tc]
    for geip, at in entries:
        b = tc.blocks.get(geip)
        assert b is not None and b.alive and b.tc == at, hex(geip)
    for at, geip in starts:
        assert tc.guest_eip(at) == (geip, 0, True), hex(at)
    assert len(entries) >= len(tc.blocks) // 2 and len(starts) > 0


@pytest.fixture(scope="module")
def nanobench(nanobench_image):
    return nanobench_image(NB_N)


def test_nanobench_deliveries_in_c_leave_what_python_leaves(nanobench, monkeypatch):
    c_run = _run(nanobench, monkeypatch, True)
    py_run = _run(nanobench, monkeypatch, False)
    c_cpu, py_cpu = c_run[3], py_run[3]
    assert py_cpu.fdeliver.delivered == 0
    # every system call (one more: the exit) and every kernel #DE, but each kind's first; every kernel #PF
    # of a refused fill but the first (its handler's translation is made by then)
    assert c_cpu.fdeliver.delivered == 3 * NB_N - 2, c_cpu.fdeliver.delivered
    assert len(c_run[1]) == len(py_run[1]) - (2 * NB_N - 1)
    _same(c_run, py_run)
    _mirror_is_true(c_cpu)


def test_full_s_hostile_deliveries(test_guest, monkeypatch):
    image = test_guest("full_deliver")
    c_run = _run(image, monkeypatch, True)
    py_run = _run(image, monkeypatch, False)
    assert b"FAIL" not in c_run[0].console and b"PASS full's event deliveries" in c_run[0].console
    c_cpu = c_run[3]
    # per loop 11 events: 2 kernel #DE; ring 3's 4 int 0x82, 2 int 0x80, #DE, #GP, and int 0x83 (into the
    # second CS: always Python's)
    assert c_cpu.fdeliver.delivered >= LOOPS * 9, c_cpu.fdeliver.delivered
    assert len(c_run[1]) >= LOOPS  # int 0x83, and the deliveries after a rewrite or a gate move
    _same(c_run, py_run)
    _mirror_is_true(c_cpu)
    native = run_guest(str(image), "native", 32, 50_000_000)
    assert c_run[0].console == native.console


def test_trap_s_hostile_deliveries_under_full(test_guest, monkeypatch):
    image = test_guest("trap_deliver")
    c_run = _run(image, monkeypatch, True)
    py_run = _run(image, monkeypatch, False)
    assert b"FAIL" not in c_run[0].console and b"PASS trap's event deliveries" in c_run[0].console
    assert c_run[3].fdeliver.delivered >= 2000, c_run[3].fdeliver.delivered
    _same(c_run, py_run)
    native = run_guest(str(image), "native", 32, 50_000_000)
    assert c_run[0].console == native.console


def test_flushes_of_the_translation_cache(test_guest, monkeypatch):
    """A flush drops every translation: C must not enter one (nor map a TC address) from before it."""
    room = TCache.room
    calls = {"n": 0}

    def flushing_room(self, nbytes, nslots):
        calls["n"] += 1
        return room(self, nbytes, nslots) and calls["n"] % 61 != 0  # a flush every 61 translations

    image = test_guest("full_deliver")
    monkeypatch.setattr(TCache, "room", flushing_room)
    c_run = _run(image, monkeypatch, True)
    monkeypatch.setattr(TCache, "room", flushing_room)
    calls["n"] = 0
    py_run = _run(image, monkeypatch, False)
    c_cpu = c_run[3]
    assert c_cpu.tc.counters.flushes > 2 and c_cpu.fdeliver.delivered >= LOOPS * 5
    _same(c_run, py_run)
    _mirror_is_true(c_cpu)


def test_a_trace_keeps_the_python_path_and_the_same_trace(test_guest, monkeypatch, tmp_path):
    image = test_guest("full_deliver")
    a, b = tmp_path / "c.jsonl", tmp_path / "py.jsonl"
    c_run = _run(image, monkeypatch, True, trace_path=str(a))
    py_run = _run(image, monkeypatch, False, trace_path=str(b))
    assert c_run[3].fdeliver.delivered == 0

    def lines(path):
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        rows[-1].pop("wall_s", None)
        return rows

    assert lines(a) == lines(b)
    assert c_run[1] == py_run[1] and c_run[2] == py_run[2] and run_record(c_run[0]) == run_record(py_run[0])


def test_the_switches(nanobench, monkeypatch):
    """CPUVIRT_FULL_EVENTS_C=0 turns the C delivery off with the rest of full's event C."""
    monkeypatch.setenv("CPUVIRT_FULL_EVENTS_C", "0")
    cpus: list = []
    run_guest(str(nanobench), "full", 32, 0, on_start=cpus.append)
    fd = cpus[-1].vcpu.fdeliver
    assert fd is not None and not fd.enabled and fd.delivered == 0


def test_the_block_copy_against_a_model():
    """The copy of Machine.block_insns (cpu/_evdeliver.h, two-way sets, with cpu/evdeliver.BlockCopyKeeper)
    never answers "no entry" for an entry the table holds, never holds an entry the table dropped, and
    asks Python only for a set holding more entries than it has slots (or one it cannot copy)."""
    import ctypes
    import random

    from cpuvirt.bt.fastcallout import _lib, _Table
    from cpuvirt.cpu.evdeliver import BLOCK_MAX_INSNS, BlockCopyKeeper, block_set
    from cpuvirt.machine.blocks import BlockInsns
    from cpuvirt.modes.full.deliverfast import _signatures

    lib = _lib()
    assert lib is not None
    _signatures(lib)
    t = _Table()
    pt = ctypes.c_void_p(ctypes.addressof(t))
    table = BlockInsns()
    keeper = BlockCopyKeeper(
        table,
        lambda a, words, n, end: lib.full_blocks_put(pt, a, words, n, end),
        lambda a: lib.full_blocks_drop(pt, a),
        lambda: lib.full_blocks_clear(pt),
        t.dl.block,
    )
    table.attach(keeper)
    rng = random.Random(7)
    # addresses crowded into few sets: 3 and more entries per set are common
    by_set: dict[int, list[int]] = {}
    a = 0x100000
    while sum(len(v) for v in by_set.values() if len(v) >= 2) < 400:
        by_set.setdefault(block_set(a), []).append(a)
        a += rng.randrange(1, 64)
    pool = [x for v in by_set.values() if len(v) >= 2 for x in v[:5]]
    b = t.dl.block
    for step in range(6000):
        x = rng.choice(pool)
        r = rng.random()
        if r < 0.5:
            n = rng.choice((1, 2, 3, BLOCK_MAX_INSNS, BLOCK_MAX_INSNS + 1))  # the last one is never copied
            table[x] = (tuple(x + 2 * k for k in range(n)), x + 2 * n)
        elif r < 0.9:
            table.pop(x, None)
        elif r < 0.901:
            table.clear()
        for y in set(pool[step % 50 :: 50]) | {x}:
            s = block_set(y)
            held = [b[k] for k in (s, s + 1) if b[k].n and b[k].address == y]
            live = {z for z in table if block_set(z) == s}
            if held:
                addrs, end = table[y]  # held: the table has it, as held
                assert held[0].first == addrs[0] and held[0].end == end and held[0].n == len(addrs)
            elif y in table:
                assert b[s].ambiguous  # the table has it, the copy does not: "ask Python"
            if b[s].ambiguous:  # only a crowded set, or one holding an entry too long to copy
                assert len(live) > 2 or any(len(table[z][0]) > BLOCK_MAX_INSNS for z in live), hex(y)
