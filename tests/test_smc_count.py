"""Virtual time follows code rewritten in place (engine/_vclock.c vclock_translated_hook, Machine._count_block).

The clock caches each block's instruction count. tests/guests/smc_count.S rewrites a function in place
with the same address and length and another number of instructions (A: 7 x inc eax; ret = 8; B: add
eax, 7; nop; nop; ret = 4) and measures rdtsc across a call of it, with the same measuring code for
copies that are never rewritten. Before the fix the rewritten function kept A's cached count: its
delta stayed A's. The engine's own count is the independent reference for whole runs: a per-instruction
hook (UC_HOOK_CODE) counts what it executes. `full` is left out of the rdtsc checks: it runs
translations, whose instruction counts (indirect call and return lookups in the translation cache)
are not the guest's.
"""
from __future__ import annotations

import struct
import subprocess

import pytest
from unicorn import UC_HOOK_CODE

from cpuvirt.runner import run_guest
from tests.conftest import requires_qemu

MAILBOX = 0x7F00
A_INSNS, B_INSNS = 8, 4                 # the two versions of smc_fn (see the guest)


@pytest.fixture(scope="module")
def smc_count(test_guest):
    return str(test_guest("smc_count"))


def _machine(hv):
    return hv.machine if hasattr(hv, "machine") else hv.vcpu.machine


@pytest.mark.parametrize("mode", ("native", "hw", "trap"))
def test_rewritten_block_is_counted_again(smc_count, mode):
    seen = {}
    r = run_guest(smc_count, mode, max_insns=5_000_000, on_start=lambda hv: seen.setdefault("hv", hv))
    console = r.console.decode()
    assert (r.outcome, r.status) == ("exit", 0) and "FAIL" not in console, console
    static_a, static_b, as_a, as_b, as_b_again, back_to_a = struct.unpack(
        "<6I", _machine(seen["hv"]).read_gpa(MAILBOX, 24))
    # The measuring code is the same for every function: deltas differ by the functions' counts.
    assert static_a - static_b == A_INSNS - B_INSNS
    assert as_a == static_a
    assert as_b == static_b, "the block rewritten from A to B kept A's instruction count"
    assert as_b_again == static_b
    assert back_to_a == static_a, "the block rewritten back to A kept B's instruction count"


def _retired_and_executed(guest, mode):
    """(instructions the clock retired, instructions the engine executed one by one)."""
    executed = [0]
    seen = {}

    def start(hv):
        seen["hv"] = hv

        def count(_uc, _address, _size, _data):
            executed[0] += 1

        _machine(hv).uc.hook_add(UC_HOOK_CODE, count)

    r = run_guest(guest, mode, max_insns=5_000_000, on_start=start)
    assert (r.outcome, r.status) == ("exit", 0), r.console.decode()
    return _machine(seen["hv"]).clock.instructions, executed[0]


@pytest.mark.parametrize("mode", ("native", "hw", "trap"))
def test_whole_run_counts_what_ran(mode):
    """The bundled smc guest (blocks rewritten in place, privileged instructions generated at run time)
    retires what the engine executed, give or take the same tail as a guest without self-modifying
    code (the last block, counted whole when it begins, is cut short by the debug-exit port)."""
    retired, executed = _retired_and_executed("smc", mode)
    hello_retired, hello_executed = _retired_and_executed("hello", mode)
    assert retired - executed == hello_retired - hello_executed


def _same_as_qemu(image):
    p = subprocess.run(["qemu-system-i386", "-nodefaults", "-nographic", "-monitor", "none", "-serial", "stdio",
                        "-no-reboot", "-m", "32", "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
                        "-fw_cfg", "name=etc/sercon-port,string=0", "-kernel", image],
                       stdin=subprocess.DEVNULL, capture_output=True, timeout=60, check=False)
    assert p.returncode == 1 and p.stdout == run_guest(image, "native", max_insns=5_000_000).console


@requires_qemu
def test_qemu_prints_the_same(smc_count):
    _same_as_qemu(smc_count)


@pytest.fixture(scope="module")
def smc_intercept(test_guest):
    return str(test_guest("smc_intercept"))


@pytest.mark.parametrize("mode", ("native", "hw", "trap", "full"))
def test_rewritten_block_gets_its_intercept(smc_intercept, mode):
    """A block rewritten in place (same address and length) with an rdmsr is seen by the intercept
    scan: before the fix native and hw let the engine run it (it read 0)."""
    r = run_guest(smc_intercept, mode, max_insns=5_000_000)
    console = r.console.decode()
    assert (r.outcome, r.status) == ("exit", 0) and "FAIL" not in console and console.count("PASS") == 2, console


@requires_qemu
def test_qemu_prints_the_same_intercept(smc_intercept):
    _same_as_qemu(smc_intercept)
