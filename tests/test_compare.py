"""`cpuvirt compare` end to end: the summary block, the site table with its silent holes, PV-vs-native
alignment by source line, a mode the guest cannot run in, labels by settings, CSV/JSON, --site."""
import csv
import io
import json
import subprocess
import sys

import pytest


def cpuvirt(*args):
    return subprocess.run([sys.executable, "-m", "cpuvirt", *map(str, args)], capture_output=True, timeout=300)


def blocks(text: str) -> dict[str, dict[str, str]]:
    """Narrow layout -> {site header: {run label: cell}}."""
    out, cur, last = {}, None, None
    for line in text.split("== sites", 1)[1].splitlines()[1:]:
        if line.startswith("     "):                      # a wrapped cell continues
            out[cur][last] += " " + line.strip()
        elif line.startswith("    "):
            label, _, cell = line.strip().partition("  ")
            last = label.strip()
            out[cur][last] = cell.strip()
        elif line.strip() and not line.startswith("#"):
            cur = line
            out[cur] = {}
    return out


@pytest.fixture(scope="module")
def holes():
    p = cpuvirt("compare", "holes", "--modes", "native,trap,full,hw")
    assert p.returncode == 0, p.stderr
    return p.stdout.decode()


def test_summary_block_first(holes):
    lines = holes.splitlines()
    assert lines[0].startswith("== summary")
    rows = {l.split()[0]: l for l in lines[2:6]}
    assert set(rows) == {"native", "trap", "full", "hw"}
    assert rows["native"].split()[1:5] == ["exit", "0", "9/0", "reference"]
    assert rows["trap"].split()[1:5] == ["exit", "1", "1/8", "differs"]     # the holes, seen by the guest
    assert rows["full"].split()[4] == "same"
    assert "console of trap vs native:" in holes and "+FAIL popf sets IF" in holes
    assert all(len(l) <= 100 for l in lines if not l.startswith("  "))


def test_holes_rows_show_silently_wrong_and_what_each_technique_did(holes):
    b = blocks(holes)
    pushf = next(v for k, v in b.items() if "holes.S:29" in k and "pushfd" in k)
    assert pushf["native"] == "ran natively"
    assert pushf["trap"].startswith("ran natively, WRONG")        # no event at all, and wrong
    assert pushf["full"].startswith("translated")
    assert pushf["hw"] == "ran in guest mode, no exit"
    cli = next(v for k, v in b.items() if "holes.S:28" in k)
    assert cli["trap"] == "trap cli"
    assert all(len(l) <= 100 for l in holes.split("== sites", 1)[1].splitlines())


def test_para_aligned_with_native_by_source_line():
    p = cpuvirt("compare", "paging", "--modes", "native,para,hw")
    assert p.returncode == 0, p.stderr
    b = blocks(p.stdout.decode())
    cr3 = next(v for k, v in b.items() if "paging.S:131" in k and "mov cr3, edx" in k)
    assert cr3["native"] == "ran natively"
    assert cr3["para"].startswith("PV build: hypercall") and "mmuext_op" in cr3["para"]
    assert "(call pv_write_cr3)" in cr3["para"]
    invlpg = next(v for k, v in b.items() if "paging.S:152" in k and "invlpg" in k)
    assert invlpg["para"] == "PV build: hypercall mmuext_op (call pv_invlpg)"
    assert cr3["hw"] == "no exit: cr3_load_exiting=0"
    assert any("hypercall mmu_update" in v.get("para", "") for v in b.values())


def test_a_mode_the_guest_cannot_run_in_is_a_column_not_an_abort():
    p = cpuvirt("compare", "apic", "--modes", "native,para")
    assert p.returncode == 0, p.stderr
    out = p.stdout.decode()
    para = next(l for l in out.splitlines() if l.startswith("para "))
    assert "not run" in para and "paravirtualized build" in para
    assert all(v.get("para") == "not run" for v in blocks(out).values())


def test_runs_of_one_mode_are_labelled_by_their_settings_csv_and_json(tmp_path):
    p = cpuvirt("compare", "paging", "--modes", "hw,hw:ept=0", "--csv")
    assert p.returncode == 0, p.stderr
    rows = list(csv.reader(io.StringIO(p.stdout.decode())))
    assert rows[0] == ["where", "symbol", "instruction", "class", "hw", "hw ept=0"]
    cr3 = [r for r in rows if r[2] == "mov cr3, edx"]
    assert cr3 and all(r[4] == "no exit: cr3_load_exiting=0" and r[5].startswith("VM exit CR_ACCESS") for r in cr3)
    j = json.loads(cpuvirt("compare", "hello", "--modes", "native,full", "--json").stdout)
    assert [r["run"] for r in j["runs"]] == ["native", "full"]
    assert j["runs"][1]["console"] == "same" and j["runs"][1]["modelled_cycles"] > 0
    assert any(s["runs"]["full"]["what"].startswith("callout") for s in j["sites"])


def test_site_accepts_symbols_and_lines():
    p = cpuvirt("compare", "holes", "--modes", "native,trap", "--site", "main+0x1", "--site", "holes.S:28")
    assert p.returncode == 0, p.stderr
    heads = list(blocks(p.stdout.decode()))
    assert len(heads) == 2 and "pushfd" in heads[0] and "cli" in heads[1]      # in the order asked
    bad = cpuvirt("compare", "holes", "--modes", "native,trap", "--site", "no_such_symbol")
    assert bad.returncode == 2 and b"unknown symbol" in bad.stderr


def test_compare_trace_files_with_symbols(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    assert cpuvirt("run", "hello", "--trace", a, "-q").returncode == 0
    assert cpuvirt("run", "hello", "--mode", "hw", "--trace", b, "-q").returncode == 0
    p = cpuvirt("compare", a, b, "--wide")
    assert p.returncode == 0, p.stderr
    out = p.stdout.decode()
    assert "console" in out and " n/a " in out
    assert any("serial_init" in l and "VM exit IO_INSTRUCTION" in l for l in out.splitlines())


def test_trace_files_of_one_mode_are_labelled_by_the_controls_that_differ(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    assert cpuvirt("run", "interrupts", "--mode", "hw", "--trace", a, "-q").returncode == 0
    assert cpuvirt("run", "interrupts", "--mode", "hw", "--vmx", "hlt_exiting=0", "--trace", b, "-q").returncode == 0
    p = cpuvirt("compare", a, b, "--csv")
    assert p.returncode == 0, p.stderr
    rows = list(csv.reader(io.StringIO(p.stdout.decode())))
    assert rows[0][4:] == ["hw hlt_exiting=1", "hw hlt_exiting=0"]
    hlt = [r for r in rows if r[2] == "hlt"]
    assert hlt and all(r[4].startswith("VM exit HLT") for r in hlt)
