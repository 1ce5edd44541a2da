"""Multiboot v1 loader: images in both layouts, every refusal, and the boot-information layout."""

from __future__ import annotations

import shutil
import struct
import subprocess

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cpuvirt.errors import MultibootError
from cpuvirt.loader.multiboot import (
    FLAG_AOUT_KLUDGE, INFO_FLAGS, MBI_ADDR, MMAP_ADDR, MULTIBOOT_BOOTLOADER_MAGIC,
    MULTIBOOT_HEADER_MAGIC, build_boot_info, check_fits, load_image,
)

MiB = 1024 * 1024
MAGIC = MULTIBOOT_HEADER_MAGIC


def mb_header(flags=0x3, fields=None, checksum=None):
    """Spec 3.1.1 header; `fields` are header_addr, load_addr, load_end, bss_end, entry."""
    if checksum is None:
        checksum = -(MAGIC + flags) & 0xFFFFFFFF
    out = struct.pack("<3I", MAGIC, flags, checksum)
    if fields is not None:
        out += struct.pack("<5I", *fields)
    return out


def make_elf(segments, entry, *, header=None, machine=3, e_type=2, cls=1, data_enc=1,
             extra_phdrs=()):
    """A minimal ELF32: ELF header, program headers, then each segment's file bytes.

    segments: (paddr, file bytes, memsz). The Multiboot header goes first in the file data.
    """
    header = mb_header() if header is None else header
    phdrs = []
    nph = len(segments) + len(extra_phdrs)
    offset = 52 + 32 * nph
    body = bytearray(header)
    offset0 = offset
    for paddr, blob, memsz in segments:
        off = offset0 + len(body)
        body += blob
        phdrs.append(struct.pack("<8I", 1, off, paddr, paddr, len(blob), memsz, 7, 0x1000))
    for ph in extra_phdrs:
        phdrs.append(ph)
    ident = b"\x7fELF" + bytes([cls, data_enc, 1]) + bytes(9)
    ehdr = ident + struct.pack("<HHIIIIIHHHHHH", e_type, machine, 1, entry, 52, 0, 0, 52, 32,
                               nph, 40, 0, 0)
    return bytes(ehdr) + b"".join(phdrs) + bytes(body)


CODE = bytes(range(1, 65))


def simple_elf(**kw):
    return make_elf([(0x100000, CODE, 0x1000)], 0x100010, **kw)


def kludge_image(header_off=0, load_addr=0x100000, load_end=0, bss_end=0x102000,
                 entry=None, payload=CODE, flags=0x10003, header_addr=None):
    header_addr = load_addr + header_off if header_addr is None else header_addr
    entry = load_addr + header_off + 32 if entry is None else entry
    return (bytes(header_off)
            + mb_header(flags, (header_addr, load_addr, load_end, bss_end, entry)) + payload)


def error_of(data, name=""):
    with pytest.raises(MultibootError) as info:
        load_image(data, name)
    return str(info.value)


def read_mem(blobs, addr, n):
    for gpa, blob in blobs:
        if gpa <= addr and addr + n <= gpa + len(blob):
            return blob[addr - gpa:addr - gpa + n]
    raise AssertionError(f"{addr:#x}+{n} not in any boot-info blob")


def read_cstr(blobs, addr):
    for gpa, blob in blobs:
        if gpa <= addr < gpa + len(blob):
            end = blob.index(b"\0", addr - gpa)
            return blob[addr - gpa:end].decode()
    raise AssertionError(f"string at {addr:#x} not in any boot-info blob")


# --- Loading --------------------------------------------------------------------------------

def test_entry_magic_is_the_spec_value():
    assert MULTIBOOT_BOOTLOADER_MAGIC == 0x2BADB002


def test_elf_segment_loads_at_paddr_with_bss_zero_range():
    image = load_image(simple_elf(), "k.elf")
    assert image.kind == "elf" and image.name == "k.elf"
    assert image.segments == [(0x100000, CODE)]
    assert image.bss == [(0x100000 + len(CODE), 0x1000 - len(CODE))]
    assert (image.entry, image.lowest, image.highest) == (0x100010, 0x100000, 0x101000)
    assert image.flags == 0x3 and image.warnings == []


def test_elf_uses_physical_not_virtual_addresses():
    elf = bytearray(simple_elf())
    struct.pack_into("<I", elf, 52 + 8, 0xC0100000)      # p_vaddr of the only PT_LOAD
    assert load_image(bytes(elf)).segments[0][0] == 0x100000


def test_elf_several_segments_and_empty_ones_skipped():
    elf = make_elf([(0x100000, CODE, 64), (0x200000, b"", 0), (0x300000, b"\xAA" * 8, 0x2000)],
                   0x100000)
    image = load_image(elf)
    assert image.segments == [(0x100000, CODE), (0x300000, b"\xAA" * 8)]
    assert image.bss == [(0x300008, 0x2000 - 8)]
    assert (image.lowest, image.highest) == (0x100000, 0x302000)


def test_header_found_at_any_aligned_offset_below_8k():
    elf = make_elf([(0x100000, bytes(0x1F00) + mb_header() + CODE, 0x3000)], 0x100000,
                   header=b"")
    assert load_image(elf).header_offset == 52 + 32 + 0x1F00


def test_video_mode_flag_is_ignored_with_a_warning_like_qemu():
    image = load_image(simple_elf(header=mb_header(0x7)))
    assert image.flags == 0x7 and "video mode" in image.warnings[0]


def test_kludge_flat_binary_to_end_of_file_plus_bss():
    image = load_image(kludge_image())
    assert image.kind == "aout-kludge"
    assert image.segments == [(0x100000, kludge_image())]
    assert image.bss == [(0x100000 + 32 + len(CODE), 0x2000 - 32 - len(CODE))]
    assert (image.entry, image.lowest, image.highest) == (0x100020, 0x100000, 0x102000)


def test_kludge_load_addr_before_header_and_explicit_load_end():
    # The header is 0x40 bytes into the file, so load_addr = header_addr - 0x40 is file offset 0.
    data = kludge_image(header_off=0x40, load_end=0x100000 + 0x70, bss_end=0)
    image = load_image(data)
    assert image.segments == [(0x100000, data[:0x70])]
    assert image.bss == [] and image.highest == 0x100070


def test_kludge_load_addr_skips_file_prefix():
    # header_addr - load_addr = 0x10 < header offset 0x40: loading starts at file offset 0x30.
    data = kludge_image(header_off=0x40, header_addr=0x100010, bss_end=0, entry=0x100010)
    image = load_image(data)
    assert image.segments == [(0x100000, data[0x30:])]


def test_kludge_wins_over_elf_when_bit_16_is_set_like_qemu():
    # An ELF whose header also gives address fields: QEMU loads the fields, not the PT_LOADs.
    payload = b"\x90" * 64
    elf = make_elf([(0x200000, payload, 0x100)], 0x200000, header=b"")
    header_off = len(elf)
    fields = (0x100000 + header_off, 0x100000, 0, 0, 0x100000 + 4)
    data = elf + mb_header(0x10003, fields)
    image = load_image(data)
    assert image.kind == "aout-kludge"
    assert image.segments == [(0x100000, data)]


@pytest.fixture(scope="module")
def gcc_kernel(tmp_path_factory):
    """A real kernel from gcc -m32 (skipped when the 32-bit toolchain is missing)."""
    if shutil.which("gcc") is None:
        pytest.skip("no gcc")
    d = tmp_path_factory.mktemp("gcc")
    (d / "k.S").write_text(
        ".section .multiboot,\"a\"\n.align 4\nmbh: .long 0x1BADB002, 0x10003, -(0x1BADB002+0x10003)\n"
        ".long mbh, _start_load, _load_end, _end, _start\n"
        ".text\n.globl _start\n_start: mov $0xf4, %dx\n mov $3, %al\n out %al, %dx\n hlt\n"
        ".data\nmsg: .asciz \"hello\"\n.bss\n.space 4096\n")
    (d / "link.ld").write_text(
        "ENTRY(_start)\nSECTIONS {\n . = 0x100000;\n _start_load = .;\n"
        " .multiboot : { *(.multiboot) }\n .text : { *(.text*) }\n .data : { *(.data*) }\n"
        " _load_end = .;\n .bss : { *(.bss*) }\n _end = .;\n}\n")
    elf = d / "k.elf"
    try:
        subprocess.run(["gcc", "-m32", "-ffreestanding", "-nostdlib", "-static", "-no-pie",
                        "-T", str(d / "link.ld"), str(d / "k.S"), "-o", str(elf)],
                       check=True, capture_output=True, timeout=60)
        subprocess.run(["objcopy", "-O", "binary", str(elf), str(d / "k.bin")],
                       check=True, capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"gcc -m32 does not work here: {exc}")
    return elf.read_bytes(), (d / "k.bin").read_bytes()


def test_gcc_built_kernel_loads_as_elf_and_as_flat_binary(gcc_kernel):
    from elftools.elf.elffile import ELFFile
    import io
    elf_bytes, flat = gcc_kernel
    elf = ELFFile(io.BytesIO(elf_bytes))
    from_elf = load_image(elf_bytes, "k.elf")        # bit 16 set: the address fields are used
    from_bin = load_image(flat, "k.bin")
    assert from_elf.entry == from_bin.entry == elf.header["e_entry"]
    assert from_bin.segments == [(0x100000, flat)]
    assert from_bin.highest == from_elf.highest
    assert from_bin.highest - from_bin.lowest >= len(flat) + 4096
    # The same kernel with bit 16 cleared loads through its program headers.
    plain = bytearray(elf_bytes)
    off = plain.find(struct.pack("<I", MAGIC))
    struct.pack_into("<2I", plain, off + 4, 0x3, -(MAGIC + 0x3) & 0xFFFFFFFF)
    via_phdrs = load_image(bytes(plain))
    assert via_phdrs.kind == "elf" and via_phdrs.entry == from_bin.entry
    assert b"".join(b for _, b in via_phdrs.segments).startswith(flat[:4])


# --- Refusals -------------------------------------------------------------------------------

@pytest.mark.parametrize("data, expected", [
    (b"", "empty file"),
    (b"\x00" * 100, "no Multiboot header"),
    (bytes(8192) + mb_header(), "no Multiboot header"),
    (bytes(2) + mb_header() + bytes(64), "no Multiboot header"),          # misaligned
    (mb_header(checksum=0x1234) + bytes(64), "bad checksum"),
    (mb_header(0x8 | 0x3) + bytes(64), "requires features 0x0008"),
    (mb_header(0x8000 | 0x3) + bytes(64), "requires features 0x8000"),
    (mb_header() + bytes(64), "not an ELF file"),
    (mb_header(0x10003), "ends before its address fields"),
    (bytes(0x202) + b"HdrS" + bytes(64) + mb_header(), "Linux kernel"),
])
def test_refusals_of_the_header(data, expected):
    assert expected in error_of(data)


def test_error_message_names_the_file():
    assert error_of(b"", "kernel.bin").startswith("kernel.bin: empty file")


def test_elf_refusals():
    assert "shorter than an ELF32 header" in error_of(b"\x7fELF" + mb_header())
    assert "ELFCLASS32" in error_of(simple_elf(cls=2))
    assert "little-endian" in error_of(simple_elf(data_enc=2))
    assert "not i386" in error_of(simple_elf(machine=62))
    assert "not an executable" in error_of(simple_elf(e_type=3))
    assert "no loadable segment" in error_of(make_elf([], 0x100000))
    assert "no loadable segment" in error_of(make_elf([(0x100000, b"", 0)], 0x100000))
    assert "p_filesz" in error_of(make_elf([(0x100000, CODE, 8)], 0x100000))
    assert "overlap" in error_of(make_elf([(0x100000, CODE, 0x100), (0x1000F0, CODE, 64)],
                                          0x100000))
    assert "entry point 0x200000" in error_of(make_elf([(0x100000, CODE, 64)], 0x200000))
    assert "entry point" in error_of(make_elf([(0x100000, CODE, 0x1000)], 0x100800))  # in bss
    assert "32-bit address space" in error_of(make_elf([(0xFFFFFF00, CODE, 0x1000)], 0xFFFFFF00))


def test_truncated_elf_is_reported_as_truncated():
    base = simple_elf()
    many = bytearray(base)
    struct.pack_into("<H", many, 44, 50)                          # e_phnum past the end
    assert "program headers (50 at offset 0x34) run past the end" in error_of(bytes(many))
    assert "truncated ELF" in error_of(base[:-10])
    bad_phdr = bytearray(base)
    struct.pack_into("<I", bad_phdr, 52 + 4, 0x7FFFFFF0)          # p_offset far past the end
    assert "truncated ELF" in error_of(bytes(bad_phdr))


def test_kludge_refusals():
    assert "above header_addr" in error_of(kludge_image(header_addr=0x0FFFF0))
    assert "before the file's start" in error_of(kludge_image(load_addr=0x100000,
                                                              header_addr=0x100100))
    assert "load_end_addr 0xff000 is below" in error_of(kludge_image(load_end=0xFF000))
    assert "bss_end_addr" in error_of(kludge_image(bss_end=0x100010))
    assert "file too short" in error_of(kludge_image(load_end=0x110000))
    assert "outside the loaded image" in error_of(kludge_image(entry=0x200000))
    assert "outside the loaded image" in error_of(kludge_image(entry=0x101000))   # in bss
    assert "32-bit address space" in error_of(kludge_image(load_addr=0xFFFFFFF0, bss_end=0,
                                                           entry=0xFFFFFFF0))


@pytest.mark.parametrize("addr, what", [
    (0x0, "page 0"),
    (0x9FC00, "640 KiB - 1 MiB hole"),
    (0xB8000, "640 KiB - 1 MiB hole"),
    (0xFFF00, "640 KiB - 1 MiB hole"),
])
def test_refuses_loading_where_there_is_no_ram_or_boot_info(addr, what):
    message = error_of(make_elf([(addr, CODE, 0x200)], addr))
    assert "overlapping" in message and what in message


@pytest.mark.parametrize("addr", [0x8F00, 0x9500])
def test_a_kernel_over_the_boot_information_loads_as_under_qemu_with_a_warning(addr):
    """QEMU's option ROM writes the memory map and multiboot_info, then copies the kernel over them
    (kvm-unit-tests' realmode.flat loads at 0x8000-0xDA2F): the kernel's bytes and zeroed bss win."""
    from cpuvirt.loader.multiboot import overwritten_boot_info
    image = load_image(make_elf([(addr, CODE, 0x800)], addr))
    assert any("boot-information area" in w for w in image.warnings)
    boot = build_boot_info(image, 32 * MiB)
    (bss_at, bss_len), = image.bss
    expected = [(max(bss_at, at), min(bss_at + bss_len, at + len(blob)) - max(bss_at, at))
                for at, blob in ((0x9000, b"m" * 144), (0x9500, b"i" * 88))
                if at < bss_at + bss_len and at + len(blob) > bss_at]
    assert expected and overwritten_boot_info(image, boot.blobs) == expected


def test_a_kernel_over_the_boot_information_sees_its_own_bytes_there(tmp_path):
    """End to end: a kernel whose bss covers 0x9500 reads zero there (multiboot_info's flags are gone),
    as under QEMU."""
    from cpuvirt.runner import run_guest
    # mov eax, [0x9500]; out 0xF4, al  (the debug-exit status is the low byte of the dword at 0x9500)
    code = bytes.fromhex("a100950000") + bytes.fromhex("e6f4") + bytes.fromhex("f4")
    path = tmp_path / "low.elf"
    path.write_bytes(make_elf([(0x8000, code, 0x2000)], 0x8000))
    r = run_guest(str(path))
    assert (r.outcome, r.status) == ("exit", 0)


def test_low_memory_kernels_load_as_under_qemu():
    for addr in (0x1000, 0x10000, 0x20000):
        assert load_image(make_elf([(addr, CODE, 0x200)], addr)).lowest == addr


def test_check_fits():
    image = load_image(make_elf([(0x100000, CODE, 0x100000)], 0x100000))
    check_fits(image, 2 * MiB)
    with pytest.raises(MultibootError, match="beyond the 1 MiB of RAM"):
        check_fits(image, 1 * MiB)


# --- Fuzzing: nothing but MultibootError may come out ---------------------------------------

def _load_or_refuse(data):
    try:
        load_image(data)
    except MultibootError:
        pass


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600))
def test_fuzz_random_bytes(data):
    _load_or_refuse(data)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, len(simple_elf())), st.lists(st.tuples(st.integers(0, 200),
                                                              st.integers(0, 255)), max_size=6))
def test_fuzz_truncated_and_mutated_elf(cut, edits):
    data = bytearray(simple_elf())
    for pos, value in edits:
        if pos < len(data):
            data[pos] = value
    _load_or_refuse(bytes(data[:cut]))


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 0xFFFF), st.lists(st.integers(0, 0xFFFFFFFF), min_size=5, max_size=5),
       st.binary(max_size=64))
def test_fuzz_kludge_fields(flags, fields, payload):
    flags |= FLAG_AOUT_KLUDGE
    _load_or_refuse(mb_header(flags, fields) + payload)


# --- Boot information -----------------------------------------------------------------------

def _mbi(info):
    return struct.unpack("<22I", read_mem(info.blobs, info.address, 88))


def test_boot_info_reproduces_qemu_layout():
    """Addresses and values measured under QEMU 7.2 + SeaBIOS with -m 32, -append "hello world"
    and -initrd "modA.txt arg1,modB.bin", for a kernel at 0x100000-0x10268F."""
    image = load_image(make_elf([(0x100000, CODE, 0x2690)], 0x100000), "k.elf")
    mod_b = bytes(range(256)) * 19 + bytes(136)                       # 5000 bytes
    info = build_boot_info(image, 32 * MiB, "hello world",
                           [(b"modA\n", "modA.txt arg1"), (mod_b, "modB.bin")])
    mbi = _mbi(info)
    assert info.address == MBI_ADDR == 0x9500
    assert mbi[0] == INFO_FLAGS == 0x24F
    assert (mbi[1], mbi[2], mbi[3]) == (639, 0x7B80, 0x8000FFFF)
    assert mbi[4] == 0x103037 and read_cstr(info.blobs, mbi[4]) == "k.elf hello world"
    assert (mbi[5], mbi[6]) == (2, 0x103000)
    mods = struct.unpack("<8I", read_mem(info.blobs, 0x103000, 32))
    assert mods == (0x104000, 0x104005, 0x103020, 0, 0x105000, 0x106388, 0x10302E, 0)
    assert read_cstr(info.blobs, 0x103020) == "modA.txt arg1"
    assert read_cstr(info.blobs, 0x10302E) == "modB.bin"
    assert read_mem(info.blobs, 0x104000, 5) == b"modA\n"
    assert read_mem(info.blobs, 0x105000, 5000) == mod_b
    assert (mbi[11], mbi[12]) == (144, MMAP_ADDR)
    assert mbi[16] == 0x103049 and read_cstr(info.blobs, mbi[16]) == "qemu"
    mmap = [struct.unpack_from("<IQQI", read_mem(info.blobs, MMAP_ADDR, 144), i * 24)
            for i in range(6)]
    assert mmap == [(20, 0, 0x9FC00, 1), (20, 0x9FC00, 0x400, 2), (20, 0xF0000, 0x10000, 2),
                    (20, 0x100000, 0x1EE0000, 1), (20, 0x1FE0000, 0x20000, 2),
                    (20, 0xFFFC0000, 0x40000, 2)]
    assert info.end == 0x107000
    assert info.modules == [(0x104000, 0x104005, "modA.txt arg1"), (0x105000, 0x106388, "modB.bin")]


def test_cmdline_is_always_valid():
    image = load_image(simple_elf(), "k.elf")
    info = build_boot_info(image, 32 * MiB)
    assert read_cstr(info.blobs, _mbi(info)[4]) == "k.elf "            # QEMU without -append
    nameless = load_image(simple_elf())
    info = build_boot_info(nameless, 32 * MiB)
    mbi = _mbi(info)
    assert mbi[0] & 0x4 and read_cstr(info.blobs, mbi[4]) == ""
    assert mbi[5] == 0 and mbi[6] == 0x101000                          # MODS set, no module
    assert build_boot_info(nameless, 32 * MiB, "a=1").cmdline == "a=1"


@settings(max_examples=100, deadline=None)
@given(st.integers(0x100000, 0x300000), st.integers(1, 0x20000), st.text(max_size=40).filter(
    lambda s: "\0" not in s), st.lists(st.tuples(st.binary(max_size=5000), st.text(
        max_size=20).filter(lambda s: "\0" not in s)), max_size=4), st.integers(4, 64))
def test_boot_info_never_overlaps_the_image_and_aligns_modules(base, size, cmdline, modules,
                                                               mem_mib):
    image = load_image(make_elf([(base, CODE, size + len(CODE))], base), "kern")
    if image.highest > mem_mib * MiB:
        return
    try:
        info = build_boot_info(image, mem_mib * MiB, cmdline, modules)
    except MultibootError as exc:
        assert "give more memory" in str(exc)
        return
    for gpa, blob in info.blobs:
        assert gpa + len(blob) <= image.lowest or gpa >= image.highest
        assert gpa + len(blob) <= info.end <= mem_mib * MiB
    mbi = _mbi(info)
    assert read_cstr(info.blobs, mbi[4]) == "kern " + cmdline
    assert mbi[2] == (mem_mib * MiB - MiB - 128 * 1024) // 1024 and mbi[1] == 639
    assert mbi[5] == len(modules)
    for i, (blob, string) in enumerate(modules):
        start, end, s_addr, _ = struct.unpack("<4I", read_mem(info.blobs, mbi[6] + 16 * i, 16))
        assert start % 4096 == 0 and end - start == len(blob)
        assert read_cstr(info.blobs, s_addr) == string
        if blob:
            assert read_mem(info.blobs, start, len(blob)) == blob


def test_boot_info_refusals():
    image = load_image(simple_elf())
    with pytest.raises(MultibootError, match="at least 2 MiB"):
        build_boot_info(image, 1 * MiB)
    with pytest.raises(MultibootError, match="give more memory"):
        build_boot_info(image, 2 * MiB, modules=[(bytes(2 * MiB), "big")])
    with pytest.raises(MultibootError, match="NUL"):
        build_boot_info(image, 32 * MiB, "a\0b")
    low = load_image(make_elf([(0x90000, CODE, 0x100)], 0x90000))
    with pytest.raises(MultibootError, match="640 KiB - 1 MiB hole"):
        build_boot_info(low, 32 * MiB, modules=[(bytes(0x20000), "m")])
