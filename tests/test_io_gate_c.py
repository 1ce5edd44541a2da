"""The I/O gate's common case in C (cpu/iosites.py, cpu/_iogate.c; full: the kernel's in/out callouts in
bt/_callout.c) changes nothing the guest or a reader of the trace can see: trap, para and full run guests
that do port I/O at their kernel's ring, at ring 3 with and without permission (#GP), through a site
rewritten in place, and before and after para's physdev_op(set_iopl), with the C paths and with
CPUVIRT_IO_GATE_C=0 (every site on its Python hook, every callout Python's):
the same console, outcome, virtual time, event counts and MMU counters, and with a trace the same trace
byte for byte. The C path must also have answered the kernel's I/O, sites and accesses (else the
comparison proves nothing); with a trace only the sites are C's (a trace row is Python's).
"""
from __future__ import annotations

import pytest

from cpuvirt.runner import run_guest

FIELDS = ("outcome", "status", "console", "icount", "vtime", "counts", "mmu", "tally")


def _both(path: str, mode: str, tmp_path, monkeypatch, probe=lambda hv: hv.vcpu.io_sites,
          max_insns: int = 20_000_000):
    """Runs with and without the C gate (and each with a trace); returns the untraced C run and what
    `probe(mode object)` gave for it, having checked that the off switch left nothing of C."""
    runs, seen = {}, {}
    for switch in ("1", "0"):
        monkeypatch.setenv("CPUVIRT_IO_GATE_C", switch)
        for traced in (False, True):
            trace = tmp_path / f"{mode}-{switch}-{traced}.jsonl" if traced else None
            runs[switch, traced] = run_guest(
                path, mode, max_insns=max_insns, trace_path=trace and str(trace),
                on_start=lambda hv, k=(switch, traced): seen.__setitem__(k, hv))
    for traced in (False, True):
        for f in FIELDS:
            assert getattr(runs["1", traced], f) == getattr(runs["0", traced], f), (f, traced)
    assert (tmp_path / f"{mode}-1-True.jsonl").read_bytes() == (tmp_path / f"{mode}-0-True.jsonl").read_bytes()
    return runs["1", False], probe(seen["1", False]), probe(seen["0", False])


def _full_ports(hv) -> int:
    """full: the guest kernel's in/out the C callout hook served (bt/_callout.c, PORT_IN/PORT_OUT)."""
    return hv.vcpu.rt.fast.ports_served


@pytest.mark.parametrize("guest", ["io_gate_smc", "ioperm"])
def test_trap_io_sites_in_c_change_nothing(guest, test_guest, tmp_path, monkeypatch):
    r, sites, off = _both(str(test_guest(guest)), "trap", tmp_path, monkeypatch)
    assert off is None and "PASS" in r.console.decode()
    # the kernel's console output (COM1 polling and writes): its sites and accesses
    assert sites.passed > 10 and sites.fast_accesses > 10, (sites.passed, sites.fast_accesses)


def test_para_io_sites_follow_set_iopl(test_guest, tmp_path, monkeypatch):
    """pv_traps.S: port I/O at ring 1 raises #GP until physdev_op(set_iopl, 1), then works."""
    r, sites, off = _both(str(test_guest("pv_traps")), "para", tmp_path, monkeypatch)
    console = r.console.decode()
    assert off is None
    assert "FAIL" not in console and "set_iopl" in console, console
    assert sites.cpls == (0b11, 0b11), sites.cpls        # rings 0-1 after set_iopl(1)
    assert sites.passed > 0 and sites.fast_accesses > 0


def test_nanobench_io_loops_in_c(tmp_path, monkeypatch):
    """nanobench's in/out loops (the kernel's, under trap, para and full) are answered in C."""
    from cpuvirt.nanobench import build
    for mode, pv in (("trap", False), ("para", True)):
        path = tmp_path / f"nb-{mode}.bin"
        path.write_bytes(build(200, pv))
        r, sites, off = _both(str(path), mode, tmp_path, monkeypatch)
        assert r.status == 0 and off is None, mode
        assert sites.passed >= 400 and sites.fast_accesses >= 400, (mode, sites.passed, sites.fast_accesses)
    path = tmp_path / "nb-full.bin"
    path.write_bytes(build(200, False))
    r, served, off = _both(str(path), "full", tmp_path, monkeypatch, probe=_full_ports)
    assert r.status == 0 and served >= 390 and off == 0, (served, off)


@pytest.mark.parametrize("guest", ["io_gate_smc", "ioperm", "bundled:exceptions"])
def test_full_kernel_port_io_in_c_changes_nothing(guest, test_guest, tmp_path, monkeypatch):
    """full: the kernel's in/out callouts served by the C callout hook once linked (its console
    output's COM1 polling and writes), ring-3 I/O still through the gate."""
    path = guest.partition(":")[2] if guest.startswith("bundled:") else str(test_guest(guest))
    r, served, off = _both(path, "full", tmp_path, monkeypatch, probe=_full_ports)
    assert "PASS" in r.console.decode() and served > 10 and off == 0, (served, off)


def test_a_page_remapped_to_other_code_sends_its_io_sites_to_python(test_guest, tmp_path, monkeypatch):
    """Hostile: tests/guests/io_remap.S maps one linear page in turn to a frame with `in ax, 0x80` and
    one with a misaligned `movaps` of the same length at the same address, whose one intercept hook is
    the I/O site's C hook. Comparing the site's bytes only in the first frame would let the movaps run
    at the kernel's ring without its #GP (the page is sent to Python once it held two frames' code)."""
    r, sites, off = _both(str(test_guest("io_remap")), "trap", tmp_path, monkeypatch)
    console = r.console.decode()
    assert console.count("PASS") == 4 and "FAIL" not in console, console
    assert off is None and sites.passed >= 3        # the warm-up calls, before the remap


@pytest.mark.parametrize("mode", ("native", "full"))
def test_io_remap_runs_as_on_hardware(test_guest, mode):
    r = run_guest(str(test_guest("io_remap")), mode, max_insns=5_000_000)
    console = r.console.decode()
    assert console.count("PASS") == 4 and "FAIL" not in console, console
