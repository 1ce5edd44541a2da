"""The bundled guests: list them, build one, build them all.

A guest is ``guests/NAME.S`` (shared code in ``guests/include/*.inc``). Its first lines carry a
``# description: one line`` comment. A guest whose source (or an include it uses) tests ``PV`` in a
conditional has a paravirtualized build as well (``PV`` = 1); every build defines ``PV`` (0 or 1).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cpuvirt.errors import CpuvirtError

if TYPE_CHECKING:
    from cpuvirt.toolchain.assemble import Assembly
    from cpuvirt.toolchain.preprocess import Preprocessed

_DESCRIPTION_RE = re.compile(r"^\s*#\s*description:\s*(.*?)\s*$", re.I)


@dataclass(frozen=True)
class GuestInfo:
    name: str
    description: str
    has_pv: bool
    source: Path


def guest_source_dir() -> Path:
    """Where the guest sources are: $CPUVIRT_GUESTS; else ``guests/`` of the checkout cpuvirt runs
    from (an editable install); else the copy an installed package carries (``cpuvirt/_guests``)."""
    env = os.environ.get("CPUVIRT_GUESTS")
    if env:
        return Path(env)
    package = Path(__file__).resolve().parents[1]
    checkout = package.parent / "guests"
    if (checkout / "include").is_dir():
        return checkout
    return package / "_guests"


def include_dir() -> Path:
    return guest_source_dir() / "include"


def _description(path: Path) -> str:
    with path.open(encoding="utf-8") as f:
        for i, line in enumerate(f):
            m = _DESCRIPTION_RE.match(line)
            if m:
                return m.group(1)
            if i >= 20:
                break
    return ""


def _preprocess(path: Path, pv: bool) -> Preprocessed:
    from cpuvirt.toolchain.preprocess import preprocess

    return preprocess(path, {"PV": int(pv)}, [include_dir()])


def _has_pv(path: Path) -> bool:
    # One pass suffices: a conditional nested in a region PV=0 skips is guarded by a conditional
    # that was evaluated, and that one mentions PV if the nested one can be reached with PV=1.
    return "PV" in _preprocess(path, False).condition_names


def list_guests() -> list[GuestInfo]:
    """The bundled guests, sorted by name."""
    d = guest_source_dir()
    if not d.is_dir():
        return []
    return [GuestInfo(p.stem, _description(p), _has_pv(p), p) for p in sorted(d.glob("*.S"))]


def _source(name: str) -> Path:
    path = guest_source_dir() / f"{name}.S"
    if not re.fullmatch(r"[A-Za-z0-9_-]+", name) or not path.is_file():
        names = ", ".join(g.name for g in list_guests())
        raise CpuvirtError(f"unknown guest '{name}' (bundled guests: {names})")
    return path


def assemble_guest(name: str, pv: bool = False) -> tuple[bytes, Assembly]:
    """Build a bundled guest: (image bytes, the assembly with its symbols and line map)."""
    path = _source(name)
    pre = _preprocess(path, pv)
    if pv and "PV" not in pre.condition_names:
        raise CpuvirtError(f"guest '{name}' has no paravirtualized build (its source never tests PV)")
    from cpuvirt.toolchain.image import build_image  # keystone and capstone: only when assembling

    return build_image(pre.lines)


def build_source(path: Path | str, pv: bool = False) -> bytes:
    """The Multiboot image of one guest source file anywhere (``cpuvirt run mine.S``): the bundled
    includes are found first, then the file's own folder."""
    path = Path(path)
    if not path.is_file():
        raise CpuvirtError(f"{path}: no such guest source file")
    from cpuvirt.toolchain.preprocess import preprocess

    pre = preprocess(path, {"PV": int(pv)}, [include_dir(), path.resolve().parent])
    if pv and "PV" not in pre.condition_names:
        raise CpuvirtError(f"{path}: no paravirtualized build (the source never tests PV; see guests/README.md)")
    from cpuvirt.toolchain.image import build_image

    return build_image(pre.lines)[0]


def build_guest(name: str, pv: bool = False) -> bytes:
    """The Multiboot image of a bundled guest (its PV build with pv=True), from the build cache when
    the sources and the toolchain are unchanged since it was built (toolchain/cache.py)."""
    from cpuvirt.toolchain.cache import cached_image

    _source(name)
    return cached_image(guest_source_dir(), name, pv, lambda: assemble_guest(name, pv)[0])


def build_all(outdir: Path | str) -> list[Path]:
    """Write NAME.bin (and NAME.pv.bin for PV-capable guests) into outdir; return the paths."""
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for g in list_guests():
        for pv in (False, True) if g.has_pv else (False,):
            p = out / f"{g.name}{'.pv' if pv else ''}.bin"
            p.write_bytes(build_guest(g.name, pv))
            written.append(p)
    return written
