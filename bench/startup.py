"""Start-up cost: wall time of `python -m cpuvirt run hello -q` as a subprocess, best of 5,
beside `python -c pass` (the interpreter alone).  usage: python bench/startup.py [--repeat R]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def best(cmd, repeat):
    b = None
    for _ in range(repeat):
        t = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, cwd=REPO)   # -m: this tree, not the installed one
        s = time.perf_counter() - t
        if p.returncode != 0:
            raise RuntimeError(f"{cmd}: exit {p.returncode}: {p.stderr.decode()[-500:]}")
        b = s if b is None else min(b, s)
    return b


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args(argv)
    run = best([sys.executable, "-m", "cpuvirt", "run", "hello", "-q"], a.repeat)
    bare = best([sys.executable, "-c", "pass"], a.repeat)
    C_header = "== startup"
    print(C_header)
    print(f"cpuvirt run hello / python -c pass : {run / bare:.1f}x")
    print(f"  python -m cpuvirt run hello -q : {run * 1000:7.1f} ms")
    print(f"  python -c pass                 : {bare * 1000:7.1f} ms")
    return {"run_s": run, "python_s": bare}


if __name__ == "__main__":
    main()
