"""16-bit code end to end (tests/guests/realmode16.S): a 16-bit protected-mode code segment with a
non-zero base, real-address mode (an interrupt through the guest's IVT, port I/O, big real mode, a CR0
read), and back to 32-bit protected mode. native and hw run it as the CPU does; full runs the 16-bit
code in place (bt/direct.py) instead of translating it as 32-bit code (it triple-faulted); trap
refuses it with one line (docs/deprivileging.md). QEMU prints the same lines."""
from __future__ import annotations

import subprocess

import pytest

from cpuvirt.engine import regs as R
from tests.conftest import requires_qemu

EXPECTED = ("real\nPASS int 0x42 through the IVT\nPASS big real mode read above 1 MiB\n"
            "PASS CR0 read in real mode\nPASS APIC register read from real mode\n")


def _run(image, mode):
    from cpuvirt.runner import run_guest
    return run_guest(str(image), mode, max_insns=5_000_000)


@pytest.mark.parametrize("mode", ("native", "full", "hw"))
def test_16bit_code_and_real_mode_run_as_on_the_cpu(test_guest, mode):
    r = _run(test_guest("realmode16"), mode)
    assert (r.outcome, r.status) == ("exit", 0), r.message
    assert r.console.decode() == EXPECTED


def test_full_runs_16bit_code_in_place_and_translates_again_after(test_guest):
    """The transitions happened (PM16 -> real -> PM16 -> 32-bit), nothing 16-bit was translated
    (every translated block starts outside the copied 16-bit code at 0x7000), and the 16-bit code
    ran in protected mode only at real ring 1 (sampled at each of its instructions)."""
    from unicorn import UC_HOOK_CODE

    from cpuvirt.runner import run_guest
    seen, samples = [], []

    def start(hv):
        seen.append(hv.vcpu)
        regs = hv.vcpu.regs
        def sample(uc, address, size, _):
            samples.append((regs.read(R.CR0) & 1, regs.read(R.CS) & 3))
        hv.vcpu.uc.hook_add(UC_HOOK_CODE, sample, None, 0x7000, 0x70FF)
    r = run_guest(str(test_guest("realmode16")), "full", max_insns=5_000_000, on_start=start)
    vcpu = seen[0]
    assert {cpl for pe, cpl in samples if pe} == {1} and {pe for pe, _ in samples} == {0, 1}
    assert r.status == 0 and vcpu.direct16.state is None
    assert vcpu.direct16.transitions >= 4
    assert not [g for g in vcpu.tc.blocks if 0x7000 <= g < 0x7100]
    assert vcpu.regs.read(R.CR0) & 1                  # back in protected mode


def test_trap_refuses_16bit_code_with_one_line(test_guest):
    r = _run(test_guest("realmode16"), "trap")
    assert (r.outcome, r.status) == ("error", 123)
    assert "16-bit code segment" in r.message and "ljmp 0x18:0" in r.message
    assert r.console == b""


@requires_qemu
def test_qemu_prints_the_same(test_guest):
    image = test_guest("realmode16")
    p = subprocess.run(["qemu-system-i386", "-nodefaults", "-nographic", "-monitor", "none", "-serial", "stdio",
                        "-no-reboot", "-m", "32", "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
                        "-fw_cfg", "name=etc/sercon-port,string=0", "-kernel", str(image)],
                       stdin=subprocess.DEVNULL, capture_output=True, timeout=60, check=False)
    assert p.returncode == 1 and p.stdout.decode() == EXPECTED     # debug-exit 0 -> (0 << 1) | 1


FIDELITY = ("PASS smsw eax in real mode stores all of CR0\n"
            "PASS pushfd after an iretd that set RF stores RF clear\n"
            "PASS clts in real mode clears CR0.TS\nPASS and CR0.TS stays clear in protected mode\n"
            "PASS lidt in 16-bit protected mode reads its operand through DS's base (limit)\n"
            "PASS lidt in 16-bit protected mode reads its operand through DS's base (base)\n"
            "PASS mov dr0 in real mode sets the DR0 protected mode reads\n"
            "PASS wrmsr in real mode sets the MSR protected mode reads\n")


@pytest.mark.parametrize("mode", ("native", "full", "hw"))
def test_real_mode_smsw_rf_and_privileged_instructions(test_guest, mode):
    """tests/guests/realmode_fidelity.S. Before: `smsw eax` kept EAX's upper half and pushfd after an
    iretd restoring RF stored RF = 1 in every mode (the engine's; kvm-unit-tests realmode's `smsw` and
    `rflags.rf`); under full clts, mov to DR0 and wrmsr in real mode ran on the engine's own state
    (the virtual CPU, which protected mode reads, never saw them), and `lidt` emulated in 16-bit
    protected mode read its operand flat, ignoring DS's base."""
    r = _run(test_guest("realmode_fidelity"), mode)
    assert (r.outcome, r.status) == ("exit", 0), r.console.decode()
    assert r.console.decode() == FIDELITY


@requires_qemu
def test_qemu_prints_the_same_fidelity_lines(test_guest):
    image = test_guest("realmode_fidelity")
    p = subprocess.run(["qemu-system-i386", "-nodefaults", "-nographic", "-monitor", "none", "-serial", "stdio",
                        "-no-reboot", "-m", "32", "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
                        "-fw_cfg", "name=etc/sercon-port,string=0", "-kernel", str(image)],
                       stdin=subprocess.DEVNULL, capture_output=True, timeout=60, check=False)
    assert p.returncode == 1 and p.stdout.decode() == FIDELITY


@pytest.mark.parametrize("mode", ("native", "hw", "trap", "full"))
def test_v86_code_is_decoded_as_16_bit_code(test_guest, mode):
    """tests/guests/v86_io.S: `mov dx, 0x3F8; out dx, al` in V86 mode without I/O permission. Decoded
    as 32-bit code (as it was for block counting) the out vanished inside a `mov edx, imm32` and was
    never checked (native, hw: it reached COM1; trap, full: the #GP came at the next instruction), and
    the block that armed the lazy I/O check ran unchecked (native, hw)."""
    r = _run(test_guest("v86_io"), mode)
    assert (r.outcome, r.status) == ("exit", 0), r.console.decode()
    assert r.console.decode() == ("PASS out in V86 mode without I/O permission raised #GP\n"
                                  "PASS at the out (CS:EIP)\n")
