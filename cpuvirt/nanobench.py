"""Adams & Agesen's nanobenchmarks (guests/nanobench.S) measured per operation, in host time and in
modelled cycles (cpuvirt/costs), for `cpuvirt bench` and bench/nanobench.py.

The guest runs N iterations of each operation and prints "done OP" after each loop and nothing else.
A phase runs from the newline that ends one line to the first byte of the next "done" line, so
the printing (its port I/O and exits) is in no phase. At both ends the host stamps the wall clock
and takes a tally of the run's events (costs.tally_of); per operation: (difference) / N.
The first phase (syscall) also holds the boot, about 1 ms and a few hundred events.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from cpuvirt.errors import CpuvirtError

OPS = (
    "syscall",
    "in",
    "out",
    "cli_sti",
    "pushf_popf",
    "cr3",
    "call_ret",
    "pgfault",
    "divzero",
    "ptemod",
    "cpuid",
    "rdtsc",
)
# Adams & Agesen 2006, section 6: (native, software VMM = BT, hardware VMM = first-generation VT-x) in
# cycles as the paper gives them (text where it gives a relation, not a number).
PAPER = {
    "syscall": ("base", "+~2000", "native"),
    "in": (3209, "~15x faster", 15826),
    "call_ret": (11, 51, 11),
    "pgfault": (1093, 3927, 11242),
    "divzero": (889, 3223, 1014),
    "ptemod": ("1 store", 391, 12733),
}


def build(n: int, pv: bool) -> bytes:
    from cpuvirt.toolchain.build import guest_source_dir, include_dir
    from cpuvirt.toolchain.image import build_image
    from cpuvirt.toolchain.preprocess import preprocess

    pre = preprocess(guest_source_dir() / "nanobench.S", {"PV": int(pv), "N_ITER": n}, [include_dir()])
    return build_image(pre.lines)[0]


@dataclass
class Phase:
    op: str
    host_s: float
    tally: Counter  # events during the phase

    def events(self) -> int:
        from cpuvirt.costs import INSTRUCTION, VMENTRY, WALK_REF

        return sum(n for k, n in self.tally.items() if k not in (INSTRUCTION, WALK_REF, VMENTRY))


def run_phases(image_path: str, spec) -> tuple[dict[str, Phase], object]:
    """One run of a nanobench image under a ModeSpec: {op: Phase} and the RunResult."""
    from cpuvirt.costs import INSTRUCTION, WALK_REF, tally_of
    from cpuvirt.runner import run_guest

    state: dict[str, Any] = {"hv": None, "start": None}  # the mode once booted; the phase's start
    line = bytearray()  # the console line being written
    phases: dict[str, Phase] = {}

    def snap():
        v = state["hv"].vcpu
        return time.perf_counter(), tally_of(v, v.mmu)

    pending = {}

    def console(byte: int) -> None:
        if state["hv"] is not None and len(line) < 2:
            pending[len(line)] = snap()  # at the line's first and second byte
        line.append(byte)
        if byte == 10:
            text = line.decode(errors="replace").strip()
            line.clear()
            if text.startswith("done ") and state["start"] is not None and 1 in pending:
                (t0, c0), (t1, c1), (_, c2) = state["start"], pending[0], pending[1]
                # Each snapshot is taken inside the console port write, after that write's own events
                # were counted: the phase holds one byte's output too. One byte's events are those
                # between the first and second byte, less the instructions of the printing loop.
                byte_events = c2 - c1
                for k in (INSTRUCTION, WALK_REF):
                    byte_events.pop(k, None)
                c1.subtract(c0)
                c1.subtract(byte_events)
                phases[text[5:]] = Phase(text[5:], t1 - t0, +c1)
            pending.clear()
            state["start"] = snap()

    def on_start(hv):
        state["hv"] = hv
        state["start"] = snap()

    r = run_guest(
        image_path, mode=spec.mode, max_insns=0, console=console, mode_options=spec.options(), on_start=on_start
    )
    if r.outcome != "exit" or r.status != 0:
        raise CpuvirtError(f"nanobench under {spec.label}: {r.outcome}, status {r.status} {r.message}".strip())
    return phases, r


def write_images(n: int, folder) -> dict[bool, str]:
    """The native and PV builds of nanobench with N iterations, written to `folder`."""
    from pathlib import Path

    out = {}
    for pv in (False, True):
        p = Path(folder) / f"nanobench{n}{'.pv' if pv else ''}.bin"
        p.write_bytes(build(n, pv))
        out[pv] = str(p)
    return out


# -- cpuvirt bench ---------------------------------------------------------------------------------------------
DEFAULT_MODES = "native,trap,full,para,hw,hw:ept=0"


def paper_column(spec) -> int | None:
    """Which of the paper's columns a run corresponds to: native, BT (full), first-generation VT-x
    (hw without EPT, as the paper's CPU had none)."""
    if spec.mode == "native":
        return 0
    if spec.mode == "full":
        return 1
    if spec.mode == "hw" and any(v.startswith("enable_ept=0") for v in spec.vmx):
        return 2
    return None


def measure(specs, n: int, table, progress=None) -> dict:
    """Run every ModeSpec; {label: {op: {host_ns, events, modelled_cycles, by_kind}}} per operation,
    and the modes that could not run with why."""
    import tempfile

    from cpuvirt import costs
    from cpuvirt.toolchain.build import list_guests

    has_pv = any(g.name == "nanobench" and g.has_pv for g in list_guests())
    out, skipped = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        if has_pv:
            imgs = write_images(n, tmp)
        else:
            from pathlib import Path

            path = Path(tmp) / "nb.bin"
            path.write_bytes(build(n, False))
            imgs = {False: str(path)}
        for i, spec in enumerate(specs):
            if progress:
                progress(i, len(specs), spec.label)
            if spec.mode == "para" and not has_pv:
                skipped[spec.label] = "nanobench has no PV build"
                continue
            try:
                phases, _ = run_phases(imgs[spec.mode == "para"], spec)
            except CpuvirtError as e:
                skipped[spec.label] = str(e)
                continue
            row = {}
            for op in OPS:
                phase = phases.get(op)
                if phase is None:
                    continue
                m = costs.model(phase.tally, table, spec.mode)
                row[op] = {
                    "host_ns": round(phase.host_s / n * 1e9, 1),
                    "events": round(phase.events() / n, 3),
                    "modelled_cycles": round(m.total / n, 1),
                    "by_kind": {k: round(v / n, 1) for k, v in m.by_kind().items()},
                }
            out[spec.label] = row
        if progress:
            progress(len(specs), len(specs), "done")
    return {
        "n": n,
        "cost_table": table.name,
        "modes": out,
        "skipped": skipped,
        "paper": {op: list(v) for op, v in PAPER.items()},
        "paper_columns": {s.label: paper_column(s) for s in specs},
    }


def format_tables(result: dict, specs) -> str:
    """A table per mode, then modelled cycles per operation side by side with the paper's."""
    lines = [
        f"# nanobench: {result['n']} iterations per operation; modelled cycles by the "
        f"{result['cost_table']} cost table (an accounting view: the guest's own clock is unchanged)"
    ]
    for spec in specs:
        label = spec.label
        if label in result["skipped"]:
            lines.append(f"\n== {label}: not run ({result['skipped'][label]})")
            continue
        col = result["paper_columns"].get(label)
        what = {0: "paper: native", 1: "paper: BT", 2: "paper: VT-x"}.get(col, "")
        lines.append(f"\n== {label}")
        lines.append(f"{'op':<11} {'host ns/op':>11} {'events/op':>10} {'modelled cyc/op':>16} {what:>14}")
        for op, r in result["modes"][label].items():
            paper = PAPER.get(op, (None, None, None))[col] if col is not None and op in PAPER else ""
            lines.append(
                f"{op:<11} {r['host_ns']:>11,.0f} {r['events']:>10.2f} {r['modelled_cycles']:>16,.0f} "
                f"{str(paper) if paper is not None else '':>14}"
            )
    shown = [s.label for s in specs if s.label in result["modes"]]
    lines.append("\n== modelled cycles per operation, every mode (paper: native / BT / VT-x)")
    w = max([8] + [len(x) for x in shown])
    lines.append(f"{'op':<11}" + "".join(f"{x:>{w + 1}}" for x in shown) + "   paper")
    for op in OPS:
        cells = "".join(f"{result['modes'][x].get(op, {}).get('modelled_cycles', 0):>{w + 1},.0f}" for x in shown)
        paper = " / ".join(str(v) for v in PAPER[op]) if op in PAPER else ""
        lines.append(f"{op:<11}{cells}   {paper}")
    return "\n".join(lines) + "\n"
