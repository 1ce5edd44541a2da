"""full answers the guest kernel's segment loads (mov/pop of DS ES FS GS), `mov r32, cr2` and iretd (to its
own ring, or to ring 3 with a plain frame) in its C callout hook (modes/full/evfast.py, bt/_callout.c,
cpu/_evseg.h shared with trap). The C path must leave exactly what the Python path
(CPUVIRT_FULL_EVENTS_C=0) leaves wherever it can be seen: the console, the event counts and reasons (in
the same order), the translation cache's counters, virtual time, the memory counters, the registers and
counters at every callout Python serves, and the trace. The guests: the nanobench image (system calls,
#DE, #PF and their handlers), trap's hostile segment-load guest (tests/guests/trap_events.S: selectors
beyond the GDT limit, not present, execute-only, RPL over DPL, a clear accessed bit, null DS and SS, a
descriptor rewritten in place, the GDT's page remapped, another GDT, iretd frames across a page, a CS
not accessed or not the loaded one) and tests/guests/full_events.S (iretd to ring 3 with the kernel's
data segments still loaded, with IOPL 3 in the image, frames across a page; one iretd site sending the
kernel to alternating targets), and tests/guests/full_events_cs.S (a delivery into a second kernel code
segment: C must leave the next event to Python while CS is not the translations' snapshot's)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from cpuvirt.bt.fastcallout import IRETD, IRETD_OUTER, LTR, MOV_CR2, MOV_SREG, POP_SREG
from cpuvirt.engine import regs as R
from cpuvirt.modes.full.vcpu import FullVcpu
from cpuvirt.runner import run_guest
from tests.runs import run_record

GPRS = (R.EAX, R.EBX, R.ECX, R.EDX, R.ESI, R.EDI, R.EBP, R.ESP, R.EIP, R.EFLAGS, R.CS, R.SS, R.DS, R.ES, R.FS, R.GS)
NB_N = 300
LOOPS = 120  # full_events.S


def _run(image, monkeypatch, c_path: bool, trace_path=None, switches=("CPUVIRT_FULL_EVENTS_C",)):
    """Run the guest under full, the C paths named by `switches` on (c_path) or off; record, at every
    callout Python serves, the site, the registers, virtual time and the counters a reader sees then, in
    order."""
    seen: list[tuple] = []
    cpus = []
    original = FullVcpu._callout_then_window

    def callout(self, site):
        seen.append(
            (
                site.insn.geip,
                tuple(self.regs.read(r) for r in GPRS),
                self.clock.now,
                self.clock.instructions,
                tuple(self.counts.items()),
                tuple(self.reasons.items()),
                dataclasses.astuple(self.tc.counters),
                self.virtual_cpu.crs(),
                self.virtual_cpu.iopl,
                self.virtual_cpu.gdtr,
            )
        )
        return original(self, site)

    monkeypatch.setattr(FullVcpu, "_callout_then_window", callout)
    for name in switches:
        monkeypatch.setenv(name, "1" if c_path else "0")
    res = run_guest(str(image), "full", 32, 20_000_000, trace_path=trace_path, on_start=cpus.append)
    monkeypatch.undo()
    vcpu = cpus[-1]
    vcpu = getattr(vcpu, "vcpu", vcpu)
    assert res.outcome == "exit" and res.status == 0, (res.message, res.console)
    vcpu._loaded.get(R.CS)  # takes in the loads C made (dict() would copy the bare dict)
    end = (
        tuple(vcpu.regs.read(r) for r in GPRS),
        tuple(vcpu.counts.items()),
        tuple(vcpu.reasons.items()),
        dataclasses.astuple(vcpu.tc.counters),
        vcpu.virtual_cpu.crs(),
        dict(vcpu._loaded),
    )
    return res, seen, end, vcpu


def _served(vcpu) -> dict[int, int]:
    fast = vcpu.rt.fast
    return {k: fast.table.served[k] for k in (MOV_SREG, POP_SREG, MOV_CR2, IRETD, IRETD_OUTER)}


def _same(c_run, py_run) -> None:
    c_res, c_seen, c_end, _ = c_run
    py_res, py_seen, py_end, _ = py_run
    assert run_record(c_res) == run_record(py_res)  # console, counts, icount, virtual time, memory counters, tally
    assert c_end == py_end
    # every callout Python served in the C run, as a reader saw the vCPU then, was the same in the Python
    # run, in the same order: the C answers in between changed nothing else
    py_index: dict = {}
    for k, record in enumerate(py_seen):
        py_index.setdefault(record[0:1] + record[2:4], []).append(k)
    last = -1
    for record in c_seen:
        candidates = [k for k in py_index.get(record[0:1] + record[2:4], []) if k > last]
        assert candidates, hex(record[0])
        last = candidates[0]
        assert record == py_seen[last], hex(record[0])


@pytest.fixture(scope="module")
def nanobench(nanobench_image):
    return nanobench_image(NB_N)


def test_nanobench_events_in_c_leave_what_python_leaves(nanobench, monkeypatch):
    c_run = _run(nanobench, monkeypatch, True)
    py_run = _run(nanobench, monkeypatch, False)
    c_cpu, py_cpu = c_run[3], py_run[3]
    served = _served(c_cpu)
    assert sum(_served(py_cpu).values()) == 0
    # per system call, #DE and #PF: 4 mov sreg, 4 pop sreg, an iretd; per #PF a CR2 read (less each site's first)
    n = NB_N - 5
    assert served[MOV_SREG] >= 3 * n * 4 and served[POP_SREG] >= 3 * n * 4, served
    assert served[MOV_CR2] >= n and served[IRETD] >= 2 * n and served[IRETD_OUTER] >= n, served
    assert len(c_run[1]) <= len(py_run[1]) - 3 * n * 9
    _same(c_run, py_run)


def test_trap_s_hostile_segment_loads_under_full(test_guest, monkeypatch):
    image = test_guest("trap_events")
    c_run = _run(image, monkeypatch, True)
    py_run = _run(image, monkeypatch, False)
    assert b"FAIL" not in c_run[0].console and b"PASS trap's segment loads" in c_run[0].console
    served = _served(c_run[3])
    assert served[MOV_SREG] >= 320 * 40 and served[POP_SREG] >= 320 * 40 and served[IRETD_OUTER] >= 320 * 8, served
    _same(c_run, py_run)
    native = run_guest(str(image), "native", 32, 20_000_000)
    assert c_run[0].console == native.console


def test_iretd_cases_only_python_may_do(test_guest, monkeypatch):
    image = test_guest("full_events")
    c_run = _run(image, monkeypatch, True)
    py_run = _run(image, monkeypatch, False)
    assert b"PASS full's kernel iretd" in c_run[0].console
    c_cpu = c_run[3]
    served = _served(c_cpu)
    # the plain returns to ring 3 (each system call's, and one enter_user per loop) are C's ...
    assert served[IRETD_OUTER] >= LOOPS * 12, served
    # ... and one kernel iretd site's repeated target
    assert served[IRETD] >= LOOPS, served
    # the rest is Python's: per loop, a return with the kernel's data segments loaded and two frames across
    # a page (and the returns while the virtual IOPL changes)
    iretd = c_cpu.reasons["callout", "iretd"]
    assert iretd - served[IRETD] - served[IRETD_OUTER] >= LOOPS * 3 + LOOPS // 4
    _same(c_run, py_run)
    native = run_guest(str(image), "native", 32, 20_000_000)
    assert c_run[0].console == native.console


def test_a_trace_keeps_the_python_path_and_the_same_trace(test_guest, monkeypatch, tmp_path):
    image = test_guest("full_events")
    a, b = tmp_path / "c.jsonl", tmp_path / "py.jsonl"
    c_run = _run(image, monkeypatch, True, trace_path=str(a))
    py_run = _run(image, monkeypatch, False, trace_path=str(b))
    assert sum(_served(c_run[3]).values()) == 0

    def lines(path):
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        rows[-1].pop("wall_s", None)
        return rows

    assert lines(a) == lines(b)
    assert c_run[1] == py_run[1] and c_run[2] == py_run[2] and run_record(c_run[0]) == run_record(py_run[0])


def test_the_pv_build_fails_alike(monkeypatch, tmp_path):
    """The nanobench PV image is para's: under full both paths stop it the same way."""
    from cpuvirt.nanobench import build

    path = tmp_path / "nanobench-pv.bin"
    path.write_bytes(build(50, True))
    runs = []
    for on in ("1", "0"):
        monkeypatch.setenv("CPUVIRT_FULL_EVENTS_C", on)
        runs.append(run_record(run_guest(str(path), "full", 32, 20_000_000)))
    assert runs[0] == runs[1] and b"paravirtualized build" in runs[0]["console"]


def test_a_delivery_that_changes_cs_leaves_the_next_event_to_python(test_guest, monkeypatch):
    """Ring 3's int 0x81 enters a handler in a second ring-0 code segment: no callout saw CS change, so
    the handler's `mov ds, ax` must be Python's (its snapshot check drops the translation of `mov eax, cs`
    that baked the first CS in), not C's (tests/guests/full_events_cs.S)."""
    image = test_guest("full_events_cs")
    c_run = _run(image, monkeypatch, True)
    py_run = _run(image, monkeypatch, False)
    assert b"PASS full's events under a second kernel code segment" in c_run[0].console
    assert _served(c_run[3])[MOV_SREG] > 0
    _same(c_run, py_run)
    native = run_guest(str(image), "native", 32, 20_000_000)
    assert c_run[0].console == native.console


def test_pops_after_a_cr3_load_put_their_pages_back_in_c(test_guest, monkeypatch):
    """A CR3 load empties the hypervisor's own TLB; the next pop's stack and GDT pages are put back in C from
    the shadow, as Python's walk would put them (bt/_callout.c hv_walk, _evseg.h ev_rtlb_fill), while a page
    that only Python's TLB still holds (its PTE rewritten without invlpg, its slot in C's copy taken by
    another page) stays Python's: C filling it from the shadow would pop another selector
    (tests/guests/full_hvtlb.S)."""
    image = test_guest("full_hvtlb")
    c_run = _run(image, monkeypatch, True)
    py_run = _run(image, monkeypatch, False)
    assert b"PASS full's hypervisor TLB after CR3 loads" in c_run[0].console
    assert _served(c_run[3])[POP_SREG] >= 64 - 1  # each loop's first pop, after its CR3 load
    _same(c_run, py_run)


def test_ltr_of_the_snapshot_s_tss_selector_in_c(test_guest, monkeypatch):
    """xv6's switchuvm under full: the TSS descriptor rewritten available with another base, then `ltr`,
    answered by the C callout hook (bt/_callout.c ltr: the busy bit written, TR's base where the C delivery
    reads it), each load followed by a system call from ring 3 whose kernel stack comes from that TSS;
    a busy TSS (#GP), the other selector and the first load after it stay Python's
    (tests/guests/full_ltr.S)."""
    image = test_guest("full_ltr")
    c_run = _run(image, monkeypatch, True)
    py_run = _run(image, monkeypatch, False)
    assert b"PASS full's kernel ltr" in c_run[0].console
    c_cpu = c_run[3]
    served = c_cpu.rt.fast.table.served[LTR]
    # 95 loads of 0x28 less 11 busy, 5 right after a load of 0x38, and the site's first
    assert served >= 78, served
    assert c_cpu.reasons["callout", "ltr"] - served >= 11 + 5 + 5  # those, and the loads of 0x38
    _same(c_run, py_run)
    native = run_guest(str(image), "native", 32, 20_000_000)
    assert c_run[0].console == native.console
