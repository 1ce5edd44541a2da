"""Guest-caused stops and hangs end in documented outcomes (issue 10, items 7 and 10; docs/security.md).

- Execution that reaches code it cannot fetch (EIP outside RAM, a stack outside RAM, page tables
  outside RAM, code in a device's MMIO page) stops with 123 and one line, in every mode, within a
  hard timeout: under `full` it used to loop forever inside the translator runtime.
- A #PF whose handler cannot itself be fetched retires nothing; each delivery is charged to the
  budget (FETCH_FAULT_CYCLES), so the run ends by budget after a bounded number of deliveries.
- Everything the hypervisor refuses or does not implement is 123 with the reason, never 1.
"""
import pytest

from cpuvirt import status
from cpuvirt.cpu.vcpu import FETCH_FAULT_CYCLES
from tests.hostile import build, run_cli, summary_line

MODES = ("native", "trap", "full", "hw")
UNFETCHABLE = {1: "0x10000000", 2: "0xffffffff", 3: "0x1007", 4: "0xfee00000"}


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("outcomes")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", sorted(UNFETCHABLE))
def test_unfetchable_code_stops_with_123(out_dir, case, mode):
    image = build("unfetchable", out_dir, CASE=case)
    p = run_cli("run", image, "--mode", mode, "--max-insns", 5_000_000, timeout=60)
    line = summary_line(p)
    assert p.returncode == status.HYPERVISOR_STOP, line
    assert p.stdout.decode() == "PASS start\n"
    if mode == "hw":      # VMX root sees an EPT violation, or an access it cannot emulate
        assert "EPT violation" in line or "MMIO access" in line or "cannot decode" in line, line
    else:
        assert "fetched code from unbacked memory at " + UNFETCHABLE[case] in line, line


@pytest.mark.parametrize("mode", MODES)
def test_faulting_fault_handler_spends_the_budget(out_dir, mode):
    budget = 1_000_000
    image = build("unfetchable", out_dir, CASE=5)
    p = run_cli("run", image, "--mode", mode, "--max-insns", budget, timeout=60)
    line = summary_line(p)
    assert p.returncode == status.BUDGET, line
    events = [l for l in p.stderr.decode().splitlines() if l.split()[:1] == ["events"]][0]
    n = int(events.split("page_fault ")[1].split(",")[0])
    # each delivery of the #PF retires nothing and costs FETCH_FAULT_CYCLES: bounded by the budget
    assert budget // FETCH_FAULT_CYCLES // 2 < n <= budget // FETCH_FAULT_CYCLES, n


@pytest.mark.parametrize("case,modes,reason", [
    (1, ("hw",), "hw: MMIO access by `fild dword ptr [0xfec00000]`"),
    (2, ("trap", "full"), "the guest cleared CR0.PE"),   # full: only from a 16-bit code segment
])
def test_refused_or_unimplemented_is_123_with_one_line(out_dir, case, modes, reason):
    image = build("hv_stops", out_dir, CASE=case)
    for mode in modes:
        p = run_cli("run", image, "--mode", mode, "--max-insns", 5_000_000, timeout=60)
        line = summary_line(p)
        assert p.returncode == status.HYPERVISOR_STOP, line
        assert f"under {mode}: error, status 123 (" in line and reason in line, line


def test_the_same_action_is_not_refused_where_it_is_implemented(out_dir):
    """hv_stops CASE=1 is a valid guest: native executes the MMIO load and PASSes."""
    p = run_cli("run", build("hv_stops", out_dir, CASE=1), timeout=60)
    assert p.returncode == 0 and p.stdout.decode().count("PASS") == 2


def test_statuses_are_defined_once():
    """123 and the other reserved statuses come from cpuvirt/status.py only."""
    import re
    from pathlib import Path
    root = Path(status.__file__).parent
    offenders = []
    for f in root.rglob("*.py"):
        if f.name == "status.py":
            continue
        for n, line in enumerate(f.read_text().splitlines(), 1):
            if re.search(r"finish\([^)]*,\s*(1|123|124|125|126)\s*,", line) or re.search(r"^\s*EXIT_(BUDGET|ERROR|HALTED|TRIPLE_FAULT|HV_STOP|HYPERVISOR_STOP)\w*\s*=\s*\d", line):
                offenders.append(f"{f.relative_to(root)}:{n}: {line.strip()}")
    assert not offenders, offenders
