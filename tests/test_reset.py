"""Reset requests (machine/reset.py, i8042.py): port 0x92, 0xCF9, the 8042. QEMU with -no-reboot (the
reference) powers off there; cpuvirt ends the run with outcome `reset`, status 125, in every mode."""
from __future__ import annotations

import pytest

from cpuvirt import status
from cpuvirt.machine.i8042 import I8042
from cpuvirt.machine.machine import Machine
from cpuvirt.runner import run_guest
from tests.conftest import requires_qemu
from tests.hostile import build

HOW = {1: "port 0x92", 2: "0xCF9", 3: "0xFE", 4: "output port"}


@pytest.fixture
def machine():
    m = Machine(4)
    resets = []
    m.on_reset = resets.append
    return m, resets


def test_port_0x92_resets_on_bit_0_rising_only(machine):
    m, resets = machine
    assert m.bus.read(0x92, 1) == 0x02
    m.bus.write(0x92, 1, 0x02)
    assert resets == []
    m.bus.write(0x92, 1, 0x03)
    assert len(resets) == 1 and m.bus.read(0x92, 1) == 0x03
    m.bus.write(0x92, 1, 0x03)                     # no new 0 -> 1 transition
    assert len(resets) == 1


def test_0xcf9_is_a_byte_register_inside_the_pci_address_port(machine):
    m, resets = machine
    m.bus.write(0xCF8, 4, 0x80000000)
    assert m.bus.read(0xCF8, 4) == 0x80000000       # the PCI configuration address, as before
    m.bus.write(0xCF9, 1, 0x02)
    assert resets == [] and m.bus.read(0xCF9, 1) == 0x02
    m.bus.write(0xCF9, 1, 0x06)
    assert len(resets) == 1


def test_the_8042_reset_line():
    resets = []
    k = I8042(on_reset=resets.append)
    k.write(0x64, 1, 0xD0)
    assert k.read(0x64, 1) & 1 and k.read(0x60, 1) == 0xCF and not k.read(0x64, 1) & 1
    k.write(0x64, 1, 0xD1)
    k.write(0x60, 1, 0xCF)                          # bit 0 kept: no reset
    assert resets == []
    k.write(0x64, 1, 0xD1)
    k.write(0x60, 1, 0x4E)
    k.write(0x64, 1, 0xFE)
    assert len(resets) == 2


@pytest.mark.parametrize("mode", ("native", "hw", "trap", "full"))
@pytest.mark.parametrize("case", sorted(HOW))
def test_a_reset_request_ends_the_run_in_every_mode(tmp_path, case, mode):
    r = run_guest(str(build("reset", tmp_path, CASE=case)), mode)
    assert (r.outcome, r.status) == ("reset", status.TRIPLE_FAULT), (r.outcome, r.message)
    assert HOW[case] in r.message and b"FAIL" not in r.console and r.console.count(b"PASS") == 3


@requires_qemu
@pytest.mark.parametrize("case", sorted(HOW))
def test_qemu_no_reboot_powers_off_at_the_same_point(tmp_path, case):
    from tests.qemu import run_under_qemu
    image = build("reset", tmp_path, CASE=case)
    out, code = run_under_qemu(image)
    assert code == 0 and out == run_guest(str(image)).console
