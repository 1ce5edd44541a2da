"""Labs an instructor can hand out: each a sequence of real cpuvirt commands, what to look at in their
output, and questions whose numeric answers are checked against the student's own run.

A lab is data (a `Lab` in a module of this package). `cpuvirt lab NAME` runs its commands in a
scratch folder exactly as a student types them, shows their output, and measures the observations;
`--answer Q=VALUE` checks answers against those measurements; `--write-doc DIR` writes the lab's
document with the observations of this very run, so the documents under docs/labs/ are regenerated,
never typed (a test regenerates them and fails when cpuvirt's behaviour has drifted from them).
Everything observed is deterministic (instructions, events, exits, faults), never a wall time.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from cpuvirt.errors import CpuvirtError

LAB_MODULES = ("holes", "bt", "para", "vtx", "memory", "virtio")


@dataclass
class Output:
    """One command as it ran: what a student would see, and the files it wrote in the lab folder."""

    argv: list[str]
    status: int
    stdout: str
    stderr: str
    folder: Path

    def summary(self, name: str) -> dict:
        """A run's --summary JSON file."""
        return json.loads((self.folder / name).read_text())

    def events(self, name: str) -> list[dict]:
        """A trace's events."""
        lines = (self.folder / name).read_text().splitlines()
        return [e for e in map(json.loads, lines) if e.get("type") == "event"]

    def footer(self, name: str) -> dict:
        return json.loads((self.folder / name).read_text().splitlines()[-1])

    def lines(self, prefix: str) -> list[str]:
        return [line for line in self.stdout.splitlines() if line.startswith(prefix)]


@dataclass
class Step:
    """One command. `observe` measures what the text's {placeholders} and the questions use."""

    command: str
    text: str
    observe: Callable[[Output], dict] = lambda out: {}
    expect: str = ""  # what the instructor should see, with {placeholders} from observations
    show_lines: int = 12  # how much of the output the document quotes


@dataclass
class Question:
    key: str
    text: str
    answer: Callable[[dict], float] | None = None  # a number from the observations, checked; None: discussion
    tolerance: float = 0.0


@dataclass
class Lab:
    name: str
    title: str
    goals: list[str]
    background: str
    steps: list[Step]
    questions: list[Question]
    extend: str
    number: int = 0
    notes: list[str] = field(default_factory=list)


def all_labs() -> list[Lab]:
    labs = []
    for i, name in enumerate(LAB_MODULES, 1):
        lab = importlib.import_module(f"cpuvirt.labs.{name}").LAB
        lab.number = i
        labs.append(lab)
    return labs


def get_lab(name: str) -> Lab:
    for lab in all_labs():
        if name in (lab.name, str(lab.number)):
            return lab
    raise CpuvirtError(f"unknown lab {name!r} (labs: {', '.join(lab.name for lab in all_labs())})")


def run_step(step: Step, folder: Path) -> Output:
    argv = shlex.split(step.command)
    if argv[0] != "cpuvirt":
        raise CpuvirtError(f"lab step is not a cpuvirt command: {step.command}")
    # The step runs in the lab folder, where `python -m cpuvirt` would import whichever cpuvirt is
    # installed: put the package running this lab first on the path, so the steps run the same code.
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(d for d in (root, os.environ.get("PYTHONPATH")) if d))
    p = subprocess.run(
        [sys.executable, "-m", "cpuvirt", *argv[1:]], cwd=folder, capture_output=True, timeout=600, env=env
    )
    return Output(argv, p.returncode, p.stdout.decode("utf-8", "replace"), p.stderr.decode("utf-8", "replace"), folder)


def run_lab(lab: Lab, folder: Path | None = None, echo=None) -> tuple[list[Output], dict]:
    """Run every step in `folder` (a fresh temporary one by default): (outputs, observations)."""
    tmp = tempfile.TemporaryDirectory(prefix=f"cpuvirt-lab-{lab.name}-") if folder is None else None
    where = Path(tmp.name) if tmp is not None else folder
    assert where is not None
    outputs, observed = [], {}
    try:
        for i, step in enumerate(lab.steps, 1):
            if echo:
                echo(f"\n[{i}/{len(lab.steps)}] $ {step.command}\n")
            out = run_step(step, where)
            if echo and step.show_lines:
                echo(_quote(out, step.show_lines * 3))
            observed.update(step.observe(out))
            outputs.append(out)
    finally:
        if tmp is not None:
            tmp.cleanup()
    return outputs, observed


def _quote(out: Output, max_lines: int) -> str:
    text = (out.stdout + out.stderr).rstrip("\n").splitlines()
    if len(text) > max_lines:
        text = text[: max_lines - 1] + [f"... ({len(text) - max_lines + 1} more lines)"]
    # wall-clock figures differ from run to run: a document shows them as "...".
    hidden, in_table = [], False
    for line in text:
        if in_table and line.strip() and not line.startswith("  "):
            line = re.sub(r"(\s)[\d.]+$", r"\1 ...", line)  # compare's summary: its "host s" column
        else:
            in_table = False
        if line.rstrip().endswith("host s"):
            in_table = True
        hidden.append(_hide_wall(line))
    text = hidden
    return "\n".join(text) + ("\n" if text else "") + (f"(exit status {out.status})\n" if out.status else "")


def _hide_wall(line: str) -> str:
    """Host-time figures (wall time, --stats handler means) differ per machine and per run."""
    import re

    if "wall time" in line:
        return re.sub(r"wall time .*", "wall time      (host time: differs per machine)", line)
    return re.sub(r"(%\s+)[\d.]+ us$", r"\1 ... us", line)


def check_answers(lab: Lab, observed: dict, answers: dict[str, str]) -> list[tuple[str, bool, str]]:
    """[(question key, right?, message)] for each answer given."""
    results = []
    questions = {q.key: q for q in lab.questions}
    for key, given in answers.items():
        q = questions.get(key)
        if q is None:
            raise CpuvirtError(f"lab {lab.name} has no question {key!r} (questions: {', '.join(questions)})")
        if q.answer is None:
            results.append((key, True, "a discussion question: no single number to check"))
            continue
        want = q.answer(observed)
        try:
            value = float(given.replace(",", "").replace("_", ""))
        except ValueError:
            raise CpuvirtError(f"--answer {key}={given}: not a number") from None
        ok = abs(value - float(want)) <= q.tolerance * max(1.0, abs(float(want)))
        results.append(
            (key, ok, "right" if ok else "not what this run shows (look again at the step that measures it)")
        )
    return results


def render_markdown(lab: Lab, outputs: list[Output], observed: dict) -> str:
    """The lab's handout, with the observations of the run that produced it."""
    md = [
        f"# Lab {lab.number}: {lab.title}",
        "",
        f"*Generated by `cpuvirt lab {lab.name} --write-doc docs/labs` from a real run; do not edit by hand.*",
        "",
        "## Goals",
        "",
    ]
    md += [f"- {g}" for g in lab.goals]
    md += [
        "",
        "## Background",
        "",
        lab.background.strip(),
        "",
        "## Steps",
        "",
        f"Work in an empty folder. `cpuvirt lab {lab.name}` runs all of these for you and shows their output.",
        "",
    ]
    for i, (step, out) in enumerate(zip(lab.steps, outputs), 1):
        md += [f"{i}. {step.text.strip()}", "", "   ```sh", f"   {step.command}", "   ```", ""]
        quoted = _quote(out, step.show_lines) if step.show_lines else ""
        if quoted.strip():
            md += ["   ```text"] + [f"   {line}" for line in quoted.rstrip("\n").splitlines()] + ["   ```", ""]
        if step.expect:
            md += [f"   **What you should see.** {step.expect.format(**observed).strip()}", ""]
    md += ["## Questions", ""]
    for q in lab.questions:
        kind = "" if q.answer is None else f" (check it: `cpuvirt lab {lab.name} --answer {q.key}=N`)"
        md += [f"- **{q.key}.** {q.text.strip()}{kind}"]
    md += ["", "## Extend it", "", lab.extend.strip(), ""]
    if lab.notes:
        md += ["## Notes for the instructor", ""] + [f"- {n}" for n in lab.notes] + [""]
    md += ["## Answers from this run (instructor)", ""]
    for q in lab.questions:
        if q.answer is not None:
            md.append(f"- {q.key}: {q.answer(observed)}")
    return "\n".join(md) + "\n"


def doc_name(lab: Lab) -> str:
    return f"{lab.number}-{lab.name}.md"
