"""Assemble preprocessed guest source with keystone 0.9.2 (x86, 32-bit, Intel syntax), safely.

What this adds to keystone:

- Errors as ``file:line: message``: keystone reports a statement index at best; on failure we find
  the first failing statement by assembling prefixes (completed with the labels defined later),
  and name undefined symbols ourselves.
- An address for every statement: each statement gets a hidden label and the assembler appends a
  table of ``.long`` label values, read back and cut off. That gives the line map (address ->
  file:line), the symbol table, and the exact instruction boundaries.
- Sections: ``.text``, ``.data``/``.rodata`` and ``.bss`` (or ``.section .NAME``). Statements are
  laid out text, then data, then bss, each in source order. The current section is per source
  file and every file starts in ``.text``: an include's sections do not leak into the includer.
  ``.bss`` may hold only labels, ``.align``/``.balign`` and ``.zero``/``.skip``/``.space``; it is not
  stored in the image (the Multiboot loader zeroes it). ``__bss_start``/``__bss_end`` bound it.
- Keystone's silent mis-encodings cannot get through (see guests/README.md):
    * rewritten before keystone sees them: ``iret`` -> ``iretd``; ``pushf``/``popf`` -> ``pushfd``/
      ``popfd``; ``push cs|ds|es|ss`` and ``pop ds|es|ss`` -> their one-byte 32-bit opcodes;
      ``jmp SEL:OFF`` / ``ljmp SEL:OFF`` / ``jmp far SEL:OFF`` -> ``EA`` + 32-bit offset + selector;
      ``push IMMEDIATE`` -> ``68`` + imm32 (keystone rejects ``push LABEL`` and encodes
      ``push 0xFF80``..``push 0xFFFF`` as ``6A xx``, which pushes 0xFFFFFFxx); ``[rep] movsd``
      (rejected: taken for the SSE2 instruction) -> ``[rep] movs dword ptr es:[edi], dword ptr [esi]``;
    * fixed after assembly: ``lgdt/lidt/sgdt/sidt`` lose keystone's 0x66 prefix (the instruction
      moves to the statement's address, a ``nop`` pads the freed byte);
    * verified after assembly: every instruction statement is decoded with capstone; any 0x66
      operand-size prefix on a statement that names no 16-bit operand (``ax``.. or ``word``) is an
      error at its file:line, and so is any 16-bit form of a descriptor-table load/store, far
      jump or iret, and any ``6A`` (push imm8) left in an instruction statement.
- Decimal numbers read as decimal, always (``new_keystone``). Keystone 0.9.2 never initializes its
  default radix (``MCAsmInfo::Radix``): a ``Ks`` whose memory happens to hold 16 there reads every
  number as hex (``.zero 104`` emits 260 bytes, ``PTE_LIMIT = 16`` becomes 22), and ``ks_option``
  sets 16 on every call, whatever the option, which a later ``Ks`` then inherits from the freed
  memory. Which one a process gets depends on its allocation history (a guest image differed between
  two runs of one ``compare``), so every ``Ks`` is checked before use, and no option is ever set.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from capstone import CS_ARCH_X86, CS_MODE_32, Cs
from keystone import KS_ARCH_X86, KS_ERR_ASM_SYMBOL_MISSING, KS_MODE_32, Ks, KsError

from cpuvirt.errors import GuestBuildError
from cpuvirt.toolchain.preprocess import SourceLine, split_top_level, strip_comment

_LABEL_RE = re.compile(r"^\s*([A-Za-z_.$][\w.$]*)\s*:(?!:)")
_IDENT_RE = re.compile(r"[A-Za-z_.$][\w.$]*")
_SEGREGS = {"cs", "ds", "es", "fs", "gs", "ss"}
_REG16_RE = re.compile(r"\b(ax|bx|cx|dx|si|di|sp|bp|word)\b", re.I)
_INTRINSIC16 = {
    "cwd",
    "cbw",
    "movsw",
    "stosw",
    "lodsw",
    "scasw",
    "cmpsw",
    "insw",
    "outsw",
    "pushfw",
    "popfw",
    "iret",
    "pushaw",
    "popaw",
    "retfw",
}
_DESC_TABLE = {"lgdt", "lidt", "sgdt", "sidt"}
_ATT_RE = re.compile(r"%[a-z]|\$-?[\w(]|^\s*[a-z]+[bwl]\s+[$%]", re.I)
_BSS_DIRECTIVES = {".align", ".balign", ".p2align", ".zero", ".skip", ".space"}
# Keystone loops forever (.fill, .skip/.space with a fill byte) or silently counts 0 (.zero, .skip) when
# the count of these depends on a label or on `.`; such a count is refused (a constant, or .align).
_COUNTED_DIRECTIVES = {".fill", ".skip", ".space", ".zero"}
_SYMBOL_RE = re.compile(r"(?<![\w.$])[A-Za-z_$][\w.$]*|(?<![\w.$])\.(?![\w.$])")
_SECTIONS = {".text": "text", ".data": "data", ".rodata": "data", ".bss": "bss"}
_FORBIDDEN_DIRECTIVES = {
    ".code16": "16-bit code is not supported; write 32-bit code",
    ".code64": "64-bit code is not supported",
    ".att_syntax": "guests are written in Intel syntax only",
    ".intel_syntax": "guests are always Intel syntax; remove the directive",
    ".org": "keystone 0.9.2 cannot do .org; use .align or .zero",
    ".section": "only .section .text/.data/.rodata/.bss exist",
}

# hints appended to keystone's terse error messages, by statement text
_HINTS = [
    (
        re.compile(r"\b(jmp|call|ljmp|lcall)\s+(far\s+|fword\s+ptr\s+)?(fword\s+ptr\s+)?\["),
        "keystone 0.9.2 cannot encode an indirect far jump/call; use `retf` on a pushed CS:EIP, or "
        ".byte 0xFF, 0x2D; .long ADDR (jmp fword ptr [ADDR])",
    ),
    (re.compile(r"\boffset\b", re.I), "keystone rejects `offset`; a bare label is its address: mov eax, label"),
    (re.compile(r"^\s*\d+\s*:"), "numeric local labels are not supported; use a unique name"),
    (re.compile(r"\\x"), "keystone does not understand \\x escapes in strings; use octal (\\101)"),
    (re.compile(r"(>>|<<)"), "keystone cannot shift a label's address; compute such values at run time"),
]


@dataclass
class Statement:
    """One assembler statement (one of possibly several on a source line)."""

    index: int
    source: str  # the statement as the author wrote it (after preprocessing)
    asm: str  # what keystone is given (after rewrites)
    file: str
    line: int
    kind: str  # "insn" | "data" | "label" | "directive"
    section: str  # "text" | "data" | "bss"
    label: str | None = None
    fix: str | None = None  # "drop66": remove keystone's operand-size prefix after assembly
    addr: int = 0
    size: int = 0

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass
class Assembly:
    """Assembled code: the bytes from ``base`` (bss included, as zeros) and everything known about them."""

    base: int
    code: bytes
    statements: list[Statement]
    symbols: dict[str, int]
    bss_start: int
    bss_end: int
    _starts: list[int] = field(default_factory=list, repr=False)
    _emitted: list[Statement] = field(default_factory=list, repr=False)

    @property
    def load_bytes(self) -> bytes:
        """The bytes stored in an image: everything up to the bss."""
        return self.code[: self.bss_start - self.base]

    def instructions(self) -> list[Statement]:
        """Instruction statements with their addresses and sizes, in address order."""
        return [s for s in self.statements if s.kind == "insn" and s.size]

    def locate(self, addr: int) -> tuple[str, int] | None:
        """(file, line) of the statement whose bytes contain addr, or None."""
        if not self._starts:
            self._emitted = sorted((s for s in self.statements if s.size), key=lambda s: s.addr)
            self._starts = [s.addr for s in self._emitted]
        k = bisect.bisect_right(self._starts, addr) - 1
        if k < 0:
            return None
        s = self._emitted[k]
        return (s.file, s.line) if s.addr <= addr < s.addr + s.size else None


def _refuse_label_counts(statements: Sequence[Statement], labels: set[str]) -> None:
    """A .fill/.skip/.space/.zero whose count names a label or `.` is an input error (_COUNTED_DIRECTIVES)."""
    for s in statements:
        if s.kind != "data":
            continue
        directive, _, rest = s.asm.strip().partition(" ")
        if directive.lower() not in _COUNTED_DIRECTIVES:
            continue
        count = split_top_level(rest, ",")[0]
        names = set(_SYMBOL_RE.findall(count))
        if "." in names or names & labels:
            raise GuestBuildError(
                f"{s.where}: the count of {directive} depends on a label or on `.`, which the assembler "
                f"(keystone) cannot do (it loops or counts 0): use a constant count, or .align"
            )


# ---------------------------------------------------------------------------------------------
# statement splitting and rewriting


def split_statements(lines: Iterable[SourceLine]) -> list[Statement]:
    """Split lines into statements (``;``-separated), peel labels, classify, rewrite, section them."""
    out: list[Statement] = []
    sections: dict[str, str] = {}  # the current section is per source file; each file starts in .text
    for sl in lines:
        section = sections.get(sl.file, "text")
        text = strip_comment(sl.text)
        for part in split_top_level(text, ";"):
            part = part.strip()
            while True:
                m = _LABEL_RE.match(part)
                if not m or m.group(1).lower() in _SEGREGS:
                    break
                name = m.group(1)
                if name.isdigit():
                    raise GuestBuildError(f"{sl.where}: numeric local labels are not supported; use a unique name")
                out.append(Statement(0, name + ":", name + ":", sl.file, sl.line, "label", section, label=name))
                part = part[m.end() :].strip()
            if not part:
                continue
            first = part.split(None, 1)[0].lower()
            rest = part[len(first) :].strip()
            if first in _SECTIONS or (first == ".section" and rest.lower() in _SECTIONS):
                section = sections[sl.file] = _SECTIONS[first if first in _SECTIONS else rest.lower()]
                continue
            if first in _FORBIDDEN_DIRECTIVES:
                raise GuestBuildError(f"{sl.where}: {first} not allowed: {_FORBIDDEN_DIRECTIVES[first]}")
            st = Statement(0, part, part, sl.file, sl.line, "insn", section)
            if first.startswith("."):
                st.kind = "data" if first not in (".set", ".equ", ".equiv", ".globl", ".global") else "directive"
            elif re.match(r"^[A-Za-z_.$][\w.$]*\s*=", part):
                st.kind = "directive"
            else:
                _rewrite(st)
            if section == "bss":
                if st.kind == "insn" or (st.kind == "data" and first not in _BSS_DIRECTIVES):
                    raise GuestBuildError(
                        f"{sl.where}: only labels, .align and .zero/.skip/.space may be in .bss: {part!r}"
                    )
                if first in (".align", ".balign", ".p2align"):
                    # in code keystone pads with NOP opcodes; the bss must be zeros
                    args = [a.strip() for a in rest.split(",")]
                    st.asm = f"{first} {args[0]}, 0"
            out.append(st)
    return out


_FARJMP_RE = re.compile(
    r"^(?:ljmp|jmp)\s+(?:far\s+)?(?:(?:d|f)word\s+ptr\s+)?([^\[\],:]+?)\s*[:,]\s*([^\[\],:]+)$", re.I
)
_PUSHPOP_SEG = {
    ("push", "cs"): 0x0E,
    ("push", "ds"): 0x1E,
    ("push", "es"): 0x06,
    ("push", "ss"): 0x16,
    ("pop", "ds"): 0x1F,
    ("pop", "es"): 0x07,
    ("pop", "ss"): 0x17,
}


_REGISTERS = {
    "eax",
    "ebx",
    "ecx",
    "edx",
    "esi",
    "edi",
    "esp",
    "ebp",
    "ax",
    "bx",
    "cx",
    "dx",
    "si",
    "di",
    "sp",
    "bp",
    "al",
    "ah",
    "bl",
    "bh",
    "cl",
    "ch",
    "dl",
    "dh",
    "cs",
    "ds",
    "es",
    "fs",
    "gs",
    "ss",
}


def _is_immediate(operand: str) -> bool:
    """An immediate operand (a number, symbol or expression: not a register or memory)."""
    if not operand or "[" in operand or "ptr" in operand.lower():
        return False
    names = _IDENT_RE.findall(re.sub(r"\b(0[xX][0-9a-fA-F]+|\d+)\b", " ", operand))
    return not any(w.lower() in _REGISTERS or w.lower() in ("dword", "word", "byte") for w in names)


def _rewrite(st: Statement) -> None:
    """Rewrite statements keystone 0.9.2 silently mis-encodes (see module docstring)."""
    text = st.source
    words = text.split()
    mnem = words[0].lower()
    if [w.lower() for w in words[-1:]] == ["movsd"] and all(w.lower() in ("rep", "repe", "repz") for w in words[:-1]):
        # keystone rejects the string-move movsd (it takes it for the SSE2 movsd)
        st.asm = " ".join(words[:-1] + ["movs dword ptr es:[edi], dword ptr [esi]"])
    elif mnem in ("iret", "iretw") and len(words) == 1:
        st.asm = "iretd"  # keystone: iret = 66 CF, the 16-bit return
    elif mnem in ("pushf", "popf") and len(words) == 1:
        st.asm = mnem + "d"  # keystone: pushf/popf = 66 9C/9D, a 16-bit push/pop
    elif len(words) == 2 and (mnem, words[1].lower()) in _PUSHPOP_SEG:
        st.asm = f".byte {_PUSHPOP_SEG[(mnem, words[1].lower())]:#04x}"  # keystone adds 66: 2-byte push/pop
    elif mnem in ("jmp", "ljmp"):
        m = _FARJMP_RE.match(text)
        if m and (mnem == "ljmp" or "far" in text.lower() or ":" in text):
            sel, off = m.group(1).strip(), m.group(2).strip()
            # keystone: ljmp SEL:OFF = 66 EA off16 sel (a 16-bit far jump); jmp SEL:LABEL is rejected
            st.asm = f".byte 0xEA; .long {off}; .word {sel}"
    elif mnem == "push" and len(words) >= 2 and _is_immediate(text[4:].strip()):
        # keystone: push LABEL is FIXUP_INVALID, and push 0xFF80..0xFFFF becomes 6A xx (push imm8,
        # sign-extended: it pushes 0xFFFFFFxx). Always emit push imm32: 68 + 4 bytes.
        st.asm = f".byte 0x68; .long {text[4:].strip()}"
    elif mnem in _DESC_TABLE:
        st.fix = "drop66"  # keystone: lgdt etc. get a 66 prefix (24-bit base); removed after assembly


# ---------------------------------------------------------------------------------------------
# assembling


_RADIX_PROBE = (".long 10", b"\x0a\x00\x00\x00")


def new_keystone() -> Ks:
    """A keystone engine (x86, 32-bit, Intel syntax) that reads decimal numbers as decimal.

    Keystone 0.9.2 leaves MCAsmInfo::Radix uninitialized (see the module docstring): an engine that
    got 16 there is held (so that its memory cannot come back) while another one is made."""
    refused = []
    for _ in range(8):
        ks = Ks(KS_ARCH_X86, KS_MODE_32)
        if bytes(ks.asm(_RADIX_PROBE[0], 0)[0] or b"") == _RADIX_PROBE[1]:
            return ks
        refused.append(ks)
    raise GuestBuildError("keystone reads decimal numbers as hex in every engine it made (its radix is uninitialized)")


def _with_hint(st: Statement, msg: str) -> str:
    for rx, hint in _HINTS:
        if rx.search(st.source):
            return f"{msg}: {hint}"
    return msg


def _source_for(stmts: Sequence[Statement], tail: str = "") -> str:
    parts = []
    for s in stmts:
        parts.append(f"__cv_s{s.index}:")
        parts.append(s.asm)
    return "\n".join(parts) + ("\n" + tail if tail else "")


_ASSIGN_RE = re.compile(r"^\s*(?:\.set|\.equ)\s+([A-Za-z_.$][\w.$]*)\s*,|^\s*([A-Za-z_.$][\w.$]*)\s*=")
_OPERAND_KEYWORDS = {"byte", "word", "dword", "fword", "qword", "tbyte", "ptr", "short", "near", "far"}


def _locate_error(stmts: list[Statement], base: int, err: KsError) -> GuestBuildError:
    """Find the statement that makes keystone fail and say file:line: why.

    Bisects over prefixes of the program; each prefix is completed with definitions of the labels
    (and assignments) that only come later, so that forward references do not fail. The first
    failing prefix ends at the culprit. (Keystone's own sym_resolver is not used: setting one
    corrupts keystone for the rest of the process; see guests/README.md.)
    """
    labels = [s.label for s in stmts if s.label]
    assigns = [s for s in stmts if s.kind == "directive" and _ASSIGN_RE.match(s.asm)]

    def fails(k: int) -> KsError | None:
        prefix = stmts[: k + 1]
        have = {s.label for s in prefix if s.label}
        tail = [f"{name}:" for name in labels if name not in have]
        tail += [s.asm for s in assigns if s.index > prefix[-1].index]
        try:
            new_keystone().asm(_source_for(prefix, "\n".join(tail)), base)
            return None
        except KsError as e:
            return e

    if not stmts or fails(len(stmts) - 1) is None:
        where = stmts[0].where if stmts else "<source>:1"
        return GuestBuildError(f"{where}: {err} (keystone gave no location)")
    lo, hi = 0, len(stmts) - 1  # invariant: the prefix ending at hi fails
    while lo < hi:
        mid = (lo + hi) // 2
        if fails(mid) is not None:
            hi = mid
        else:
            lo = mid + 1
    st = stmts[hi]
    e = fails(hi) or err
    if getattr(e, "errno", None) == KS_ERR_ASM_SYMBOL_MISSING:
        known = set(labels) | {
            m.group(1) or m.group(2) for s in assigns for m in [_ASSIGN_RE.match(s.asm)] if m is not None
        }
        words = _IDENT_RE.findall(re.sub(r"\b(0[xX][0-9a-fA-F]+|\d+)\b|\"[^\"]*\"|'[^']*'", " ", st.asm))
        unknown = [
            w
            for w in words[1:]
            if w not in known and w.lower() not in _REGISTERS and w.lower() not in _OPERAND_KEYWORDS
        ]
        if unknown:
            return GuestBuildError(f"{st.where}: undefined symbol '{unknown[0]}' in `{st.source}`")
    return GuestBuildError(f"{st.where}: {_with_hint(st, str(e))} in `{st.source}`")


def assemble(lines: Iterable[SourceLine], base: int) -> Assembly:
    """Assemble preprocessed lines at ``base`` (which should be 4 KiB aligned: ``.align`` is
    relative to it). Raises GuestBuildError(``file:line: message``)."""
    stmts = split_statements(lines)
    # layout order: text, data, bss; then the bss bounds
    ordered = [s for s in stmts if s.section == "text"] + [s for s in stmts if s.section == "data"]
    bss = [s for s in stmts if s.section == "bss"]
    where = stmts[-1] if stmts else None
    fname, fline = (where.file, where.line) if where else ("<source>", 1)
    for name in ("__bss_start", "__bss_end"):
        if any(s.label == name for s in stmts):
            raise GuestBuildError(f"{fname}:{fline}: {name} is defined by the toolchain")
    ordered.append(Statement(0, "__bss_start:", "__bss_start:", fname, fline, "label", "bss", "__bss_start"))
    ordered += bss
    ordered.append(Statement(0, "__bss_end:", "__bss_end:", fname, fline, "label", "bss", "__bss_end"))
    for i, s in enumerate(ordered):
        s.index = i

    seen: dict[str, Statement] = {}
    for s in ordered:
        if s.label:
            if s.label in seen:
                raise GuestBuildError(f"{s.where}: label '{s.label}' already defined at {seen[s.label].where}")
            seen[s.label] = s
    labels = [s.label for s in ordered if s.label]
    _refuse_label_counts(ordered, set(labels))

    n = len(ordered)
    table_syms = [f"__cv_s{i}" for i in range(n)] + ["__cv_end"] + labels
    table = ["__cv_end:"]
    for k in range(0, len(table_syms), 32):
        table.append(".long " + ", ".join(table_syms[k : k + 32]))
    src = _source_for(ordered, "\n".join(table))
    try:
        enc, _ = new_keystone().asm(src, base)
    except KsError as e:
        raise _locate_error(ordered, base, e) from None
    blob = bytes(enc or b"")
    tlen = 4 * len(table_syms)
    if len(blob) < tlen:
        raise GuestBuildError(f"{fname}:{fline}: internal error: keystone output shorter than its address table")
    code, tab = bytearray(blob[:-tlen]), blob[-tlen:]
    vals = [int.from_bytes(tab[4 * i : 4 * i + 4], "little") for i in range(len(table_syms))]
    addrs, end = vals[:n], vals[n]
    if end != base + len(code):
        raise GuestBuildError(f"{fname}:{fline}: internal error: address table disagrees with the code size")
    for i, s in enumerate(ordered):
        s.addr = addrs[i]
        s.size = (addrs[i + 1] if i + 1 < n else end) - addrs[i]
        if s.size < 0:
            raise GuestBuildError(f"{s.where}: internal error: statement addresses out of order")
    symbols = dict(zip(labels, vals[n + 1 :]))

    for s in ordered:
        if s.fix == "drop66":
            _drop_opsize_prefix(code, base, s)
    asm = Assembly(base, bytes(code), ordered, symbols, symbols["__bss_start"], symbols["__bss_end"])
    if any(asm.code[asm.bss_start - base :]):
        raise GuestBuildError(f"{fname}:{fline}: internal error: .bss is not all zeros")
    problems = check_encodings(asm)
    if problems:
        raise GuestBuildError(problems[0])
    return asm


_LEGACY_PREFIXES = {0xF0, 0xF2, 0xF3, 0x2E, 0x36, 0x3E, 0x26, 0x64, 0x65, 0x66, 0x67}


def _drop_opsize_prefix(code: bytearray, base: int, s: Statement) -> None:
    off = s.addr - base
    b = code[off : off + s.size]
    k = 0
    while k < len(b) and b[k] in _LEGACY_PREFIXES:
        if b[k] == 0x66:
            code[off : off + s.size] = b[:k] + b[k + 1 :] + b"\x90"
            return
        k += 1


# ---------------------------------------------------------------------------------------------
# verification


_cs = Cs(CS_ARCH_X86, CS_MODE_32)


def _prefixes(raw: bytes) -> bytes:
    k = 0
    while k < len(raw) and raw[k] in _LEGACY_PREFIXES:
        k += 1
    return raw[:k]


def check_encodings(asm: Assembly) -> list[str]:
    """Decode every instruction statement; return ``file:line: problem`` strings (empty: all good)."""
    problems: list[str] = []
    for s in asm.statements:
        # keystone drops what it cannot parse as an instruction without an error (AT&T operands
        # among it): a check placed after such a line would pass on code that was never there.
        if s.kind == "insn" and not s.size:
            hint = (
                " (AT&T syntax? guests are written in Intel syntax: `inc eax`, `mov eax, 5`)"
                if _ATT_RE.search(s.source)
                else ""
            )
            problems.append(f"{s.where}: `{s.source}` assembled to no bytes: keystone did not understand it{hint}")
    for s in asm.instructions():
        off = s.addr - asm.base
        region = asm.code[off : off + s.size]
        covered = 0
        for insn in _cs.disasm(region, s.addr):
            covered += insn.size
            raw = bytes(insn.bytes)
            pre = _prefixes(raw)
            opcode = raw[len(pre) :]
            hexb = raw.hex(" ")
            if opcode[:1] == b"\x6a" and 0x66 not in pre:
                problems.append(
                    f"{s.where}: `{s.source}` assembled as {hexb} (push imm8): keystone mis-encodes "
                    "push 0xFF80..0xFFFF this way; the toolchain should have emitted push imm32"
                )
            if 0x66 not in pre:
                continue
            mn = insn.mnemonic
            if mn in _DESC_TABLE:
                problems.append(f"{s.where}: `{s.source}` assembled as {hexb}: 16-bit {mn} (24-bit base)")
            elif opcode[:1] == b"\xea":
                problems.append(f"{s.where}: `{s.source}` assembled as {hexb}: 16-bit far jump; write jmp SEL:OFF")
            elif opcode[:1] == b"\xcf":
                problems.append(f"{s.where}: `{s.source}` assembled as {hexb}: 16-bit iret; write iretd")
            elif (
                not _REG16_RE.search(s.source)
                and mn not in _INTRINSIC16
                and "xmm" not in insn.op_str
                and not s.source.lstrip().startswith(".")
            ):
                problems.append(
                    f"{s.where}: keystone 0.9.2 encoded `{s.source}` as {hexb} ({mn} {insn.op_str}), "
                    "with a 0x66 operand-size prefix, i.e. a 16-bit operation; write the 32-bit form "
                    "(e.g. `push 5`, not `push dword 5`) or name the 16-bit operand explicitly"
                )
        if covered != len(region):
            problems.append(f"{s.where}: `{s.source}` does not decode as whole instructions ({region.hex(' ')})")
    return problems
