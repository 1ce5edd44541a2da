"""ruff over cpuvirt/ with the project's rules (pyproject.toml, [tool.ruff]): pyflakes' real bugs
(undefined names, unused imports), bugbear's traps, import order and width, and `ruff format`'s layout;
and mypy over the whole package ([tool.mypy] in pyproject.toml). Each is skipped where its tool is not
installed (both are in the `test` extra, so CI has them)."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff is not installed (pip install ruff)")
def test_ruff_check_is_clean():
    p = subprocess.run(["ruff", "check", "--no-cache", "cpuvirt"], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff is not installed (pip install ruff)")
def test_ruff_format_leaves_the_code_as_it_is():
    """`ruff format` is the layout: run it before committing (`ruff format cpuvirt`)."""
    p = subprocess.run(["ruff", "format", "--check", "--no-cache", "cpuvirt"], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr


@pytest.mark.skipif(shutil.which("mypy") is None, reason="mypy is not installed (pip install mypy)")
def test_mypy_is_clean():
    """Every module of cpuvirt/ ([tool.mypy] files in pyproject.toml)."""
    p = subprocess.run(["mypy", "--no-incremental"], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr


@pytest.mark.skipif(shutil.which("mypy") is None, reason="mypy is not installed (pip install mypy)")
def test_mypy_tells_the_address_spaces_apart(tmp_path):
    """GVA, GPA and HPA (memory/types.py) are distinct to mypy at the memory layer's borders: a guest-linear
    address given where a guest-physical one is expected is an error, the right one is not."""
    wrong = tmp_path / "wrong.py"
    wrong.write_text("from cpuvirt.memory.p2m import P2m\nfrom cpuvirt.memory.types import GPA, GVA\n\n"
                     "def f(p: P2m, gva: GVA, gpa: GPA) -> None:\n"
                     "    p.gpa_to_hpa(gpa)\n"
                     "    p.gpa_to_hpa(gva)\n")
    p = subprocess.run(["mypy", "--no-incremental", "--follow-imports=silent", "--ignore-missing-imports",
                        "--config-file", "/dev/null", str(wrong)], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 1, p.stdout + p.stderr
    errors = [line for line in p.stdout.splitlines() if ": error:" in line]
    assert len(errors) == 1 and "wrong.py:6:" in errors[0] and '"GVA"' in errors[0], p.stdout
