"""rdtsc reads the virtual clock. Every mode but hw answers it in C (_vclock.c,
vclock_rdtsc_hook); hw keeps a Python hook (RDTSC exiting, TSC offsetting). Both paths must give
the guest the same values: the runs are compared byte for byte, console and trace."""
from __future__ import annotations

from pathlib import Path

import pytest

from cpuvirt.cpu.vcpu import Vcpu
from cpuvirt.runner import run_guest


GUEST = str(Path(__file__).parent / "guests" / "rdtsc.S")     # prints three rdtsc values


def _run(tmp_path, mode, tag):
    seen = []
    path = tmp_path / f"{mode}.{tag}.jsonl"
    res = run_guest(GUEST, mode, 32, 50_000_000, str(path), on_start=seen.append)
    hv = seen[-1]
    vcpu = hv.vcpu if hasattr(hv, "vcpu") else hv
    return res, path.read_text(), vcpu.clock._state.rdtsc_reads


@pytest.mark.parametrize("mode", ["native", "trap"])   # full translates the kernel's rdtsc (a callout)
def test_rdtsc_in_c_gives_what_the_python_hook_gives(tmp_path, monkeypatch, mode):
    c_res, c_trace, c_reads = _run(tmp_path, mode, "c")
    monkeypatch.setattr(Vcpu, "rdtsc_in_c", False)
    py_res, py_trace, py_reads = _run(tmp_path, mode, "py")
    assert c_res.outcome == py_res.outcome == "exit" and c_res.status == py_res.status == 0
    assert c_reads == 3 and py_reads == 0            # the guest's rdtsc went through the C hook
    assert c_res.console == py_res.console and c_res.console.count(b":") == 3
    assert c_trace == py_trace
