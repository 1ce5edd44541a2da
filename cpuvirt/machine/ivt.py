"""The real-address-mode interrupt vector table as the firmware leaves it (SeaBIOS under QEMU).

A Multiboot kernel starts in protected mode, but one that goes back to real mode (kvm-unit-tests'
`realmode`) finds the BIOS's IVT at 0000:0000 (SDM Vol. 3A 20.1.4: 256 four-byte far pointers, offset
then segment). SeaBIOS's `ivt_init` points every vector at a lone `iret` (F000:FF53, the address the
IBM PC BIOS made official) and the hardware-interrupt vectors at handlers that acknowledge the 8259
(master: vectors 08h-0Fh for IRQ 0-7; slave: 70h-77h for IRQ 8-15). With the PIT running and IRQ 0
unmasked (as the firmware leaves them), a real-mode `sti; hlt` is woken by the timer tick and goes on;
with an empty IVT it would jump to 0000:0000 and run the table itself as code.

Modelled: those three handlers, no more. Not modelled: BIOS services (int 10h, 13h, 15h...: they
return at once, with nothing done and no flags changed) and the BDA tick count that SeaBIOS's IRQ 0
handler keeps at 0040:006C.
"""

from __future__ import annotations

import struct

BIOS_SEGMENT = 0xF000
IRET_OFFSET = 0xFF53  # F000:FF53 `iret`, every vector's default
MASTER_EOI_OFFSET = 0xFE00  # IRQ 0-7: EOI to the master 8259, then iret
SLAVE_EOI_OFFSET = 0xFE10  # IRQ 8-15: EOI to the slave, then to the master, then iret
MASTER_VECTORS = range(0x08, 0x10)
SLAVE_VECTORS = range(0x70, 0x78)

# 16-bit code (SDM Vol. 2 opcodes): push ax; mov al, 20h; out 20h, al; pop ax; iret
MASTER_EOI = bytes((0x50, 0xB0, 0x20, 0xE6, 0x20, 0x58, 0xCF))
# push ax; mov al, 20h; out 0A0h, al; out 20h, al; pop ax; iret
SLAVE_EOI = bytes((0x50, 0xB0, 0x20, 0xE6, 0xA0, 0xE6, 0x20, 0x58, 0xCF))
IRET = b"\xcf"


def _linear(offset: int) -> int:
    return (BIOS_SEGMENT << 4) + offset


def handler(vector: int) -> tuple[int, int]:
    """(segment, offset) the firmware's IVT holds for `vector`."""
    if vector in MASTER_VECTORS:
        return BIOS_SEGMENT, MASTER_EOI_OFFSET
    if vector in SLAVE_VECTORS:
        return BIOS_SEGMENT, SLAVE_EOI_OFFSET
    return BIOS_SEGMENT, IRET_OFFSET


def ivt_blobs() -> list[tuple[int, bytes]]:
    """(guest-physical address, bytes): the table at 0 and its three handlers in the BIOS segment."""
    table = b"".join(struct.pack("<HH", off, seg) for seg, off in (handler(v) for v in range(256)))
    return [
        (0, table),
        (_linear(IRET_OFFSET), IRET),
        (_linear(MASTER_EOI_OFFSET), MASTER_EOI),
        (_linear(SLAVE_EOI_OFFSET), SLAVE_EOI),
    ]
