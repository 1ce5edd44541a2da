"""Mode para: the Xen-style hypervisor side (docs/pv-abi.md). Small PV test guests (tests/guests/pv_*.S,
on their own runtime pv_rt.inc) check themselves and print PASS/FAIL; the tests here also check what
the guest cannot see: the trace, the entry state, the refusal of unmodified images."""
import json
import struct
import subprocess
import sys

import pytest

from cpuvirt.machine.machine import Machine
from cpuvirt.memory.direct import L1, L2, NONE, WRITABLE, DirectPaging, Refused
from cpuvirt.memory.p2m import RAM_HPA
from cpuvirt.modes.para import startinfo as S
from cpuvirt.runner import run_guest
from cpuvirt.toolchain.build import build_guest, list_guests


def run_para(image, tmp_path, name="t", **kw):
    trace = tmp_path / f"{name}.jsonl"
    res = run_guest(str(image), "para", trace_path=str(trace), max_insns=kw.pop("max_insns", 20_000_000), **kw)
    events = [json.loads(line) for line in trace.read_text().splitlines()]
    return res, [e for e in events if e["type"] == "event"], events


def assert_passes(res, checks):
    text = res.console.decode()
    assert res.outcome == "exit" and res.status == 0, (res.outcome, res.status, res.message, text[-600:])
    assert "FAIL" not in text
    assert text.count("PASS ") == checks, text


def test_hello_over_console_io(test_guest, tmp_path):
    res, events, _ = run_para(test_guest("pv_hello"), tmp_path)
    assert res.console.startswith(b"hello from a PV guest\n")
    assert_passes(res, 2)
    calls = [e for e in events if e["kind"] == "hypercall"]
    assert {e["reason"] for e in calls} == {"console_io", "xen_version", "unknown (99)", "sched_op"}
    first = calls[0]
    assert (first["reason"], first["code"], first["insn"], first["cpl"]) == ("console_io", 18, "int 0x82", 1)
    assert first["detail"]["count"] == 22 and first["detail"]["result"] == 22
    unknown = next(e for e in calls if e["code"] == 99)
    assert unknown["detail"]["result"] == -38 and unknown["action"] == "refused"
    assert calls[-1]["detail"]["reason"] == 0 and res.counts["hypercall"] == len(calls)


def test_traps_through_the_trap_table(test_guest, tmp_path):
    res, events, _ = run_para(test_guest("pv_traps"), tmp_path)
    assert_passes(res, 18)
    pf = [e for e in events if e["kind"] == "page_fault"]
    assert [e["detail"]["cr2"] for e in pf] == ["0x7000123", pf[1]["detail"]["cr2"]] and pf[1]["detail"]["error_code"] == 3
    gp = [e for e in events if e["kind"] == "exception" and e["reason"] == "#GP"]
    assert [e["insn"].split()[0] for e in gp][:2] == ["cli", "out"]
    assert all(e["action"] == "bounced through the trap table" for e in gp)


def test_event_channels_and_upcalls(test_guest, tmp_path):
    res, events, _ = run_para(test_guest("pv_events"), tmp_path)
    assert_passes(res, 19)
    upcalls = [e for e in events if e["kind"] == "upcall" and e["reason"] == "evtchn_upcall"]
    assert len(upcalls) == 5 and upcalls[-1]["cpl"] == 3
    timers = [e for e in events if e["reason"] == "set_timer_op"]
    assert timers and all("timeout" in e["detail"] for e in timers)
    bind = next(e for e in events if e["reason"] == "event_channel_op")
    assert bind["detail"]["cmd"] == "bind_virq" and bind["detail"]["port"] == 2


def test_direct_paging_and_ring3(test_guest, tmp_path):
    res, events, _ = run_para(test_guest("pv_mmu"), tmp_path)
    assert_passes(res, 29)
    refused = [e for e in events if e["kind"] == "hypercall" and e["action"] == "refused"]
    whys = " | ".join(e["detail"].get("refused", "") for e in refused)
    assert "cannot become writable" in whys and "cannot become L1" in whys and "already pinned" in whys
    ok = next(e for e in events if e["reason"] == "mmu_update" and e["detail"]["result"] == 0)
    assert ok["detail"]["updates"][0].endswith("(L2 entry)")


def test_entry_state_and_start_info(tmp_path):
    """What the guest is started with, read from the machine after boot (docs/pv-abi.md 1-2)."""
    from cpuvirt.engine import regs as R
    from cpuvirt.loader.multiboot import build_boot_info, load_image
    from cpuvirt.modes.para import ParaMode
    image = load_image(build_guest("hello", pv=True), "hello")
    boot = build_boot_info(image, 32 << 20, "", [], kernel_name="hello")
    m = Machine(32)
    hv = ParaMode(m)
    for gpa, blob in image.segments:
        m.write_gpa(gpa, blob)
    for gpa, blob in boot.blobs:
        m.write_gpa(gpa, blob)
    m.set_flat_protected_mode(0x500)
    m.regs.write(R.EAX, 0x2BADB002)
    m.regs.write(R.EBX, boot.address)
    hv.set_image(image, boot)
    hv.boot()
    r, lay = m.regs, hv.layout
    assert r.cpl() == 1 and r.read(R.CS) == S.FLAT_RING1_CS and r.read(R.SS) == S.FLAT_RING1_DS
    assert (r.read(R.EAX), r.read(R.EBX), r.read(R.ESI)) == (0x2BADB002, boot.address, lay.start_info)
    assert lay.start_info >= image.highest and lay.start_info % 0x1000 == 0
    si = m.read_gpa(lay.start_info, 0x1000)
    assert si.startswith(b"xen-3.0-x86_32\0")
    nr_pages, shared_ma = struct.unpack_from("<II", si, 32)
    assert nr_pages == 8192 and shared_ma == RAM_HPA + lay.shared_info       # a machine address
    pt_base, nr_pt, mfn_list = struct.unpack_from("<III", si, 60)
    assert (pt_base, nr_pt, mfn_list) == (lay.l2, 9, lay.mfn_list)
    hc, sh_va = struct.unpack_from("<II", si, 0x800)
    assert (hc, sh_va) == (lay.hypercall, lay.shared_info)
    assert m.read_gpa(lay.shared_info, 2) == b"\0\1"                          # events masked
    page = m.read_gpa(lay.hypercall, 0x1000)
    assert page[18 * 32:18 * 32 + 8] == bytes.fromhex("b812000000cd82c3")
    assert page[23 * 32:23 * 32 + 8] == bytes.fromhex("50b817000000cd82")
    assert struct.unpack_from("<I", m.read_gpa(lay.mfn_list, 8), 4)[0] == (RAM_HPA >> 12) + 1
    # the page tables: machine frames, page tables and the hypercall page read-only
    p = hv.paging
    l1 = struct.unpack("<1024I", m.read_gpa(lay.l1[0], 0x1000))
    assert l1[0x100] >> 12 == (RAM_HPA >> 12) + 0x100 and l1[0x100] & 2
    for frame in (lay.hypercall, lay.l2, lay.l1[0], lay.gdt):
        assert not l1[frame >> 12] & 2, hex(frame)
    assert p.type_of((RAM_HPA + lay.l2) >> 12) == "L2" and p.type_of((RAM_HPA + lay.l1[3]) >> 12) == "L1"
    assert p.type_of((RAM_HPA + lay.hypercall) >> 12) == "hypercall"
    assert p.type_of((RAM_HPA + 0x200000) >> 12) == "writable"


def test_unmodified_image_is_refused(tmp_path):
    native = tmp_path / "hello.bin"
    native.write_bytes(build_guest("hello"))
    res = run_guest(str(native), "para")
    assert (res.outcome, res.status) == ("error", 123)
    assert res.message.startswith("para: cli at 0x")
    assert "privileged instruction in a guest that is not paravirtualized" in res.message
    assert "--mode native/trap/full/hw" in res.message


def test_cli_run_para_and_refusal(tmp_path):
    native = tmp_path / "hello.bin"
    native.write_bytes(build_guest("hello"))
    p = subprocess.run([sys.executable, "-m", "cpuvirt", "run", str(native), "--mode", "para"],
                       check=False, capture_output=True, text=True, timeout=60)
    assert p.returncode == 123 and "Traceback" not in p.stderr
    assert "not paravirtualized" in p.stderr
    p = subprocess.run([sys.executable, "-m", "cpuvirt", "run", "hello", "--mode", "para", "--stats"],
                       check=False, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "PASS hello" in p.stdout and "hypercall" in p.stderr


def test_block_with_nothing_to_wake_is_halted(tmp_path):
    src = tmp_path / "pv_block.S"
    from tests.conftest import TEST_GUESTS
    src.write_text('#include "pv_rt.inc"\n.text\nmain:\n    mov ebx, 1\n    xor ecx, ecx\n    HC(29)\n    ret\n')
    from cpuvirt.toolchain.build import include_dir
    from cpuvirt.toolchain.image import build_image
    from cpuvirt.toolchain.preprocess import preprocess
    image, _ = build_image(preprocess(src, {}, [TEST_GUESTS, include_dir()]).lines)
    (tmp_path / "b.bin").write_bytes(image)
    res = run_guest(str(tmp_path / "b.bin"), "para")
    assert (res.outcome, res.status) == ("halted", 126) and "SCHEDOP_block" in res.message


def test_runs_are_deterministic(test_guest, tmp_path):
    image = test_guest("pv_events")
    _, _, a = run_para(image, tmp_path, "a")
    _, _, b = run_para(image, tmp_path, "b")
    assert a == b


# -- the frame-type rules on their own ------------------------------------------------------------

class _Mmu:
    def __init__(self, m):
        self.ram, self.counters = m.ram, m.mmu.counters


def _paging():
    m = Machine(8)
    return m, DirectPaging(_Mmu(m), 2048, RAM_HPA)


def test_frame_types_and_counts():
    m, p = _paging()
    base = RAM_HPA >> 12
    l1, l2, data = base + 10, base + 11, base + 12
    m.write_gpa(10 << 12, struct.pack("<I", (data << 12) | 3))               # L1[0] -> data, RW
    m.write_gpa(11 << 12, struct.pack("<I", (l1 << 12) | 3))                 # L2[0] -> L1
    p.new_baseptr(l2)
    assert (p.type_of(l2), p.type_of(l1), p.type_of(data)) == ("L2", "L1", "writable")
    assert p.count[12] == 1
    with pytest.raises(Refused) as e:                                        # L1 mapped writable
        p.update_entry((l1 << 12) + 4, (l1 << 12) | 3)
    assert e.value.errno == 22
    assert m.read_gpa((10 << 12) + 4, 4) == b"\0\0\0\0"                      # nothing written
    p.update_entry((l1 << 12) + 4, (data << 12) | 3)                         # a second RW mapping
    assert p.count[12] == 2
    p.update_entry(l1 << 12, 0)
    p.update_entry((l1 << 12) + 4, 0)
    assert p.type[12] == NONE and p.count[12] == 0
    with pytest.raises(Refused) as e:
        p.update_entry(l1 << 12, ((base + 5000) << 12) | 1)                  # not the guest's
    assert e.value.errno == 1
    with pytest.raises(Refused):
        p.get_type(l2, L1)                                                   # an L2 is not an L1
    # a directory that maps itself as its own page table is refused, and leaves nothing typed
    selfmap = base + 20
    m.write_gpa(20 << 12, struct.pack("<I", (selfmap << 12) | 1))
    with pytest.raises(Refused):
        p.get_type(selfmap, L2)
    assert p.count[20] == 0
    p.get_type(base + 30, WRITABLE)
    with pytest.raises(Refused):
        p.pin(base + 30, L1)
    assert (L1, L2) == (2, 3)


# -- the bundled guests' PV builds: the same console as native, but for tests/pv_console.py's lines --

PV_GUESTS = [g.name for g in list_guests() if g.has_pv]


@pytest.mark.parametrize("guest", PV_GUESTS)
def test_pv_build_console_equals_native(guest):
    from tests.guest_args import in_guest_dir, run_kwargs
    from tests.pv_console import expected_pv_console
    with in_guest_dir():
        native = run_guest(guest, **run_kwargs(guest))
        para = run_guest(guest, "para", **run_kwargs(guest))
    assert para.console == expected_pv_console(guest, native.console), para.message
    assert (para.outcome, para.status) == (native.outcome, native.status) == ("exit", 0)
    assert para.counts.get("hypercall", 0) > 0


def test_event_ports_are_reused_and_bounded():
    """Ports come from a fixed table in shared_info: a bind/close loop must not walk off it."""
    from cpuvirt.modes.para.events import NR_PORTS, VIRQ_TIMER, EventChannels
    m = Machine(4)
    ev = EventChannels(m.ram, RAM_HPA + 0x10000)
    for _ in range(3000):
        assert ev.bind_virq(VIRQ_TIMER) == 2
        assert ev.close(2)
    for virq in range(NR_PORTS - 2):
        assert ev.bind_virq(virq) == virq + 2
    assert ev.bind_virq(9999) is None
    assert m.read_gpa(0x11000, 0x1000) == bytes(0x1000)      # nothing written past the page
