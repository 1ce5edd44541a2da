"""The engine's state restore at a TLB fill, kept by the fast fills until a path needs it (memory/_tlbfill.c,
"The engine's state, restored only when a fill needs it"; memory/fastfill.py); and the paging registers
the fills read in the engine's CPU state (engine/internals.py register_offsets).

Unicorn restores EIP and the lazy flags' cc_op at the start of every fill; the fast fills answer their common
case without either, and make the restore before anything that reads them (a decline: the #PF hooks and
Mmu.fill come next; a quick exit). Every run must be what it is with the restore made at every fill
(CPUVIRT_LAZY_RESTORE=0): same console, outcome, counts and trace, for guests whose faults come from the
middle of blocks, in every mode. That holds only while the fast fill is each engine's first fill hook.
"""
from __future__ import annotations

import json

import pytest

from cpuvirt.memory.fastfill import lazy_restores
from cpuvirt.runner import run_guest
from tests.runs import run_record

MODES = {"native": ("native", None), "trap": ("trap", None), "full": ("full", None), "para": ("para", None),
         "hw": ("hw", {"vmx": [], "ept": True}), "hw-noept": ("hw", {"vmx": [], "ept": False})}


def _run(guest, mode, monkeypatch, lazy: bool, trace_path=None):
    monkeypatch.setenv("CPUVIRT_LAZY_RESTORE", "1" if lazy else "0")
    name, opts = MODES[mode]
    seen: list = []
    before = lazy_restores()
    res = run_guest(str(guest), name, 32, 30_000_000, trace_path=trace_path, mode_options=opts,
                    on_start=seen.append)
    kept, made = (a - b for a, b in zip(lazy_restores(), before))
    return res, seen[0].vcpu.mmu.counters.fast, kept, made


@pytest.fixture
def nanobench(nanobench_image):
    return lambda mode: nanobench_image(200, pv=mode == "para")


@pytest.mark.parametrize("mode", sorted(MODES))
def test_the_fast_fill_is_first_and_keeps_restores(mode, monkeypatch, nanobench):
    """Every mode's first fill hook is its fast fill, so its fills may keep the restore; most of them do
    (the fills the fast fill answers), and the paths after it make some (the faults, the first fetches)."""
    res, fast, kept, made = _run(nanobench(mode), mode, monkeypatch, True)
    assert (res.outcome, res.status) == ("exit", 0), res.message
    assert fast is not None and fast.lazy
    assert kept > 0 and 0 < made < kept


RUNS = [(g, m) for g in ("nanobench", "string_faults", "true_pf") for m in sorted(MODES)
        if g == "nanobench" or m != "para"]   # (para runs paravirtualized builds only)


@pytest.mark.parametrize("guest,mode", RUNS)
def test_a_run_is_the_same_with_every_restore_made(guest, mode, monkeypatch, test_guest, nanobench):
    image = nanobench(mode) if guest == "nanobench" else test_guest(guest)
    lazy, fast, kept, _ = _run(image, mode, monkeypatch, True)
    eager, eager_fast, eager_kept, _ = _run(image, mode, monkeypatch, False)
    assert fast.lazy and not eager_fast.lazy and kept > 0 and eager_kept == 0
    assert run_record(lazy) == run_record(eager)


@pytest.mark.parametrize("mode", ["native", "trap", "hw"])
def test_a_trace_is_the_same_with_every_restore_made(mode, monkeypatch, tmp_path, test_guest):
    image = test_guest("true_pf")
    a, b = tmp_path / "lazy.jsonl", tmp_path / "eager.jsonl"
    _run(image, mode, monkeypatch, True, trace_path=str(a))
    _run(image, mode, monkeypatch, False, trace_path=str(b))

    def rows(path):
        out = [json.loads(line) for line in path.read_text().splitlines()]
        out[-1].pop("wall_s", None)
        return out

    faults = [r for r in rows(a) if r.get("kind") == "page_fault" and r.get("reason") == "#PF"]
    assert rows(a) == rows(b) and len(faults) == 800   # each with its instruction's EIP


@pytest.mark.parametrize("mode", ["native", "hw", "trap"])
def test_the_fills_read_the_registers_the_api_reads(mode, monkeypatch, test_guest):
    """CR0, CR3, CR4 and SS as the fills read them in the CPU state are the engine's own, after a run with
    paging, CR3 switches and user mode (true_pf.S)."""
    import ctypes

    from cpuvirt.engine import regs as R
    from cpuvirt.memory.fastfill import _lib

    res, fast, _, _ = _run(test_guest("true_pf"), mode, monkeypatch, True)
    assert res.outcome == "exit"
    uc = fast.mmu.uc
    out = (ctypes.c_uint64 * 4)()
    assert _lib().fill_engine_registers(uc._uch, out) == 1
    assert list(out) == [uc.reg_read(R.CR0), uc.reg_read(R.CR3), uc.reg_read(R.CR4), uc.reg_read(R.SS)]
    assert out[0] & 0x80000000   # paging on


@pytest.mark.parametrize("mode", ["native", "hw"])
def test_every_register_offset_holds_what_the_api_reads(mode, monkeypatch, test_guest):
    """engine/internals.py register_offsets, which cpu/_delivery.c's rd() reads at (the general registers,
    EIP, CR0, CR2, CR3, CR4, CS and SS): each word holds, in its low 32 bits, what uc_reg_read returns, on a
    live engine after a run with paging, faults and user mode."""
    from cpuvirt.engine import regs as R
    from cpuvirt.engine.internals import engine_env, read_process, register_offsets

    res, fast, _, _ = _run(test_guest("true_pf"), mode, monkeypatch, True)
    assert res.outcome == "exit"
    uc, at = fast.mmu.uc, register_offsets()
    assert set(at) == {R.EAX, R.ECX, R.EDX, R.EBX, R.ESP, R.EBP, R.ESI, R.EDI, R.EIP, R.CR0, R.CR2, R.CR3, R.CR4,
                       R.CS, R.SS}
    state = read_process(engine_env(uc), 0x400)
    seen = {r: int.from_bytes(state[off : off + 4], "little") for r, off in at.items()}
    assert seen == {r: uc.reg_read(r) & 0xFFFFFFFF for r in at}
    assert len(set(seen.values())) > 8   # distinct values: not a state of zeros
