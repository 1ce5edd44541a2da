"""The guest toolchain: preprocess, assemble (keystone, made safe), wrap as Multiboot, build guests.

Submodules: ``preprocess`` (preprocess(), preprocess_text()), ``assemble`` (assemble(),
check_encodings()), ``image`` (Multiboot header, build_image(), find_header()) and ``build`` (the
bundled guests). The names below are the ones other layers need; the functions named like their
submodule (assemble, preprocess) are deliberately not re-exported, so that the submodules stay
reachable as attributes of this package.
"""

from cpuvirt.toolchain.assemble import Assembly, Statement, check_encodings
from cpuvirt.toolchain.build import (
    GuestInfo,
    assemble_guest,
    build_all,
    build_guest,
    guest_source_dir,
    list_guests,
)
from cpuvirt.toolchain.image import MultibootHeader, build_image, find_header, make_image
from cpuvirt.toolchain.preprocess import SourceLine, preprocess_text

__all__ = [
    "Assembly", "GuestInfo", "MultibootHeader", "SourceLine", "Statement", "assemble_guest",
    "build_all", "build_guest", "build_image", "check_encodings", "find_header", "guest_source_dir",
    "list_guests", "make_image", "preprocess_text",
]
