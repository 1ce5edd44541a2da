"""`cpuvirt net-bench` end to end, with a small burst (cpuvirt/netbench.py)."""
from __future__ import annotations

import json
import subprocess
import sys


def _net_bench(*args):
    return subprocess.run([sys.executable, "-m", "cpuvirt", "net-bench", *args], capture_output=True, text=True,
                          timeout=300)


def test_net_bench_measures_every_backend_and_the_ring_variants():
    r = _net_bench("--frames", "40", "--modes", "native", "--json")
    assert r.returncode == 0, r.stderr[-500:]
    assert "net-bench [" in r.stderr and "/" in r.stderr                  # the progress bar
    data = json.loads(r.stdout)
    rows = {row["backend"]: row for row in data["rows"]}
    assert set(rows) == {"userspace", "vhost", "vhost-user"}
    for row in rows.values():
        assert row["frames"] == 42                                         # ARP, ping, 40 burst frames
        assert row["kicks"] == 1.0 and row["exits"] >= 3                   # one kick per frame, each an exit
        assert row["interrupts"] > 0
    for b in ("userspace", "vhost", "vhost-user"):                        # (vhost-user: its process reports)
        assert rows[b]["copies"] == 2.0 and rows[b]["cachelines"] > 0     # out of and back into guest RAM
    lines = {(x["variant"], x["backend"]): x for x in data["cachelines"]}
    split, fixed = lines["split ring, EVENT_IDX", "userspace"], lines["fixed avail mapping, EVENT_IDX", "userspace"]
    plain = lines["split ring, no EVENT_IDX", "userspace"]
    assert fixed["to_device"] < split["to_device"] and fixed["to_driver"] == split["to_driver"]
    assert plain["to_driver"] < split["to_driver"]                        # no used_event / avail_event lines
    assert split["kicks"] == 1.0 and plain["kicks"] > 1.9 and split["suppressed"] > plain["suppressed"] == 0
    for b in ("vhost", "vhost-user"):            # the same data path everywhere (the device model also reads
        n = fixed["frames"]                       # avail.idx at the receive queue's first kick, for its trace)
        assert abs(lines["fixed avail mapping, EVENT_IDX", b]["to_device"] - fixed["to_device"]) * n <= 1
        assert lines["split ring, no EVENT_IDX", b]["to_driver"] == plain["to_driver"]


def test_net_bench_table_and_bad_input():
    r = _net_bench("--frames", "4", "--modes", "native", "--backends", "userspace", "--no-cachelines")
    assert r.returncode == 0 and "native  userspace" in r.stdout and "exits" in r.stdout
    bad = _net_bench("--modes", "warp")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "warp" in bad.stderr
