"""Virtualization modes: each is a strategy over the same cpu core, memory module and machine.

DESIGN.md section 3. A mode is registered in MODES as "module:Class" (imported on first use, so that
one mode's import cost or breakage never touches the others); the modes still being built are named
in PLANNED so that a user asking for one is told plainly that it is not built yet.
"""

from __future__ import annotations

import importlib

from cpuvirt.errors import CpuvirtError

MODES = {  # in DESIGN.md's order: the reference, then the techniques from naive to hardware
    "native": "cpuvirt.modes.native:NativeMode",
    "trap": "cpuvirt.modes.trap:TrapMode",
    "full": "cpuvirt.modes.full:FullMode",
    "para": "cpuvirt.modes.para:ParaMode",
    "hw": "cpuvirt.modes.hw:HwMode",
}
PLANNED = tuple(m for m in ("trap", "full", "para") if m not in MODES)


def get_mode(name: str):
    if name in MODES:
        module, cls = MODES[name].split(":")
        return getattr(importlib.import_module(module), cls)
    if name in PLANNED:
        raise CpuvirtError(f"mode '{name}' is not implemented yet (available: {', '.join(MODES)})")
    planned = f"; planned: {', '.join(PLANNED)}" if PLANNED else ""
    raise CpuvirtError(f"unknown mode '{name}' (modes: {', '.join(MODES)}{planned})")
