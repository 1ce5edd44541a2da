"""How many TLB misses a run makes, and so the guest page walks native counts, the shadow's hits and the
modelled cost of walks, must not follow the host's speed. QEMU sizes its software TLB at each flush from its
use over a window of host time (100 ms); cpuvirt points libunicorn's clock for that at a count of the engine's
own calls (engine/internals.py pin_tlb_clock, _vclock.c tlb_clock), so that a window is 100 flushes.

tests/guests/tlb_sizes.S grows the engine's TLB, flushes it often with little in use, flushes once more, then
reads 150 pages again and again: with the TLB shrunk they miss, with it large they do not. Each run is made
twice, the second with the host stalled 150 ms at each `#` the guest prints."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from cpuvirt.engine.internals import pin_tlb_clock

SCRIPT = """
import json, sys, time
from cpuvirt.runner import run_guest
out = []
for stall in (False, True):
    def console(byte, stall=stall):
        if stall and byte == ord("#"):
            time.sleep(0.15)
    res = run_guest(sys.argv[1], "native", console=console)
    assert res.outcome == "exit" and res.status == 0, (res.outcome, res.message)
    out.append({k: v for k, v in res.mmu.items() if k in ("fills", "walks", "walk_refs")})
print(json.dumps(out))
"""


def _fast_and_stalled(image, clock: str) -> list[dict]:
    env = dict(os.environ)
    env.pop("CPUVIRT_TLB_CLOCK", None)
    if clock == "host":
        env["CPUVIRT_TLB_CLOCK"] = "host"
    p = subprocess.run([sys.executable, "-c", SCRIPT, str(image)], env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    return json.loads(p.stdout)


def test_the_host_s_speed_does_not_change_the_tlb_misses(test_guest):
    assert pin_tlb_clock() == "pinned"
    image = test_guest("tlb_sizes")
    fast, stalled = _fast_and_stalled(image, "pinned")
    assert fast == stalled
    # the guest does tell the TLB sizes apart: on the host's clock the stalls shrink it, and its last phase
    # misses (7,500 misses against 150: the margin is the 100 ms window against a phase of a few ms)
    fast, stalled = _fast_and_stalled(image, "host")
    assert stalled["fills"] > fast["fills"] + 1000, (fast, stalled)
