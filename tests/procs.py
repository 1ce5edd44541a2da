"""Helper processes of the tests (a vhost-user backend, a switch): start one and wait for the sockets
it creates, stop one for sure."""
from __future__ import annotations

import os
import subprocess
import sys
import time


def start_cpuvirt(args: list[str], paths: list[str], what: str, timeout: float = 10) -> subprocess.Popen:
    """`python -m cpuvirt ARGS...`, returned once every path in `paths` exists (its listening sockets)."""
    proc = subprocess.Popen([sys.executable, "-m", "cpuvirt", *args])
    deadline = time.monotonic() + timeout
    while not all(os.path.exists(p) for p in paths):
        assert proc.poll() is None and time.monotonic() < deadline, f"the {what} did not start"
        time.sleep(0.02)
    return proc


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL after 5 s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
