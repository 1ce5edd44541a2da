"""hw's quick EPT-violation exit (VmxCpu.ept_quick_hook, called by memory/_tlbfill.c's EPT fill when the final
guest-physical page of an access has no EPT entry and lies in guest RAM: lazy EPT) leaves what the full exit
leaves (the refused fill, on_refused_fill -> _ept_exit -> vm_exit -> handle_ept_violation -> vm_entry, the
engine's retry).

Each guest runs under `--vmx lazy_ept=1` with the quick path and without it (VmxCpu.quick_ept, the
CPUVIRT_NO_QUICK_EPT switch), and everything a reader can see must be the same byte for byte: the console,
instructions, virtual time, event, exit and MMU counters, and, at every port access (where Python looks),
the VMCS exit-information fields, GUEST_RIP, the guest-physical and linear addresses, the counters and the
clock. Hostile cases: unassigned guest-physical memory, the APIC-access page, MMIO devices, a page mapped
read-only in EPT, an EPT misconfiguration, fetches from fresh pages, timer interrupts between violations.
"""

from __future__ import annotations

import pytest

from cpuvirt.cpu.vcpu import Vcpu
from cpuvirt.memory.ept import EPT_R, EPT_W
from cpuvirt.memory.p2m import RAM_HPA
from cpuvirt.modes.hw import vmx
from cpuvirt.modes.hw.exits import ExitReason
from cpuvirt.modes.hw.vmcs import Field as F
from cpuvirt.runner import run_guest
from tests.runs import check_off_switches

EXIT_FIELDS = (
    F.VM_EXIT_REASON,
    F.EXIT_QUALIFICATION,
    F.VM_EXIT_INSTRUCTION_LEN,
    F.VM_EXIT_INTR_INFO,
    F.VM_EXIT_INTR_ERROR_CODE,
    F.VMX_INSTRUCTION_INFO,
    F.GUEST_RIP,
    F.GUEST_PHYSICAL_ADDRESS,
    F.GUEST_LINEAR_ADDRESS,
)


def _run(image, monkeypatch, quick: bool, controls=("lazy_ept=1",), trace_path=None, start=None, ok=True, in_c=True,
         **kw):
    """The run, and at every port access (exit or not) what a reader sees."""
    seen = []
    cpus = []
    exit_for_io, device_io = vmx.VmxCpu._exit_for_io, Vcpu.port_io

    def snapshot(self):
        self.fold_fast_exits()
        v = self.vmcs._values
        return (
            tuple(v.get(f) for f in EXIT_FIELDS),
            self.exits, self.counts["vmexit"], self.counts["io"],
            tuple(sorted((int(r), n) for r, n in self.stats.items())),
            self.clock.now, self.clock.instructions,
            tuple(sorted(self.mmu.counters.as_dict().items())),
        )

    def exit_io(self, port, size, is_in, value, from_c=0):
        seen.append((port, size, is_in, value) + snapshot(self))
        return exit_for_io(self, port, size, is_in, value, from_c)

    def no_exit_io(self, port, size, is_in, value=0):
        seen.append((port, size, is_in, value) + snapshot(self))
        return device_io(self, port, size, is_in, value)

    def on_start(hv):
        cpus.append(hv.vcpu)
        if start is not None:
            start(hv.vcpu)

    monkeypatch.setattr(vmx.VmxCpu, "_exit_for_io", exit_io)
    monkeypatch.setattr(Vcpu, "port_io", no_exit_io)
    monkeypatch.setattr(vmx.VmxCpu, "quick_ept", quick)
    monkeypatch.setattr(vmx.VmxCpu, "quick_ept_c", in_c)
    res = run_guest(str(image), "hw", trace_path=trace_path, on_start=on_start,
                    mode_options={"vmx": list(controls)}, **kw)
    monkeypatch.undo()
    if ok:
        assert res.outcome == "exit" and res.status == 0, (res.message, res.console[-300:])
    return res, seen, cpus[0]


def _same(a, b, refills: int = 0) -> None:
    """Everything alike; `refills`: the full path may make up to that many more TLB fills, each a walk under
    EPT, a shadow hit under shadow paging (see test_bundled_guests_under_lazy_ept)."""
    (ra, sa, ca), (rb, sb, cb) = a, b
    for field in ("outcome", "status", "message", "console", "icount", "vtime", "counts", "tally"):
        if field == "tally" and refills:
            ta, tb = dict(ra.tally), dict(rb.tally)
            ta.pop("walk_ref", None), tb.pop("walk_ref", None)
            assert ta == tb
            continue
        assert getattr(ra, field) == getattr(rb, field), field
    if refills:
        ma, mb = dict(ra.mmu), dict(rb.mmu)
        extra = mb["fills"] - ma["fills"]
        sha, shb = ma.pop("shadow", None), mb.pop("shadow", None)
        if sha is None:
            assert 0 <= extra <= refills and mb["walks"] - ma["walks"] == extra, (ma, mb)
        else:
            assert 0 <= extra <= refills and mb["walks"] == ma["walks"], (ma, mb)
            assert shb.pop("shadow_hits") - sha.pop("shadow_hits") == extra and sha == shb
        for k in ("faults", "unbacked"):
            assert ma[k] == mb[k]
    else:
        assert ra.mmu == rb.mmu
    assert [row[:4] for row in ra.exit_stats] == [row[:4] for row in rb.exit_stats]  # not the handler's wall time
    assert len(sa) == len(sb)
    for n, (x, y) in enumerate(zip(sa, sb)):
        if refills:
            x, y = x[:-1], y[:-1]
        assert x == y, f"port access {n}: {x} != {y}"
    ca.fold_fast_exits()
    cb.fold_fast_exits()
    assert dict(ca.stats) == dict(cb.stats) and ca.exits == cb.exits
    assert list(ca.counts.items()) == list(cb.counts.items())
    assert list(ca.reasons.items()) == list(cb.reasons.items())
    assert {f: ca.vmcs._values.get(f) for f in EXIT_FIELDS} == {f: cb.vmcs._values.get(f) for f in EXIT_FIELDS}
    assert ca.clock.now == cb.clock.now and ca.clock.instructions == cb.clock.instructions


@pytest.fixture(scope="module")
def quick_ept(test_guest):
    return test_guest("hw_quick_ept")


def test_quick_ept_exits_leave_what_the_full_exit_leaves(quick_ept, monkeypatch):
    """Stores of every form (displacement, SIB, straddling two fresh pages, rep stosd over a boundary, movsd,
    lock cmpxchg), a load and a fetch on fresh pages, with paging off and on, the PIT interrupting and CPUID
    exits answered in C just before and just after violations: the quick exits in C and in Python."""
    quick = _run(quick_ept, monkeypatch, True)
    slow = _run(quick_ept, monkeypatch, False)
    _same(quick, slow)
    assert b"FAIL" not in quick[0].console and quick[0].console.count(b"PASS") == 5
    q, n = quick[2], quick[2].stats[ExitReason.EPT_VIOLATION]
    assert slow[2].quick_ept_exits == 0 and slow[2].fast_fill.quick_exits == 0
    assert q.quick_ept_exits >= 240 and q.quick_ept_exits < n  # the paging phase's guest PTE updates: full
    # both the C and the Python quick exit (since the C fill sets A/D bits, the paging phase's first touches
    # reach the quick exit too, mostly through Python's: 313 quick exits, 33 of them in C, on 2026-12-04)
    assert q._ept_c.c_total >= 30 and q.fast_fill.quick_exits >= 40
    assert q._ept_c.c_total + q.fast_fill.quick_exits == q.quick_ept_exits


def test_quick_ept_exits_in_python_only(quick_ept, monkeypatch):
    """CPUVIRT_QUICK_EPT_C=0: every quick exit through VmxCpu.ept_quick_hook, the same again."""
    quick = _run(quick_ept, monkeypatch, True, in_c=False)
    slow = _run(quick_ept, monkeypatch, False)
    _same(quick, slow)
    assert quick[2]._ept_c is None and quick[2].fast_fill.quick_exits == quick[2].quick_ept_exits >= 240


# guest -> (the least number of quick exits expected, TLB refills the full path may add: see below)
GUESTS = {"hello": (4, 0), "paging": (8, 0), "interrupts": (4, 0), "exceptions": (4, 0), "usermode": (6, 0),
          "smc": (4, 0), "apic": (6, 0), "holes": (4, 0), "hostile": (1000, 4)}


@pytest.mark.parametrize("guest", list(GUESTS))
def test_bundled_guests_under_lazy_ept(guest, monkeypatch):
    """Hostile among them: unassigned guest-physical memory and MMIO (holes, hostile), the APIC-access page
    (apic), self-modifying code (smc), ring 3 (usermode). hostile's sweeps also show the one thing the quick
    exit changes: the full exit stops the engine, which translates a block at the faulting instruction again
    and so refills its code page's TLB entry when the data access just evicted it; that refill (a TLB fill
    and a walk, never a guest-visible change) is not made when the engine goes on."""
    least, refills = GUESTS[guest]
    quick = _run(guest, monkeypatch, True, ok=False)
    slow = _run(guest, monkeypatch, False, ok=False)
    _same(quick, slow, refills)
    assert quick[2].quick_ept_exits >= least and slow[2].quick_ept_exits == 0
    assert quick[2].quick_ept_exits < quick[2].stats[ExitReason.EPT_VIOLATION]  # some take the full exit


def _read_only(cpu) -> None:
    """Map the guest's pages at FRESH + 0x10000.. read-only (then execute-only-less: read/write, no execute) in
    EPT before it runs: a store there, or a fetch, is an EPT violation on a present entry (the full exit)."""
    base = 0x01000000
    for i in range(16, 24):
        cpu.ept.map(base + i * 4096, RAM_HPA + base + i * 4096, EPT_R)
    cpu.ept.map(base + 0x30000, RAM_HPA + base + 0x30000, EPT_R | EPT_W)


def test_present_but_read_only_entries_take_the_full_exit(quick_ept, monkeypatch):
    quick = _run(quick_ept, monkeypatch, True, start=_read_only)
    slow = _run(quick_ept, monkeypatch, False, start=_read_only)
    _same(quick, slow)
    assert quick[2].quick_ept_exits > 0


def _misconfigured(cpu) -> None:
    """A write-only EPT entry (W without R: a misconfiguration, SDM 29.3.3.1) on a page the guest stores to."""
    cpu.ept.write_entry(0x01000000 + 9 * 4096, (RAM_HPA + 0x01000000 + 9 * 4096) | EPT_W)


def test_an_ept_misconfiguration_stops_the_guest_either_way(quick_ept, monkeypatch):
    quick = _run(quick_ept, monkeypatch, True, start=_misconfigured, ok=False)
    slow = _run(quick_ept, monkeypatch, False, start=_misconfigured, ok=False)
    _same(quick, slow)
    assert quick[0].outcome == "ept_misconfig" and quick[2].stats[ExitReason.EPT_MISCONFIG] == 1
    assert quick[2].quick_ept_exits > 0


def replace_handler(reason: ExitReason, calls: list):
    """A `start` for _run that puts a handler of its own for `reason`, which notes each exit's RIP in `calls`
    and then does what the default one does (a quick exit must then never be taken in its place)."""

    def start(cpu):
        handlers = cpu.hypervisor.handlers
        default = handlers[reason]

        def handle(x):
            calls.append(x.rip)
            default(x)

        handlers[reason] = handle

    return start


def test_a_replaced_ept_handler_sees_every_violation(quick_ept, monkeypatch):
    calls: list = []
    res, _, cpu = _run(quick_ept, monkeypatch, True, start=replace_handler(ExitReason.EPT_VIOLATION, calls))
    assert len(calls) == cpu.stats[ExitReason.EPT_VIOLATION] > 300 and cpu.quick_ept_exits == 0


def test_a_trace_is_the_same_and_takes_the_full_exit(quick_ept, monkeypatch, tmp_path):
    a, b = tmp_path / "quick.jsonl", tmp_path / "slow.jsonl"
    quick = _run(quick_ept, monkeypatch, True, trace_path=str(a))
    slow = _run(quick_ept, monkeypatch, False, trace_path=str(b))
    _same(quick, slow)
    assert a.read_bytes() == b.read_bytes() and b"EPT_VIOLATION" in a.read_bytes()
    assert quick[2].quick_ept_exits == 0


def test_without_lazy_ept_nothing_changes(quick_ept, monkeypatch):
    """EPT mapped up front: no violation on RAM, the quick exit never runs; shadow paging neither."""
    for controls in ((), ("enable_ept=0",)):
        quick = _run(quick_ept, monkeypatch, True, controls=controls)
        slow = _run(quick_ept, monkeypatch, False, controls=controls)
        _same(quick, slow)
        assert quick[2].quick_ept_exits == 0


@pytest.mark.parametrize("variable", ["CPUVIRT_NO_QUICK_EPT", "CPUVIRT_QUICK_EPT_C"])
def test_the_environment_switches_turn_it_off(variable):
    code = "from cpuvirt.modes.hw.vmx import VmxCpu; print(VmxCpu.quick_ept, VmxCpu.quick_ept_c)"
    check_off_switches(code, ("CPUVIRT_NO_QUICK_EPT", "CPUVIRT_QUICK_EPT_C"), variable)


@pytest.mark.parametrize("case", [1, 4, 5])
def test_unfetchable_code_under_lazy_ept(case, monkeypatch, tmp_path):
    """Hostile: a jump outside RAM (unassigned guest-physical memory: the handler stops the guest), a jump into
    the APIC-access page (mapped read/write, not execute: an EPT violation on a present entry), the #PF gate in
    a page that is not present (a delivery fault loop): the same outcome either way."""
    from tests.hostile import build

    image = build("unfetchable", tmp_path, CASE=case)
    quick = _run(image, monkeypatch, True, ok=False, max_insns=3_000_000)
    slow = _run(image, monkeypatch, False, ok=False, max_insns=3_000_000)
    _same(quick, slow)
    assert quick[0].outcome != "exit" and quick[2].quick_ept_exits > 0


def test_a_block_the_clock_does_not_know(monkeypatch, tmp_path):
    """When Machine.block_insns has no entry for the running block (its cache was emptied, or nothing decoded),
    the full exit cannot take the block's rest off the clock (Vcpu.left_block_at), and the engine's retry counts
    it again: the quick exit must not be taken then (C asks the event books' copy of the table, Python the
    table). Here the blocks holding qe_store_disp's store are never kept."""
    from cpuvirt.machine.machine import Machine
    from cpuvirt.toolchain.build import include_dir
    from cpuvirt.toolchain.image import build_image
    from cpuvirt.toolchain.preprocess import preprocess

    from tests.hostile import TEST_GUESTS

    image, info = build_image(preprocess(TEST_GUESTS / "hw_quick_ept.S", {}, [include_dir()]).lines)
    path = tmp_path / "qe.bin"
    path.write_bytes(image)
    store = info.symbols["qe_store_disp"]
    count = Machine._count_block

    def forgetful(self, address, size):
        n = count(self, address, size)
        if address <= store < address + size:
            self.block_insns.pop(address, None)
        return n

    def run(quick):
        monkeypatch.setattr(Machine, "_count_block", forgetful)
        return _run(path, monkeypatch, quick)

    quick, slow = run(True), run(False)
    _same(quick, slow, refills=8)  # (the full exits' retries refill code pages: see the bundled guests' test)
    q = quick[2]
    assert 0 < q.quick_ept_exits <= q.stats[ExitReason.EPT_VIOLATION] - 30  # 240 / 8 stores there: full exits
