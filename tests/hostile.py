"""Helpers for the hostile-guest tests (docs/security.md): build a tests/guests/ source with
preprocessor defines (one source, several attacks), and run cpuvirt in a subprocess with a hard
timeout, so that a hang is a test failure and not a stuck test run."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from cpuvirt.toolchain.build import include_dir
from cpuvirt.toolchain.image import build_image
from cpuvirt.toolchain.preprocess import preprocess

TEST_GUESTS = Path(__file__).parent / "guests"
REPO = Path(__file__).resolve().parents[1]


def build(name: str, out_dir: Path, **defines) -> Path:
    pre = preprocess(TEST_GUESTS / f"{name}.S", {k: str(v) for k, v in defines.items()}, [include_dir()])
    image, _ = build_image(pre.lines)
    tag = "".join(f"-{k}{v}" for k, v in sorted(defines.items()))
    path = out_dir / f"{name}{tag}.bin"
    path.write_bytes(image)
    return path


def run_cli(*args, timeout: float = 120) -> subprocess.CompletedProcess:
    """`python -m cpuvirt ARGS` in this tree; a run that outlives `timeout` fails the test."""
    try:
        return subprocess.run([sys.executable, "-m", "cpuvirt", *map(str, args)], capture_output=True,
                              timeout=timeout, cwd=REPO)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"cpuvirt {' '.join(map(str, args))} did not end within {timeout} s (a hang)") from None


def summary_line(p: subprocess.CompletedProcess) -> str:
    """The first line of the run summary: 'cpuvirt: NAME under MODE: OUTCOME, status N (why)'."""
    err = p.stderr.decode()
    assert "Traceback" not in err, err
    first = err.splitlines()[0] if err else ""
    assert first.startswith("cpuvirt: "), err
    return first
