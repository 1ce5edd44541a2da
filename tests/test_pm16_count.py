"""16-bit protected-mode code is counted as the CPU decodes it (Machine._count_block, Vcpu.running_code32).

tests/guests/pm16_count.S runs a loop in a code segment with D = 0 between two rdtscs. Virtual time
counts each translated block's instructions when the block begins, so the delta is the loop block
(mov ax, mov ax, mov ax, dec cx, jnz: 5 instructions) run 99 more times after the block that holds the
first rdtsc, plus the last block's 7 instructions (mov bx, rdtsc ... ljmp), counted before its rdtsc:
99 * 5 + 7 = 502. Before the fix the blocks were decoded as 32-bit code (only real-address and V86
mode were decoded as 16-bit): `mov cx, 100` swallowed two bytes of the next instruction, and the
delta was 206. trap refuses 16-bit code (docs/deprivileging.md).
"""
from __future__ import annotations

import subprocess

import pytest

from cpuvirt.runner import run_guest
from tests.conftest import requires_qemu


@pytest.fixture(scope="module")
def pm16(test_guest):
    return str(test_guest("pm16_count"))


@pytest.mark.parametrize("mode", ("native", "hw", "full"))
def test_16bit_code_segment_counts_its_own_instructions(pm16, mode):
    seen = {}
    r = run_guest(pm16, mode, max_insns=5_000_000, on_start=lambda hv: seen.setdefault("hv", hv))
    assert "PASS" in r.console.decode() and (r.outcome, r.status) == ("exit", 0), r.console.decode()
    delta = int.from_bytes(seen["hv"].machine.read_gpa(0x7F04, 4), "little")
    assert delta == 99 * 5 + 7


def test_block_addresses_are_the_16bit_instructions(pm16):
    """The per-block instruction lists (left_block_at, intercepts) hold the loop's 16-bit boundaries."""
    seen = {}
    run_guest(pm16, "native", max_insns=5_000_000, on_start=lambda hv: seen.setdefault("hv", hv))
    loop = 0x7000 + 8                                   # pm16_loop: after rdtsc, mov esi, mov cx
    addrs, end = seen["hv"].machine.block_insns[loop]
    assert addrs == (loop, loop + 3, loop + 6, loop + 9, loop + 10) and end == loop + 12


@requires_qemu
def test_qemu_prints_the_same(pm16):
    p = subprocess.run(["qemu-system-i386", "-nodefaults", "-nographic", "-monitor", "none", "-serial", "stdio",
                        "-no-reboot", "-m", "32", "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
                        "-fw_cfg", "name=etc/sercon-port,string=0", "-kernel", pm16],
                       stdin=subprocess.DEVNULL, capture_output=True, timeout=60, check=False)
    assert p.returncode == 1 and p.stdout == run_guest(pm16, "native", max_insns=5_000_000).console
