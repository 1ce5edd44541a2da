"""Para, issue 10 item 3: a frame-type change that removes a protection invalidates what the engine
cached through the frame. After set_gdt to a new frame, the old GDT frame is released; the guest
maps it writable and writes a descriptor there. A segment load must then read the new GDT: before
the fix the engine's stale TLB entry for the GDT window still pointed at the old frame, so a
descriptor the guest could write was honoured (tests/guests/pv_stale_gdt.S)."""
from cpuvirt.memory.direct import GDT, L1, WRITABLE, DirectPaging
from cpuvirt.runner import run_guest
from tests.hostile import build


def test_segment_load_after_set_gdt_reads_the_new_table(tmp_path):
    res = run_guest(str(build("pv_stale_gdt", tmp_path)), "para", max_insns=5_000_000)
    text = res.console.decode()
    assert (res.outcome, res.status) == ("exit", 0), (res.message, text)
    assert "PASS a segment load after set_gdt reads the new GDT, not the released frame" in text
    assert "FAIL" not in text


class _Ram:
    hpa = 0x40000000

    def __init__(self):
        self.buf = bytearray(16 << 12)


class _Mmu:
    def __init__(self):
        self.ram = _Ram()
        self.counters = None


def test_every_type_loss_that_removes_a_protection_asks_for_a_flush():
    """The class, not the instance: whenever a GDT, L1 or L2 frame loses its last reference, or a
    writable mapping goes away, the engine's TLB is flushed before the guest runs again."""
    paging = DirectPaging(_Mmu(), 16, 0x40000000)
    base = paging.base_mfn
    for t in (GDT, L1, WRITABLE):
        paging.tlb_dirty = False
        paging.get_type(base + 3, t)
        assert not paging.tlb_dirty or t != GDT
        paging.tlb_dirty = False
        paging.put_type(base + 3)
        assert paging.tlb_dirty, t
    paging.tlb_dirty = False
    paging.set_gdt([base + 4])
    assert paging.tlb_dirty                      # the window now shows another frame
