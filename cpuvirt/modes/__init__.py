"""Virtualization modes: each is a strategy over the same cpu core, memory module and machine.

DESIGN.md section 3. Only the modes listed in MODES exist; the others are named in PLANNED so that a
user asking for one is told plainly that it is not built yet.
"""
from __future__ import annotations

from cpuvirt.errors import CpuvirtError
from cpuvirt.modes.hw import HwMode
from cpuvirt.modes.native import NativeMode

MODES = {"native": NativeMode, "hw": HwMode}
PLANNED = ("trap", "full", "para")


def get_mode(name: str):
    if name in MODES:
        return MODES[name]
    if name in PLANNED:
        raise CpuvirtError(f"mode '{name}' is not implemented yet (available: {', '.join(MODES)})")
    raise CpuvirtError(f"unknown mode '{name}' (modes: {', '.join(MODES)}; planned: {', '.join(PLANNED)})")
