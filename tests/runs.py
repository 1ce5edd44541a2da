"""What a run leaves, for tests that compare two runs of one guest (a C path on and off): the RunResult
less host time (its wall time, and the host microseconds per exit of hw's exit table); hw --no-ept's run
with the VMCS fields every exit Python makes finds; and what a class's switches read from the environment
in a fresh process."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys


def run_record(res) -> dict:
    out = dataclasses.asdict(res)
    del out["wall_s"]
    out["exit_stats"] = [tuple(row[:-1]) for row in out["exit_stats"]]
    return out


def switches_with(code: str, unset: tuple[str, ...], **env: str) -> list[str]:
    """What `code` (a Python snippet printing a class's switches) prints in a fresh process with the variables
    `unset` removed from the environment and `env` set."""
    e = {k: v for k, v in os.environ.items() if k not in unset}
    e.update(env)
    p = subprocess.run([sys.executable, "-c", code], env=e, capture_output=True, text=True, check=True)
    return p.stdout.split()


def check_off_switches(code: str, names: tuple[str, str], variable: str) -> None:
    """A quick path's two switches, (CPUVIRT_NO_..., CPUVIRT_..._C): `code` prints both class attributes; both
    are on by default, and `variable` turns off its own one only."""
    assert switches_with(code, names) == ["True", "True"]
    off = switches_with(code, names, **{variable: "1" if variable == names[0] else "0"})
    assert off == (["False", "True"] if variable == names[0] else ["True", "False"])


EXIT_FIELDS = (
    "VM_EXIT_REASON",
    "EXIT_QUALIFICATION",
    "VM_EXIT_INSTRUCTION_LEN",
    "VM_EXIT_INTR_INFO",
    "VM_EXIT_INTR_ERROR_CODE",
    "VMX_INSTRUCTION_INFO",
    "GUEST_RIP",
    "GUEST_CR3",
    "VM_ENTRY_INTR_INFO_FIELD",
    "VM_ENTRY_EXCEPTION_ERROR_CODE",
    "VM_ENTRY_INSTRUCTION_LEN",
)


def hw_shadow_run(path, switch: str, on: bool, monkeypatch):
    """hw --no-ept with VmxCpu's class switch `switch` on or off: (the run's record, its reasons, the shadow's
    counters, the VmxCpu, and at every VM exit Python makes, C's folded first, and at every stop of the run loop
    after its folds, the exit's reason (-1 at a stop), RIP and virtual time with the exit-information and
    entry-injection fields the VMCS holds then)."""
    from cpuvirt.engine import regs as R
    from cpuvirt.modes.hw.vmcs import Field
    from cpuvirt.modes.hw.vmx import VmxCpu
    from cpuvirt.runner import run_guest

    fields = [Field[name] for name in EXIT_FIELDS]
    seen: list[tuple] = []
    original, original_entry = VmxCpu.vm_exit, VmxCpu.before_entry

    def vm_exit(self, reason, rip, **kw):
        self.fold_fast_exits()
        seen.append((int(reason), rip, self.clock.now, tuple(self.vmcs._values.get(f) for f in fields)))
        return original(self, reason, rip, **kw)

    def before_entry(self):  # each stop of the run loop (-1: no exit), where the fields are folded too
        original_entry(self)
        seen.append((-1, self.regs.read(R.EIP), self.clock.now, tuple(self.vmcs._values.get(f) for f in fields)))

    monkeypatch.setattr(VmxCpu, "vm_exit", vm_exit)
    monkeypatch.setattr(VmxCpu, "before_entry", before_entry)
    monkeypatch.setattr(VmxCpu, switch, on)
    cpus: list = []
    res = run_guest(str(path), "hw", 32, 50_000_000, mode_options={"ept": False}, on_start=cpus.append)
    monkeypatch.undo()
    vcpu = cpus[-1].vcpu
    return run_record(res), tuple(vcpu.reasons.items()), cpus[-1].shadow.counters.as_dict(), vcpu, seen


def same_exits(c_seen: list, py_seen: list) -> None:
    """Each exit Python made in the C run was made in the Python run too, in order, finding the same fields."""
    index: dict = {}
    for k, record in enumerate(py_seen):
        index.setdefault(record[:3], []).append(k)
    last = -1
    for record in c_seen:
        candidates = [k for k in index.get(record[:3], []) if k > last]
        assert candidates, record[:3]
        last = candidates[0]
        assert record == py_seen[last], (record, py_seen[last])
