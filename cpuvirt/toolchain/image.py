"""Multiboot v1 images: a flat binary whose header uses the a.out kludge (flag bit 16).

Layout of every image this toolchain makes, all at physical 0x100000 (1 MiB):

    0x100000  Multiboot header (32 bytes): magic, flags, checksum, header_addr, load_addr,
              load_end_addr, bss_end_addr, entry_addr
    0x100020  the guest's .text, then .data          <- stored in the file
    ...       .bss (zeroed by the loader)            <- not stored: load_end_addr..bss_end_addr

The header is assembled together with the guest (as the first statements of its .text) so that its
address fields are the guest's own labels (``_start``, ``__bss_start``, ``__bss_end``), and so that
the whole image is assembled at a page-aligned base (keystone's ``.align`` is relative to the base).
Flags: bit 0 (modules page-aligned), bit 1 (memory information wanted), bit 16 (address fields valid).
Nothing in an image depends on time or on the build machine: the same source gives the same bytes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Iterable

from cpuvirt.errors import GuestBuildError, MultibootError
from cpuvirt.toolchain.assemble import Assembly, assemble
from cpuvirt.toolchain.preprocess import SourceLine

MULTIBOOT_MAGIC = 0x1BADB002
MULTIBOOT_BOOTLOADER_MAGIC = 0x2BADB002  # in EAX at entry
FLAG_PAGE_ALIGN = 1 << 0
FLAG_MEMORY_INFO = 1 << 1
FLAG_VIDEO_MODE = 1 << 2
FLAG_AOUT_KLUDGE = 1 << 16
FLAGS = FLAG_PAGE_ALIGN | FLAG_MEMORY_INFO | FLAG_AOUT_KLUDGE
LOAD_ADDR = 0x100000
HEADER_SIZE = 32
HEADER_SEARCH_LIMIT = 8192
ENTRY_SYMBOL = "_start"
HEADER_FILE = "<multiboot header>"


def checksum(flags: int = FLAGS) -> int:
    return (-(MULTIBOOT_MAGIC + flags)) & 0xFFFFFFFF


def header_lines(entry: str = ENTRY_SYMBOL) -> list[SourceLine]:
    """The header as assembler lines, to be placed first in the image's .text."""
    text = [
        ".text",
        "__multiboot_header:",
        f".long {MULTIBOOT_MAGIC:#010x}  # magic",
        f".long {FLAGS:#010x}  # flags: page-align, memory info, a.out kludge",
        f".long {checksum():#010x}  # checksum: magic + flags + checksum = 0",
        ".long __multiboot_header  # header_addr",
        f".long {LOAD_ADDR:#x}  # load_addr",
        ".long __bss_start  # load_end_addr",
        ".long __bss_end  # bss_end_addr",
        f".long {entry}  # entry_addr",
    ]
    return [SourceLine(HEADER_FILE, i + 1, t) for i, t in enumerate(text)]


@dataclass(frozen=True)
class MultibootHeader:
    offset: int  # file offset of the header
    magic: int
    flags: int
    checksum: int
    header_addr: int
    load_addr: int
    load_end_addr: int
    bss_end_addr: int
    entry_addr: int


def find_header(image: bytes) -> MultibootHeader:
    """Find and check the Multiboot v1 header of a flat (a.out kludge) image; MultibootError if bad."""
    limit = min(len(image), HEADER_SEARCH_LIMIT)
    for off in range(0, limit - 11, 4):
        magic, flags, csum = struct.unpack_from("<III", image, off)
        if magic != MULTIBOOT_MAGIC:
            continue
        if (magic + flags + csum) & 0xFFFFFFFF:
            raise MultibootError(f"Multiboot header at offset {off:#x}: bad checksum")
        if not flags & FLAG_AOUT_KLUDGE:
            return MultibootHeader(off, magic, flags, csum, 0, 0, 0, 0, 0)
        if off + HEADER_SIZE > len(image):
            raise MultibootError("Multiboot header truncated")
        h = MultibootHeader(off, magic, flags, csum, *struct.unpack_from("<IIIII", image, off + 12))
        if h.header_addr - h.load_addr != off:
            raise MultibootError("Multiboot header: header_addr - load_addr is not the header's file offset")
        if h.load_end_addr and not h.load_addr < h.load_end_addr <= h.load_addr + len(image):
            raise MultibootError("Multiboot header: load_end_addr outside the file")
        if h.bss_end_addr and h.bss_end_addr < (h.load_end_addr or h.load_addr + len(image)):
            raise MultibootError("Multiboot header: bss_end_addr below load_end_addr")
        end = h.load_end_addr or h.load_addr + len(image)
        if not h.load_addr <= h.entry_addr < end:
            raise MultibootError("Multiboot header: entry_addr outside the loaded image")
        return h
    raise MultibootError("no Multiboot v1 header in the first 8 KiB")


def make_image(asm: Assembly) -> bytes:
    """The image file's bytes for an assembly that begins with header_lines()."""
    data = asm.load_bytes
    h = find_header(data)
    if h.offset != 0 or h.load_addr != asm.base or h.load_end_addr != asm.bss_start or h.bss_end_addr != asm.bss_end:
        raise MultibootError("internal error: the Multiboot header does not describe its own image")
    return data


def build_image(lines: Iterable[SourceLine], entry: str = ENTRY_SYMBOL) -> tuple[bytes, Assembly]:
    """Assemble preprocessed guest lines behind a Multiboot header at 0x100000: (image, assembly)."""
    lines = list(lines)
    try:
        asm = assemble(header_lines(entry) + lines, LOAD_ADDR)
    except GuestBuildError as e:
        if str(e).startswith(HEADER_FILE) and f"'{entry}'" in str(e):
            first = lines[0].where if lines else "<source>:1"
            raise GuestBuildError(f"{first}: no '{entry}:' label (the Multiboot entry point)") from None
        raise
    return make_image(asm), asm
