"""MIT's xv6 (x86, github mit-pdos/xv6-public) runs unchanged: boot to its shell, a scripted session,
usertests. xv6 is not part of this repository: these tests run only when XV6_DIR names a checkout
where `make kernelmemfs` has been run (docs/xv6.md says how); otherwise they are skipped.

The slow ones (usertests; the slower modes) are marked `slow`: deselect them with -m "not slow".
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


def session(mode: str, lines: list[str], opts=None, max_insns: int = 0):
    return run_guest(str(KERNEL), mode, MEM_MIB, max_insns, input_data="".join(f"{x}\n" for x in lines).encode(),
                     input_prompt=PROMPT, mode_options=opts)


QUICK = ["echo hello xv6", "ls"]


def check_quick(res):
    assert (res.outcome, res.status) == ("input_end", 0), (res.message, res.console[-500:])
    text = res.console.decode()
    assert text.startswith("xv6...\ncpu0: starting 0\nsb: size 1000 nblocks 941")
    assert "init: starting sh\n$ echo hello xv6\nhello xv6\n$ ls\n" in text
    assert "usertests      2 15 " in text and text.endswith("console        3 18 0\n$ ")


def test_xv6_boots_to_its_shell_and_runs_commands_in_native():
    res = session("native", QUICK)
    check_quick(res)
    assert res.counts["interrupt"] > 0 and res.counts["mmio"] > 0
    again = session("native", QUICK)
    assert again.console == res.console and again.icount == res.icount, "scripted runs are reproducible"


@pytest.mark.skipif(not qemu_available(), reason="qemu-system-i386 is not installed")
def test_xv6_console_is_qemus_from_its_first_line():
    ours = session("native", QUICK)
    theirs, _, completed = qemu_xv6_session(KERNEL, QUICK, timeout=120)
    assert completed, theirs[-300:]
    assert ours.console == theirs


@pytest.mark.slow
@pytest.mark.parametrize("mode,opts", MODES[1:], ids=["trap", "full", "hw-ept", "hw-noept"])
def test_xv6_quick_session_in_every_mode(mode, opts):
    res = session(mode, QUICK, opts)
    check_quick(res)
    assert res.console == session("native", QUICK).console


@pytest.mark.slow
def test_xv6_usertests_pass_in_native():
    res = session("native", ["usertests"])
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
