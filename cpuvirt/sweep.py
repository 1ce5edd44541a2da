"""`cpuvirt sweep GUEST --vmx NAME=0,1 ...`: one run per combination of VMX control values, in
parallel processes (one per core), tabulated by exits per reason and modelled cycles.

Each run is independent (its own machine in its own process), so the order they finish in does not
matter; the table is in combination order. Modes other than hw in --modes run once each, as
references.
"""

from __future__ import annotations

import itertools
import os
from concurrent.futures import ProcessPoolExecutor

from cpuvirt.errors import CpuvirtError

LIST_SETTINGS = ("io_bitmap", "msr_bitmap")  # their value is itself a comma list: alternatives split on '|'


def parse_axes(items: list[str]) -> list[tuple[str, list[str]]]:
    axes = []
    for item in items:
        name, eq, values = item.partition("=")
        name = name.strip()
        if not eq or not name or not values:
            raise CpuvirtError(f"--vmx {item!r}: expected NAME=V1,V2,... (e.g. hlt_exiting=0,1)")
        alts = [v.strip() for v in values.split("|" if name in LIST_SETTINGS else ",")]
        if any(not v for v in alts):
            raise CpuvirtError(f"--vmx {item!r}: an empty value")
        axes.append((name, alts))
    names = [n for n, _ in axes]
    if len(set(names)) != len(names):
        raise CpuvirtError("--vmx: each control once (list its values after '=')")
    return axes


def combinations(axes) -> list[tuple[str, ...]]:
    return [tuple(f"{n}={v}" for (n, _), v in zip(axes, combo)) for combo in itertools.product(*[a for _, a in axes])]


def _one(job) -> dict:
    """A run in a worker process: what the table needs (plain data, picklable)."""
    guest, mode, vmx, max_insns = job
    from cpuvirt.runner import run_guest

    try:
        r = run_guest(
            guest, mode, 32, max_insns, None, None, "", mode_options={"vmx": list(vmx)} if mode == "hw" else None
        )
    except CpuvirtError as e:
        return {"mode": mode, "vmx": list(vmx), "error": str(e)}
    return {
        "mode": mode,
        "vmx": list(vmx),
        "outcome": r.outcome,
        "status": r.status,
        "instructions": r.icount,
        "exits": {name: n for name, _, n, _, _ in r.exit_stats},
        "tally": dict(r.tally),
        "console_sha": __import__("hashlib").sha256(r.console).hexdigest()[:12],
    }


def sweep(guest: str, axes, modes: list[str], max_insns: int, jobs: int | None = None) -> list[dict]:
    from cpuvirt.modes.hw.controls import VmxSettings
    from cpuvirt.runner import resolve_guest

    combos = combinations(axes)
    for vmx in combos:
        VmxSettings(list(vmx))  # every bad name or value before the first run
    work: list[tuple[str, str, tuple, int]] = []
    for mode in modes:
        resolve_guest(guest, mode)
        work.extend(
            [(guest, "hw", vmx, max_insns) for vmx in combos] if mode == "hw" else [(guest, mode, (), max_insns)]
        )
    jobs = jobs or os.cpu_count() or 1
    if jobs == 1 or len(work) == 1:
        return [_one(w) for w in work]
    with ProcessPoolExecutor(max_workers=min(jobs, len(work))) as pool:
        return list(pool.map(_one, work))


def format_table(rows: list[dict], table) -> str:
    from collections import Counter

    from cpuvirt import costs

    w = max([3] + [len(" ".join([r["mode"]] + r["vmx"])) for r in rows])
    lines = [f"{'run':<{w}} {'outcome':<10} {'console':<12} {'instructions':>12} {'exits':>7} {'modelled':>12}"]
    detail = []
    for r in rows:
        label = " ".join([r["mode"]] + r["vmx"])
        if "error" in r:
            lines.append(f"{label:<{w}} not run: {r['error']}")
            continue
        m = costs.model(Counter(r["tally"]), table, r["mode"])
        r["modelled_cycles"] = round(m.total)
        exits = sum(r["exits"].values())
        lines.append(
            f"{label:<{w}} {r['outcome'] + ' ' + str(r['status']):<10} {r['console_sha']:<12} "
            f"{r['instructions']:>12,} {exits:>7,} {m.total:>12,.0f}"
        )
        if r["exits"]:
            by_count = sorted(r["exits"].items(), key=lambda kv: -kv[1])
            detail.append(f"  {label}: " + ", ".join(f"{k} {v}" for k, v in by_count))
    if detail:
        lines.append(f"exits by reason (modelled cycles: {table.name} cost table):")
        lines.extend(detail)
    return "\n".join(lines) + "\n"
