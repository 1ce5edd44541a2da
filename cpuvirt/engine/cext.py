"""Loading cpuvirt's C hooks: each is a Python extension module only so that setuptools compiles it;
Python talks to it through ctypes, and its state structures are mirrored by ctypes.Structure classes
whose sizes must match the C ones (each C file exports a `<name>_sizeof` per structure)."""

from __future__ import annotations

import ctypes
import importlib.util


def load(module: str, layouts: dict[str, type]) -> ctypes.CDLL | None:
    """The extension `module` as a ctypes library, or None when it is not built or when any
    `sizeof` function in `layouts` disagrees with its mirror (an extension older than its .py)."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        return None
    lib = ctypes.CDLL(spec.origin)
    for sizeof, mirror in layouts.items():
        fn = getattr(lib, sizeof)
        fn.restype = ctypes.c_size_t
        if fn() != ctypes.sizeof(mirror):
            return None
    return lib
