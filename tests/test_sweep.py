"""`cpuvirt sweep`: every combination of VMX control values, run in parallel, tabulated."""
import json
import subprocess
import sys


def cpuvirt(*args):
    return subprocess.run([sys.executable, "-m", "cpuvirt", *map(str, args)], capture_output=True, timeout=300)


def test_sweep_runs_every_combination_and_counts_exits_by_reason():
    p = cpuvirt("sweep", "interrupts", "--vmx", "hlt_exiting=0,1", "--vmx", "rdtsc_exiting=0,1",
                "--modes", "native,hw", "--json")
    assert p.returncode == 0, p.stderr
    runs = json.loads(p.stdout)["runs"]
    assert [r["vmx"] for r in runs] == [[], ["hlt_exiting=0", "rdtsc_exiting=0"], ["hlt_exiting=0", "rdtsc_exiting=1"],
                                        ["hlt_exiting=1", "rdtsc_exiting=0"], ["hlt_exiting=1", "rdtsc_exiting=1"]]
    assert all(r["outcome"] == "exit" and r["status"] == 0 for r in runs)
    assert len({r["console_sha"] for r in runs}) == 1                  # the guest sees the same machine
    by = {tuple(r["vmx"]): r for r in runs}
    assert "HLT" not in by[("hlt_exiting=0", "rdtsc_exiting=0")]["exits"]
    assert by[("hlt_exiting=1", "rdtsc_exiting=0")]["exits"]["HLT"] > 0
    assert runs[0]["mode"] == "native" and runs[0]["exits"] == {}
    assert all(r["modelled_cycles"] > 0 for r in runs)
    text = cpuvirt("sweep", "interrupts", "--vmx", "hlt_exiting=0,1", "--jobs", "1").stdout.decode()
    assert "hw hlt_exiting=1" in text and "HLT 5" in text


def test_sweep_bad_input_is_refused_before_running():
    assert cpuvirt("sweep", "hello", "--vmx", "no_such_control=0,1").returncode == 2
    assert cpuvirt("sweep", "hello", "--vmx", "hlt_exiting").returncode == 2
    assert cpuvirt("sweep", "hello").returncode == 2
