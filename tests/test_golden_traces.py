"""Golden exit traces: traces/GUEST.MODE.jsonl.gz must equal a fresh run, event for event.

They change only on purpose. After a deliberate change, regenerate them and review the diff:
    CPUVIRT_REGEN_TRACES=1 python -m pytest tests/test_golden_traces.py
"""
import gzip
import os
from pathlib import Path

import pytest

from cpuvirt.runner import run_guest
from cpuvirt.toolchain.build import list_guests
from tests.guest_args import in_guest_dir, run_kwargs

TRACES = Path(__file__).resolve().parent.parent / "traces"
MODES = ["native", "hw", "trap", "full"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("guest", [g.name for g in list_guests()])
def test_trace_matches_golden(guest, mode, tmp_path):
    fresh = tmp_path / "t.jsonl"
    with in_guest_dir():            # guests with modules (tests/guest_args.py) name them relatively
        run_guest(guest, mode, trace_path=str(fresh), **run_kwargs(guest))
    data = fresh.read_bytes()
    golden = TRACES / f"{guest}.{mode}.jsonl.gz"
    if os.environ.get("CPUVIRT_REGEN_TRACES"):
        golden.write_bytes(gzip.compress(data, compresslevel=9, mtime=0))
    assert golden.exists(), f"no golden trace {golden.name}: run with CPUVIRT_REGEN_TRACES=1"
    want = gzip.decompress(golden.read_bytes()).decode().splitlines()
    got = data.decode().splitlines()
    for n, (w, g) in enumerate(zip(want, got), 1):
        assert g == w, f"{golden.name} line {n} differs:\n  golden: {w}\n  now:    {g}"
    assert len(got) == len(want), f"{golden.name}: {len(want)} lines golden, {len(got)} now"


@pytest.mark.parametrize("guest", [g.name for g in list_guests() if g.has_pv])
def test_para_trace_matches_golden(guest, tmp_path):
    """Mode para runs the PV build, so only guests that have one (traces/GUEST.para.jsonl.gz)."""
    test_trace_matches_golden(guest, "para", tmp_path)
