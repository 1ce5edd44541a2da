"""Bare Unicorn running a Multiboot image, with no cpuvirt layer: the engine's speed limit.

Standalone on purpose (imports only unicorn), so that it also runs in a throwaway venv holding
another Unicorn version:  python bench/rawuc.py IMAGE [--repeat N]

What it sets up is only what the bench guests need: 32 MiB of RAM at 0, a flat ring-0 GDT,
UC_TLB_VIRTUAL with the same lazy-execute fill hook as cpuvirt's memory module (execute permission
only for pages code was fetched from: UNICORN-NOTES.md "Performance traps"), COM1 output (LSR
always ready), and the isa-debug-exit port 0xF4. No clock hook, no page-table walk.
"""
from __future__ import annotations

import struct
import sys
import time

from unicorn import (UC_ARCH_X86, UC_HOOK_INSN, UC_HOOK_TLB_FILL, UC_MEM_FETCH, UC_MODE_32, UC_PROT_ALL,
                     UC_PROT_READ, UC_PROT_WRITE, UC_TLB_VIRTUAL, Uc)
from unicorn import x86_const as X

RAM = 32 << 20
GDT_GPA = 0x500
MB_MAGIC = 0x1BADB002


def parse_multiboot(data: bytes) -> tuple[list[tuple[int, bytes]], int]:
    """(segments, entry) of a Multiboot image using the a.out kludge (flag bit 16): our toolchain's."""
    for off in range(0, min(len(data), 8192) - 12, 4):
        magic, flags, checksum = struct.unpack_from("<3I", data, off)
        if magic == MB_MAGIC and (magic + flags + checksum) & 0xFFFFFFFF == 0:
            break
    else:
        raise ValueError("no Multiboot header")
    if not flags & (1 << 16):
        raise ValueError("only a.out-kludge Multiboot images are supported here")
    header_addr, load_addr, load_end, _bss_end, entry = struct.unpack_from("<5I", data, off + 12)
    start = off - (header_addr - load_addr)
    end = start + (load_end - load_addr) if load_end else len(data)
    return [(load_addr, data[start:end])], entry


def parse_elf(data: bytes) -> tuple[list[tuple[int, bytes]], int]:
    """(segments, entry) of an ELF32 kernel: its PT_LOAD segments (file bytes; .bss stays zero RAM)."""
    entry, phoff = struct.unpack_from("<II", data, 24)[0], struct.unpack_from("<I", data, 28)[0]
    phentsize, phnum = struct.unpack_from("<HH", data, 42)
    segments = []
    for i in range(phnum):
        p_type, off, _vaddr, paddr, filesz = struct.unpack_from("<5I", data, phoff + i * phentsize)
        if p_type == 1 and filesz:
            segments.append((paddr, data[off:off + filesz]))
    return segments, entry


def make_uc(image: bytes, on_out_port=None):
    """A ready-to-start engine and its console; on_out_port(port) may handle extra ports."""
    uc = Uc(UC_ARCH_X86, UC_MODE_32)
    uc.ctl_exits_enabled(True)     # as cpuvirt does: no end address, so no end-of-run fetch fill
    uc.ctl_set_exits([])
    uc.mem_map(0, RAM)
    uc.ctl_set_tlb_mode(UC_TLB_VIRTUAL)
    segments, entry = parse_elf(image) if image[:4] == b"\x7fELF" else parse_multiboot(image)
    for gpa, blob in segments:
        uc.mem_write(gpa, blob)
    gdt = struct.pack("<QQQ", 0, 0x00CF9A000000FFFF, 0x00CF92000000FFFF)
    uc.mem_write(GDT_GPA, gdt)
    uc.reg_write(X.UC_X86_REG_GDTR, (0, GDT_GPA, len(gdt) - 1, 0))
    uc.reg_write(X.UC_X86_REG_CR0, 0x11)
    uc.reg_write(X.UC_X86_REG_CS, 0x08)
    for r in (X.UC_X86_REG_SS, X.UC_X86_REG_DS, X.UC_X86_REG_ES, X.UC_X86_REG_FS, X.UC_X86_REG_GS):
        uc.reg_write(r, 0x10)
    uc.reg_write(X.UC_X86_REG_EAX, 0x2BADB002)
    uc.reg_write(X.UC_X86_REG_EBX, 0x9000)     # zeroed memory: an empty multiboot_info
    out = bytearray()
    code_pages = set()

    def fill(uc, vaddr, access, entry, _):
        entry.paddr = vaddr                    # identity; paging stays off in compute guests
        if access == UC_MEM_FETCH:
            code_pages.add(vaddr)
        entry.perms = UC_PROT_ALL if vaddr in code_pages else UC_PROT_READ | UC_PROT_WRITE
        return True

    def on_in(uc, port, size, _):
        return 0x60 if port == 0x3FD else 0xFF   # LSR: transmitter empty

    if on_out_port is None:
        def on_out(uc, port, size, value, _):
            if port == 0x3F8:
                out.append(value & 0xFF)
            elif port == 0xF4:
                uc.emu_stop()
    else:
        on_out = on_out_port(out)

    uc.hook_add(UC_HOOK_TLB_FILL, fill)
    uc.hook_add(UC_HOOK_INSN, on_in, None, 1, 0, X.UC_X86_INS_IN)
    uc.hook_add(UC_HOOK_INSN, on_out, None, 1, 0, X.UC_X86_INS_OUT)
    return uc, entry, out


def run(image: bytes, on_out_port=None) -> tuple[bytes, float]:
    """Console output and the wall time of emu_start (engine creation and loading excluded)."""
    uc, entry, out = make_uc(image, on_out_port)
    t = time.perf_counter()
    uc.emu_start(entry, 0)
    return bytes(out), time.perf_counter() - t


def best_of(image: bytes, repeat: int, on_out_port=None) -> tuple[bytes, float]:
    best, console = None, b""
    for _ in range(repeat):
        console, s = run(image, on_out_port)
        best = s if best is None else min(best, s)
    return console, best


if __name__ == "__main__":
    import unicorn
    path = sys.argv[1]
    n = int(sys.argv[sys.argv.index("--repeat") + 1]) if "--repeat" in sys.argv else 3
    console, s = best_of(open(path, "rb").read(), n)
    sys.stdout.write(console.decode(errors="replace"))
    print(f"raw unicorn {unicorn.__version__}: {s:.4f} s (best of {n})")
