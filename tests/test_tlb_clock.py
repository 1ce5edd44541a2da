"""How many TLB misses a run makes, and so the guest page walks native counts, the shadow's hits and the
modelled cost of walks, must not follow the host's speed. QEMU sizes its software TLB at each flush from its
use over a window of host time (100 ms); cpuvirt points libunicorn's clock for that at a count of the engine's
own calls (engine/internals.py pin_tlb_clock, _vclock.c tlb_clock), so that a window is 100 flushes.

tests/guests/tlb_sizes.S grows the engine's TLB, flushes it often with little in use, flushes once more, then
reads 150 pages again and again: with the TLB shrunk they miss, with it large they do not. It runs with the
host stalled 150 ms at each `#` it prints, and with the engine's clock itself moved 150 ms on there: the
first must change nothing, the second shows that the guest does tell the TLB's sizes apart."""

from __future__ import annotations

import subprocess
import sys
import time

from cpuvirt.engine import internals
from cpuvirt.engine.internals import pin_tlb_clock
from cpuvirt.runner import run_guest


def _misses(image, at_mark=None) -> dict:
    def console(byte: int) -> None:
        if at_mark is not None and byte == ord("#"):
            at_mark()

    res = run_guest(str(image), "native", console=console)
    assert res.outcome == "exit" and res.status == 0, (res.outcome, res.message)
    return {k: v for k, v in res.mmu.items() if k in ("fills", "walks", "walk_refs")}


def test_the_host_s_speed_does_not_change_the_tlb_misses(test_guest):
    assert pin_tlb_clock() == "pinned"
    image = test_guest("tlb_sizes")
    fast = _misses(image)
    assert _misses(image, lambda: time.sleep(0.15)) == fast
    # the guest is sensitive: 150 ms more on the engine's own clock at each mark shrinks the TLB before its
    # last phase, which then misses (15,915 fills against 8,563 on 2026-12-05; the host's clock with the
    # stalls gave 15,915 too, before it was pinned)
    later = _misses(image, lambda: internals._tlb_clock_lib().vclock_tlb_clock_set(internals.tlb_clock() + 150))
    assert later["fills"] > fast["fills"] + 1000, (fast, later)


def test_probe_engines_leave_the_clock_as_they_found_it():
    """The engines made to probe libunicorn (the fault fields' and the segments' places in a saved context)
    run once per process, before the first guest or not: they must not move the clock a guest's run sizes
    its TLB by. Checked in a fresh process (the probes' results are cached), where an engine that is set up
(libunicorn makes its CPU, and its TLB, at the first call that needs them) does move it."""
    code = (
        "from cpuvirt.engine.internals import new_engine, tlb_clock\n"
        "from cpuvirt.cpu.quirks import context_layout\n"
        "from cpuvirt.cpu.segcache import segs_offset\n"
        "new_engine().mem_map(0, 4096); t0 = tlb_clock()\n"
        "context_layout(); segs_offset(); t1 = tlb_clock()\n"
        "new_engine().mem_map(0, 4096); print(t0, t1, tlb_clock())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    t0, t1, t2 = map(int, out)
    assert t1 == t0 and t2 > t1


def test_closing_an_engine_leaves_the_clock_alone():
    """uc_close flushes the engine's TLB, one tick of the clock, and the binding closes an engine whenever the
    garbage collector gets to it: possibly in the middle of another engine's run, whose TLB windows would then
    end a flush early (test_the_host_s_speed_does_not_change_the_tlb_misses shows the clock moves the misses).
    Every engine cpuvirt's clock is pinned for is closed without a tick. In a fresh process."""
    code = (
        "import gc\n"
        "from cpuvirt.engine.internals import new_engine, tlb_clock\n"
        "running = new_engine(); running.mem_map(0, 4096)\n"
        "other = new_engine(); other.mem_map(0, 4096); t0 = tlb_clock()\n"
        "del other; gc.collect(); print(t0, tlb_clock())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    t0, t1 = map(int, out)
    assert t0 > 0 and t1 == t0
