"""The platform of issue 6: fw_cfg, the MMIO bus, the CPUID model, the machine's interrupt routing,
Multiboot modules and the command line end to end, and large guests (docs/platform.md)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cpuvirt.x86 import cpuid as C
from cpuvirt.machine.bus import PortBus
from cpuvirt.machine.fw_cfg import FwCfg
from cpuvirt.machine.machine import Machine, MsrFault
from cpuvirt.machine.mmio import MmioBus
from cpuvirt.runner import run_guest
from tests.conftest import requires_qemu
from tests.test_equivalence import QEMU


# --- fw_cfg, against QEMU's docs/specs/fw_cfg and what QEMU 7.2 was measured doing ---------------------

def fw_bus(ram=32 << 20):
    bus = PortBus()
    fw = FwCfg(ram)
    bus.register(0x510, 2, fw, wide=True)
    return bus, fw


def fw_item(bus, key, n):
    bus.write(0x510, 2, key)
    return bytes(bus.read(0x511, 1) for _ in range(n))


def test_fw_cfg_items():
    bus, _ = fw_bus(512 << 20)
    assert fw_item(bus, 0x00, 4) == b"QEMU"                             # FW_CFG_SIGNATURE
    assert fw_item(bus, 0x01, 4) == (1).to_bytes(4, "little")           # traditional interface, no DMA
    assert fw_item(bus, 0x03, 8) == (512 << 20).to_bytes(8, "little")   # FW_CFG_RAM_SIZE, 64-bit LE
    assert fw_item(bus, 0x05, 2) == b"\x01\x00"                         # FW_CFG_NB_CPUS, 16-bit LE
    assert fw_item(bus, 0x0F, 2) == b"\x01\x00"                         # FW_CFG_MAX_CPUS
    assert fw_item(bus, 0x19, 8) == bytes(8)                            # empty file directory (BE count 0)


def test_fw_cfg_reads_past_the_end_and_unknown_keys_give_zeros():
    bus, _ = fw_bus()
    assert fw_item(bus, 0x00, 8) == b"QEMU\0\0\0\0"
    for key in (0x02, 0x20, 0x1234, 0x8000, 0x8003, 0xFFFF):           # QEMU has uuid, files, E820...
        assert fw_item(bus, key, 4) == bytes(4), hex(key)


def test_fw_cfg_selector_semantics():
    bus, _ = fw_bus()
    assert fw_item(bus, 0x4000, 4) == b"QEMU"                           # bit 14 (write channel) ignored
    bus.write(0x510, 2, 0)
    assert bus.read(0x510, 1) == ord("Q")                               # QEMU: byte reads of 0x510 are data
    assert bus.read(0x511, 2) == 0 and bus.read(0x511, 4) == 0          # wide reads: 0, offset unchanged
    assert bus.read(0x511, 1) == ord("E")
    bus.write(0x510, 2, 0x01)
    bus.write(0x510, 1, 0x00)                                           # byte writes: data writes, ignored
    bus.write(0x511, 2, 0x00)                                           # truncated to a byte: ignored
    bus.write(0x510, 4, 0x00)                                           # not a selector write
    assert bytes(bus.read(0x511, 1) for _ in range(4)) == (1).to_bytes(4, "little")
    bus.write(0x510, 2, 0)                                              # reselecting rewinds
    assert bus.read(0x511, 1) == ord("Q")


# --- the MMIO bus ---------------------------------------------------------------------------------------

class Regs32:
    def __init__(self):
        self.regs = {}
        self.log = []

    def read(self, offset, size):
        self.log.append(("r", offset, size))
        return self.regs.get(offset, 0x11223344) & ((1 << 8 * size) - 1)

    def write(self, offset, size, value):
        self.log.append(("w", offset, size, value))
        self.regs[offset] = value


def test_mmio_bus_routes_by_range_with_offsets():
    seen = []
    bus = MmioBus(on_access=lambda *a: seen.append(a))
    a, b = Regs32(), Regs32()
    bus.register(0xFEE00000, 0x1000, a)
    bus.register(0xFEC00000, 0x20, b)
    bus.write(0xFEE00080, 4, 0x1_0000_0020)                 # masked to the access width
    assert bus.read(0xFEE00080, 4) == 0x20
    assert bus.read(0xFEC00010, 1) == 0x44 and bus.read(0xFEC00010, 2) == 0x3344
    assert a.log == [("w", 0x80, 4, 0x20), ("r", 0x80, 4)]
    assert b.log == [("r", 0x10, 1), ("r", 0x10, 2)]
    assert seen == [(0xFEE00080, 4, True, 0x20), (0xFEE00080, 4, False, 0x20),
                    (0xFEC00010, 1, False, 0x44), (0xFEC00010, 2, False, 0x3344)]
    with pytest.raises(ValueError):
        bus.register(0xFEE00800, 0x1000, b)                 # overlaps


def test_mmio_bus_splits_8_byte_accesses():
    bus = MmioBus()
    dev = Regs32()
    bus.register(0x1000, 0x100, dev)
    bus.write(0x1010, 8, 0xAABBCCDD_11223344)
    assert dev.log == [("w", 0x10, 4, 0x11223344), ("w", 0x14, 4, 0xAABBCCDD)]
    assert bus.read(0x1010, 8) == 0xAABBCCDD_11223344


def test_unmapped_gpa_reads_all_ones_and_is_recorded_once_at_512_mib(test_guest, tmp_path):
    """Page 0 and the top of 512 MiB are RAM; a page of the PCI hole (nothing there) reads all-ones,
    ignores writes and is reported once; the APIC's register is an `mmio` event at its instruction."""
    trace = tmp_path / "t.jsonl"
    res = run_guest(str(test_guest("memory")), mem_mib=512, trace_path=str(trace))
    assert (res.outcome, res.status) == ("exit", 0), res.console.decode()
    assert b"FAIL" not in res.console
    events = [json.loads(line) for line in trace.read_text().splitlines()[1:-1]]
    unbacked = [e for e in events if e["kind"] == "unbacked_memory"]
    assert [e["detail"]["gpa"] for e in unbacked] == ["0xfeb00000"]
    assert res.mmu["unbacked"] >= 2
    mmio = [e for e in events if e["kind"] == "mmio"]
    assert [(e["reason"], e["detail"]) for e in mmio] == [
        ("READ", {"gpa": "0xfee00030", "size": 4, "value": "0x50014"})]
    assert mmio[0]["insn"] == "mov eax, dword ptr [0xfee00030]"


def test_apic_page_is_a_device_not_ram():
    m = Machine(32)
    assert m.p2m.gpa_to_hpa(0xFEE00000) is None            # not RAM: the hypervisor never writes it
    assert m.p2m.mmio_to_hpa(0xFEE00000) is not None


# --- CPUID -----------------------------------------------------------------------------------------------

def test_cpuid_model():
    eax, ebx, ecx, edx = C.cpuid(0)
    assert eax == 1 and (ebx, edx, ecx) == (0x756E6547, 0x49656E69, 0x6C65746E)    # "GenuineIntel"
    eax, ebx, ecx, edx = C.cpuid(1)
    assert eax == 0x600 and ebx == 0                       # family 6 model 0; APIC ID 0
    assert ecx == 0                                        # no VMX (5), x2APIC (21), TSC deadline (24)
    assert edx == 0xA339                                   # FPU PSE TSC MSR CX8 APIC PGE CMOV
    assert not C.cpuid(1, apic_enabled=False)[3] & C.APIC
    assert C.cpuid(7) == C.cpuid(1)                        # above the maximum: the highest basic leaf
    assert C.cpuid(0x40000000) == C.cpuid(1)               # no hypervisor leaves either
    assert C.cpuid(0x80000000)[0] == 0x80000004
    assert C.cpuid(0x80000001) == (0, 0, 0, 0)             # no NX, no long mode, no SYSCALL
    brand = b"".join(r.to_bytes(4, "little") for leaf in (0x80000002, 0x80000003, 0x80000004)
                     for r in C.cpuid(leaf))
    assert brand.rstrip(b"\0") == C.BRAND
    assert C.cpuid(0x80000005) == C.cpuid(1)


# --- the machine: interrupt routing, MSRs ------------------------------------------------------------------

def test_machine_routes_the_8259_through_lint0_and_the_apic():
    m = Machine(32)
    apic, pic = m.apic, m.pic
    pic.write(0x21, 1, 0xFE)                               # unmask IRQ 0 (vector base 0x08 from SeaBIOS)
    pic.raise_irq(0)
    assert m.pending_interrupt() == 0x08                   # LINT0 ExtINT: the 8259 reaches the CPU
    apic.write(0x350, 4, 0x10700)                          # mask LINT0
    assert m.pending_interrupt() is None
    apic.write(0x300, 4, 0x40041)                          # a self-IPI
    assert m.pending_interrupt() == 0x41 and m.acknowledge_interrupt() == 0x41
    apic.write(0x350, 4, 0x700)
    apic.write(0x300, 4, 0x40061)
    assert m.acknowledge_interrupt() == 0x08               # ExtINT first: it ignores APIC priorities
    assert m.acknowledge_interrupt() == 0x61
    m.wrmsr(0x1B, 0xFEE00000)                              # APIC globally disabled: the 8259 direct
    pic.write(0x20, 1, 0x20)
    pic.raise_irq(0)
    pic.lower_irq(0)
    pic.raise_irq(0)
    assert m.pending_interrupt() == 0x08


def test_machine_timer_deadlines_skip_a_pit_that_cannot_interrupt():
    m = Machine(32)
    assert m.next_timer_deadline() == m.pit.next_deadline()     # SeaBIOS leaves IRQ 0 unmasked
    m.pic.write(0x21, 1, 0xFF)
    assert m.next_timer_deadline() is None                 # masked: its edges only latch the IRR
    m.apic.write(0x3E0, 4, 0xB)
    m.apic.write(0x320, 4, 0x40)
    m.apic.write(0x380, 4, 1000)
    assert m.next_timer_deadline() == m.clock.now + 1000
    m.apic.write(0x350, 4, 0x10700)                        # LINT0 masked: the 8259 is cut off
    m.pic.write(0x21, 1, 0xFE)
    assert m.next_timer_deadline() == m.clock.now + 1000


def test_machine_msrs_and_cpuid():
    m = Machine(32)
    assert m.rdmsr(0x1B) == 0xFEE00900
    assert m.cpuid(1)[3] & C.APIC
    with pytest.raises(MsrFault):
        m.wrmsr(0x1B, 0xFEE00900 | 1 << 10)
    with pytest.raises(MsrFault):
        m.rdmsr(0x10)
    m.wrmsr(0x1B, 0xFEE00100)
    assert not m.cpuid(1)[3] & C.APIC                      # SDM 10.4.3: CPUID follows the global enable


# --- Multiboot modules and the command line, end to end -----------------------------------------------------

def cpuvirt(*args, **kw):
    return subprocess.run([sys.executable, "-m", "cpuvirt", *map(str, args)], capture_output=True,
                          timeout=120, **kw)


@pytest.fixture
def modules(tmp_path):
    (tmp_path / "m1.txt").write_bytes(b"first module\n")
    (tmp_path / "m2.bin").write_bytes(bytes(range(7, 107)))
    return tmp_path


def test_module_and_append_reach_the_guest(test_guest, modules):
    image = test_guest("bootinfo")
    p = cpuvirt("run", image, "--module", "m1.txt", "--module", "m2.bin,arg1 arg2,x", "--append",
                "hello world", "-q", cwd=modules)
    assert p.returncode == 0, p.stderr
    assert p.stdout.decode().splitlines() == [
        f"cmdline={image} hello world",                    # the kernel as named, as QEMU does
        "module=m1.txt size=13 first byte=66",
        "module=m2.bin arg1 arg2,x size=100 first byte=07"]


def test_apic_guest_prints_its_module_and_command_line():
    from cpuvirt.toolchain.build import guest_source_dir
    p = cpuvirt("run", "apic", "--module", "apic.module,a b", "--append", "x=1", "-q", cwd=guest_source_dir())
    assert p.returncode == 0, p.stderr
    out = p.stdout.decode()
    assert "kernel command line (after the kernel's name): x=1\n" in out
    assert "modules: 1\nmodule 0 command line (after its file name): a b\n" in out
    assert "module 0 first line: cpuvirt apic guest module: hello from module 0\n" in out
    assert "FAIL" not in out


@requires_qemu
def test_module_layout_equals_qemu(test_guest, modules):
    image = test_guest("bootinfo")
    ours = cpuvirt("run", image, "--module", "m1.txt", "--module", "m2.bin,arg1 arg2", "--append", "a b",
                   "-q", cwd=modules)
    theirs = subprocess.run(QEMU + ["-kernel", str(image), "-initrd", "m1.txt,m2.bin arg1 arg2", "-append", "a b"],
                            capture_output=True, timeout=60, stdin=subprocess.DEVNULL, cwd=modules)
    assert ours.returncode == 0 and theirs.returncode == 1
    assert ours.stdout == theirs.stdout


def test_bad_module_path_is_one_line(modules):
    p = cpuvirt("run", "hello", "--module", "missing.bin,arg", cwd=modules)
    assert p.returncode == 2
    err = p.stderr.decode().strip()
    assert err == "cpuvirt: --module missing.bin: No such file or directory"


def test_512_mib_boots():
    p = cpuvirt("run", "hello", "--mem", "512", "-q")
    assert p.returncode == 0 and b"PASS hello" in p.stdout
    assert cpuvirt("run", "hello", "--mem", "513", "-q").returncode == 2


@pytest.mark.parametrize("mode,vmx", [("native", []), ("hw", []), ("hw", ["msr_bitmap=0x1b"])])
def test_ia32_apic_base_reaches_the_platform_in_every_mode(test_guest, mode, vmx):
    from cpuvirt.runner import run_guest
    res = run_guest(str(test_guest("apic_base_msr")), mode, mode_options={"vmx": vmx} if mode == "hw" else None)
    assert res.outcome == "exit" and res.status == 0, res.console
    assert b"PASS IA32_APIC_BASE" in res.console
