"""Intercepted instructions are found where they run (cpu/intercept.py).

A page's code is seen block by block as the clock first counts it. The clock knows a block by (linear
address, length), so it drops its counts of a linear page's blocks when the page serves fetches from
another frame (Mmu.on_code_remap): the other frame's block of the same length is counted, and checked,
again. tests/guests/intercept_frames.S runs
`nop; nop; ret` and `invd; ret` in turn at one linear address (INVD always exits under hw), and keeps
data in a code page that decodes as sensitive instructions but never runs: once, every page was
scanned and every such decode got a code hook (kvm-unit-tests' vmexit: 447 hooks, 171 of them `hlt`
decoded from data; the engine walks them all at each hooked instruction).
"""
from __future__ import annotations

import json

import pytest

from cpuvirt.runner import run_guest
from cpuvirt.toolchain.build import include_dir
from cpuvirt.toolchain.image import build_image
from cpuvirt.toolchain.preprocess import preprocess
from tests.conftest import TEST_GUESTS


@pytest.fixture(scope="module")
def guest(tmp_path_factory):
    pre = preprocess(TEST_GUESTS / "intercept_frames.S", {}, [include_dir()])
    image, asm = build_image(pre.lines)
    path = tmp_path_factory.mktemp("intercepts") / "intercept_frames.bin"
    path.write_bytes(image)
    # never run: the data in a code page, and the hlt byte after each frame's ret in X (0x300000)
    return str(path), [*range(asm.symbols["not_code"], asm.symbols["not_code_end"]), 0x300003]


def test_each_frame_at_one_linear_address_is_intercepted(guest, tmp_path):
    """Both runs of frame B's `invd` exit, although its block has frame A's address and length."""
    trace = tmp_path / "t.jsonl"
    r = run_guest(guest[0], "hw", trace_path=str(trace))
    assert (r.outcome, r.status) == ("exit", 0), r.message
    exits = [e for e in map(json.loads, trace.read_text().splitlines()) if e.get("reason") == "INVD"]
    assert [(e["kind"], e["eip"]) for e in exits] == [("vmexit", "0x300000")] * 2


@pytest.mark.parametrize("mode", ["native", "hw", "trap"])
def test_bytes_that_never_run_get_no_hook(guest, mode):
    seen = {}
    r = run_guest(guest[0], mode, on_start=lambda hv: seen.setdefault("hv", hv))
    assert (r.outcome, r.status) == ("exit", 0), r.message
    hooked = seen["hv"].vcpu.intercepts.hooked
    assert not [hex(a) for a in guest[1] if a in hooked]
    assert hooked  # the intercepts were on: what runs was hooked (the far jumps, iret, invd...)
