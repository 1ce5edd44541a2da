"""A small preprocessor for guest assembly sources, with a line map.

Directives (written with no space after the ``#``; ``# text`` with a space is a comment):

- ``#include "file"`` / ``#include <file>``: "file" is looked up relative to the including file, then
  in the include directories (``guests/include/`` for the bundled guests); <file> only in the latter.
- ``#define NAME value`` (object-like) and ``#define NAME(a, b) body`` (function-like; no space
  between the name and the ``(``). Substitution is whole-word, never inside string or character
  literals, and rescans the result (a macro is not expanded inside its own expansion). In a
  function-like body, ``a ## b`` pastes tokens and ``__UNIQ__`` becomes a number unique to that
  expansion (for labels a macro defines). A line ending in ``\\`` continues on the next line.
- ``#undef NAME``, ``#error message``.
- ``#if EXPR``, ``#ifdef NAME``, ``#ifndef NAME``, ``#elif EXPR``, ``#else``, ``#endif``, nested.
  EXPR is a C integer expression over macros, ``defined(NAME)``/``defined NAME`` and numbers;
  unknown names are 0. The build passes ``PV`` = 1 or 0, so ``#if PV`` selects paravirtualized code.

Comments: ``#`` (outside literals, and not a directive at the start of a line) or ``//`` up to the end
of the line. They are removed from the output.

Every output line carries the (file, line) it came from: text produced by a macro expansion carries
the location of the line that invoked it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

from cpuvirt.errors import GuestBuildError

_ROOT = Path(__file__).resolve().parents[2]

DIRECTIVES = ("include", "define", "undef", "ifdef", "ifndef", "if", "elif", "else", "endif", "error")
_DIRECTIVE_RE = re.compile(r"^\s*#(" + "|".join(DIRECTIVES) + r")\b(.*)$", re.S)
_IDENT_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# a string or character literal (opaque), or an identifier not preceded by a word character
_TOKEN_RE = re.compile(r"\"(?:\\.|[^\"\\])*\"?|'(?:\\.|[^'\\])*'|(?<![\w.$])([A-Za-z_]\w*)")
_MAX_INCLUDE_DEPTH = 32
_MAX_EXPANSION_DEPTH = 64


@dataclass(frozen=True)
class SourceLine:
    """One line of preprocessed text and where it came from (file as displayed, 1-based line)."""

    file: str
    line: int
    text: str

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass
class Macro:
    name: str
    params: tuple[str, ...] | None  # None: object-like
    body: str
    where: str


@dataclass
class Preprocessed:
    lines: list[SourceLine]
    #: names that appeared in an evaluated #if/#ifdef/#ifndef/#elif condition
    condition_names: set[str] = field(default_factory=set)
    #: every file read, as displayed, in first-read order
    files: list[str] = field(default_factory=list)


def display_path(path: Path) -> str:
    """How a source file is named in messages: relative to the repository or the cwd when possible."""
    p = Path(path).resolve()
    for root in (_ROOT, Path.cwd().resolve()):
        try:
            return p.relative_to(root).as_posix()
        except ValueError:
            pass
    return str(p)


# ---------------------------------------------------------------------------------------------
# lexical helpers (string and character literals are opaque everywhere)


def _skip_literal(text: str, i: int) -> int:
    """text[i] is a quote; return the index just past the matching closing quote (or len)."""
    q = text[i]
    i += 1
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == q:
            return i + 1
        i += 1
    return len(text)


def strip_comment(text: str, keep_paste: bool = False) -> str:
    """Remove a ``#`` or ``//`` comment (outside literals). With keep_paste, ``##`` is not a comment."""
    if "#" not in text and "/" not in text:
        return text.rstrip()
    i = 0
    n = len(text)
    while i < n:
        c = text[i]
        if c in "\"'":
            # a lone apostrophe (e.g. in prose) would swallow the rest; treat ' as a literal only
            # when it closes on this line
            if c == "'" and text.find("'", i + 1) < 0:
                i += 1
                continue
            i = _skip_literal(text, i)
            continue
        if c == "#":
            if keep_paste and i + 1 < n and text[i + 1] == "#":
                i += 2
                continue
            return text[:i].rstrip()
        if c == "/" and i + 1 < n and text[i + 1] == "/":
            return text[:i].rstrip()
        i += 1
    return text.rstrip()


def split_top_level(text: str, sep: str) -> list[str]:
    """Split on sep outside literals and outside (), []."""
    if sep not in text:
        return [text]
    parts, depth, cur, i = [], 0, [], 0
    while i < len(text):
        c = text[i]
        if c in "\"'":
            j = _skip_literal(text, i)
            cur.append(text[i:j])
            i = j
            continue
        if c in "([":
            depth += 1
        elif c in ")]":
            depth -= 1
        if c == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    parts.append("".join(cur))
    return parts


def _replace_words(text: str, mapping: Mapping[str, str]) -> str:
    """Whole-word replacement outside literals."""
    out, i = [], 0
    while i < len(text):
        c = text[i]
        if c in "\"'":
            j = _skip_literal(text, i)
            out.append(text[i:j])
            i = j
            continue
        m = _IDENT_RE.match(text, i)
        if m and (i == 0 or not (text[i - 1].isalnum() or text[i - 1] == "_")):
            w = m.group(0)
            out.append(mapping.get(w, w))
            i = m.end()
            continue
        out.append(c)
        i += 1
    return "".join(out)


# ---------------------------------------------------------------------------------------------
# #if expressions

_EXPR_TOKEN_RE = re.compile(
    r"\s*(?:(0[xX][0-9a-fA-F]+|\d+)[uUlL]*|([A-Za-z_]\w*)|(<<|>>|<=|>=|==|!=|&&|\|\||[-+*/%<>&|^!~()?:]))"
)

_BINARY_PRECEDENCE = {
    "||": 1,
    "&&": 2,
    "|": 3,
    "^": 4,
    "&": 5,
    "==": 6,
    "!=": 6,
    "<": 7,
    ">": 7,
    "<=": 7,
    ">=": 7,
    "<<": 8,
    ">>": 8,
    "+": 9,
    "-": 9,
    "*": 10,
    "/": 10,
    "%": 10,
}


def _eval_expr(text: str) -> int:
    tokens: list[tuple[str, object]] = []
    pos = 0
    text = text.strip()
    while pos < len(text):
        m = _EXPR_TOKEN_RE.match(text, pos)
        if not m or m.end() == pos:
            raise ValueError(f"bad token in #if expression near {text[pos : pos + 10]!r}")
        if m.group(1):
            tokens.append(("num", int(m.group(1), 0)))
        elif m.group(2):
            tokens.append(("num", 0))  # an identifier left after expansion is 0, as in C
        else:
            tokens.append(("op", m.group(3)))
        pos = m.end()
        while pos < len(text) and text[pos].isspace():
            pos += 1
    k = 0

    def peek():
        return tokens[k] if k < len(tokens) else ("end", None)

    def unary() -> int:
        nonlocal k
        kind, val = peek()
        if kind == "num":
            k += 1
            return int(val)  # type: ignore[arg-type]
        if val == "(":
            k += 1
            v = ternary()
            if peek() != ("op", ")"):
                raise ValueError("missing ')' in #if expression")
            k += 1
            return v
        if val in ("!", "~", "-", "+"):
            k += 1
            v = unary()
            return {"!": int(not v), "~": ~v, "-": -v, "+": v}[val]  # type: ignore[index]
        raise ValueError("incomplete #if expression")

    def binary(min_prec: int) -> int:
        nonlocal k
        left = unary()
        while True:
            kind, op = peek()
            prec = _BINARY_PRECEDENCE.get(op) if kind == "op" else None  # type: ignore[arg-type]
            if prec is None or prec < min_prec:
                return left
            k += 1
            right = binary(prec + 1)
            if op in ("/", "%") and right == 0:
                raise ValueError("division by zero in #if expression")
            left = {
                "||": lambda a, b: int(bool(a) or bool(b)),
                "&&": lambda a, b: int(bool(a) and bool(b)),
                "|": lambda a, b: a | b,
                "^": lambda a, b: a ^ b,
                "&": lambda a, b: a & b,
                "==": lambda a, b: int(a == b),
                "!=": lambda a, b: int(a != b),
                "<": lambda a, b: int(a < b),
                ">": lambda a, b: int(a > b),
                "<=": lambda a, b: int(a <= b),
                ">=": lambda a, b: int(a >= b),
                "<<": lambda a, b: a << b,
                ">>": lambda a, b: a >> b,
                "+": lambda a, b: a + b,
                "-": lambda a, b: a - b,
                "*": lambda a, b: a * b,
                "/": lambda a, b: int(a / b),
                "%": lambda a, b: a - b * int(a / b),
            }[op](left, right)  # type: ignore[index]

    def ternary() -> int:
        nonlocal k
        cond = binary(1)
        if peek() == ("op", "?"):
            k += 1
            a = ternary()
            if peek() != ("op", ":"):
                raise ValueError("missing ':' in #if expression")
            k += 1
            b = ternary()
            return a if cond else b
        return cond

    if not tokens:
        raise ValueError("#if with no expression")
    v = ternary()
    if k != len(tokens):
        raise ValueError("junk at the end of the #if expression")
    return v


# ---------------------------------------------------------------------------------------------


class Preprocessor:
    """Preprocesses one translation unit; see the module docstring for the language."""

    def __init__(self, defines: Mapping[str, object] | None = None, include_dirs: Iterable[Path] = ()):
        self.macros: dict[str, Macro] = {}
        for name, value in (defines or {}).items():
            if isinstance(value, bool):
                value = int(value)
            self.macros[name] = Macro(name, None, "" if value is None else str(value), "<command line>")
        self.include_dirs = [Path(d) for d in include_dirs]
        self._uniq = 0
        self._out: list[SourceLine] = []
        self._names: set[str] = set()
        self._files: list[str] = []

    # -- entry points
    def run_file(self, path: Path) -> Preprocessed:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise GuestBuildError(f"{display_path(path)}:1: cannot read: {e.strerror or e}") from None
        return self.run_text(text, display_path(path), path.parent)

    def run_text(self, text: str, filename: str = "<source>", base_dir: Path | None = None) -> Preprocessed:
        self._out, self._names, self._files = [], set(), []
        self._process(text, filename, base_dir, depth=0)
        return Preprocessed(self._out, self._names, self._files)

    # -- internals
    def _error(self, where: str, msg: str) -> GuestBuildError:
        return GuestBuildError(f"{where}: {msg}")

    def _logical_lines(self, text: str):
        """Yield (first physical line number, logical line) joining backslash continuations."""
        lines = text.split("\n")
        i = 0
        while i < len(lines):
            start = i
            cur = lines[i].rstrip("\r")
            while cur.endswith("\\") and i + 1 < len(lines):
                i += 1
                cur = cur[:-1] + " " + lines[i].rstrip("\r")
            yield start + 1, cur
            i += 1

    def _process(self, text: str, filename: str, base_dir: Path | None, depth: int) -> None:
        if depth > _MAX_INCLUDE_DEPTH:
            raise self._error(f"{filename}:1", "#include nested too deeply (recursive include?)")
        if filename not in self._files:
            self._files.append(filename)
        # stack of [active_now, parent_active, taken_already, else_seen, where]
        stack: list[list] = []
        active = True
        for lineno, raw in self._logical_lines(text):
            where = f"{filename}:{lineno}"
            m = _DIRECTIVE_RE.match(raw)
            if m:
                name = m.group(1)
                rest = strip_comment(m.group(2), keep_paste=(name == "define")).strip()
                if name in ("if", "ifdef", "ifndef"):
                    if active:
                        cond = self._condition(name, rest, where)
                    else:
                        cond = False
                    stack.append([active and cond, active, cond, False, where])
                    active = active and cond
                elif name == "elif":
                    if not stack or stack[-1][3]:
                        raise self._error(where, "#elif without #if")
                    top = stack[-1]
                    if top[1] and not top[2]:
                        cond = self._condition("if", rest, where)
                        top[0] = cond
                        top[2] = cond
                    else:
                        top[0] = False
                    active = top[0]
                elif name == "else":
                    if not stack or stack[-1][3]:
                        raise self._error(where, "#else without #if")
                    top = stack[-1]
                    top[3] = True
                    top[0] = top[1] and not top[2]
                    top[2] = True
                    active = top[0]
                elif name == "endif":
                    if not stack:
                        raise self._error(where, "#endif without #if")
                    stack.pop()
                    active = stack[-1][0] if stack else True
                elif not active:
                    continue
                elif name == "define":
                    self._define(rest, where)
                elif name == "undef":
                    if not _IDENT_RE.fullmatch(rest):
                        raise self._error(where, "#undef needs one macro name")
                    self.macros.pop(rest, None)
                elif name == "error":
                    raise self._error(where, f"#error {rest}")
                elif name == "include":
                    self._include(rest, where, base_dir, depth)
                continue
            if not active:
                continue
            body = strip_comment(raw)
            if not body.strip():
                continue
            try:
                expanded = self._expand(body, frozenset(), 0)
            except ValueError as e:
                raise self._error(where, str(e)) from None
            self._out.append(SourceLine(filename, lineno, expanded))
        if stack:
            raise self._error(stack[-1][4], "unterminated conditional (#if without #endif)")

    def _condition(self, kind: str, rest: str, where: str) -> bool:
        if kind in ("ifdef", "ifndef"):
            if not _IDENT_RE.fullmatch(rest):
                raise self._error(where, f"#{kind} needs one macro name")
            self._names.add(rest)
            return (rest in self.macros) == (kind == "ifdef")
        self._names.update(w for w in _IDENT_RE.findall(rest) if w != "defined")

        def repl(m: re.Match) -> str:
            return "1" if m.group(1) in self.macros else "0"

        expr = re.sub(r"\bdefined\s*\(\s*([A-Za-z_]\w*)\s*\)", repl, rest)
        expr = re.sub(r"\bdefined\s+([A-Za-z_]\w*)", repl, expr)
        try:
            return bool(_eval_expr(self._expand(expr, frozenset(), 0)))
        except ValueError as e:
            raise self._error(where, str(e)) from None

    def _define(self, rest: str, where: str) -> None:
        m = re.match(r"([A-Za-z_]\w*)(\(([^)]*)\))?\s*(.*)$", rest, re.S)
        if not m:
            raise self._error(where, "#define needs a macro name")
        name, params, body = m.group(1), m.group(3), m.group(4).strip()
        if name == "defined":
            raise self._error(where, "'defined' cannot be a macro name")
        plist: tuple[str, ...] | None = None
        if m.group(2) is not None:
            plist = tuple(p.strip() for p in params.split(",")) if params.strip() else ()
            for p in plist:
                if not _IDENT_RE.fullmatch(p):
                    raise self._error(where, f"bad macro parameter name {p!r}")
            if len(set(plist)) != len(plist):
                raise self._error(where, "duplicate macro parameter name")
        self.macros[name] = Macro(name, plist, body, where)

    def _include(self, rest: str, where: str, base_dir: Path | None, depth: int) -> None:
        m = re.fullmatch(r'"([^"]+)"|<([^>]+)>', rest)
        if not m:
            raise self._error(where, '#include expects "file" or <file>')
        name = m.group(1) or m.group(2)
        candidates: list[Path] = []
        if m.group(1) and base_dir is not None:
            candidates.append(base_dir / name)
        candidates += [d / name for d in self.include_dirs]
        for c in candidates:
            if c.is_file():
                text = c.read_text(encoding="utf-8")
                self._process(text, display_path(c), c.parent, depth + 1)
                return
        raise self._error(where, f"cannot find include file {name!r}")

    def _expand(self, text: str, active: frozenset, depth: int) -> str:
        if depth > _MAX_EXPANSION_DEPTH:
            raise ValueError("macro expansion nested too deeply")
        macros = self.macros
        if not any(w in macros for w in _IDENT_RE.findall(text)):
            return text
        out: list[str] = []
        pos = 0
        n = len(text)
        while True:
            m = _TOKEN_RE.search(text, pos)
            if m is None:
                out.append(text[pos:])
                break
            out.append(text[pos : m.start()])
            word = m.group(1)
            pos = m.end()
            macro = macros.get(word) if word else None
            if macro is None or word in active:
                out.append(m.group(0))
                continue
            if macro.params is None:
                out.append(self._expand(macro.body, active | {word}, depth + 1))
                continue
            j = pos
            while j < n and text[j] in " \t":
                j += 1
            if j >= n or text[j] != "(":
                out.append(word)  # a function-like macro's name without arguments is left alone
                continue
            args, pos = self._parse_args(text, j, word)
            if len(args) == 1 and args[0].strip() == "" and not macro.params:
                args = []
            if len(args) != len(macro.params):
                raise ValueError(f"macro {word} takes {len(macro.params)} argument(s), got {len(args)}")
            self._uniq += 1
            mapping = {p: a.strip() for p, a in zip(macro.params, args)}
            mapping["__UNIQ__"] = str(self._uniq)
            body = _replace_words(macro.body, mapping)
            body = re.sub(r"\s*##\s*", "", body)
            out.append(self._expand(body, active | {word}, depth + 1))
        return "".join(out)

    @staticmethod
    def _parse_args(text: str, j: int, name: str) -> tuple[list[str], int]:
        """text[j] == '('; return (arguments, index past the closing parenthesis)."""
        depth = 0
        args: list[str] = []
        cur: list[str] = []
        i = j
        while i < len(text):
            c = text[i]
            if c in "\"'":
                k = _skip_literal(text, i)
                cur.append(text[i:k])
                i = k
                continue
            if c in "([":
                depth += 1
                if depth == 1 and c == "(":
                    i += 1
                    continue
            elif c in ")]":
                depth -= 1
                if depth == 0:
                    args.append("".join(cur))
                    return args, i + 1
            elif c == "," and depth == 1:
                args.append("".join(cur))
                cur = []
                i += 1
                continue
            cur.append(c)
            i += 1
        raise ValueError(f"unterminated argument list for macro {name}")


def preprocess(
    path: Path, defines: Mapping[str, object] | None = None, include_dirs: Iterable[Path] = ()
) -> Preprocessed:
    """Preprocess a file. ``defines`` maps names to values (e.g. ``{"PV": 1}``)."""
    return Preprocessor(defines, include_dirs).run_file(Path(path))


def preprocess_text(
    text: str,
    filename: str = "<source>",
    defines: Mapping[str, object] | None = None,
    include_dirs: Iterable[Path] = (),
    base_dir: Path | None = None,
) -> Preprocessed:
    """Preprocess source text; ``#include "x"`` looks in base_dir first, then include_dirs."""
    return Preprocessor(defines, include_dirs).run_text(text, filename, base_dir)
