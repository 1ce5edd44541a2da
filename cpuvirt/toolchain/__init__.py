"""The guest toolchain: preprocess, assemble (keystone, made safe), wrap as Multiboot, build guests."""

from cpuvirt.toolchain.assemble import Assembly, Statement, assemble, check_encodings
from cpuvirt.toolchain.build import (
    GuestInfo,
    assemble_guest,
    build_all,
    build_guest,
    guest_source_dir,
    list_guests,
)
from cpuvirt.toolchain.image import build_image, find_header, make_image
from cpuvirt.toolchain.preprocess import SourceLine, preprocess, preprocess_text

__all__ = [
    "Assembly", "GuestInfo", "SourceLine", "Statement", "assemble", "assemble_guest", "build_all",
    "build_guest", "build_image", "check_encodings", "find_header", "guest_source_dir", "list_guests",
    "make_image", "preprocess", "preprocess_text",
]
