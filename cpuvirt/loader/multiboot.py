"""Multiboot v1 loader: kernel image -> guest-physical segments, and the boot information for EBX.

Implements the GNU Multiboot Specification 0.6.96, section 3, the way QEMU 7.2's
`hw/i386/multiboot.c` plus its `multiboot.bin` option ROM and SeaBIOS do it, since QEMU is the
reference for cpuvirt's guest ABI (DESIGN.md section 2). Where QEMU and the spec differ, the
docstring of the function concerned says which one is followed and why.

Measured under `qemu-system-i386 -m 32 -kernel k.elf -append "hello world" -initrd "modA.txt arg1,modB.bin"`
with a probe kernel (k.elf loaded at 0x100000..0x102690):

    EBX = 0x9500 (multiboot_info), mmap at 0x9000 (6 entries, 144 bytes), flags 0x24F,
    mem_lower 639, mem_upper 31616 (the top 128 KiB of RAM is reserved by SeaBIOS),
    boot_device 0x8000FFFF, mods_addr 0x103000, module strings 0x103020 and 0x10302E,
    cmdline 0x103037 = "k.elf hello world", boot_loader_name 0x103049 = "qemu",
    modules at 0x104000 and 0x105000 (page aligned), mod_end exclusive.

`build_boot_info` reproduces that layout byte for byte.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

from cpuvirt.errors import MultibootError

MULTIBOOT_HEADER_MAGIC = 0x1BADB002
"""Spec 3.1.2: the magic value of the OS image header."""

MULTIBOOT_BOOTLOADER_MAGIC = 0x2BADB002
"""Spec 3.2: the value in EAX when the kernel is entered."""

HEADER_SEARCH_LIMIT = 8192 - 48
"""Spec 3.1: the header lies in the first 8192 bytes. QEMU scans only offsets below 8192 - 48
(room for the longest, 48-byte, header); headers it would not find are not found here either."""

# Header flags, spec 3.1.2.
FLAG_PAGE_ALIGN = 1 << 0
FLAG_MEMORY_INFO = 1 << 1
FLAG_VIDEO_MODE = 1 << 2
FLAG_AOUT_KLUDGE = 1 << 16
_SUPPORTED_REQUIRED = FLAG_PAGE_ALIGN | FLAG_MEMORY_INFO | FLAG_VIDEO_MODE

# multiboot_info flags, spec 3.3.
INFO_MEMORY = 1 << 0
INFO_BOOT_DEVICE = 1 << 1
INFO_CMDLINE = 1 << 2
INFO_MODS = 1 << 3
INFO_MMAP = 1 << 6
INFO_BOOT_LOADER_NAME = 1 << 9
INFO_FLAGS = INFO_MEMORY | INFO_BOOT_DEVICE | INFO_CMDLINE | INFO_MODS | INFO_MMAP | INFO_BOOT_LOADER_NAME
"""0x24F: what QEMU always sets, MODS included even with no module (mods_count is then 0)."""

MMAP_ADDR = 0x9000
"""Where QEMU's option ROM stores the BIOS E820 map (its ADDR_E820_MAP)."""
MBI_ADDR = 0x9500
"""Where QEMU puts multiboot_info (its ADDR_MBI = ADDR_E820_MAP + 0x500); EBX points here."""
MBI_SIZE = 88
"""Bytes of multiboot_info up to and including the VBE fields (spec 3.3)."""

BOOT_DEVICE = 0x8000FFFF
"""Spec 3.3 boot_device: BIOS drive 0x80, no partition; QEMU's fixed value."""
BOOT_LOADER_NAME = "qemu"
"""Reported as QEMU reports it, so a guest printing it shows the same text on both."""

MEM_LOWER_KIB = 639
"""Spec 3.3 mem_lower: KiB of RAM below 640 KiB; SeaBIOS keeps 1 KiB at 0x9FC00 for its EBDA."""
FIRMWARE_RESERVED_TOP = 128 * 1024
"""SeaBIOS reserves the top 128 KiB of RAM (measured at -m 2 to 512): mem_upper and the memory
map leave it out, so a guest sees the same numbers under QEMU and cpuvirt."""

PAGE = 4096
LOW_MEMORY_END = 0x9FC00
"""End of conventional RAM; from here to 1 MiB are the EBDA, VGA memory and the BIOS ROM."""
HIGH_MEMORY = 0x100000

_BOOT_INFO = (MMAP_ADDR, MBI_ADDR + MBI_SIZE, "the boot-information area 0x9000-0x9557 (QEMU's too)")
_FORBIDDEN = (
    (0, PAGE, "page 0 (real-mode IVT and BIOS data area)"),
    (LOW_MEMORY_END, HIGH_MEMORY, "the 640 KiB - 1 MiB hole (EBDA, VGA, BIOS ROM)"),
)
"""Guest-physical ranges no kernel may be loaded into: the hole is not RAM, and page 0 is refused
so that a null pointer never lands in the kernel. A kernel over the boot-information area loads,
as under QEMU, whose option ROM writes the memory map and multiboot_info first and then copies the
kernel (file bytes and zeroed bss) over them (measured: a kernel at 0x8000 with bss over 0x9500 saw
flags 0; kvm-unit-tests' realmode.flat, at 0x8000-0xDA2F, runs): the kernel's bytes win, with a
warning. The command line and modules, placed above the kernel, may overlap none of these."""

_U32 = 1 << 32


@dataclass
class KernelImage:
    """A kernel ready to copy into guest RAM.

    `segments` holds the bytes read from the file, each as (guest-physical address, bytes);
    `bss` holds the ranges to zero-fill after them, as (guest-physical address, length), kept
    apart so that a huge bss costs no memory here. `lowest`..`highest` (exclusive) spans both.
    """

    segments: list[tuple[int, bytes]]
    bss: list[tuple[int, int]]
    entry: int
    lowest: int
    highest: int
    flags: int
    name: str = ""
    kind: str = "elf"
    """Which layout was loaded: "elf", or "aout-kludge" (the spec 3.1.3 address fields)."""
    header_offset: int = 0
    warnings: list[str] = field(default_factory=list)
    """Things QEMU warns about but boots anyway (for example the ignored video-mode request)."""


@dataclass
class BootInfo:
    """Boot information to copy into guest RAM before entry: EBX = `address`.

    `blobs` are (guest-physical address, bytes); `end` is the first page-aligned address after
    everything placed above the kernel (command lines, module list, modules).
    """

    address: int
    blobs: list[tuple[int, bytes]]
    end: int
    cmdline: str = ""
    modules: list[tuple[int, int, str]] = field(default_factory=list)
    """(mod_start, mod_end, string) for each module, as written into the module list."""


def load_image(data: bytes, name: str = "") -> KernelImage:
    """Parse a Multiboot v1 kernel (spec 3.1) into segments; MultibootError says what is wrong.

    Flag bit 16 selects the a.out-kludge address fields even when the file is an ELF, as QEMU
    does; otherwise the file must be an ELF32 i386 executable loaded by its PT_LOAD p_paddr.
    Required flag bits 3-15 are refused (spec 3.1.2: a loader must fail on a requirement it
    does not understand; QEMU ignores them); bit 2, the video mode, is ignored with a warning,
    as QEMU does ("multiboot knows VBE. we don't").
    """
    where = f"{name}: " if name else ""
    if not data:
        raise MultibootError(f"{where}empty file")
    if len(data) >= 0x206 and data[0x202:0x206] == b"HdrS":
        raise MultibootError(
            f'{where}this is a Linux kernel ("HdrS" at 0x202), which QEMU boots with the Linux protocol, not Multiboot'
        )
    offset, flags = _find_header(data, where)
    unsupported = flags & 0xFFFF & ~_SUPPORTED_REQUIRED
    if unsupported:
        raise MultibootError(
            f"{where}Multiboot header (flags {flags:#010x}) requires features {unsupported:#06x} "
            "this loader does not support (supported: bit 0 page-aligned modules, bit 1 memory "
            "information, bit 2 video mode is ignored)"
        )
    if flags & FLAG_AOUT_KLUDGE:
        image = _load_kludge(data, offset, flags, where)
    else:
        image = _load_elf(data, offset, flags, where)
    image.name = name
    if flags & FLAG_VIDEO_MODE:
        image.warnings.append(
            "the kernel asks for a video mode (Multiboot flag bit 2); it is ignored, as QEMU ignores it"
        )
    _check_placement(image, where)
    return image


def check_fits(image: KernelImage, mem_bytes: int) -> None:
    """Refuse a kernel that extends past the end of guest RAM."""
    if image.highest > mem_bytes:
        raise MultibootError(
            f"{_where(image)}the kernel occupies guest-physical {image.lowest:#x}-"
            f"{image.highest - 1:#x}, beyond the {mem_bytes // (1024 * 1024)} MiB of RAM "
            f"(ends at {mem_bytes:#x}); give more memory"
        )


def build_boot_info(
    image: KernelImage,
    mem_bytes: int,
    cmdline: str = "",
    modules: Sequence[tuple[bytes, str]] = (),
    kernel_name: str | None = None,
) -> BootInfo:
    """Lay out multiboot_info (spec 3.3) and everything it points to, as QEMU does.

    multiboot_info sits at 0x9500 and the memory map at 0x9000 (QEMU's addresses). Above the
    kernel, from the first page boundary after it: the module list (16 bytes each), each
    module's string, the kernel command line, the boot-loader name, then the modules, each
    page aligned (spec 3.1.2 bit 0). A module's string is what it was given with, e.g.
    "initrd.img arg" (QEMU passes each `-initrd` item whole). The kernel command line is, as
    under QEMU, the kernel's name, a space, then `cmdline` ("k.elf " when no -append);
    without a name it is just `cmdline`. The name is `kernel_name` when given (QEMU uses the
    -kernel argument as typed, path included), else `image.name`. QEMU aligns relative to the load
    address; here the alignment is absolute, which is the same for a page-aligned kernel and
    spec-correct for others.
    """
    where = _where(image)
    if mem_bytes < 2 * 1024 * 1024:
        raise MultibootError(f"{where}at least 2 MiB of RAM is needed, not {mem_bytes} bytes")
    name = image.name if kernel_name is None else kernel_name
    kernel_cmdline = f"{name} {cmdline}" if name else cmdline
    mod_strings = [_c_string(s, "module string", where) for _, s in modules]
    kernel_str = _c_string(kernel_cmdline, "command line", where)
    loader_str = _c_string(BOOT_LOADER_NAME, "boot loader name", where)

    info_base = _page_up(image.highest)
    mods_addr = info_base
    strings_addr = mods_addr + 16 * len(mod_strings)
    strings = bytearray()
    mod_string_addrs = []
    for c_string in mod_strings:
        mod_string_addrs.append(strings_addr + len(strings))
        strings += c_string
    cmdline_addr = strings_addr + len(strings)
    strings += kernel_str
    loader_addr = strings_addr + len(strings)
    strings += loader_str
    cursor = _page_up(strings_addr + len(strings))

    mod_list = bytearray()
    mod_blobs = []
    placed = []
    for (blob, s), s_addr in zip(modules, mod_string_addrs):
        start, end = cursor, cursor + len(blob)
        mod_list += struct.pack("<4I", start, end, s_addr, 0)
        mod_blobs.append((start, bytes(blob)))
        placed.append((start, end, s))
        cursor = _page_up(end)
    end = cursor

    if end > mem_bytes:
        raise MultibootError(
            f"{where}kernel, command line and modules need RAM up to {end:#x}, beyond the "
            f"{mem_bytes // (1024 * 1024)} MiB of RAM; give more memory"
        )
    for lo, hi, what in (*_FORBIDDEN, _BOOT_INFO):
        if info_base < hi and end > lo:
            raise MultibootError(
                f"{where}the command line and modules, placed above the "
                f"kernel at {info_base:#x}-{end - 1:#x}, would overlap {what}"
            )

    upper_end = mem_bytes - FIRMWARE_RESERVED_TOP
    mmap = b"".join(
        struct.pack("<IQQI", 20, base, length, kind)
        for base, length, kind in (
            (0, LOW_MEMORY_END, 1),
            (LOW_MEMORY_END, 0xA0000 - LOW_MEMORY_END, 2),
            (0xF0000, 0x10000, 2),
            (HIGH_MEMORY, upper_end - HIGH_MEMORY, 1),
            (upper_end, FIRMWARE_RESERVED_TOP, 2),
            (0xFFFC0000, 0x40000, 2),
        )
    )
    mbi = struct.pack(
        "<22I",
        INFO_FLAGS,
        MEM_LOWER_KIB,
        (upper_end - HIGH_MEMORY) // 1024,
        BOOT_DEVICE,
        cmdline_addr,
        len(mod_strings),
        mods_addr,
        0,
        0,
        0,
        0,
        len(mmap),
        MMAP_ADDR,
        0,
        0,
        0,
        loader_addr,
        0,
        0,
        0,
        0,
        0,
    )
    blobs = [(MMAP_ADDR, mmap), (MBI_ADDR, mbi), (info_base, bytes(mod_list + strings))]
    blobs += mod_blobs
    return BootInfo(address=MBI_ADDR, blobs=blobs, end=end, cmdline=kernel_cmdline, modules=placed)


def _find_header(data: bytes, where: str) -> tuple[int, int]:
    """Spec 3.1.1/3.1.2: the first 4-byte-aligned magic whose checksum holds; (offset, flags)."""
    limit = min(len(data) - 12, HEADER_SEARCH_LIMIT - 4)
    bad = None
    pos = data.find(b"\x02\xb0\xad\x1b", 0, limit + 4)
    while pos != -1 and pos <= limit:
        if pos % 4 == 0:
            magic, flags, checksum = struct.unpack_from("<3I", data, pos)
            total = (magic + flags + checksum) % _U32
            if total == 0:
                return pos, flags
            if bad is None:
                bad = (pos, total)
        pos = data.find(b"\x02\xb0\xad\x1b", pos + 1, limit + 4)
    if bad is not None:
        raise MultibootError(
            f"{where}Multiboot header at offset {bad[0]:#x} has a bad checksum "
            f"(magic + flags + checksum = {bad[1]:#010x}, must be 0 mod 2^32)"
        )
    raise MultibootError(
        f"{where}no Multiboot header (magic 0x1BADB002 at a 4-byte-aligned "
        "offset) in the first 8 KiB: not a Multiboot v1 kernel"
    )


def _load_kludge(data: bytes, offset: int, flags: int, where: str) -> KernelImage:
    """Spec 3.1.3 address fields: the file from load_addr's offset is copied to load_addr."""
    if offset + 32 > len(data):
        raise MultibootError(
            f"{where}Multiboot header at offset {offset:#x} sets flag bit 16 "
            "but the file ends before its address fields"
        )
    header_addr, load_addr, load_end, bss_end, entry = struct.unpack_from("<5I", data, offset + 12)
    if load_addr > header_addr:
        raise MultibootError(f"{where}Multiboot load_addr {load_addr:#x} is above header_addr {header_addr:#x}")
    if header_addr - load_addr > offset:
        raise MultibootError(
            f"{where}Multiboot header_addr - load_addr = {header_addr - load_addr:#x} exceeds "
            f"the header's file offset {offset:#x}: load_addr would lie before the file's start"
        )
    text_offset = offset - (header_addr - load_addr)
    if load_end:
        if load_end < load_addr:
            raise MultibootError(f"{where}Multiboot load_end_addr {load_end:#x} is below load_addr {load_addr:#x}")
        load_size = load_end - load_addr
        if text_offset + load_size > len(data):
            raise MultibootError(
                f"{where}file too short: load_addr..load_end_addr needs {load_size:#x} bytes "
                f"from file offset {text_offset:#x}, the file has {len(data):#x} bytes"
            )
    else:
        load_size = len(data) - text_offset
    if load_addr + load_size > _U32:
        raise MultibootError(
            f"{where}the kernel ({load_size:#x} bytes at {load_addr:#x}) does not fit in the 32-bit address space"
        )
    top = load_addr + load_size
    if bss_end:
        if bss_end < top:
            raise MultibootError(
                f"{where}Multiboot bss_end_addr {bss_end:#x} is below the end of the loaded data {top:#x}"
            )
        top = bss_end
    if not load_addr <= entry < load_addr + load_size:
        raise MultibootError(
            f"{where}entry_addr {entry:#x} is outside the loaded image {load_addr:#x}-{load_addr + load_size:#x}"
        )
    segments = [(load_addr, bytes(data[text_offset : text_offset + load_size]))]
    bss = [(load_addr + load_size, top - load_addr - load_size)] if top > load_addr + load_size else []
    return KernelImage(
        segments=segments,
        bss=bss,
        entry=entry,
        lowest=load_addr,
        highest=top,
        flags=flags,
        kind="aout-kludge",
        header_offset=offset,
    )


def _load_elf(data: bytes, offset: int, flags: int, where: str) -> KernelImage:
    """ELF32 i386 ET_EXEC: each PT_LOAD's p_filesz bytes at p_paddr, zeros up to p_memsz."""
    if data[:4] != b"\x7fELF":
        raise MultibootError(
            f"{where}not an ELF file, and the Multiboot header (flags "
            f"{flags:#010x}) does not set bit 16 to give load addresses"
        )
    if len(data) < 52:
        raise MultibootError(
            f"{where}truncated ELF: the file ({len(data)} bytes) is shorter than an ELF32 header (52 bytes)"
        )
    if data[4] != 1:
        raise MultibootError(
            f"{where}ELF class {data[4]} is not ELFCLASS32: give a 32-bit "
            'i386 kernel (QEMU: "Cannot load x86-64 image, give a 32bit one")'
        )
    if data[5] != 1:
        raise MultibootError(f"{where}ELF data encoding {data[5]} is not little-endian")
    e_type, e_machine = struct.unpack_from("<HH", data, 16)
    if e_machine != 3:
        raise MultibootError(f"{where}ELF machine {e_machine} is not i386 (EM_386 = 3)")
    if e_type != 2:
        raise MultibootError(
            f"{where}ELF type {e_type} is not an executable (ET_EXEC = 2): "
            "link the kernel statically at a fixed address (-static -no-pie)"
        )
    (e_phoff,) = struct.unpack_from("<I", data, 28)
    e_phentsize, e_phnum = struct.unpack_from("<HH", data, 42)
    if e_phnum and e_phentsize < 32:
        raise MultibootError(f"{where}malformed ELF: program header entry size {e_phentsize} is smaller than 32")
    if e_phoff + e_phnum * e_phentsize > len(data):
        raise MultibootError(
            f"{where}truncated ELF: the program headers ({e_phnum} at offset {e_phoff:#x}) run "
            f"past the end of the file ({len(data)} bytes)"
        )
    try:
        from elftools.elf.elffile import ELFFile  # only ELF kernels pay for pyelftools' import

        elf = ELFFile(io.BytesIO(data))
        entry = elf.header["e_entry"]
        loads = [
            (seg["p_paddr"], seg["p_offset"], seg["p_filesz"], seg["p_memsz"])
            for seg in elf.iter_segments()
            if seg["p_type"] == "PT_LOAD"
        ]
    except Exception as exc:  # pyelftools raises many types on malformed input
        raise MultibootError(f"{where}malformed or truncated ELF ({type(exc).__name__}: {exc})") from None

    segments, bss = [], []
    spans: list[tuple[int, int]] = []
    for paddr, p_offset, filesz, memsz in loads:
        if memsz == 0:
            continue  # QEMU's ELF loader skips empty segments too
        if filesz > memsz:
            raise MultibootError(
                f"{where}malformed ELF: a PT_LOAD segment at {paddr:#x} has p_filesz {filesz:#x} > p_memsz {memsz:#x}"
            )
        if p_offset + filesz > len(data):
            raise MultibootError(
                f"{where}truncated ELF: the segment for {paddr:#x} needs file bytes "
                f"{p_offset:#x}-{p_offset + filesz:#x}, the file has {len(data):#x}"
            )
        if paddr + memsz > _U32:
            raise MultibootError(
                f"{where}the PT_LOAD segment at {paddr:#x} ({memsz:#x} bytes) does not fit in the 32-bit address space"
            )
        for lo, hi in spans:
            if paddr < hi and paddr + memsz > lo:
                raise MultibootError(f"{where}PT_LOAD segments overlap at physical {max(lo, paddr):#x}")
        spans.append((paddr, paddr + memsz))
        if filesz:
            segments.append((paddr, bytes(data[p_offset : p_offset + filesz])))
        if memsz > filesz:
            bss.append((paddr + filesz, memsz - filesz))
    if not spans:
        raise MultibootError(f"{where}the ELF has no loadable segment (no PT_LOAD with p_memsz > 0)")
    if not any(gpa <= entry < gpa + len(blob) for gpa, blob in segments):
        raise MultibootError(
            f"{where}ELF entry point {entry:#x} is not inside a loaded "
            "segment's file data (paging is off at entry: it must be physical)"
        )
    return KernelImage(
        segments=segments,
        bss=bss,
        entry=entry,
        lowest=min(lo for lo, _ in spans),
        highest=max(hi for _, hi in spans),
        flags=flags,
        kind="elf",
        header_offset=offset,
    )


def _check_placement(image: KernelImage, where: str) -> None:
    """Refuse loading into memory that is not RAM or that the boot information needs."""
    ranges: list[tuple[int, int]] = []
    for start, end in sorted(
        [(gpa, gpa + len(blob)) for gpa, blob in image.segments] + [(gpa, gpa + n) for gpa, n in image.bss]
    ):
        if ranges and ranges[-1][1] == start:
            ranges[-1] = (ranges[-1][0], end)  # a segment's file part and its bss
        else:
            ranges.append((start, end))
    for lo, hi, what in _FORBIDDEN:
        for start, end in ranges:
            if start < hi and end > lo:
                raise MultibootError(f"{where}the kernel would load at {start:#x}-{end - 1:#x}, overlapping {what}")
    lo, hi, _ = _BOOT_INFO
    for start, end in ranges:
        if start < hi and end > lo:
            image.warnings.append(
                f"the kernel loads at {start:#x}-{end - 1:#x}, over the boot-information "
                f"area {lo:#x}-{hi - 1:#x}: as under QEMU, its bytes replace the memory map "
                "and multiboot_info there"
            )
            break


def overwritten_boot_info(image: KernelImage, blobs) -> list[tuple[int, int]]:
    """The (gpa, length) ranges of the kernel's bss that lie over boot-information blobs: zeroed after
    the blobs are written, as QEMU's option ROM copies the kernel (bss included) after them."""
    out = []
    for gpa, n in image.bss:
        for at, blob in blobs:
            lo, hi = max(gpa, at), min(gpa + n, at + len(blob))
            if lo < hi:
                out.append((lo, hi - lo))
    return out


def _c_string(text: str, what: str, where: str) -> bytes:
    if "\0" in text:
        raise MultibootError(f"{where}the {what} contains a NUL character")
    return text.encode("utf-8") + b"\0"


def _page_up(addr: int) -> int:
    return (addr + PAGE - 1) & ~(PAGE - 1)


def _where(image: KernelImage) -> str:
    return f"{image.name}: " if image.name else ""
