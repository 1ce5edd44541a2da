"""The SSE alignment sites follow code rewrites and are bounded (cpu/ssealign.py, cpu/intercept.py).

tests/guests/sse_sites.S writes PAGES pages of `movaps xmm0, [esi]` and runs them, then rewrites one
site into `movaps xmm0, [esi + 8]` (misaligned: #GP) and into `movaps xmm0, [ebx]` (same length as
the original, aligned, then misaligned). Before the fix the C hook kept the addressing form it first
decoded: the last check failed in every mode (no #GP: [esi] was checked instead of [ebx]). And every
site kept a code hook, which the engine walks at each translation and each hooked execution: native
took 2.6 s for 4 pages, 17 s for 16, 249 s for 64 (quadratic). The hooks are now capped
(limits.SSE_SITES, INTERCEPT_SITES; under full the translation cache is flushed to free its copies'
hooks); bench/sse_sites.py measures the host time per page.
"""
from __future__ import annotations

import subprocess

import pytest

from cpuvirt import limits
from cpuvirt.runner import run_guest
from tests.conftest import requires_qemu

MODES = ("native", "hw", "trap", "full")


def _build(tmp_path, pages: int) -> str:
    from cpuvirt.toolchain.build import include_dir
    from cpuvirt.toolchain.image import build_image
    from cpuvirt.toolchain.preprocess import preprocess
    from tests.conftest import TEST_GUESTS
    pre = preprocess(TEST_GUESTS / "sse_sites.S", {"PAGES": str(pages)}, [include_dir()])
    path = tmp_path / f"sse_sites-{pages}.bin"
    path.write_bytes(build_image(pre.lines)[0])
    return str(path)


@pytest.fixture(scope="module")
def eight_pages(tmp_path_factory):
    return _build(tmp_path_factory.mktemp("sse"), 8)          # 10,920 sites: over the cap


@pytest.mark.parametrize("mode", MODES)
def test_rewritten_sites_and_many_sites(eight_pages, mode):
    seen = {}
    r = run_guest(eight_pages, mode, max_insns=20_000_000, on_start=lambda hv: seen.setdefault("hv", hv))
    console = r.console.decode()
    assert "FAIL" not in console and console.count("PASS") == 4, console
    assert (r.outcome, r.status) == ("exit", 0), r.message
    ic = seen["hv"].vcpu.intercepts
    sse = ic.sse
    assert sse is not None
    assert len(ic.hooked) <= limits.INTERCEPT_SITES
    assert sse.tc_sites <= limits.SSE_SITES and len(sse.sites) - sse.tc_sites <= limits.SSE_SITES
    if mode == "full":        # kernel code runs from the TC: its copies' hooks were freed by flushes
        assert seen["hv"].vcpu.tc.counters.flushes >= 2
    else:                     # the guest's own sites beyond the cap are left unchecked
        assert sse.unchecked > 0 and len(sse.sites) == limits.SSE_SITES


def test_the_hard_cap_stops_the_guest(tmp_path, monkeypatch):
    """Beyond limits.INTERCEPT_SITES hooks the hypervisor stops the guest: status 123, one line."""
    monkeypatch.setattr(limits, "INTERCEPT_SITES", 100)
    r = run_guest(_build(tmp_path, 1), "native", max_insns=5_000_000)
    assert (r.outcome, r.status) == ("error", 123), (r.outcome, r.message)
    assert "more than 100 intercepted instruction sites" in r.message


def test_site_forms_of_rewritten_encodings():
    """What a site is re-aimed at when its bytes change: another base register gives another form,
    an unaligned move nothing to check (), 16-bit-only or undecodable bytes Python (None)."""
    from cpuvirt.cpu.ssealign import _site_form
    assert _site_form(bytes.fromhex("0f2806"))[:2] != _site_form(bytes.fromhex("0f2803"))[:2]
    assert _site_form(bytes.fromhex("0f1006")) == ()           # movups
    assert _site_form(bytes.fromhex("670f2800")) is None        # [bx + si]: 16-bit addressing


@pytest.mark.parametrize("mode", MODES)
def test_one_linear_page_two_frames(test_guest, mode):
    """tests/guests/sse_remap.S maps one linear page in turn to two frames holding `movaps [esi]` and
    `movaps [ebx]` (same length): the check follows the frame that runs. Before, native, hw and trap
    kept checking [esi] (4 of 5 checks failed); full passed (its translations follow frames)."""
    r = run_guest(str(test_guest("sse_remap")), mode, max_insns=5_000_000)
    console = r.console.decode()
    assert "FAIL" not in console and console.count("PASS") == 5, console
    assert (r.outcome, r.status) == ("exit", 0), r.message


@requires_qemu
def test_qemu_prints_the_same_for_remapped_frames(test_guest):
    image = str(test_guest("sse_remap"))
    p = subprocess.run(["qemu-system-i386", "-nodefaults", "-nographic", "-monitor", "none", "-serial", "stdio",
                        "-no-reboot", "-m", "32", "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
                        "-fw_cfg", "name=etc/sercon-port,string=0", "-kernel", image],
                       stdin=subprocess.DEVNULL, capture_output=True, timeout=120, check=False)
    assert p.returncode == 1 and p.stdout == run_guest(image, "native", max_insns=5_000_000).console


@requires_qemu
def test_qemu_prints_the_same(eight_pages):
    p = subprocess.run(["qemu-system-i386", "-nodefaults", "-nographic", "-monitor", "none", "-serial", "stdio",
                        "-no-reboot", "-m", "32", "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
                        "-fw_cfg", "name=etc/sercon-port,string=0", "-kernel", eight_pages],
                       stdin=subprocess.DEVNULL, capture_output=True, timeout=120, check=False)
    assert p.returncode == 1 and p.stdout == run_guest(eight_pages, "native", max_insns=20_000_000).console
