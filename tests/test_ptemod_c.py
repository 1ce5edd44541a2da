"""full's C callout hook serves adaptive stores into traced page tables that no shadow entry derives from,
and into frames with translated code away from its bytes (ADAPTIVE), and invlpg of pages without
translated code (INVLPG) (bt/_callout.c, docs/binary-translation.md "Callouts answered in C").
Everything a reader sees must be what the Python path (CPUVIRT_ADAPTIVE_C=0, CPUVIRT_INVLPG_C=0) leaves:
the console, counts and reasons, virtual time, the translation cache's and the shadow's counters, and the
vCPU at every callout Python serves. The guests:
tests/guests/ptemod_c.S (every store form C does, and the cases it must leave to Python: a word an entry
derives from, a site's untraced run, a store into translated code, invlpg of a code page) and the nanobench
image (ptemod, pgfault, divzero)."""

from __future__ import annotations

import pytest

from cpuvirt.bt.fastcallout import ADAPTIVE, INVLPG
from cpuvirt.runner import run_guest
from tests.conftest import requires_qemu
from tests.qemu import assert_same_console_as_qemu
from tests.runs import run_record
from tests.test_full_events import _run, _same
from tests.test_trap_fast import _run as _trap_run
from tests.test_trap_fast import _same_events

SWITCHES = ("CPUVIRT_ADAPTIVE_C", "CPUVIRT_INVLPG_C")
ROUNDS = 64  # ptemod_c.S


def _symbols(name: str) -> dict[str, int]:
    from cpuvirt.toolchain.build import include_dir
    from cpuvirt.toolchain.image import build_image
    from cpuvirt.toolchain.preprocess import preprocess
    from tests.conftest import TEST_GUESTS

    return build_image(preprocess(TEST_GUESTS / f"{name}.S", {}, [include_dir()]).lines)[1].symbols


def _served(vcpu) -> tuple[int, int]:
    served = vcpu.rt.fast.table.served
    return served[ADAPTIVE], served[INVLPG]


def test_page_table_stores_and_invlpg_in_c_leave_what_python_leaves(test_guest, monkeypatch):
    image = test_guest("ptemod_c")
    c_run = _run(image, monkeypatch, True, switches=SWITCHES)
    py_run = _run(image, monkeypatch, False, switches=SWITCHES)
    console = c_run[0].console
    assert b"FAIL" not in console and b"PASS page-table stores and invlpg" in console
    stores, invlpgs = _served(c_run[3])
    assert _served(py_run[3]) == (0, 0)
    # per round, once the sites are adaptive: 8 stores into page tables that derive nothing (the PTE(B)
    # store every other round only), 5 into data beside translated code and store_at's 3 into a plain page
    # (its untraced run); invlpg of pages A, B, C, E, F and of the page nothing maps (not the code page's)
    assert stores >= (ROUNDS - 8) * 16, stores
    assert invlpgs >= (ROUNDS - 2) * 6, invlpgs
    # ... and Python served the rest: the zapping store, the store into translated code, the code page's invlpg
    reasons = c_run[3].reasons
    assert reasons["callout", "store"] - stores >= ROUNDS // 2 + (ROUNDS - 8)
    # store_at's untraced runs are C's: Python sees the site once a round at most (its page-table store,
    # when C leaves it), and of the 70 plain stores in a row only the 64th, which makes the site native
    store_at = _symbols("ptemod_c")["store_at"]
    python_at = [entry for entry in c_run[1] if entry[0] == store_at]
    assert 0 < len(python_at) <= ROUNDS + 8, len(python_at)
    assert len([entry for entry in py_run[1] if entry[0] == store_at]) > 3 * ROUNDS + 64
    assert reasons["callout", "invlpg"] - invlpgs >= ROUNDS
    assert c_run[3].mmu.strategy.counters.zapped == py_run[3].mmu.strategy.counters.zapped > 0
    # the stores that zap (PTE(B) after a round that read page B, and the `or` that zaps B's entry again)
    # are C's too when the page directory leads to every entry they zap
    assert c_run[3].rt.fast.table.zaps >= ROUNDS // 4, c_run[3].rt.fast.table.zaps
    _same(c_run, py_run)
    native = run_guest(str(image), "native", 32, 20_000_000)
    assert console == native.console  # the flags and entries of each store, summed


@pytest.fixture(scope="module")
def nanobench(nanobench_image):
    return nanobench_image(300)


def test_nanobench_ptemod_in_c(nanobench, monkeypatch):
    c_run = _run(nanobench, monkeypatch, True, switches=SWITCHES)
    py_run = _run(nanobench, monkeypatch, False, switches=SWITCHES)
    stores, invlpgs = _served(c_run[3])
    # ptemod: its xor and invlpg; pgfault: the handler's store setting P (nothing derives from the entry
    # then), its count's inc and the loop's invlpg (the store clearing P zaps the entry the retry made:
    # Python's); divzero: the handler's inc of its count (data in a frame with translated code)
    assert stores >= 4 * (300 - 5) and invlpgs >= 2 * (300 - 5), (stores, invlpgs)
    _same(c_run, py_run)


def test_a_trace_keeps_them_python_s(test_guest, monkeypatch, tmp_path):
    image = test_guest("ptemod_c")
    c_run = _run(image, monkeypatch, True, trace_path=str(tmp_path / "t.jsonl"), switches=SWITCHES)
    assert _served(c_run[3]) == (0, 0)
    rows = (tmp_path / "t.jsonl").read_text()
    assert '"reason":"store"' in rows and '"reason":"invlpg"' in rows


TRAP_SWITCHES = ("CPUVIRT_INVLPG_C", "CPUVIRT_TRAP_PTEMOD_C")


def test_trap_answers_invlpg_and_ptemods_in_c(test_guest, monkeypatch):
    """Under trap, invlpg of the deprivileged kernel is a #GP its C INTR hook answers, and a store into a
    traced page table that zaps nothing is emulated in the TLB fill (modes/_trapfast.c): the same shadow,
    hypervisor-TLB and clock work as the Python path (CPUVIRT_INVLPG_C=0, CPUVIRT_TRAP_PTEMOD_C=0)."""
    image = test_guest("ptemod_c")
    c_res, c_seen, c_end, c_cpu = _trap_run(image, monkeypatch, True, switches=TRAP_SWITCHES)
    py_res, py_seen, py_end, py_cpu = _trap_run(image, monkeypatch, False, switches=TRAP_SWITCHES)
    assert py_cpu.fast.stores.state.stores == 0  # (the hook stays, for the true #PFs: test_true_pf_c.py)
    stores = c_cpu.fast.stores.stores
    # the page-table stores that derive nothing (emulate_store's forms: not the add/sub/inc/dec beside code,
    # which trap runs natively), less the first
    assert stores >= (ROUNDS - 1) * 8, stores
    # among them the PTE(B) store after a round that read page B: the entry it zaps goes in C too (when no
    # invlpg C served before it is still to be folded: those may unlink words of the same page table)
    assert c_cpu.fast.stores.state.zaps >= ROUNDS // 4, c_cpu.fast.stores.state.zaps
    assert b"FAIL" not in c_res.console and b"PASS page-table stores and invlpg" in c_res.console
    served = c_cpu.fast.answered - py_cpu.fast.answered  # the C run's other answers are the Python run's
    # invlpg of pages A, B, C, E, F, the page nothing maps and the code page each round (less the first),
    # then the alias pages of the IDT and GDT phases
    assert served >= (ROUNDS - 1) * 7, served
    assert c_cpu.reasons["trap", "invlpg"] == py_cpu.reasons["trap", "invlpg"] >= served
    assert run_record(c_res) == run_record(py_res)
    assert c_end == py_end
    _same_events(c_seen, py_seen)
    native = run_guest(str(image), "native", 32, 20_000_000)
    assert c_res.console == native.console



@pytest.mark.parametrize("mode", ["trap", "full"])
def test_a_store_crossing_into_another_frame_is_written_through_each_page(mode, test_guest):
    """tests/guests/ptemod_cross.S: a store that starts in a traced page table and ends in the next linear
    page, which maps a frame that is not the table's neighbour. The C paths take a store inside one page only
    (trap's fill hook: the `(addr & 0xFFF) + size > 0x1000` test); one that wrote it at the first part's
    guest-physical address changed the page table's first entry instead of the data (a checksum not native's)."""
    path = test_guest("ptemod_cross")
    native = run_guest(str(path), "native", 32, 50_000_000)
    ours = run_guest(str(path), mode, 32, 50_000_000)
    assert b"PASS page-crossing page-table store" in native.console and b"FAIL" not in native.console
    assert ours.console == native.console


@requires_qemu
def test_ptemod_cross_console_is_qemus(test_guest):
    assert b"PASS" in assert_same_console_as_qemu(test_guest("ptemod_cross"), [], [])


@pytest.mark.parametrize("mode", ["trap", "full"])
def test_an_engine_tlb_flush_ends_a_trims_staleness(mode, monkeypatch):
    """A trim leaves entries the shadow dropped in the engine's TLB (`_engine_stale`): a WP or PGE toggle
    must flush it, and the C paths (full's zapping stores and toggles, trap's hook) leave those to Python
    (`shadow_ok` 0). Every whole flush of the engine's TLB, a CR3 load's included, ends that: the C paths may
    be re-armed. (Once it was set, it stayed until the next WP/PGE toggle: xv6's usertests under full left
    19,536 zapping stores to Python for it.)"""
    from cpuvirt.memory import shadow

    monkeypatch.setattr(shadow, "MAX_ROOT_ENTRIES", 8)
    hvs = []
    res = run_guest("paging", mode, on_start=hvs.append)
    assert (res.outcome, res.status) == ("exit", 0) and res.mmu["shadow"]["root_trims"] > 0
    s = hvs[0].vcpu.mmu.strategy
    for flush_engine in (True, False):
        s._engine_stale = True  # as a trim leaves it
        s.on_cr3_write(s._cur_key, flush_engine=flush_engine)
        assert s._engine_stale is False
        assert s.tlb_flush() is False  # nothing left for a toggle to flush
    if mode == "full":
        cr = hvs[0].vcpu.crfast
        cr.arm(s)
        assert cr.t.shadow_ok == 1
