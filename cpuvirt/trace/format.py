"""Exit traces, format cpuvirt-trace/1 (DESIGN.md section 5): JSON Lines written as events happen.

A header line, one line per event, a footer line. Events never hold wall-clock times (they would break
determinism); not even the footer has one, so two runs give byte-identical traces.
"""

from __future__ import annotations

import json
from typing import IO, Iterator

from cpuvirt import __version__
from cpuvirt.errors import TraceFormatError

FORMAT = "cpuvirt-trace/1"
KINDS = (
    "vmexit",
    "trap",
    "callout",
    "hypercall",
    "io",
    "interrupt",
    "exception",
    "page_fault",
    "hlt",
    "translate",
    "entry_failure",
    "unhandled_io",
    "unbacked_memory",
)


class TraceWriter:
    def __init__(self, stream: IO[str], guest: str, image_sha256: str, mode: str, options: dict):
        self.stream = stream
        self.seq = 0
        self._line(
            {
                "type": "header",
                "format": FORMAT,
                "guest": guest,
                "image_sha256": image_sha256,
                "mode": mode,
                "options": options,
                "cpuvirt": __version__,
            }
        )

    def _line(self, obj: dict) -> None:
        self.stream.write(json.dumps(obj, separators=(",", ":")) + "\n")

    def event(
        self,
        icount: int,
        cpl: int,
        kind: str,
        reason: str,
        code,
        eip: int,
        insn: str,
        detail: dict | None = None,
        action: str = "",
    ) -> None:
        self._line(
            {
                "type": "event",
                "seq": self.seq,
                "icount": icount,
                "cpl": cpl,
                "kind": kind,
                "reason": reason,
                "code": code,
                "eip": f"{eip:#x}",
                "insn": insn,
                "detail": detail or {},
                "action": action,
            }
        )
        self.seq += 1

    def footer(self, outcome: str, status: int, icount: int, counts: dict) -> None:
        # No wall-clock time here (DESIGN.md puts wall_s in the footer): two runs must give
        # byte-identical traces, so wall time is only in the run summary on stderr.
        self._line({"type": "footer", "outcome": outcome, "status": status, "icount": icount, "counts": counts})
        self.stream.flush()


class Trace:
    """A trace read back: header, events, and footer (None when the run crashed mid-way)."""

    def __init__(self, header: dict, events: list[dict], footer: dict | None):
        self.header, self.events, self.footer = header, events, footer


_EVENT_KEYS = ("seq", "icount", "cpl", "kind", "reason", "code", "eip", "insn", "detail", "action")


def read_trace(path: str) -> Trace:
    """A trace file, gzip-compressed (the golden traces under traces/) or not; "-" reads stdin."""
    import gzip
    import io
    import sys

    try:
        if path == "-":
            return _parse("<stdin>", io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8"))
        with open(path, "rb") as raw:
            gz = raw.read(2) == b"\x1f\x8b"
        opener = gzip.open if gz else open
        with opener(path, "rt", encoding="utf-8") as f:
            return _parse(path, f)
    except OSError as e:
        raise TraceFormatError(f"{path}: cannot read trace: {e.strerror or e}") from None
    except (UnicodeDecodeError, EOFError):
        raise TraceFormatError(f"{path}: not a cpuvirt trace (not UTF-8 text, or a truncated gzip file)") from None


def _parse(path: str, lines: Iterator[str]) -> Trace:
    header, footer, events = None, None, []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise TraceFormatError(f"{path}:{n}: malformed trace line ({e.msg})") from None
        if not isinstance(obj, dict) or "type" not in obj:
            raise TraceFormatError(f"{path}:{n}: a trace line must be a JSON object with a 'type'")
        kind = obj["type"]
        if header is None:
            if kind != "header" or obj.get("format") != FORMAT:
                raise TraceFormatError(f"{path}:{n}: not a {FORMAT} trace (first line must be its header)")
            header = obj
        elif footer is not None:
            raise TraceFormatError(f"{path}:{n}: line after the footer")
        elif kind == "event":
            missing = [k for k in _EVENT_KEYS if k not in obj]
            if missing:
                raise TraceFormatError(f"{path}:{n}: event lacks {', '.join(missing)}")
            events.append(obj)
        elif kind == "footer":
            footer = obj
        else:
            raise TraceFormatError(f"{path}:{n}: unknown line type {kind!r}")
    if header is None:
        raise TraceFormatError(f"{path}: empty file, not a {FORMAT} trace")
    return Trace(header, events, footer)
