"""Built guest images, kept between runs so that `cpuvirt run hello` does not assemble hello each time.

Assembling a bundled guest costs more than the rest of a short run's start-up (keystone's import,
preprocessing, assembly, the encoding check). A build is a pure function of the guest sources, the
toolchain's own code and the keystone build, so the image is stored under a key hashed from all of
them: any edit to a guest, an include or the toolchain gives a new key, and a stale image can never be
used. The cache lives in $CPUVIRT_CACHE, else $XDG_CACHE_HOME/cpuvirt, else ~/.cache/cpuvirt;
CPUVIRT_CACHE=off turns it off. A cache that cannot be written is skipped without a word (the build
simply happens every time), and files are replaced atomically, so parallel runs never see half an image.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from importlib.util import find_spec
from pathlib import Path
from typing import Callable

_TOOLCHAIN_FILES = ("preprocess.py", "assemble.py", "image.py", "build.py", "cache.py")
_SOURCE_SUFFIXES = (".S", ".inc", ".h")


def cache_dir() -> Path | None:
    env = os.environ.get("CPUVIRT_CACHE")
    if env:
        return None if env.lower() in ("off", "0", "no") else Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "cpuvirt"


def _keystone_build() -> str:
    """Which keystone: its files' names and sizes (cheap; importing keystone or importlib.metadata to
    ask its version would cost more than the cache saves)."""
    spec = find_spec("keystone")
    if spec is None or spec.origin is None:
        return "none"
    folder = Path(spec.origin).parent
    return ";".join(
        f"{p.name}:{p.stat().st_size}"
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.suffix in (".py", ".so", ".dylib", ".dll")
    )


def build_key(source_root: Path, name: str, pv: bool) -> str:
    """sha256 over the toolchain's code, which keystone, the guest's source and every file of the
    include folder (path and bytes), and the build's name and PV flag."""
    h = hashlib.sha256()
    here = Path(__file__).resolve().parent
    for fname in _TOOLCHAIN_FILES:
        h.update(fname.encode() + b"\0" + (here / fname).read_bytes() + b"\0")
    h.update(_keystone_build().encode() + b"\0")
    sources = [source_root / f"{name}.S"] + sorted((source_root / "include").rglob("*"))
    for path in sources:
        if path.suffix in _SOURCE_SUFFIXES and path.is_file():
            h.update(str(path.relative_to(source_root)).encode() + b"\0" + path.read_bytes() + b"\0")
    h.update(f"{name}\0{int(pv)}".encode())
    return h.hexdigest()


def cached_image(source_root: Path, name: str, pv: bool, build: Callable[[], bytes]) -> bytes:
    """The image of guest `name` (its PV build if `pv`): from the cache when present, else `build()`,
    stored for next time."""
    where = cache_dir()
    if where is None:
        return build()
    path = where / "guests" / f"{name}{'.pv' if pv else ''}-{build_key(source_root, name, pv)[:32]}.bin"
    try:
        return path.read_bytes()
    except OSError:
        pass
    image = build()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(image)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
        for old in path.parent.glob(f"{name}{'.pv' if pv else ''}-*.bin"):  # earlier builds of this guest
            if old != path:
                old.unlink(missing_ok=True)
    except OSError:
        pass  # a read-only home, a full disk: no cache, the same image
    return image
