"""PCI bus 0 (machine/pci.py): configuration mechanism #1, the bridges QEMU has, BAR sizing and moves,
the capability list, INTx routing through the PIIX3 into a level-triggered 8259 input."""
from __future__ import annotations

import pytest

from cpuvirt.machine.machine import Machine
from tests.conftest import requires_qemu
from cpuvirt.virtio.setup import DeviceSpec, attach_devices


def machine_with(n_nics: int = 1) -> tuple[Machine, list]:
    m = Machine(32)
    transports, _ = attach_devices(m, [DeviceSpec("virtio-net")] * n_nics)
    m.pci.firmware_setup()
    return m, transports


def cfg_read(m, slot, offset, size=4, fn=0, bus=0, enable=True):
    m.bus.write(0xCF8, 4, (0x80000000 if enable else 0) | bus << 16 | slot << 11 | fn << 8 | (offset & 0xFC))
    return m.bus.read(0xCFC + (offset & 3), size)


def cfg_write(m, slot, offset, value, size=4):
    m.bus.write(0xCF8, 4, 0x80000000 | slot << 11 | (offset & 0xFC))
    m.bus.write(0xCFC + (offset & 3), size, value)


def test_bridges_have_qemus_ids_and_the_command_register_seabios_leaves():
    m, _ = machine_with(0)
    assert cfg_read(m, 0, 0) == 0x12378086 and cfg_read(m, 0, 8) == 0x06000002      # i440FX, rev 2
    assert cfg_read(m, 1, 0) == 0x70008086 and cfg_read(m, 1, 8) == 0x06010000      # PIIX3
    assert cfg_read(m, 0, 4) == 0x00000103 and cfg_read(m, 1, 4) == 0x02000103      # as measured under QEMU
    assert cfg_read(m, 1, 0x0E, 1) & 0x80                                           # multifunction
    assert [cfg_read(m, 1, 0x60 + i, 1) for i in range(4)] == [10, 10, 11, 11]      # PIRQA-D routing


def test_mechanism_1_enable_bit_absent_functions_and_access_widths():
    m, _ = machine_with(1)
    assert cfg_read(m, 2, 0, enable=False) == 0xFFFFFFFF        # enable bit clear: nothing answers
    assert cfg_read(m, 7, 0) == 0xFFFFFFFF                      # empty slot
    assert cfg_read(m, 2, 0, fn=1) == 0xFFFFFFFF                # function 1
    assert cfg_read(m, 2, 0, bus=1) == 0xFFFFFFFF               # bus 1
    assert cfg_read(m, 2, 0, 2) == 0x1AF4 and cfg_read(m, 2, 2, 2) == 0x1000
    assert cfg_read(m, 2, 3, 1) == 0x10
    m.bus.write(0xCF8, 4, 0x80001000)
    assert m.bus.read(0xCF8, 4) == 0x80001000
    assert m.bus.read(0xCF8, 2) == 0xFFFF                       # CONFIG_ADDRESS: dword accesses only
    m.bus.write(0xCF8, 2, 0)
    assert m.bus.read(0xCF8, 4) == 0x80001000


def test_virtio_net_header_as_under_qemu_and_slots_follow_device_order():
    m, (a, b) = machine_with(2)
    for slot, line, io in ((2, 10, 0xC000), (3, 11, 0xC020)):
        assert cfg_read(m, slot, 0) == 0x10001AF4
        assert cfg_read(m, slot, 4) == 0x00100103               # status: capability list; I/O, memory, SERR
        assert cfg_read(m, slot, 8) == 0x02000000
        assert cfg_read(m, slot, 0x2C) == 0x00011AF4            # subsystem: virtio type 1 (network)
        assert cfg_read(m, slot, 0x34, 1) == 0x40
        assert cfg_read(m, slot, 0x3C, 2) == 0x0100 | line      # pin A -> PIRQ (slot - 1) & 3 -> IRQ
        assert cfg_read(m, slot, 0x10) == io | 1
    assert cfg_read(m, 2, 0x14) & 0xFFF == 0 and cfg_read(m, 2, 0x14) < 0xFEC00000
    assert a.device.mac != b.device.mac                         # 52:54:00:12:34:56, then ...:57


def test_bar_sizing_and_a_moved_bar_moves_the_device():
    m, (t,) = machine_with(1)
    assert m.bus.read(0xC000, 4) == t.device.host_features()
    cfg_write(m, 2, 0x10, 0xFFFFFFFF)
    assert cfg_read(m, 2, 0x10) == 0xFFFFFFE1                   # 32 bytes of I/O space
    assert m.bus.read(0xC000, 4) == 0xFFFFFFFF                  # not decoded while being sized
    cfg_write(m, 2, 0x10, 0xD000)
    assert cfg_read(m, 2, 0x10) == 0xD001
    assert m.bus.read(0xD000, 4) == t.device.host_features()
    assert m.bus.read(0xC000, 4) == 0xFFFFFFFF
    cfg_write(m, 2, 0x14, 0xFFFFFFFF)
    assert cfg_read(m, 2, 0x14) == 0xFFFFF000                   # 4 KiB memory BAR
    cfg_write(m, 2, 0x14, 0xFEB00000)
    assert m.mmio.find(0xFEB00000)[0] == 0xFEB00000 and m.p2m.mmio_to_hpa(0xFEB00000) is not None
    m.mmio.write(0xFEB00000, 4, 0xFEE00000)                     # MSI-X table entry 0 address
    assert m.mmio.read(0xFEB00000, 4) == 0xFEE00000
    cfg_write(m, 2, 0x14, 0xFEA00000)
    assert m.mmio.read(0xFEA00000, 4) == 0xFEE00000             # the table moved with its BAR
    assert m.mmio.find(0xFEB00000) is None and m.p2m.mmio_to_hpa(0xFEB00000) is None


def test_expansion_rom_bar_is_sized_and_assigned_as_seabios_does_but_not_decoded():
    m, _ = machine_with(2)
    assert [cfg_read(m, s, 0x30) for s in (2, 3)] == [0xFEB40000, 0xFEB80000]   # 256 KiB each, disabled
    assert [cfg_read(m, s, 0x14) for s in (2, 3)] == [0xFEBC0000, 0xFEBC1000]   # then the MSI-X BARs
    cfg_write(m, 2, 0x30, 0xFFFFFFFF)
    assert cfg_read(m, 2, 0x30) == 0xFFFC0001
    assert m.mmio.find(0xFFFC0000) is None


@requires_qemu
@pytest.mark.parametrize("nics", [1, 2])
def test_bus_0_reads_as_under_qemu(nics, test_guest):
    """tests/guests/pciprobe.S dumps every function's header, capability list and BAR size masks: the
    same bytes under QEMU 7.2 + SeaBIOS with the same NICs."""
    from tests.qemu import assert_same_console_as_qemu
    image = test_guest("pciprobe")
    extra = []
    for i in range(nics):
        extra += ["-netdev", f"user,id=n{i}", "-device", f"virtio-net-pci,netdev=n{i},disable-modern=on"]
    console = assert_same_console_as_qemu(image, [DeviceSpec("virtio-net")] * nics, extra)
    assert console.count(b"\ndev ") + console.startswith(b"dev ") == 2 + nics


def test_command_register_turns_decoding_off_and_on():
    m, (t,) = machine_with(1)
    cfg_write(m, 2, 4, 0x0000, 2)
    assert m.bus.read(0xC000, 4) == 0xFFFFFFFF
    assert m.mmio.find(cfg_read(m, 2, 0x14)) is None
    cfg_write(m, 2, 4, 0x0003, 2)
    assert m.bus.read(0xC000, 4) == t.device.host_features()


def test_capability_list_is_msix_with_its_table_and_pba_in_bar1():
    m, _ = machine_with(1)
    cap = cfg_read(m, 2, 0x34, 1)
    header = cfg_read(m, 2, cap)
    assert header & 0xFF == 0x11 and (header >> 8) & 0xFF == 0     # MSI-X, end of list
    assert (header >> 16) & 0x7FF == 3                              # 4 vectors, as QEMU's
    assert cfg_read(m, 2, cap + 4) == 0x00000001                    # table: BAR1 offset 0
    assert cfg_read(m, 2, cap + 8) == 0x00000801                    # PBA: BAR1 offset 0x800
    cfg_write(m, 2, cap + 4, 0x12345678)                            # read-only
    assert cfg_read(m, 2, cap + 4) == 0x00000001


def test_intx_is_level_triggered_on_the_routed_irq_until_the_isr_is_read():
    m, (t,) = machine_with(1)
    slave = m.pic.slave
    assert slave.elcr & (1 << 2)                                # IRQ 10 level (SeaBIOS's ELCR)
    assert m.bus.read(0x4D1, 1) == 0x0C
    t._interrupt(1, 0xFFFF, queue=0)
    assert slave.irr & (1 << 2)
    assert cfg_read(m, 2, 6, 2) & 0x08                          # status: interrupt pending
    assert m.bus.read(0xC000 + 19, 1) == 1                      # ISR read clears it ...
    assert not slave.irr & (1 << 2)                             # ... and the line (level) falls
    assert not cfg_read(m, 2, 6, 2) & 0x08
    assert m.bus.read(0xC000 + 19, 1) == 0
    cfg_write(m, 2, 4, 0x0503, 2)                               # INTx disable
    t._interrupt(1, 0xFFFF, queue=0)
    assert not slave.irr & (1 << 2)
    cfg_write(m, 2, 4, 0x0103, 2)
    assert slave.irr & (1 << 2)                                 # still asserted: it shows again


def test_level_request_stays_in_the_irr_after_inta_while_the_line_is_high():
    m, _ = machine_with(0)
    pic = m.pic
    for port, value in ((0x20, 0x11), (0x21, 0x20), (0x21, 4), (0x21, 1), (0xA0, 0x11), (0xA1, 0x28),
                        (0xA1, 2), (0xA1, 1), (0x21, 0xFB), (0xA1, 0xFB)):
        pic.write(port, 1, value)
    assert pic.slave.elcr == 0x0C                               # ICW1 does not reset the ELCR
    pic.raise_irq(10)
    assert pic.acknowledge() == 0x2A
    assert pic.slave.irr & 4                                    # level: not cleared by INTA
    pic.write(0xA0, 1, 0x20)
    pic.write(0x20, 1, 0x20)
    assert pic.pending_vector() == 0x2A                         # EOI with the line high: again
    pic.lower_irq(10)
    assert not pic.slave.irr & 4                                # the request follows the line, so the
    assert pic.acknowledge() == 0x2F                            # latched cascade edge finds nothing: the
    assert pic.pending_vector() is None                         # slave's spurious IRQ 15 (as QEMU's i8259)


def test_msi_message_reaches_the_local_apic():
    m, _ = machine_with(0)
    assert m.send_msi(0xFEE00000, 0x45)
    assert m.apic.irr >> 0x45 & 1
    assert not m.send_msi(0xFEC00000, 0x46)                     # not the APIC's window
    assert not m.send_msi(0xFEE01000, 0x47)                     # APIC ID 1: no such CPU


def test_conflicting_bar_is_not_decoded():
    m, (a, b) = machine_with(2)
    cfg_write(m, 3, 0x10, 0xC000)                               # onto the first NIC's registers
    assert m.bus.read(0xC000, 4) == a.device.host_features()    # the first keeps them
    assert b.bars[0].mapped is None


@pytest.mark.parametrize("text", ["virtio-blk", "virtio-net,mac=zz", "virtio-net,peer=tap", "virtio-net,foo=1",
                                  "virtio-net,mac"])
def test_bad_device_specs_are_input_errors(text):
    from cpuvirt.errors import CpuvirtError
    from cpuvirt.virtio.setup import parse_device
    with pytest.raises(CpuvirtError, match="--device"):
        parse_device(text)
