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
