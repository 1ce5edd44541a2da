"""MIT's xv6 (x86, github mit-pdos/xv6-public) runs unchanged: boot to its shell, a scripted session,
usertests. xv6 is not part of this repository: these tests run only when XV6_DIR names a checkout
where `make kernelmemfs` has been run (docs/xv6.md says how); otherwise they are skipped.

Every mode runs the quick session (boot, `echo`, `ls`: fork, exec, system calls, page tables,
context switches, the timer and COM1 interrupts), with its console byte for byte native's (itself
QEMU's), and shows the events its technique is made of; `usertests` (minutes to an hour per mode) is
marked `slow`: deselect it with -m "not slow"; bench/xv6.py runs it in every mode.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from cpuvirt.runner import run_guest
from tests.qemu import qemu_available, qemu_xv6_session

XV6_DIR = os.environ.get("XV6_DIR")
KERNEL = Path(XV6_DIR, "kernelmemfs") if XV6_DIR else None
MEM_MIB = 256            # xv6's PHYSTOP is 224 MiB: it frees pages up to there without asking
PROMPT = b"$ "

pytestmark = pytest.mark.skipif(KERNEL is None or not KERNEL.is_file(),
                                reason="set XV6_DIR to an xv6-public checkout built with `make kernelmemfs`")
MODES = [("native", None), ("trap", None), ("full", None), ("hw", {"vmx": [], "ept": True}),
         ("hw", {"vmx": [], "ept": False})]


def session(mode: str, lines: list[str], opts=None, max_insns: int = 0, trace=None):
    return run_guest(str(KERNEL), mode, MEM_MIB, max_insns, trace_path=str(trace) if trace else None,
                     input_data="".join(f"{x}\n" for x in lines).encode(), input_prompt=PROMPT, mode_options=opts)


QUICK = ["echo hello xv6", "ls"]


def check_quick(res):
    assert (res.outcome, res.status) == ("input_end", 0), (res.message, res.console[-500:])
    text = res.console.decode()
    assert text.startswith("xv6...\ncpu0: starting 0\nsb: size 1000 nblocks 941")
    assert "init: starting sh\n$ echo hello xv6\nhello xv6\n$ ls\n" in text
    assert "usertests      2 15 " in text and text.endswith("console        3 18 0\n$ ")


@pytest.fixture(scope="module")
def native_quick(tmp_path_factory):
    """The quick session in native, with its trace: the reference of every other mode."""
    trace = tmp_path_factory.mktemp("xv6") / "native.jsonl"
    return session("native", QUICK, trace=trace), trace


def test_xv6_boots_to_its_shell_and_runs_commands_in_native(native_quick):
    res, _ = native_quick
    check_quick(res)
    assert res.counts["interrupt"] > 0 and res.counts["mmio"] > 0
    again = session("native", QUICK)
    assert again.console == res.console and again.icount == res.icount, "scripted runs are reproducible"


def test_xv6_trace_names_its_system_calls_interrupts_and_functions(native_quick):
    """`trace show` on xv6: the int 0x40 rows name the call (from the kernel's syscalls[] table),
    IRQ rows name the device, kernel rows the function and line, user rows nothing."""
    import subprocess
    import sys
    _, trace = native_quick
    p = subprocess.run([sys.executable, "-m", "cpuvirt", "trace", "show", str(trace), "--image", str(KERNEL),
                        "--kind", "interrupt"], capture_output=True, timeout=600)
    assert p.returncode == 0, p.stderr[-500:]
    rows = [x for x in p.stdout.decode().splitlines() if " interrupt " in x]
    calls = [x for x in rows if "int 0x40" in x]
    # echo's `write`s, sh's fork/exec/wait, ls's open/fstat/read/close: every one named, by its number
    assert calls and all(" xv6: system call " in x for x in calls)
    for name, nr in (("write", 16), ("exec", 7), ("fork", 1), ("open", 15), ("fstat", 8), ("close", 21)):
        assert any(f"eax={nr:#x} " in x and f"xv6: system call {name} ({nr})" in x for x in calls), name
    assert not any(" @ " in x for x in calls), "user code is not the kernel's: no kernel symbol"
    timer = [x for x in rows if "IRQ vector 0x20" in x]
    assert timer and all("xv6: timer interrupt (IRQ 0, vector 32)  @ " in x for x in timer)
    assert any("xv6: COM1 interrupt (IRQ 4, vector 36)" in x for x in rows)
    mmio = subprocess.run([sys.executable, "-m", "cpuvirt", "trace", "show", str(trace), "--image", str(KERNEL),
                           "--kind", "mmio"], capture_output=True, timeout=600).stdout.decode().splitlines()
    assert any("xv6: mycpu() reads the local APIC ID (lapicid)  @ lapicid+0x9 lapic.c:105" in x for x in mmio)


@pytest.mark.skipif(not qemu_available(), reason="qemu-system-i386 is not installed")
def test_xv6_console_is_qemus_from_its_first_line():
    ours = session("native", QUICK)
    theirs, _, completed = qemu_xv6_session(KERNEL, QUICK, timeout=120)
    assert completed, theirs[-300:]
    assert ours.console == theirs


# What each technique is made of on xv6, as the run's tally counts it: the privileged instructions
# of pushcli and switchuvm trap (trap) or are callouts (full); hw with EPT exits for the I/O APIC's
# MMIO (EPT violations) and the local APIC's EOI writes (APIC_WRITE: its ID reads cost no exit, APIC
# virtualization), without EPT for CR3 loads and the shadow page tables' faults.
EVIDENCE = {"trap": ("trap:cli", "trap:sti", "trap:ltr", "trap:mov cr3", "page_fault:ptemod"),
            "full": ("callout:ltr", "callout:mov cr3", "callout:iretd", "callout:mov sreg"),
            "hw-ept": ("vmexit:EPT_VIOLATION", "vmexit:APIC_WRITE", "vmexit:IO_INSTRUCTION"),
            "hw-noept": ("vmexit:CR_ACCESS", "vmexit:EXCEPTION_NMI", "vmexit:IO_INSTRUCTION")}


@pytest.mark.parametrize("mode,opts", MODES[1:], ids=["trap", "full", "hw-ept", "hw-noept"])
def test_xv6_quick_session_in_every_mode(mode, opts, native_quick):
    res = session(mode, QUICK, opts)
    check_quick(res)
    assert res.console == native_quick[0].console
    label = {"hw": "hw-ept" if opts and opts.get("ept") else "hw-noept"}.get(mode, mode)
    missing = [k for k in EVIDENCE[label] if not res.tally.get(k)]
    assert not missing, (missing, res.counts)
    if mode == "hw":
        assert "trap" not in res.counts and "callout" not in res.counts
        assert ("vmexit:EPT_VIOLATION" in res.tally) == bool(opts["ept"])
        if opts["ept"]:
            # mycpu()'s APIC ID read on every pushcli is served from the virtual-APIC page: the local
            # APIC's accesses under native far outnumber every exit under hw.
            assert res.counts["vmexit"] * 10 < native_quick[0].counts["mmio"], (res.counts, native_quick[0].counts)


@pytest.mark.slow
def test_xv6_compare_native_and_trap_by_xv6s_names(tmp_path):
    """`cpuvirt compare kernelmemfs --modes native,trap` with a script: rows per system call, the timer,
    and switchuvm's lcr3 in its own row (x86.h's inline lcr3 is also in switchkvm)."""
    import json
    import subprocess
    import sys
    script = tmp_path / "s.txt"
    script.write_text("echo hi\n")
    p = subprocess.run([sys.executable, "-m", "cpuvirt", "compare", str(KERNEL), "--modes", "native,trap",
                        "--mem", str(MEM_MIB), "--input", str(script), "--input-prompt", "$ ", "--max-insns", "0",
                        "--json"], capture_output=True, timeout=3600)
    assert p.returncode == 0, p.stderr[-800:]
    out = json.loads(p.stdout)
    assert [r["outcome"] for r in out["runs"]] == ["input_end", "input_end"]
    rows = {(s["where"], s["symbol"].split("+")[0]): s for s in out["sites"]}
    write = rows["system call 16", "sys_write"]
    assert write["runs"]["native"]["events"] == write["runs"]["trap"]["events"] > 0
    assert rows["IRQ 0", "timer"]["runs"]["trap"]["events"] > 0
    uvm = [s for s in out["sites"] if s["symbol"].startswith("switchuvm") and s["instruction"] == "mov cr3, eax"]
    kvm = [s for s in out["sites"] if s["symbol"].startswith("switchkvm") and s["instruction"] == "mov cr3, eax"]
    assert len(uvm) == len(kvm) == 1 and uvm[0]["where"] == kvm[0]["where"]          # one x86.h line, two rows
    assert uvm[0]["runs"]["trap"]["what"].startswith("trap mov")
    assert uvm[0]["runs"]["native"]["what"] == "ran natively"
    assert uvm[0]["meaning"].startswith("context switch: switchuvm")


@pytest.mark.slow
def test_xv6_usertests_pass_in_native():
    res = session("native", ["usertests"])
    assert (res.outcome, res.status) == ("input_end", 0), (res.message, res.console[-800:])
    assert b"\nALL TESTS PASSED\n$ " in res.console


# usertests in the other modes that pass it (docs/xv6.md: trap stops at `preempt`, its iret hole):
# tens of minutes each on a shared machine (full: 47 min for the whole scripted session, hw --no-ept 73 min,
# both measured under load).
@pytest.mark.slow
@pytest.mark.parametrize("mode,opts", [("full", None), ("hw", {"vmx": [], "ept": True}), ("hw", {"vmx": [], "ept": False})],
                         ids=["full", "hw-ept", "hw-noept"])
def test_xv6_usertests_pass(mode, opts):
    res = session(mode, ["usertests"], opts)
    assert (res.outcome, res.status) == ("input_end", 0), (res.message, res.console[-800:])
    assert b"\nALL TESTS PASSED\n$ " in res.console


def test_xv6_interactive_on_a_terminal_and_ctrl_c_ends_the_run():
    """A pseudo-terminal stands in for a person: type a command after the prompt, then Ctrl-C."""
    import pty
    import select
    import subprocess
    import sys
    import time
    master, slave = pty.openpty()
    def controlling_terminal():          # as a login shell's child: Ctrl-C on the pty is SIGINT
        import fcntl
        import termios
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    p = subprocess.Popen([sys.executable, "-m", "cpuvirt", "run", str(KERNEL), "--mem", str(MEM_MIB)],
                         stdin=slave, stdout=slave, stderr=subprocess.PIPE, close_fds=True,
                         preexec_fn=controlling_terminal)
    os.close(slave)
    out = b""

    def read_until(token: bytes, limit: float) -> bool:
        nonlocal out
        end = time.monotonic() + limit
        while time.monotonic() < end:
            if select.select([master], [], [], 0.2)[0]:
                try:
                    out += os.read(master, 4096)
                except OSError:
                    return False
            if token in out:
                return True
        return False

    try:
        assert read_until(b"$ ", 300), out
        os.write(master, b"echo typed by hand\n")
        assert read_until(b"typed by hand\r\n$ ", 120), out
        os.write(master, b"\x03")
        status = p.wait(timeout=60)
        import termios
        lflag = termios.tcgetattr(master)[3]
        assert lflag & termios.ICANON and lflag & termios.ECHO, "the terminal's settings are restored"
    finally:
        if p.poll() is None:
            p.kill()
        os.close(master)
    err = p.stderr.read().decode()
    assert status == 130, err
    assert "interrupted" in err and "Traceback" not in err
