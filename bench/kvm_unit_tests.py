"""Run kvm-unit-tests (i386) under every cpuvirt mode and under QEMU; print a PASS/FAIL/SKIP table.

kvm-unit-tests is built outside this repository (its code and binaries are never committed):

    git clone https://gitlab.com/kvm-unit-tests/kvm-unit-tests.git /work/kut/src
    cd /work/kut/src && ./configure --arch=i386 && make
    python bench/kvm_unit_tests.py /work/kut/src [--tests taskswitch,eventinj] [--modes native,hw]

Each x86/NAME.flat is a Multiboot ELF kernel: cpuvirt loads it as any guest (`cpuvirt run FILE`),
QEMU with -kernel. Options come from x86/unittests.cfg (`extra_params`/`test_args` -append and -m;
`smp` is ignored: cpuvirt has one CPU). A kvm-unit-tests kernel ends through isa-debug-exit with
(failures ? 1 : 0), or 77 when everything was skipped; QEMU turns a write of v into (v << 1) | 1.
The verdict also reads the console: any "FAIL:" line is a failure, except that a run whose only
FAIL lines are checks QEMU itself fails (REFERENCE_FAILS) is "PASS*". Both get pc-testdev, as
kvm-unit-tests' own x86/run script gives it to QEMU. Wall times are measured in this
one run (QEMU's include its start-up).
"""
from __future__ import annotations

import argparse
import configparser
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

TARGETS = ("taskswitch", "eventinj", "umip", "cmpxchg8b", "setjmp", "smptest", "dummy", "emulator", "realmode", "init",
           "la57", "hpet_read_test")
# QEMU's CPU model where its default (qemu32) will not do: QEMU 7.2 hangs in la57 after the test sets
# CR4.LA57 on qemu32; unittests.cfg asks for `-cpu max,host-phys-bits` (host-phys-bits is KVM's).
QEMU_CPU = {"la57": "max"}
# Checks the reference itself fails (QEMU 7.2 TCG): a run whose only FAIL lines are these is "PASS*".
REFERENCE_FAILS = {
    "emulator": frozenset(("FAIL: no fep: #DB suppressed after MOV SS",      # TCG raises the single-step
                           "FAIL: no fep: #DB suppressed after POP SS")),    # #DB in the MOV SS shadow
}
MODES = ("native", "hw", "trap", "full")
MEM_MIB = 128                    # QEMU 7.2's default, used for both
BUDGET = 2_000_000_000           # cpuvirt --max-insns (cycles of virtual time)
QEMU_TIMEOUT = 120


def test_options(build: Path, name: str) -> tuple[str, int]:
    """(kernel command line, memory MiB) for test `name` from x86/unittests.cfg."""
    cfg = configparser.ConfigParser(interpolation=None, strict=False)
    cfg.read(build / "x86" / "unittests.cfg")
    append, mem = "", MEM_MIB
    if cfg.has_section(name):
        sec = cfg[name]
        args = shlex.split(sec.get("extra_params", "") + " " + sec.get("qemu_params", ""))
        for i, a in enumerate(args):
            if a == "-append" and i + 1 < len(args):
                append = args[i + 1]
            if a == "-m" and i + 1 < len(args):
                mem = int(re.sub(r"[^0-9]", "", args[i + 1]))
        if sec.get("test_args"):
            append = shlex.split(sec["test_args"])[0] if sec["test_args"].startswith(("'", '"')) else sec["test_args"]
    return append, mem


def verdict(status: int | None, console: str, outcome: str = "exit", name: str = "") -> str:
    fails = {ln.strip() for ln in console.splitlines() if ln.startswith("FAIL:")}
    if outcome == "reset":
        return "RESET"              # the guest reset the machine: where QEMU -no-reboot powers off
    if fails:
        return "PASS*" if outcome == "exit" and fails <= REFERENCE_FAILS.get(name, frozenset()) else "FAIL"
    if outcome != "exit":
        return "FAIL"
    if status == 0:
        return "PASS"
    if status == 77:
        return "SKIP"
    return "FAIL"


def run_cpuvirt(flat: Path, mode: str, append: str, mem: int) -> tuple[str, float, str]:
    """(verdict, wall seconds, why) of one test under one mode, in this process."""
    from cpuvirt.machine.testdev import TestdevSpec
    from cpuvirt.runner import run_guest
    t0 = time.perf_counter()
    try:
        # kvm-unit-tests' own x86/run gives QEMU `-device pc-testdev`: so do both here.
        r = run_guest(str(flat), mode, mem_mib=mem, max_insns=BUDGET, cmdline=append, devices=[TestdevSpec()])
    except Exception as e:    # noqa: BLE001 - a table cell, not a crash of the whole table
        return "ERROR", time.perf_counter() - t0, f"{type(e).__name__}: {e}"
    wall = time.perf_counter() - t0
    console = r.console.decode(errors="replace")
    v = verdict(r.status, console, r.outcome, flat.stem)
    why = ""
    if v != "PASS":
        fails = [ln for ln in console.splitlines() if ln.startswith("FAIL")]
        why = "; ".join(fails[:3]) or f"{r.outcome} {r.status}: {r.message}"
    return v, wall, why


def run_qemu(flat: Path, append: str, mem: int) -> tuple[str, float, str]:
    cmd = ["qemu-system-i386", "-nodefaults", "-display", "none", "-serial", "stdio", "-no-reboot",
           "-m", str(mem), "-device", "isa-debug-exit,iobase=0xf4,iosize=0x4", "-device", "pc-testdev",
           "-kernel", str(flat)]
    if append:
        cmd += ["-append", append]
    if flat.stem in QEMU_CPU:
        cmd += ["-cpu", QEMU_CPU[flat.stem]]
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=QEMU_TIMEOUT, check=False)
    except FileNotFoundError:
        return "SKIP", 0.0, "qemu-system-i386 not installed"
    except subprocess.TimeoutExpired:
        return "FAIL", time.perf_counter() - t0, f"timeout after {QEMU_TIMEOUT} s"
    wall = time.perf_counter() - t0
    status = p.returncode >> 1 if p.returncode & 1 else None
    # 0 without a debug-exit write: -no-reboot turned the guest's reset request into a power-off
    v = verdict(status, p.stdout.decode(errors="replace"), "reset" if p.returncode == 0 else "exit", flat.stem)
    return v, wall, "" if v == "PASS" else f"status {p.returncode}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("build", type=Path, help="a kvm-unit-tests tree built with ./configure --arch=i386")
    ap.add_argument("--tests", default=",".join(TARGETS))
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--no-qemu", action="store_true")
    a = ap.parse_args(argv)
    if not (a.build / "x86").is_dir():
        print(f"kvm_unit_tests: {a.build} has no x86/ directory (not a kvm-unit-tests build)", file=sys.stderr)
        return 2
    modes = [m for m in a.modes.split(",") if m]
    cols = modes + ([] if a.no_qemu else ["qemu"])
    print("| test | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    notes = []
    for name in [t for t in a.tests.split(",") if t]:
        flat = a.build / "x86" / f"{name}.flat"
        if not flat.exists():
            print(f"| {name} | " + " | ".join("SKIP (not built)" for _ in cols) + " |")
            continue
        append, mem = test_options(a.build, name)
        cells = []
        for m in modes:
            v, wall, why = run_cpuvirt(flat, m, append, mem)
            cells.append(f"{v} {wall:.2f} s")
            if why:
                notes.append(f"- {name} under {m}: {why}")
        if not a.no_qemu:
            v, wall, why = run_qemu(flat, append, mem)
            cells.append(f"{v} {wall:.2f} s")
            if why:
                notes.append(f"- {name} under QEMU: {why}")
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
    if notes:
        print()
        print("\n".join(notes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
