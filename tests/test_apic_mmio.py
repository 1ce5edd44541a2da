"""The local APIC's ID register read in C (machine/apicmmio.py, _apicmmio.c).

tests/guests/apic_id_timer.S reads the ID 100,000 times while a periodic APIC timer interrupts the
loop, then writes the ID and reads it back. The C read may answer only while the model's timer
catch-up would do nothing: a read that answered past a due zero crossing would move the interrupt,
and with it every count below. Each run is compared with CPUVIRT_APIC_MMIO_C=0 (every access through
the Python model), and the C path is shown to have served the reads.
"""
from __future__ import annotations

import subprocess

import pytest

from cpuvirt.runner import run_guest
from tests.conftest import requires_qemu

MODES = ("native", "trap", "full", "hw")


def _run(path: str, mode: str, c_path: bool, monkeypatch, trace=None):
    monkeypatch.setenv("CPUVIRT_APIC_MMIO_C", "1" if c_path else "0")
    seen = {}
    opts = {"vmx": ["virtualize_apic_accesses=0"]} if mode == "hw" else None  # hw's APICv has its own C reads
    r = run_guest(path, mode, trace_path=trace, mode_options=opts, on_start=lambda hv: seen.setdefault("hv", hv))
    return r, seen["hv"].machine


@pytest.fixture(scope="module")
def guest(test_guest):
    return str(test_guest("apic_id_timer"))


@pytest.mark.parametrize("mode", MODES)
def test_c_reads_give_what_the_model_gives(guest, mode, monkeypatch):
    c, mc = _run(guest, mode, True, monkeypatch)
    py, mp = _run(guest, mode, False, monkeypatch)
    assert (c.outcome, c.status) == ("exit", 0), c.console.decode()
    assert c.console == py.console and "FAIL" not in c.console.decode()
    assert (c.icount, c.vtime, c.counts, c.mmu, c.tally) == (py.icount, py.vtime, py.counts, py.mmu, py.tally)
    assert mp.apic_mmio is None
    if mode != "hw":  # under hw without APICv an ID read is an EPT violation: the model's, in Python
        assert mc.apic_mmio is not None and mc.apic_mmio.reads > 90_000


def test_a_trace_records_every_read(guest, monkeypatch, tmp_path):
    """A trace has an `mmio` event per access: the C path stays off, and the trace is the Python one's."""
    c, mc = _run(guest, "native", True, monkeypatch, trace=str(tmp_path / "c.jsonl"))
    py, _ = _run(guest, "native", False, monkeypatch, trace=str(tmp_path / "py.jsonl"))
    assert mc.apic_mmio.reads == 0
    assert (tmp_path / "c.jsonl").read_bytes() == (tmp_path / "py.jsonl").read_bytes()
    assert c.counts["mmio"] == py.counts["mmio"] > 100_000


@requires_qemu
def test_qemu_prints_the_same(guest, monkeypatch):
    p = subprocess.run(["qemu-system-i386", "-nodefaults", "-nographic", "-monitor", "none", "-serial", "stdio",
                        "-no-reboot", "-m", "32", "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
                        "-fw_cfg", "name=etc/sercon-port,string=0", "-kernel", guest],
                       stdin=subprocess.DEVNULL, capture_output=True, timeout=120, check=False)
    assert p.returncode == 1 and p.stdout == _run(guest, "native", True, monkeypatch)[0].console
