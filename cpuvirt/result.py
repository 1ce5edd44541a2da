"""What one run of a guest leaves (`run_guest`'s answer): a record of its own, below the runner and the
trace tools that read it (`compare`'s columns), so that those need not import the runner."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RunResult:
    guest: str
    mode: str
    outcome: str
    status: int
    message: str
    console: bytes
    icount: int
    vtime: int
    counts: dict
    mmu: dict
    wall_s: float
    vga: str = ""
    unhandled_ports: list = field(default_factory=list)
    exit_stats: list = field(default_factory=list)
    devices: list = field(default_factory=list)
    tally: dict = field(default_factory=dict)  # events for the cost model (cpuvirt/costs)
    console_dropped: int = 0  # bytes written between the kept head and tail (not in `console`)
    warnings: list = field(default_factory=list)  # the loader's (image.warnings): shown in the summary
