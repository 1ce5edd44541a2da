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
from tests.conftest import requires_qemu
from tests.qemu import assert_same_console_as_qemu

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


def test_a_megamorphic_return_is_looked_up_in_c(test_guest, monkeypatch):
    """tests/guests/megamorphic_ret.S: a `ret` and a `ret 4` with 24 live targets each. The translator fills its cache until it
    is wide and MEGAMORPHIC_AFTER more misses have gone by, then no more (each fill patches translated code);
    its misses are then the C hook's look-ups (IC_RET), which leave what Python's leave (Python serves every
    one without C's copy of the translation cache: CPUVIRT_FULL_DELIVERY_C=0)."""
    from cpuvirt.bt.fastcallout import IC_RET
    from cpuvirt.bt.translate import IC_WIDE, MEGAMORPHIC_AFTER, WIDEN_AFTER
    from tests.runs import run_record

    path = str(test_guest("megamorphic_ret"))
    out = []
    for env in ("1", "0"):
        monkeypatch.setenv("CPUVIRT_FULL_DELIVERY_C", env)
        seen: list = []
        res = run_guest(path, "full", 32, 50_000_000, on_start=seen.append)
        vcpu = seen[-1].vcpu
        out.append((run_record(res), vcpu.tc.counters.as_dict(), vcpu.rt.fast.table.served[IC_RET]))
    (c, c_counters, c_served), (py, py_counters, py_served) = out
    assert c == py and c_counters == py_counters
    # once no more filled, each cache holds IC_WIDE of its 24 targets for good: 8 misses a round of 24 calls
    misses, most = c_counters["ic_misses"], 2 * (WIDEN_AFTER + MEGAMORPHIC_AFTER + 24)
    assert 2 * 100 * (24 - IC_WIDE) <= misses < 2 * 100 * (24 - IC_WIDE) + most, misses
    # ... nearly all of them C's (the first one of each target after it was found megamorphic is Python's)
    assert py_served == 0 and c_served >= misses - most, (c_served, misses)
    native = run_guest(path, "native", 32, 50_000_000)
    assert b"PASS" in native.console and c["console"] == native.console


@requires_qemu
def test_megamorphic_ret_console_is_qemus(test_guest):
    assert b"PASS" in assert_same_console_as_qemu(test_guest("megamorphic_ret"), [], [])
