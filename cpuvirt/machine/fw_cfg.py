"""QEMU's firmware configuration device (fw_cfg) on I/O ports 0x510 (selector) and 0x511 (data).

Follows QEMU's docs/specs/fw_cfg and `hw/nvram/fw_cfg.c` (QEMU 7.2), its reference
implementation, and what a probe kernel measured under QEMU 7.2:

- A 16-bit write to port 0x510 selects an item and sets the data offset to 0. The key's bit 14 (the
  old write channel) is ignored; bit 15 selects the architecture-specific items.
- Each 8-bit read of port 0x511 (or of 0x510: QEMU maps both ports onto one two-byte region whose
  byte reads are data reads) returns the item's next byte; past the end of the item, and for
  every key that names no item, reads return 0.
- 8-bit writes (data writes, removed in QEMU 2.4) are ignored; so are 32-bit writes and a
  16-bit write at 0x511 (QEMU truncates it to a byte). 16- and 32-bit reads return 0 and do not
  move the offset (QEMU accepts only byte reads on these ports).

Items (little-endian integers, as QEMU stores them):

    0x0000 signature   "QEMU"
    0x0001 id          1: the traditional interface only (QEMU's pc machine says 3: it has DMA)
    0x0003 ram_size    guest RAM in bytes, 64-bit
    0x0005 nb_cpus     1, 16-bit
    0x000F max_cpus    1, 16-bit
    0x0019 file_dir    an empty directory: a big-endian count of 0

Under QEMU the directory lists some 14 files (bootorder, etc/e820, etc/acpi/tables, etc/sercon-port,
genroms/..., ...), and QEMU has more numbered items (uuid, nographic, boot_menu, the x86 items at
0x8000 and up: ACPI and SMBIOS tables, E820, HPET); they all read zeros here. The DMA interface
(port 0x514) is not modelled: its ports are unhandled (read all-ones).
"""

from __future__ import annotations

import struct

FW_CFG_PORT_SEL = 0x510
FW_CFG_PORT_DATA = 0x511

FW_CFG_SIGNATURE = 0x00
FW_CFG_ID = 0x01
FW_CFG_RAM_SIZE = 0x03
FW_CFG_NB_CPUS = 0x05
FW_CFG_MAX_CPUS = 0x0F
FW_CFG_FILE_DIR = 0x19

FW_CFG_WRITE_CHANNEL = 0x4000
FW_CFG_ARCH_LOCAL = 0x8000
FW_CFG_VERSION_TRADITIONAL = 0x01


class FwCfg:
    """The two ports; `items` maps a key (bit 14 clear) to its bytes."""

    def __init__(self, ram_bytes: int, cpus: int = 1):
        self.items: dict[int, bytes] = {
            FW_CFG_SIGNATURE: b"QEMU",
            FW_CFG_ID: struct.pack("<I", FW_CFG_VERSION_TRADITIONAL),
            FW_CFG_RAM_SIZE: struct.pack("<Q", ram_bytes),
            FW_CFG_NB_CPUS: struct.pack("<H", cpus),
            FW_CFG_MAX_CPUS: struct.pack("<H", cpus),
            FW_CFG_FILE_DIR: struct.pack(">I", 0),
        }
        self.select(FW_CFG_SIGNATURE)  # QEMU's reset selects the signature

    def select(self, key: int) -> None:
        self.key = key & 0xFFFF
        self.data = self.items.get(self.key & ~FW_CFG_WRITE_CHANNEL, b"")
        self.offset = 0

    def read(self, port: int, size: int) -> int:
        if size != 1:
            return 0
        offset = self.offset
        if offset >= len(self.data):
            return 0
        self.offset = offset + 1
        return self.data[offset]

    def write(self, port: int, size: int, value: int) -> None:
        if size == 2 and port == FW_CFG_PORT_SEL:
            self.select(value)
