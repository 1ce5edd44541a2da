"""Isolation under deprivileging (DESIGN.md 3): the `hostile` guest sweeps its whole address space.

It reads and writes one dword per page over all 4 GiB with paging off, identity-mapped, and with every
linear page above 4 MiB aliased onto its own RAM (then runs code written through those aliases), and
checks that it sees only its own RAM or unbacked (all-ones, with `strict`) memory. Here it runs in every mode, visiting every page of the linear windows
the hypervisor's own structures occupy (asked of the object model) and one page per MiB elsewhere; the
run must end normally with every check PASS. For `full`, the translation cache must come out intact.
"""
from __future__ import annotations

import subprocess
import sys

import pytest

from cpuvirt import runner
from cpuvirt.machine import machine as machine_mod
from cpuvirt.machine.machine import Machine
from cpuvirt.memory.mmu import Mmu
from cpuvirt.memory.p2m import P2m
from cpuvirt.modes import MODES, get_mode
from cpuvirt.runner import run_guest
from cpuvirt.toolchain.build import list_guests

GUEST = "hostile"
ALL_MODES = ("native", "hw", "trap", "full", "para")
STRIDE = 0x100000          # outside the hypervisor's windows: one page per MiB
# hw: every access to unassigned guest-physical memory is an EPT-violation exit (~0.2 ms each here),
# and VMX root mode has no linear window in the guest's space: the guest's default stride (4 MiB).
MODE_ARGS = {"hw": "strict"}


def _has_pv(name: str) -> bool:
    return any(g.name == name and g.has_pv for g in list_guests())


def mode_params() -> list:
    out = []
    for m in ALL_MODES:
        marks = []
        if m not in MODES:
            marks.append(pytest.mark.skip(reason=f"mode '{m}' is not registered in cpuvirt.modes.MODES yet"))
        elif m == "para" and not _has_pv(GUEST):
            marks.append(pytest.mark.skip(reason="hostile has no paravirtualized build (a PV kernel cannot turn "
                                                 "paging off or map frames it does not own); para's isolation is "
                                                 "tests/guests/pv_hostile.S, run by tests/test_pv_security.py"))
        out.append(pytest.param(m, marks=marks, id=m))
    return out


def hypervisor_windows(hv) -> list[tuple[int, int]]:
    """Linear windows the mode's own code and data occupy, as its object model tells them."""
    from cpuvirt.cpu.deprivilege import (
        SHADOW_GDT_BYTES,
        SHADOW_GDT_WINDOW,
        DeprivilegedVcpu,
    )
    v = hv.vcpu
    wins = []
    if isinstance(v, DeprivilegedVcpu):
        wins.append((SHADOW_GDT_WINDOW, SHADOW_GDT_WINDOW + SHADOW_GDT_BYTES))
    tc = getattr(v, "tc", None)
    if tc is not None:
        wins.append((tc.base, tc.end))
    return wins


def sweep_args(mode: str) -> tuple[str, list[tuple[int, int]]]:
    """The guest's command line for `mode`, and the windows it sweeps densely."""
    if mode in MODE_ARGS:
        return MODE_ARGS[mode], []
    wins = hypervisor_windows(get_mode(mode)(Machine(32)))
    dense = " ".join(f"dense={lo:#x}-{hi & 0xFFFFFFFF:#x}" for lo, hi in wins)
    if not wins:         # still exercise the dense path: the top 2 MiB
        dense = "dense=0xffe00000-0x0"
    return f"stride={STRIDE:#x} {dense} strict", wins


class Spy:
    """Keeps the mode instance of a run (runner.run_guest builds and drops it)."""

    def __init__(self, monkeypatch):
        self.instances = []
        real = runner.get_mode

        def get_mode_spy(name):
            cls = real(name)
            spy = self

            class Spied(cls):
                def __init__(self, *a, **k):
                    super().__init__(*a, **k)
                    spy.instances.append(self)
            return Spied
        monkeypatch.setattr(runner, "get_mode", get_mode_spy)


class TcWatch:
    """full mode: the translation cache as it was when the sweep began (the guest's first access to
    unbacked memory), and every patch the translator itself made to it afterwards."""

    def __init__(self, monkeypatch, spy: Spy):
        self.spy = spy
        self.snapshot = None
        self.patched: set[int] = set()
        real_note = Mmu._note_unbacked
        watch = self

        def note(mmu, gpa):
            if watch.snapshot is None and spy.instances and getattr(spy.instances[0].vcpu, "tc", None):
                watch.take()
            return real_note(mmu, gpa)
        monkeypatch.setattr(Mmu, "_note_unbacked", note)

    def read(self, addr: int, size: int) -> bytes:
        v = self.spy.instances[0].vcpu
        return bytes(v.hv_mem.read(v.tc_hpa + (addr - v.tc.base), size))

    def take(self) -> None:
        tc = self.spy.instances[0].vcpu.tc
        real_patch = tc.patch

        def patch(addr, data):
            self.patched.update(range(addr, addr + len(data)))
            return real_patch(addr, data)
        tc.patch = patch
        self.snapshot = [(b, self.read(b.tc, b.tc_end - b.tc)) for b in tc.order if b.alive]

    def check(self) -> int:
        """Compare what is still alive with the snapshot, translator patches excepted; return how many
        blocks were compared."""
        from cpuvirt.bt.tcache import CALLOUT_SLOTS, INT3
        tc = self.spy.instances[0].vcpu.tc
        assert self.read(tc.base, CALLOUT_SLOTS) == bytes([INT3]) * CALLOUT_SLOTS, "callout area changed"
        compared = 0
        for b, before in self.snapshot:
            if not b.alive:
                continue
            now = self.read(b.tc, b.tc_end - b.tc)
            changed = [b.tc + i for i in range(len(now)) if now[i] != before[i] and b.tc + i not in self.patched]
            assert not changed, f"TC bytes of the block for guest {b.geip:#x} changed at {changed[:4]}"
            compared += 1
        return compared


@pytest.mark.parametrize("mode", mode_params())
def test_hostile_sweep_ends_normally_with_every_check_passing(mode, monkeypatch):
    spy = Spy(monkeypatch)
    watch = TcWatch(monkeypatch, spy) if mode == "full" else None
    cmdline, dense = sweep_args(mode)
    res = run_guest(GUEST, mode, cmdline=cmdline)
    text = res.console.decode()
    lines = text.splitlines()
    assert res.outcome == "exit" and res.status == 0, (res.outcome, res.message, text[-600:])
    assert "FAIL" not in text, text
    assert sum(line.startswith("PASS ") for line in lines) >= 14, text
    assert "PASS paging off: writes outside RAM never read back" in lines
    assert "PASS strict: every read outside RAM, ROM range included, gave all-ones" in lines
    # the windows did not move during the run: the dense ranges covered them
    assert hypervisor_windows(spy.instances[0]) == dense
    if mode != "native":
        assert res.console == run_guest(GUEST, "native", cmdline=cmdline).console
    if watch is not None:
        assert watch.snapshot, "no translations made before the sweep began"
        assert watch.check() > 0, "every translation made before the sweep was dropped: nothing to compare"


LEAK_GPA = 0xF0000000
LEAK_HPA = 0x3000_0000      # a host page no guest mapping should ever reach
SECRET = bytes(range(256)) * 16


def test_a_hypervisor_that_leaks_a_page_into_the_guest_is_caught(monkeypatch):
    """The sweep can fail: serve guest-physical LEAK_GPA from a host page holding hypervisor data."""
    real_init, real_g2h = Machine.__init__, P2m.gpa_to_hpa
    machines = []

    def init(self, *a, **k):
        real_init(self, *a, **k)
        self.uc.mem_map(LEAK_HPA, 0x1000)
        self.uc.mem_write(LEAK_HPA, SECRET)
        machines.append(self)

    def gpa_to_hpa(self, gpa):
        if LEAK_GPA <= gpa < LEAK_GPA + 0x1000:
            return LEAK_HPA + (gpa - LEAK_GPA)
        return real_g2h(self, gpa)

    monkeypatch.setattr(machine_mod.Machine, "__init__", init)
    monkeypatch.setattr(P2m, "gpa_to_hpa", gpa_to_hpa)
    res = run_guest(GUEST, "native", cmdline="strict")
    fails = [line for line in res.console.decode().splitlines() if line.startswith("FAIL")]
    assert res.status == 1
    assert any(line.startswith("FAIL paging off: writes outside RAM never read back") for line in fails), fails
    assert any(line.startswith("FAIL identity-mapped: writes outside RAM never read back") for line in fails), fails
    assert any(line.startswith("FAIL strict:") for line in fails), fails
    assert bytes(machines[0].uc.mem_read(LEAK_HPA, 0x1000)) != SECRET      # the guest did reach it


def test_bad_command_line_is_one_fail_line():
    res = run_guest(GUEST, "native", cmdline="stride=0x1001")
    assert res.status == 1
    assert res.console.decode().splitlines() == [
        "FAIL kernel command line: expected stride=0xN, dense=0xLO-0xHI or strict"]


def test_listed_with_its_description():
    out = subprocess.run([sys.executable, "-m", "cpuvirt", "guests"], capture_output=True, text=True, check=True).stdout
    line = next((l for l in out.splitlines() if l.split()[:1] == [GUEST]), None)
    assert line is not None, out
    assert "isolation sweep" in line
