"""`cpuvirt vmx controls` lists every simulated control; the VMCS dump names the set control bits."""
import json
import subprocess
import sys

from cpuvirt.modes.hw.controls import CONTROLS


def cpuvirt(*args):
    return subprocess.run([sys.executable, "-m", "cpuvirt", *map(str, args)], capture_output=True, timeout=300)


def test_vmx_controls_lists_every_control_with_defaults_and_effect():
    p = cpuvirt("vmx", "controls", "--json")
    assert p.returncode == 0
    rows = {r["name"]: r for r in json.loads(p.stdout)}
    assert set(rows) == set(CONTROLS)
    assert rows["hlt_exiting"]["sdm_name"] == "HLT exiting" and rows["hlt_exiting"]["bit"] == 7
    assert rows["enable_ept"]["default"] == 1 and rows["enable_ept"]["default_no_ept"] == 0
    assert rows["cr3_load_exiting"]["default"] == 0 and rows["cr3_load_exiting"]["default_no_ept"] == 1
    assert all(r["effect"] for r in rows.values())
    text = cpuvirt("vmx", "controls").stdout.decode()
    assert all(len(l) <= 100 for l in text.splitlines())


def test_vmcs_dump_names_the_set_control_bits():
    p = cpuvirt("vmcs", "paging", "--dump-vmcs-on", "CR_ACCESS", "--vmx", "hlt_exiting=0")
    assert p.returncode == 0, p.stderr
    primary = next(l for l in p.stdout.decode().splitlines() if "CPU_BASED_VM_EXEC_CONTROL" in l)
    assert "unconditional_io_exiting" in primary and "hlt_exiting" not in primary
    secondary = next(l for l in p.stdout.decode().splitlines() if "SECONDARY_VM_EXEC_CONTROL" in l)
    # KVM's preset on a CPU with APICv (controls.py): bits 0, 1 and 8, named in bit order.
    assert secondary.split()[-3:] == ["virtualize_apic_accesses", "enable_ept", "apic_register_virtualization"]
    assert "use_tpr_shadow" in primary
