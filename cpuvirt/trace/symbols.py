"""Guest addresses in source terms: `symbol+offset` and `file:line`.

Two sources of symbols: a bundled guest (or a FILE.S) is rebuilt with the toolchain, whose Assembly
has every label and a line map (`Assembly.locate`); an ELF kernel gives its symbol table and, when
built with -g, its DWARF line program (read with pyelftools). A trace records the image's sha256 and
the guest's name, not a path or the symbols, so a trace is symbolized at show time: the image is
found again (the bundled guest of that name, its PV build, or a file the user names with --image)
and used only if its sha256 is the one the trace recorded; otherwise addresses stay bare.
"""

from __future__ import annotations

import bisect
import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

from cpuvirt.errors import CpuvirtError

if TYPE_CHECKING:
    from cpuvirt.trace.xv6 import Xv6


class Symbols:
    """Nearest-symbol and line lookups over one image."""

    def __init__(
        self,
        symbols: dict[str, int],
        lines=None,
        source: str = "",
        end: int | None = None,
        ranges: list[tuple[int, int]] | None = None,
    ):
        # Internal assembler names (__bss_start...) are kept for resolving but not preferred for naming.
        self.by_name = dict(symbols)
        named = sorted((a, n) for n, a in symbols.items() if not n.startswith("__"))
        self._addrs = [a for a, _ in named]
        self._names = [n for _, n in named]
        self._lines = lines  # callable addr -> (file, line) | None
        self.source = source
        self.end = end  # addresses at or past it belong to no symbol here
        self.ranges = ranges  # ELF: the loaded segments [start, end); other addresses are not ours
        # ELF: (start, end, +delta) physical load address -> link address
        self.aliases: list[tuple[int, int, int]] = []
        self.inlined = False  # ELF from C: one file:line (an inline helper) serves many functions
        self.kernel: Xv6 | None = None  # a kernel's own names for its events (trace/xv6.py), if recognised
        self.statements: dict[str, list[str]] = {}  # file:line -> the instructions written there
        self.code: list[tuple[int, str]] = []  # (address, source) of every instruction (assembler)

    def _linked(self, addr: int) -> int:
        """A kernel linked high runs its first instructions at its physical load address (xv6's
        `entry` at 0x10000c before paging is on): name those by the address they were linked at."""
        if self.ranges is not None and not any(lo <= addr < hi for lo, hi in self.ranges):
            for lo, hi, delta in self.aliases:
                if lo <= addr < hi:
                    return addr + delta
        return addr

    def owns(self, addr: int) -> bool:
        """The address is in this image (or it has no segment map to tell)."""
        addr = self._linked(addr)
        return self.ranges is None or any(lo <= addr < hi for lo, hi in self.ranges)

    def name(self, addr: int) -> str | None:
        addr = self._linked(addr)
        k = bisect.bisect_right(self._addrs, addr) - 1
        if k < 0 or (self.end is not None and addr >= self.end):
            return None
        if self.ranges is not None and not any(lo <= addr < hi for lo, hi in self.ranges):
            return None  # e.g. an xv6 user program's code at 0 is not the kernel's
        off = addr - self._addrs[k]
        if off > 0x10000:  # too far to be inside that symbol
            return None
        return self._names[k] if off == 0 else f"{self._names[k]}+{off:#x}"

    @property
    def has_lines(self) -> bool:
        return self._lines is not None

    def line(self, addr: int) -> str | None:
        if self._lines is None:
            return None
        loc = self._lines(self._linked(addr))
        return f"{loc[0]}:{loc[1]}" if loc else None

    def describe(self, addr: int) -> str:
        """'main+0x4 hello.S:14', whichever parts are known ('' if none)."""
        return " ".join(p for p in (self.name(addr), self.line(addr)) if p)

    def resolve(self, text: str) -> int:
        """An address as a user writes it: a number, a symbol, or symbol+offset."""
        text = text.strip()
        try:
            return int(text.replace("_", ""), 0)
        except ValueError:
            pass
        name, plus, off = text.partition("+")
        if name not in self.by_name:
            near = [n for n in self._names if n.startswith(name[:3])][:5]
            hint = f" (symbols like: {', '.join(near)})" if near else ""
            raise CpuvirtError(f"unknown symbol {name!r}{hint}")
        try:
            return self.by_name[name] + (int(off, 0) if plus else 0)
        except ValueError:
            raise CpuvirtError(f"{text!r}: the offset after '+' must be a number") from None

    def hypercalls_of(self, function: str, depth: int = 4) -> list[int]:
        """Hypercall numbers a PV-ops function can make: its `HYPERCALL(NR)` sites (`add eax, 32 * NR`)
        and those of the pv_* functions it calls, read from the source up to its first `ret`."""
        import re

        found: list[int] = []
        seen: set[str] = set()
        starts = [a for a, _ in self.code]

        def walk(name: str, d: int) -> None:
            if name in seen or d < 0 or name not in self.by_name:
                return
            seen.add(name)
            k = bisect.bisect_left(starts, self.by_name[name])
            for _, text in self.code[k : k + 200]:
                m = re.fullmatch(r"add eax, 32 \* \(?(\d+)\)?", text.strip())
                if m and int(m.group(1)) not in found:
                    found.append(int(m.group(1)))
                m = re.fullmatch(r"call (pv_\w+)", text.strip())
                if m:
                    walk(m.group(1), d - 1)
                if text.strip() == "ret":
                    break

        walk(function, depth)
        return found


NONE = Symbols({})


def from_assembly(asm, source: str = "") -> Symbols:
    s = Symbols(asm.symbols, asm.locate, source, asm.bss_end)
    s.code = sorted((st.addr, st.source) for st in asm.instructions())
    for st in asm.instructions():
        s.statements.setdefault(f"{st.file}:{st.line}", []).append(st.source)
    return s


def from_elf(data: bytes, source: str = "") -> Symbols:
    """Symbol table and (with -g) DWARF line info of an ELF image."""
    import io

    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile
    from elftools.elf.sections import SymbolTableSection

    try:
        elf = ELFFile(io.BytesIO(data))
        syms: dict[str, int] = {}
        sizes: dict[str, int] = {}
        for sec in elf.iter_sections():
            if isinstance(sec, SymbolTableSection):
                for s in sec.iter_symbols():
                    # Absolute symbols (xv6's _binary_entryother_size = 0x8a) are numbers, not addresses.
                    if (
                        s.name
                        and s["st_info"]["type"] in ("STT_FUNC", "STT_OBJECT", "STT_NOTYPE")
                        and s["st_shndx"] not in ("SHN_UNDEF", "SHN_ABS")
                    ):
                        syms.setdefault(s.name, s["st_value"])
                        sizes.setdefault(s.name, s["st_size"])
        loads = [seg for seg in elf.iter_segments() if seg["p_type"] == "PT_LOAD" and seg["p_memsz"]]
        ranges = [(seg["p_vaddr"], seg["p_vaddr"] + seg["p_memsz"]) for seg in loads]
        aliases = [
            (seg["p_paddr"], seg["p_paddr"] + seg["p_memsz"], seg["p_vaddr"] - seg["p_paddr"])
            for seg in loads
            if seg["p_paddr"] != seg["p_vaddr"]
        ]
        from cpuvirt.trace import xv6

        kernel = xv6.detect(elf, syms, sizes)
        rows = []
        if elf.has_dwarf_info():
            dwarf = elf.get_dwarf_info()
            for cu in dwarf.iter_CUs():
                prog = dwarf.line_program_for_CU(cu)
                if prog is None:
                    continue
                files = prog["file_entry"]
                ver = prog.header.get("version", 4)
                for entry in prog.get_entries():
                    st = entry.state
                    if st is None or st.end_sequence:
                        continue
                    idx = st.file if ver >= 5 else st.file - 1
                    name = files[idx].name.decode(errors="replace") if 0 <= idx < len(files) else "?"
                    rows.append((st.address, os.path.basename(name), st.line))
        rows.sort(key=lambda r: r[0])  # stable: of the rows at one address (inlined code), the last holds
    except (ELFError, ValueError, KeyError, IndexError):
        return NONE
    starts = [r[0] for r in rows]

    def lines(addr):
        k = bisect.bisect_right(starts, addr) - 1
        if k < 0 or addr - starts[k] > 0x1000:
            return None
        return rows[k][1], rows[k][2]

    found = Symbols(syms, lines if rows else None, source, ranges=ranges or None)
    found.kernel = kernel
    found.aliases = aliases
    found.inlined = bool(rows)
    return found


def for_image(data: bytes, source: str = "") -> Symbols:
    if data[:4] == b"\x7fELF":
        return from_elf(data, source)
    return NONE


def for_guest(guest: str, mode: str = "native") -> Symbols:
    """Symbols of a guest as `run` takes it: bundled name, FILE.S, or an image file (ELF symbols)."""
    try:
        if guest.endswith(".S"):
            from cpuvirt.toolchain.build import include_dir
            from cpuvirt.toolchain.image import build_image
            from cpuvirt.toolchain.preprocess import preprocess

            pre = preprocess(Path(guest), {"PV": int(mode == "para")}, [include_dir(), Path(guest).resolve().parent])
            return from_assembly(build_image(pre.lines)[1], guest)
        if os.sep in guest or os.path.exists(guest):
            return for_image(Path(guest).read_bytes(), guest)
        from cpuvirt.toolchain.build import assemble_guest

        return from_assembly(assemble_guest(guest, pv=(mode == "para"))[1], guest)
    except (CpuvirtError, OSError):
        return NONE


_cache: dict[tuple, Symbols] = {}


def for_trace(header: dict, image: str | None = None) -> Symbols:
    """Symbols for a trace's image, if it can be found and its sha256 matches the trace's header."""
    want = header.get("image_sha256")
    guest = str(header.get("guest", ""))
    key = (want, image)
    if key in _cache:
        return _cache[key]
    found = NONE
    if image is not None:
        try:
            data = Path(image).read_bytes()
        except OSError as e:
            raise CpuvirtError(f"--image {image}: {e.strerror}") from None
        if hashlib.sha256(data).hexdigest() != want:
            raise CpuvirtError(f"--image {image}: not the image this trace was made from (sha256 differs)")
        found = for_image(data, image)
        if found is NONE and guest:
            found = _bundled(guest, want) or NONE
    elif guest:
        found = _bundled(guest, want) or NONE
    _cache[key] = found
    return found


def _bundled(guest: str, want: str | None) -> Symbols | None:
    from cpuvirt.toolchain.build import assemble_guest, list_guests

    name = guest[:-4] if guest.endswith(".bin") else guest
    if name not in {g.name for g in list_guests()}:
        return None
    for pv in (False, True):
        try:
            image, asm = assemble_guest(name, pv)
        except CpuvirtError:
            continue
        if hashlib.sha256(image).hexdigest() == want:
            return from_assembly(asm, name + (" (PV build)" if pv else ""))
    return None
