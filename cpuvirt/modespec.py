"""A mode with settings, as `compare`, `bench`, `sweep` and `report` take them: `hw:enable_ept=0:hlt_exiting=0`.

MODE[:NAME=VALUE]...: the mode, then VMX controls (hw only; `ept=0` is short for `enable_ept=0`, as
`--no-ept`). Its label is the mode and the settings given, so two runs of one mode are told apart by
the settings that differ ("hw enable_ept=0").
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cpuvirt.errors import CpuvirtError


@dataclass(frozen=True)
class ModeSpec:
    mode: str
    vmx: tuple[str, ...] = field(default=())
    given: tuple[str, ...] = field(default=())  # the settings as the user wrote them (for the label)

    @property
    def label(self) -> str:
        return " ".join((self.mode,) + (self.given or self.vmx))

    def options(self, extra_vmx=()) -> dict | None:
        if self.mode != "hw":
            return None
        return {"vmx": list(self.vmx) + list(extra_vmx)}


def parse(text: str) -> ModeSpec:
    from cpuvirt.modes import get_mode

    mode, *settings = [p.strip() for p in text.strip().split(":")]
    get_mode(mode)  # an unknown mode is an input error naming the known ones
    vmx, given = [], []
    for s in settings:
        name, eq, value = s.partition("=")
        if not eq or not name:
            raise CpuvirtError(f"mode {text!r}: settings are NAME=VALUE after a ':' (e.g. hw:enable_ept=0)")
        if mode != "hw":
            raise CpuvirtError(f"mode {text!r}: settings apply to hw (VMX controls) only")
        vmx.append(f"{'enable_ept' if name == 'ept' else name}={value}")
        given.append(f"{name}={value}")
    if vmx:
        from cpuvirt.modes.hw.controls import VmxSettings

        VmxSettings(vmx)  # bad names and values are input errors before any run
    return ModeSpec(mode, tuple(vmx), tuple(given))


def parse_list(text: str) -> list[ModeSpec]:
    specs = [parse(t) for t in text.split(",") if t.strip()]
    if not specs:
        raise CpuvirtError("--modes: no mode given")
    return specs
