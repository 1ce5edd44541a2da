"""Para: an INVLPG a PV kernel asks for (update_va_mapping with UVMF_INVLPG, MMUEXT_INVLPG_LOCAL) drops
that page's translation only, as Xen's flush_tlb_one_local does; UVMF_TLB_FLUSH and every loss of a
protection still flush the engine's whole TLB (tests/guests/pv_invlpg.S shows the difference through a
read-only entry changed without a flush). CPUVIRT_INVLPG_FLUSHES_ALL=1 brings back the whole flush."""
import pytest

from cpuvirt.runner import run_guest
from tests.hostile import build


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    return str(build("pv_invlpg", tmp_path_factory.mktemp("pv_invlpg")))


def _run(image, monkeypatch, status=0, **env):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    res = run_guest(image, "para", max_insns=5_000_000)
    assert (res.outcome, res.status) == ("exit", status), (res.message, res.console.decode())
    return res


@pytest.mark.parametrize("c", ["1", "0"])
def test_invlpg_drops_one_page_in_c_and_in_python(image, monkeypatch, c):
    text = _run(image, monkeypatch, CPUVIRT_PARA_FAST=c).console.decode()
    assert "FAIL" not in text, text
    for name in ("stale_after_uva", "stale_after_ext", "fresh_after_ext", "stale_again", "fresh_after_flush",
                 "fresh_after_uva"):
        assert f"PASS {name}" in text, text


def test_c_and_python_fill_the_same_pages(image, monkeypatch):
    c = _run(image, monkeypatch, CPUVIRT_PARA_FAST="1")
    py = _run(image, monkeypatch, CPUVIRT_PARA_FAST="0")
    assert c.console == py.console
    assert (c.icount, c.vtime, c.counts) == (py.icount, py.vtime, py.counts)
    assert c.mmu == py.mmu


def test_a_whole_flush_shows_the_new_frame_at_once_and_refills_more(image, monkeypatch):
    one = _run(image, monkeypatch)
    everything = _run(image, monkeypatch, status=1, CPUVIRT_INVLPG_FLUSHES_ALL="1")  # its FAIL lines: exit 1
    text = everything.console.decode()
    assert "FAIL stale_after_uva" in text and "FAIL stale_after_ext" in text, text
    assert everything.mmu["fills"] > one.mmu["fills"]
