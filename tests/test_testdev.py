"""pc-testdev (machine/testdev.py): QEMU's test device, register by register, and a guest that uses it
in every mode (under hw each access to its MMIO area is an emulated instruction) and under QEMU."""
from __future__ import annotations

import json

import pytest

from cpuvirt.machine.machine import Machine
from cpuvirt.machine.testdev import IOMEM_GPA, IRQ_PORT, PcTestdev, TestdevSpec
from cpuvirt.runner import run_guest
from tests.conftest import requires_qemu
from tests.hostile import build, run_cli


@pytest.fixture(scope="module")
def testdev_image(tmp_path_factory):
    return build("testdev", tmp_path_factory.mktemp("testdev"))


@pytest.fixture
def machine():
    m = Machine(4)
    return m, PcTestdev(m)


def test_the_scratch_register_takes_every_width_at_every_port(machine):
    m, _ = machine
    m.bus.write(0xE0, 4, 0x11223344)
    assert [m.bus.read(0xE0 + k, 1) for k in range(4)] == [0x44, 0x33, 0x22, 0x11]
    assert m.bus.read(0xE2, 2) == 0x1122
    m.bus.write(0xE1, 2, 0xABCD)
    assert m.bus.read(0xE0, 4) == 0x11ABCD44
    m.bus.write(0xE3, 4, 0xFFFFFF99)               # what lies beyond byte 3 is lost
    assert m.bus.read(0xE0, 4) == 0x99ABCD44
    m.bus.write(0xE8, 4, 0xA1B2C3D4)               # the byte-wise window on the same register
    assert m.bus.read(0xE0, 4) == 0xA1B2C3D4 and m.bus.read(0xE9, 2) == 0xB2C3


def test_the_flush_port_takes_only_dword_writes_and_flushes_the_engine_tlb(machine, monkeypatch):
    m, dev = machine
    flushed = []
    monkeypatch.setattr(m, "_flush_engine_tlb", lambda: flushed.append(1))
    m.bus.write(0xE4, 2, 0x1000)
    assert flushed == [] and m.bus.read(0xE4, 4) == 0
    m.bus.write(0xE4, 4, 0x1234)
    assert flushed == [1] and dev.flush.count == 1


def test_irq_lines_drive_the_8259_and_the_io_apic(machine):
    m, _ = machine
    m.bus.write(IRQ_PORT + 5, 1, 1)
    assert m.pic.master.irr & (1 << 5) and m.ioapic.lines & (1 << 5)
    m.bus.write(IRQ_PORT + 5, 1, 0)
    assert not m.ioapic.lines & (1 << 5)
    m.bus.write(IRQ_PORT + 20, 1, 7)               # above 15: an I/O APIC pin only
    assert m.ioapic.lines & (1 << 20)
    assert m.bus.read(IRQ_PORT + 20, 1) == 0


def test_the_iomem_area_is_64_kib_of_little_endian_scratch(machine):
    m, dev = machine
    m.mmio.write(IOMEM_GPA + 0xFFFC, 4, 0xDEADBEEF)
    assert m.mmio.read(IOMEM_GPA + 0xFFFE, 2) == 0xDEAD
    m.mmio.write(IOMEM_GPA + 8, 8, 0x0102030405060708)          # split into two dwords
    assert dev.iomem.buf[8:16] == bytes.fromhex("0807060504030201")
    assert m.mmio.find(IOMEM_GPA + 0x10000) is None


@pytest.mark.parametrize("mode,options", [("native", None), ("trap", None), ("full", None), ("hw", None),
                                          ("hw", {"ept": False}), ("hw", {"vmx": ["lazy_ept=1"]})])
def test_the_testdev_guest_passes_in_every_mode(testdev_image, mode, options):
    r = run_guest(str(testdev_image), mode, mode_options=options, devices=[TestdevSpec()])
    assert (r.outcome, r.status) == ("exit", 0), r.console.decode()
    assert b"FAIL" not in r.console and r.console.count(b"PASS") == 22


def test_without_the_device_the_guest_fails(testdev_image):
    r = run_guest(str(testdev_image))
    assert r.status != 0 and b"FAIL byte 1 of the scratch register" in r.console


def test_hw_emulates_each_mmio_instruction_at_an_ept_violation(testdev_image, tmp_path):
    trace = tmp_path / "hw.jsonl"
    run_guest(str(testdev_image), "hw", trace_path=str(trace), devices=[TestdevSpec()])
    actions = [e["action"] for e in map(json.loads, trace.read_text().splitlines())
               if e.get("reason") == "EPT_VIOLATION"]
    partial = [a for a in actions if a.startswith("emulated part of `rep stosd")]
    assert len(partial) == 15000 // 1024 and all(a.endswith("re-entered to continue") for a in partial)
    for text in ("or dword ptr [0xff000000], eax", "lock inc byte ptr [0xff000004]", "rep movsb",
                 "repe cmpsb", "movdqu xmmword ptr [0xff000301], xmm1", "shld dword ptr [0xff000000], eax, cl"):
        assert any(a.startswith("emulated `" + text) for a in actions), (text, sorted(set(actions))[:20])


@requires_qemu
def test_qemu_with_its_pc_testdev_prints_the_same(testdev_image):
    from tests.qemu import run_under_qemu
    out, status = run_under_qemu(testdev_image, extra=["-device", "pc-testdev"])
    assert status == 1, out                          # debug-exit 0
    assert out == run_guest(str(testdev_image), devices=[TestdevSpec()]).console


def test_the_cli_takes_pc_testdev_once_and_without_options(testdev_image):
    p = run_cli("run", testdev_image, "--device", "pc-testdev", "-q")
    assert p.returncode == 0 and b"FAIL" not in p.stdout
    for args in (("--device", "pc-testdev,iobase=0xe0"), ("--device", "pc-testdev", "--device", "pc-testdev")):
        p = run_cli("run", testdev_image, *args)
        err = p.stderr.decode()
        assert p.returncode == 2 and err.count("\n") == 1 and "pc-testdev" in err and "Traceback" not in err
