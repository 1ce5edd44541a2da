"""kvm-unit-tests (i386) under cpuvirt, through bench/kvm_unit_tests.py (docs/kvm-unit-tests.md).

Runs only when KUT_DIR points at a kvm-unit-tests tree built with `./configure --arch=i386 && make`
(never part of this repository). Each target must PASS as it does under QEMU, except where another
piece of work or a documented hole predicts the failure (marked xfail with the reason).
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

KUT = os.environ.get("KUT_DIR")
pytestmark = pytest.mark.skipif(not KUT or not (Path(KUT) / "x86").is_dir(),
                                reason="KUT_DIR does not point at a kvm-unit-tests i386 build")
TARGETS = ("taskswitch", "eventinj", "umip", "cmpxchg8b", "setjmp", "smptest", "dummy", "hpet_read_test")
PREDICTED = {
    ("umip", "trap"): "the `mov r, cs` hole: the kernel sees RPL 1 and expects #GP from mov cr0 "
                      "(docs/deprivileging.md)",
}


def _runner():
    path = Path(__file__).resolve().parent.parent / "bench" / "kvm_unit_tests.py"
    spec = importlib.util.spec_from_file_location("kvm_unit_tests", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("mode", ("native", "hw", "full", "trap"))
@pytest.mark.parametrize("name", TARGETS)
def test_kvm_unit_test_passes(name, mode, request):
    if (name, mode) in PREDICTED:
        request.node.add_marker(pytest.mark.xfail(reason=PREDICTED[(name, mode)], strict=False))
    k = _runner()
    build = Path(KUT)
    flat = build / "x86" / f"{name}.flat"
    if not flat.exists():
        pytest.skip(f"{flat} is not built")
    append, mem = k.test_options(build, name)
    verdict, _, why = k.run_cpuvirt(flat, mode, append, mem)
    assert verdict == "PASS", why


# `emulator` (with pc-testdev): the FAIL lines each mode must print, no more and no fewer. QEMU 7.2
# TCG itself fails the two MOV SS / POP SS checks (bench/kvm_unit_tests.py REFERENCE_FAILS). The
# unaligned movaps raises #GP in every mode (cpu/ssealign.py).
_MOV_SS = {"FAIL: no fep: #DB suppressed after MOV SS", "FAIL: no fep: #DB suppressed after POP SS"}
EMULATOR_FAILS = {
    "native": _MOV_SS,
    "hw": _MOV_SS,
    "full": set(),         # no #DB after MOV SS / POP SS here, as the SDM says for Intel (why: not investigated)
    # the smsw hole (CR0 read without trapping), then the str hole: `str` reads the real TR (0),
    # so `ltr` of it raises #GP and the test stops there (docs/deprivileging.md)
    "trap": {"FAIL: smsw (1)"},
}


@pytest.mark.parametrize("mode", ("native", "hw", "full", "trap"))
def test_emulator_fails_only_where_predicted(mode):
    from cpuvirt.machine.testdev import TestdevSpec
    from cpuvirt.runner import run_guest
    flat = Path(KUT) / "x86" / "emulator.flat"
    if not flat.exists():
        pytest.skip(f"{flat} is not built")
    r = run_guest(str(flat), mode, mem_mib=128, max_insns=_runner().BUDGET, devices=[TestdevSpec()])
    console = r.console.decode(errors="replace")
    fails = {ln.strip() for ln in console.splitlines() if ln.startswith("FAIL:")}
    assert fails == EMULATOR_FAILS[mode], console[-2000:]
    if mode == "trap":
        assert "Unhandled exception 13 #GP(0)" in console
    else:
        assert "SUMMARY: 86 tests" in console and console.count("PASS:") >= 81


@pytest.mark.parametrize("mode", ("native", "hw", "full"))
def test_realmode_passes(mode):
    """realmode (loaded at 0x8000, over the boot-information area, as QEMU loads it; interrupts through
    the IVT): all 127 checks pass as under QEMU 7.2, in native, in hw (16-bit code through the
    instruction emulator, the firmware's IVT for the timer tick that ends its `sti; hlt`) and in full
    (16-bit code run in place, bt/direct.py). `rflags.rf` and `smsw` used to fail in all three: the
    engine's pushfl stored RF = 1 after an iretl that restored it, and `smswl %eax` kept EAX's upper
    half (Vcpu.iret_image_rf, Vcpu.smsw_site)."""
    from cpuvirt.machine.testdev import TestdevSpec
    from cpuvirt.runner import run_guest
    flat = Path(KUT) / "x86" / "realmode.flat"
    if not flat.exists():
        pytest.skip(f"{flat} is not built")
    r = run_guest(str(flat), mode, mem_mib=128, max_insns=_runner().BUDGET, devices=[TestdevSpec()])
    console = r.console.decode(errors="replace")
    fails = {ln.strip() for ln in console.splitlines() if ln.startswith("FAIL:")}
    assert not fails, console[-2000:]
    assert console.count("PASS:") == 127 and (r.outcome, r.status) == ("exit", 0)


def test_realmode_under_trap_stops_at_its_16bit_code_segment():
    """trap does not run 16-bit code (docs/deprivileging.md): one line, status 123, before any output."""
    from cpuvirt.runner import run_guest
    flat = Path(KUT) / "x86" / "realmode.flat"
    if not flat.exists():
        pytest.skip(f"{flat} is not built")
    r = run_guest(str(flat), "trap", mem_mib=128, max_insns=_runner().BUDGET)
    assert (r.outcome, r.status) == ("error", 123) and "16-bit code segment" in r.message


@pytest.mark.parametrize("mode", ("native", "hw", "full", "trap"))
def test_init_resets_through_port_0x92_where_qemu_no_reboot_powers_off(mode):
    from cpuvirt.runner import run_guest
    flat = Path(KUT) / "x86" / "init.flat"
    if not flat.exists():
        pytest.skip(f"{flat} is not built")
    r = run_guest(str(flat), mode, mem_mib=128, max_insns=_runner().BUDGET)
    assert (r.outcome, r.status) == ("reset", 125) and "port 0x92" in r.message
    assert r.console.endswith(b"testing port 92 init... ")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ("native", "trap", "full", "hw", "hw-noept"))
def test_sieve_completes(mode):
    """`sieve` (7.8 G instructions, 128 MiB, ~170 M TLB fills): the TLB-miss path of every mode, in C where
    the fill changes nothing (bench/sieve.py times it beside QEMU; about a minute a mode here)."""
    from cpuvirt.machine.testdev import TestdevSpec
    from cpuvirt.runner import run_guest

    flat = Path(KUT) / "x86" / "sieve.flat"
    if not flat.exists():
        pytest.skip(f"{flat} is not built")
    options = {"ept": False} if mode == "hw-noept" else None
    r = run_guest(str(flat), mode.split("-")[0], mem_mib=128, max_insns=12_000_000_000, devices=[TestdevSpec()],
                  mode_options=options)
    console = r.console.decode(errors="replace")
    assert (r.outcome, r.status) == ("exit", 0), (r.message, console[-300:])
    assert "FAIL" not in console and console.count("virtual:") == 3
