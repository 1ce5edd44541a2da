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


def first_fill_hook(uc) -> bool:
    """Count a UC_HOOK_TLB_FILL hook about to be added to `uc`: True for the engine's first. Unicorn asks
    the fill hooks in the order they were added, and the first may run before the engine's state is
    restored (memory/fastfill.py `lazy`): every cpuvirt fill hook is counted here as it is added."""
    n = uc.__dict__.get("_cpuvirt_fill_hooks", 0)
    uc.__dict__["_cpuvirt_fill_hooks"] = n + 1
    return n == 0


def add_c_hook(uch, htype: int, fn, data, begin: int = 1, end: int = 0, insn: int | None = None, what: str = "") -> int:
    """Add an engine hook whose callback is a C (or ctypes) function, through libunicorn itself: the
    binding only adds Python callbacks. `uch` is the engine's handle (`Uc._uch`), `data` the callback's
    user data (a `c_void_p`, an address, or None), `insn` the instruction of a UC_HOOK_INSN hook. The
    caller keeps `fn` and `data` alive as long as the engine may call them. Returns the hook's handle."""
    from unicorn.unicorn_py3 import unicorn as _ucmod

    handle = ctypes.c_size_t()
    extra = () if insn is None else (ctypes.c_int(insn),)
    if data is not None and not isinstance(data, ctypes.c_void_p):
        data = ctypes.c_void_p(data)
    err = _ucmod.uclib.uc_hook_add(
        uch,
        ctypes.byref(handle),
        htype,
        ctypes.cast(fn, ctypes.c_void_p),
        data,
        ctypes.c_uint64(begin),
        ctypes.c_uint64(end),
        *extra,
    )
    if err:
        raise RuntimeError(f"cannot {what or f'add a hook of type {htype:#x}'} (uc error {err})")
    return handle.value
