"""Para: an INVLPG a PV kernel asks for (update_va_mapping with UVMF_INVLPG, MMUEXT_INVLPG_LOCAL) drops
that page's translation only, as Xen's flush_tlb_one_local does; UVMF_TLB_FLUSH and every loss of a
protection still flush the engine's whole TLB (tests/guests/pv_invlpg.S shows the difference through a
read-only entry changed without a flush), except a writable mapping update_va_mapping removes through a
table linked at one directory slot: its one linear page goes (no other reaches the entry), and through a
table linked at two the whole TLB still does. CPUVIRT_INVLPG_FLUSHES_ALL=1 brings back the whole flush."""
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
                 "fresh_after_uva", "stale_after_protection_loss", "alias", "fresh_after_protection_loss"):
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


def test_a_batch_of_invlpgs_beyond_the_ceiling_is_one_whole_flush():
    """A hostile batch of INVLPG requests costs the host at most FLUSH_PAGE_CEILING page flushes: beyond,
    the hypercall ends with one whole flush (the guest sees no stale entry either way)."""
    from cpuvirt.memory.direct import FLUSH_PAGE_CEILING, DirectPaging

    class _Mmu:
        ram, counters = None, None

    paging = DirectPaging(_Mmu(), 16, 0x40000000)
    pages, whole = [], []
    paging.on_flush_page, paging.on_flush = pages.append, lambda: whole.append(1)
    for k in range(3):
        paging.flush_page(k << 12 | 0x123)
    paging.flush_tlb()
    assert pages == [0, 0x1000, 0x2000] and not whole
    pages.clear()
    for k in range(FLUSH_PAGE_CEILING + 5):
        paging.flush_page(k << 12)
    assert paging.flush_due
    paging.flush_tlb()
    assert not pages and whole == [1] and not paging.flush_due
