"""The labs as a student walks them: every command of every lab runs, and its handout regenerated from
this run equals the committed one (so a handout's expected observations never go stale)."""
import subprocess
import sys
from pathlib import Path

import pytest

from cpuvirt import labs

DOCS = Path(__file__).resolve().parents[1] / "docs" / "labs"


@pytest.mark.parametrize("lab", [lab.name for lab in labs.all_labs()])
def test_lab_handout_matches_a_fresh_run(lab, tmp_path):
    p = subprocess.run([sys.executable, "-m", "cpuvirt", "lab", lab, "--write-doc", str(tmp_path), "-q"],
                       capture_output=True, timeout=600)
    assert p.returncode == 0, p.stderr.decode()
    name = labs.doc_name(labs.get_lab(lab))
    fresh = (tmp_path / name).read_text()
    committed = (DOCS / name).read_text()
    assert fresh == committed, (f"docs/labs/{name} is stale: regenerate it with "
                                f"`cpuvirt lab {lab} --write-doc docs/labs` and read the diff")


def test_every_lab_step_ran_without_error_status_where_none_is_expected(tmp_path):
    lab = labs.get_lab("holes")
    outputs, observed = labs.run_lab(lab, tmp_path)
    assert [o.status for o in outputs] == [0, 1, 0, 0, 0, 0, 0, 0]     # only trap's holes run FAILs
    assert observed["native_pass"] == 9 and observed["trap_fail"] >= 1


def test_answers_are_checked_against_the_run():
    lab = labs.get_lab("holes")
    observed = {"trap_fail": 8, "trapped_kind_count": 8, "full_callout": 956, "para_hypercall": 35}
    results = dict((k, ok) for k, ok, _ in labs.check_answers(lab, observed, {"q1": "8", "q4": "955"}))
    assert results == {"q1": True, "q4": False}
    with pytest.raises(Exception):
        labs.check_answers(lab, observed, {"q1": "eight"})


def test_lab_cli_lists_and_refuses_bad_input():
    run = lambda *a: subprocess.run([sys.executable, "-m", "cpuvirt", "lab", *a], capture_output=True, timeout=60)
    p = run()
    assert p.returncode == 0 and all(n in p.stdout.decode() for n in ("holes", "bt", "para", "vtx", "memory", "virtio"))
    for bad in (["nope"], ["holes", "--answer", "q99=1"], ["holes", "--answer", "q1"], ["holes", "--write-doc", "/nonexistent"]):
        p = run(*bad)
        assert p.returncode == 2 and p.stderr.decode().count("\n") == 1, bad
