"""What a run leaves, for tests that compare two runs of one guest (a C path on and off): the RunResult
less host time (its wall time, and the host microseconds per exit of hw's exit table); and what a class's
switches read from the environment in a fresh process."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys


def run_record(res) -> dict:
    out = dataclasses.asdict(res)
    del out["wall_s"]
    out["exit_stats"] = [tuple(row[:-1]) for row in out["exit_stats"]]
    return out


def switches_with(code: str, unset: tuple[str, ...], **env: str) -> list[str]:
    """What `code` (a Python snippet printing a class's switches) prints in a fresh process with the variables
    `unset` removed from the environment and `env` set."""
    e = {k: v for k, v in os.environ.items() if k not in unset}
    e.update(env)
    p = subprocess.run([sys.executable, "-c", code], env=e, capture_output=True, text=True, check=True)
    return p.stdout.split()


def check_off_switches(code: str, names: tuple[str, str], variable: str) -> None:
    """A quick path's two switches, (CPUVIRT_NO_..., CPUVIRT_..._C): `code` prints both class attributes; both
    are on by default, and `variable` turns off its own one only."""
    assert switches_with(code, names) == ["True", "True"]
    off = switches_with(code, names, **{variable: "1" if variable == names[0] else "0"})
    assert off == (["False", "True"] if variable == names[0] else ["True", "False"])
