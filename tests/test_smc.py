"""The `smc` guest (self-modifying code) in every mode: the same console as native, and PASS.

A mode that caches anything derived from guest code (a translation cache, intercept hooks placed by
scanning code pages, the engine's own translations) must notice every store into code it has
already used: the guest patches immediates and whole instructions of a function it ran, patches a
loop while the loop runs, copies code into a buffer and runs it, and generates privileged and I/O
instructions at run time.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cpuvirt.modes import MODES
from cpuvirt.runner import run_guest
from cpuvirt.toolchain.build import assemble_guest, guest_source_dir, list_guests

ALL_MODES = ("native", "hw", "trap", "full", "para")
GUEST = "smc"


def _has_pv(name: str) -> bool:
    return any(g.name == name and g.has_pv for g in list_guests())


def mode_params(guest: str) -> list:
    """Every mode, skipped with a reason where it cannot run this guest yet."""
    out = []
    for m in ALL_MODES:
        marks = []
        if m not in MODES:
            marks.append(pytest.mark.skip(reason=f"mode '{m}' is not registered in cpuvirt.modes.MODES yet"))
        elif m == "para" and not _has_pv(guest):
            marks.append(pytest.mark.skip(reason=f"'{guest}' has no paravirtualized build: para runs only PV "
                                                 "builds, and this guest's privileged instructions are its point"))
        out.append(pytest.param(m, marks=marks, id=m))
    return out


@pytest.fixture(scope="module")
def native():
    return run_guest(GUEST)


def test_native_passes_every_check(native):
    assert native.outcome == "exit" and native.status == 0, (native.outcome, native.message)
    lines = native.console.decode().splitlines()
    assert lines and all(line.startswith("PASS ") for line in lines), native.console.decode()
    # the last line is printed by in/out instructions the guest generated at run time
    assert lines[-1] == "PASS this line was printed by in/out instructions generated at run time"
    # every CHECK in the source printed one line, plus that generated line
    source = (guest_source_dir() / f"{GUEST}.S").read_text()
    assert len(lines) == source.count("CHECK_EQ(") + 1


@pytest.mark.parametrize("mode", mode_params(GUEST))
def test_console_equals_native(mode, native):
    res = run_guest(GUEST, mode)
    assert res.outcome == "exit" and res.status == 0, (res.outcome, res.message, res.console[-400:])
    assert res.console == native.console


def test_hw_exits_on_privileged_instructions_generated_at_run_time(tmp_path):
    """hw intercepts by scanning code pages: code written later must be scanned too. The generated
    `mov cr0, eax` (it changes CR0.MP, a bit the CR0 guest/host mask owns) must exit, at the buffer."""
    if "hw" not in MODES:
        pytest.skip("mode 'hw' is not registered")
    gen_buf = assemble_guest(GUEST)[1].symbols["gen_buf"]
    trace = tmp_path / "smc.hw.jsonl"
    res = run_guest(GUEST, "hw", trace_path=str(trace))
    assert res.status == 0
    events = [json.loads(line) for line in trace.read_text().splitlines()]
    sites = [e for e in events if e.get("reason") == "CR_ACCESS" and e.get("insn") == "mov cr0, eax"]
    in_buffer = [e for e in sites if gen_buf <= int(e["eip"], 16) < gen_buf + 0x1000]
    assert len(in_buffer) == 2, sites          # set TS|MP, then clear MP (clts changes no owned bit)


def test_listed_with_its_description():
    out = subprocess.run([sys.executable, "-m", "cpuvirt", "guests"], capture_output=True, text=True, check=True).stdout
    line = next((l for l in out.splitlines() if l.split()[:1] == [GUEST]), None)
    assert line is not None, out
    assert "self-modifying code" in line
