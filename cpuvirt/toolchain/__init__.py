"""The guest toolchain: preprocess, assemble (keystone, made safe), wrap as Multiboot, build guests.

Submodules: ``preprocess`` (preprocess(), preprocess_text()), ``assemble`` (assemble(),
check_encodings()), ``image`` (Multiboot header, build_image(), find_header()) and ``build`` (the
bundled guests). The names below are the ones other layers need; the functions named like their
submodule (assemble, preprocess) are deliberately not re-exported, so that the submodules stay
reachable as attributes of this package.
"""

import importlib

# name -> submodule; imported on first use, so that running an already-built guest does not load
# keystone and capstone (start-up time).
_EXPORTS = {
    "Assembly": "assemble",
    "Statement": "assemble",
    "check_encodings": "assemble",
    "GuestInfo": "build",
    "assemble_guest": "build",
    "build_all": "build",
    "build_guest": "build",
    "guest_source_dir": "build",
    "list_guests": "build",
    "MultibootHeader": "image",
    "build_image": "image",
    "find_header": "image",
    "make_image": "image",
    "SourceLine": "preprocess",
    "preprocess_text": "preprocess",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"cpuvirt.toolchain.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'cpuvirt.toolchain' has no attribute {name!r}")
