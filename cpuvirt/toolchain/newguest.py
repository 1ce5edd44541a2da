"""`cpuvirt new-guest NAME`: a skeleton guest that builds and PASSes in every mode it can run in."""

from __future__ import annotations

import re
from pathlib import Path

from cpuvirt.errors import CpuvirtError

TEMPLATES = Path(__file__).resolve().parent / "templates"


def new_guest(name: str, folder: Path | str = ".", c: bool = False) -> list[Path]:
    """Write the skeleton: NAME.S (assembler, with a PV build), or NAME/ with a C kernel and its
    Makefile. Refuses to overwrite anything."""
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]*", name):
        raise CpuvirtError(f"new-guest {name!r}: a name is a letter then letters, digits, '_' or '-'")
    folder = Path(folder)
    if not folder.is_dir():
        raise CpuvirtError(f"{folder}: no such folder")
    if c:
        target = folder / name
        if target.exists():
            raise CpuvirtError(f"{target} exists: not overwritten")
        sources = sorted((TEMPLATES / "c").iterdir())
        outputs = [target / p.name for p in sources]
    else:
        target = folder / f"{name}.S"
        if target.exists():
            raise CpuvirtError(f"{target} exists: not overwritten")
        sources, outputs = [TEMPLATES / "guest.S"], [target]
    try:
        if c:
            target.mkdir()
        for src, out in zip(sources, outputs):
            out.write_text(src.read_text().replace("@NAME@", name))
    except OSError as e:
        raise CpuvirtError(f"{e.filename}: {e.strerror}") from None
    return outputs
