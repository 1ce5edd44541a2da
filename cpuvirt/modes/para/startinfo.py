"""The pages a PV guest is started with (docs/pv-abi.md section 2): where they go and what is in them.

Layouts are Xen's x86_32 ones (`struct start_info`, `struct shared_info`, the hypercall page),
plus a small cpuvirt block in start_info (the hypercall page's address: Xen gives it by ELF note).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

PAGE = 0x1000
XEN_MAGIC = b"xen-3.0-x86_32"
HYPERCALL_VECTOR = 0x82
NR_SLOTS = 128
IRET = 23

# start_info field offsets (xen.h, x86_32)
SI_NR_PAGES, SI_SHARED_INFO, SI_FLAGS, SI_CONSOLE_MFN, SI_CONSOLE_EVTCHN = 32, 36, 40, 52, 56
SI_PT_BASE, SI_NR_PT_FRAMES, SI_MFN_LIST, SI_MOD_START, SI_MOD_LEN, SI_CMD_LINE = 60, 64, 68, 72, 76, 80
MAX_GUEST_CMDLINE = 1024
SI_EXT = 0x800  # cpuvirt block: hypercall_page, shared_info_va, boot_gdt_va, boot_gdt_entries,
#                    first_free_pfn, hypervisor_virt_start, multiboot_info, boot_stack_top

# shared_info offsets (xen.h, arch-x86/xen-x86_32.h): vcpu_info[0] first, 64 bytes each
VCPU_UPCALL_PENDING, VCPU_UPCALL_MASK, VCPU_PENDING_SEL, VCPU_CR2, VCPU_TIME = 0, 1, 4, 8, 32
EVTCHN_PENDING, EVTCHN_MASK = 2048, 2176

CONSOLE_PORT = 1

# Boot GDT selectors: Xen's FLAT_RING1_CS... without the 0xe000 private-slice base.
FLAT_RING1_CS, FLAT_RING1_DS, FLAT_RING3_CS, FLAT_RING3_DS = 0x19, 0x21, 0x2B, 0x33
BOOT_GDT = (
    0,
    0,
    0,
    0x00CFBA000000FFFF,  # 0x18: code, DPL 1, accessed bit set below
    0x00CFB2000000FFFF,  # 0x20: data, DPL 1
    0x00CFFA000000FFFF,  # 0x28: code, DPL 3
    0x00CFF2000000FFFF,
)  # 0x30: data, DPL 3
DESC_ACCESSED = 1 << 40


def hypercall_page() -> bytes:
    """Slot nr: `mov eax, nr; int 0x82; ret`; slot 23 (iret): `push eax; mov eax, 23; int 0x82`."""
    page = bytearray(b"\xcc" * PAGE)
    for nr in range(NR_SLOTS):
        if nr == IRET:
            code = b"\x50\xb8" + struct.pack("<I", nr) + bytes((0xCD, HYPERCALL_VECTOR))
        else:
            code = b"\xb8" + struct.pack("<I", nr) + bytes((0xCD, HYPERCALL_VECTOR, 0xC3))
        page[nr * 32 : nr * 32 + len(code)] = code
    # An `iretd` the iret hypercall resumes at (after slot 127: never a hypercall entry).
    page[IRET_STUB : IRET_STUB + 1] = b"\xcf"
    return bytes(page)


IRET_STUB = IRET * 32 + 16


@dataclass
class Layout:
    """Guest-physical addresses (= virtual at entry: 1:1) of the pages the hypervisor builds."""

    start_info: int
    shared_info: int
    hypercall: int
    gdt: int
    stack: int
    l2: int
    l1: list[int]
    mfn_list: int
    first_free: int

    @staticmethod
    def plan(top: int, nr_pages: int) -> Layout:
        """Pages from the first page boundary at or above `top` (image, bss and modules end)."""
        a = (top + PAGE - 1) & ~(PAGE - 1)
        nr_l1 = (nr_pages + 1023) // 1024
        mfn_pages = (nr_pages * 4 + PAGE - 1) // PAGE
        l1 = [a + (6 + i) * PAGE for i in range(nr_l1)]
        mfn_list = a + (6 + nr_l1) * PAGE
        return Layout(
            a,
            a + PAGE,
            a + 2 * PAGE,
            a + 3 * PAGE,
            a + 4 * PAGE,
            a + 5 * PAGE,
            l1,
            mfn_list,
            mfn_list + mfn_pages * PAGE,
        )


def start_info(lay: Layout, nr_pages: int, mfn_of, mbi: int, cmdline: bytes, module) -> bytes:
    si = bytearray(PAGE)
    si[0 : len(XEN_MAGIC)] = XEN_MAGIC
    struct.pack_into("<II", si, SI_NR_PAGES, nr_pages, mfn_of(lay.shared_info) << 12)
    struct.pack_into("<I", si, SI_CONSOLE_EVTCHN, CONSOLE_PORT)
    struct.pack_into("<III", si, SI_PT_BASE, lay.l2, 1 + len(lay.l1), lay.mfn_list)
    if module is not None:
        struct.pack_into("<II", si, SI_MOD_START, module[0], module[1] - module[0])
    cmd = cmdline[: MAX_GUEST_CMDLINE - 1]
    si[SI_CMD_LINE : SI_CMD_LINE + len(cmd)] = cmd
    from cpuvirt.xen import HYPERVISOR_VIRT_START

    struct.pack_into(
        "<8I",
        si,
        SI_EXT,
        lay.hypercall,
        lay.shared_info,
        lay.gdt,
        len(BOOT_GDT),
        lay.first_free >> 12,
        HYPERVISOR_VIRT_START,
        mbi,
        lay.stack + PAGE,
    )
    return bytes(si)


def shared_info() -> bytes:
    sh = bytearray(PAGE)
    sh[VCPU_UPCALL_MASK] = 1
    # vcpu_time_info: system time (ns) = ((tsc - 0) << 1) * 0x80000000 >> 32 = tsc
    struct.pack_into("<IIQQIb", sh, VCPU_TIME, 0, 0, 0, 0, 0x80000000, 1)
    return bytes(sh)


def boot_gdt() -> bytes:
    return struct.pack(f"<{len(BOOT_GDT)}Q", *(d | DESC_ACCESSED if d else 0 for d in BOOT_GDT))
