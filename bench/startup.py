"""Start-up cost: wall time of `python -m cpuvirt run hello -q` as a subprocess, best of 5,
beside `python -c pass` (the interpreter alone).  usage: python bench/startup.py [--repeat R]

Measured as a user's installation runs: with Python's bytecode cache (__pycache__) written and used.
An environment that sets PYTHONDONTWRITEBYTECODE (this project's development machines do) makes every
start compile all of cpuvirt's modules again; that figure is printed too, as "no bytecode cache".
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def best(cmd, repeat, cache=True):
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    if not cache:
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        env["PYTHONPYCACHEPREFIX"] = os.devnull        # nothing cached can be found either
    b = None
    for i in range(repeat + (1 if cache else 0)):      # with the cache: one warm-up run writes it
        t = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, cwd=REPO, env=env)   # -m: this tree, not the installed one
        s = time.perf_counter() - t
        if p.returncode != 0:
            raise RuntimeError(f"{cmd}: exit {p.returncode}: {p.stderr.decode()[-500:]}")
        if cache and i == 0:
            continue
        b = s if b is None else min(b, s)
    return b


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args(argv)
    cmd = [sys.executable, "-m", "cpuvirt", "run", "hello", "-q"]
    run = best(cmd, a.repeat)
    bare = best([sys.executable, "-c", "pass"], a.repeat)
    cold = best(cmd, a.repeat, cache=False)
    print("== startup")
    print(f"cpuvirt run hello / python -c pass : {run / bare:.1f}x")
    print(f"  python -m cpuvirt run hello -q : {run * 1000:7.1f} ms")
    print(f"  python -c pass                 : {bare * 1000:7.1f} ms")
    print(f"  the same, no bytecode cache    : {cold * 1000:7.1f} ms ({cold / run:.1f}x)")
    return {"run_s": run, "python_s": bare, "no_cache_s": cold}


if __name__ == "__main__":
    main()
