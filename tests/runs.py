"""What a run leaves, for tests that compare two runs of one guest (a C path on and off): the RunResult
less host time (its wall time, and the host microseconds per exit of hw's exit table)."""

from __future__ import annotations

import dataclasses


def run_record(res) -> dict:
    out = dataclasses.asdict(res)
    del out["wall_s"]
    out["exit_stats"] = [tuple(row[:-1]) for row in out["exit_stats"]]
    return out
