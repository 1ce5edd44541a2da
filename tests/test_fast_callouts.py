"""Mode full answers cpuid, rdtsc and mov-to-CR0/CR4 callouts in C once Python has served a site
(bt/_callout.c, bt/fastcallout.py, modes/full/crfast.py). The C path must be invisible: the guest sees
what native gives it, and the run's figures (instructions, virtual time, events, callouts, lookups) are
those of the Python path, which serves every callout when the extension is absent or a trace is written.
"""

from __future__ import annotations

from pathlib import Path

from cpuvirt.bt.fastcallout import CPUID, MOV_CR0, MOV_CR4, RDTSC, FastCallouts
from cpuvirt.runner import run_guest
from cpuvirt.x86 import cpuid as C

GUEST = str(Path(__file__).parent / "guests" / "fast_callouts.S")
N = 300  # the guest's loop count


def _run(mode, monkeypatch=None, python_only=False, trace_path=None):
    seen = []
    if python_only:
        monkeypatch.setattr(FastCallouts, "install", classmethod(lambda cls, *a: None))
    res = run_guest(GUEST, mode, 32, 50_000_000, on_start=seen.append, trace_path=trace_path)
    assert res.outcome == "exit" and res.status == 0, (res.message, res.console.decode()[-600:])
    return res, seen[-1]


def _served(hv) -> dict[int, int]:
    fast = hv.vcpu.rt.fast
    return {} if fast is None else {k: fast.table.served[k] for k in (CPUID, RDTSC, MOV_CR0, MOV_CR4)}


def test_full_answers_as_native_and_as_the_model():
    native, _ = _run("native")
    full, hv = _run("full")
    lines, native_lines = full.console.decode().splitlines(), native.console.decode().splitlines()
    # line 2 is the TSC: full counts translated instructions (docs/binary-translation.md), not native's
    assert lines[:1] + lines[2:] == native_lines[:1] + native_lines[2:]
    assert "FAIL" not in full.console.decode()
    first = lines[0]
    want = 0
    for i in range(N, 0, -1):
        want += sum(C.cpuid(i & 3, i, apic_enabled=True))
    assert first.strip().lower() == f"0x{want & 0xFFFFFFFF:08x}"
    served = _served(hv)
    # every site was served once by Python, then by C (the toggles: 2 writes per register per round)
    assert served[CPUID] >= N - 5 and served[RDTSC] >= N - 5
    assert served[MOV_CR0] >= 2 * N - 10 and served[MOV_CR4] >= 2 * N - 10


def test_the_c_path_counts_and_times_as_the_python_path(monkeypatch):
    fast, hv = _run("full")
    slow, hv_slow = _run("full", monkeypatch, python_only=True)
    assert hv_slow.vcpu.rt.fast is None and sum(_served(hv).values()) > 4 * N
    assert fast.console == slow.console
    assert (fast.icount, fast.vtime) == (slow.icount, slow.vtime)
    assert fast.counts == slow.counts
    assert fast.tally == slow.tally
    for key in ("callouts", "lookups", "translations", "invalidations", "flushes"):
        assert fast.mmu["translation"]["tc"][key] == slow.mmu["translation"]["tc"][key], key


def test_a_trace_keeps_every_callout_in_python(tmp_path):
    traced, hv = _run("full", trace_path=str(tmp_path / "t.jsonl"))
    plain, _ = _run("full")
    assert not any(_served(hv).values())
    assert traced.counts == plain.counts and traced.icount == plain.icount




def test_a_flush_sends_every_slot_back_to_python(monkeypatch):
    """After a TC flush slot numbers are reused by other sites: a slot still linked would be served as
    what it was (the counts and the console would differ from the Python path's)."""
    from cpuvirt.bt.tcache import TCache

    room = TCache.room
    calls = {"n": 0}

    def flushing_room(self, nbytes, nslots):
        calls["n"] += 1
        return room(self, nbytes, nslots) and calls["n"] % 37 != 0  # a flush every 37 translations

    monkeypatch.setattr(TCache, "room", flushing_room)
    fast, hv = _run("full")
    assert hv.vcpu.tc.counters.flushes > 2 and sum(_served(hv).values()) > 4 * N
    calls["n"] = 0
    slow, _ = _run("full", monkeypatch, python_only=True)
    assert fast.console == slow.console
    assert (fast.icount, fast.vtime, fast.counts) == (slow.icount, slow.vtime, slow.counts)
