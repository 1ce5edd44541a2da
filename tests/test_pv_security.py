"""Mode para, security: a hostile PV guest (tests/guests/pv_hostile.S) maps frames it does not own,
makes its page tables writable, installs ring-0 and system descriptors, passes pointers outside its
memory or to read-only pages, and uses bad hypercall numbers. Each attempt must get the right
negative errno (the guest checks and prints PASS/FAIL), the run must end cleanly, and the memory the
hypervisor relies on (page tables, hypercall page, GDT) must be what it was (read here afterwards)."""
import json
import struct

import pytest

from cpuvirt.engine import regs as R
from cpuvirt.loader.multiboot import build_boot_info, load_image
from cpuvirt.machine.machine import Machine
from cpuvirt.modes.para import ParaMode
from cpuvirt.runner import run_guest

CHECKS = 41


def boot_para(path):
    """A para-mode machine booted on the image at `path`, not yet run: (machine, mode, entry)."""
    image = load_image(path.read_bytes(), path.name)
    boot = build_boot_info(image, 32 << 20, "", [], kernel_name=path.name)
    m = Machine(32, on_console=lambda byte: None)
    hv = ParaMode(m, max_insns=20_000_000)
    for gpa, blob in image.segments:
        m.write_gpa(gpa, blob)
    for gpa, blob in boot.blobs:
        m.write_gpa(gpa, blob)
    m.set_flat_protected_mode(0x500)
    m.regs.write(R.EAX, 0x2BADB002)
    m.regs.write(R.EBX, boot.address)
    hv.set_image(image, boot)
    hv.boot()
    return m, hv, image.entry


@pytest.fixture(scope="module")
def hostile(test_guest):
    return test_guest("pv_hostile")


def test_every_attempt_gets_its_errno(hostile, tmp_path):
    trace = tmp_path / "t.jsonl"
    res = run_guest(str(hostile), "para", trace_path=str(trace), max_insns=20_000_000)
    text = res.console.decode()
    assert (res.outcome, res.status) == ("exit", 0), (res.message, text[-800:])
    assert "FAIL" not in text and text.count("PASS ") == CHECKS, text
    events = [json.loads(line) for line in trace.read_text().splitlines()]
    refused = [e for e in events if e.get("kind") == "hypercall" and e["action"] == "refused"]
    results = {e["detail"]["result"] for e in refused}
    assert results == {-1, -14, -22, -38}               # EPERM, EFAULT, EINVAL, ENOSYS
    whys = [e["detail"].get("refused", "") for e in refused]
    assert any("is not the guest's" in w for w in whys)
    assert any("cannot become writable" in w for w in whys)
    assert any("DPL 0" in w for w in whys)
    assert any("not mapped" in w for w in whys)
    faults = [e for e in events if e.get("kind") == "page_fault"]
    assert [e["detail"]["cr2"] for e in faults][1] == "0xfc000000" and all(e["detail"]["error_code"] & 2 for e in faults)


def test_hypervisor_memory_intact(hostile):
    m, hv, entry = boot_para(hostile)
    lay = hv.layout
    protected = [lay.hypercall, lay.gdt, lay.l2] + lay.l1
    before = {a: m.read_gpa(a, 0x1000) for a in protected}
    out = hv.run(entry)
    assert (out.kind, out.status) == ("exit", 0), out.message
    for g, flags in (((lay.first_free >> 12) + 3, 1), ((lay.first_free >> 12) + 5, 5)):
        # the frames the guest legitimately remapped read-only (a GDT and a page table)
        assert m.ram.read32(0x40000000 + lay.l1[0] + 4 * g) & ~0x60 == ((0x40000 + g) << 12) | flags
        m.ram.write32(0x40000000 + lay.l1[0] + 4 * g, struct.unpack_from("<I", before[lay.l1[0]], 4 * g)[0])
    for a in protected:
        after = m.read_gpa(a, 0x1000)
        if a in lay.l1 or a == lay.l2:
            # the walk sets A/D bits as hardware does; nothing else may change
            strip = lambda page: bytes(b & ~0x60 if i % 4 == 0 else b for i, b in enumerate(page))
            assert strip(after) == strip(before[a]), hex(a)
        else:
            assert after == before[a], hex(a)
    p = hv.paging
    assert p.type_of((0x40000000 + lay.l2) >> 12) == "L2" and p.base == 0x40000000 + lay.l2


def test_unmodified_hostile_sweep_never_reaches_the_hypervisor(test_guest):
    """Every frame an L1 entry names must be the guest's: a guest sweeping every mfn with
    update_va_mapping gets -EPERM outside its 32 MiB (checked on the strategy, without a guest)."""
    from cpuvirt.memory.direct import Refused
    m, hv, _ = boot_para(test_guest("pv_hello"))
    p = hv.paging
    l1 = 0x40000000 + hv.layout.l1[1]            # maps 4-8 MiB: free guest frames
    refused = 0
    for mfn in list(range(0, 0x40000, 0x1000)) + [0x3FFFF, 0x42000, 0x7FFFF, 0xFEE00, 0xFFFFF]:
        try:
            p.update_entry(l1, (mfn << 12) | 3)
        except Refused as r:
            assert r.errno == 1
            refused += 1
    assert refused == 0x40 + 5
    assert m.ram.read32(l1) >> 12 == 0x40400          # the entry kept its own frame
