"""`cpuvirt compare`: how each technique dealt with each sensitive site of the same guest (DESIGN.md 5).

Events of two or more traces are aligned by guest site, the pair (eip, instruction): for every site,
one column per trace says what happened there and how often (a VM exit with its reason, an emulated
I/O, a delivered exception...). Sites come in guest-address order; a site that only one trace has is
where the techniques differ in what they must intercept.
"""
from __future__ import annotations

from collections import Counter, defaultdict

from cpuvirt.errors import CpuvirtError
from cpuvirt.trace.format import Trace, read_trace


def _label(e: dict) -> str:
    if e["kind"] == "vmexit":
        return e["reason"]
    if e["kind"] == "io":
        return f"io {e['reason'].lower()}"
    return f"{e['kind']} {e['reason']}"


def site_table(traces: list[Trace]) -> dict[tuple[int, str], list[Counter]]:
    table: dict[tuple[int, str], list[Counter]] = defaultdict(lambda: [Counter() for _ in traces])
    for i, t in enumerate(traces):
        for e in t.events:
            table[(int(e["eip"], 16), e["insn"])][i][_label(e)] += 1
    return table


def compare(traces: list[Trace], names: list[str], out, limit: int | None = None) -> None:
    guests = {t.header.get("image_sha256") for t in traces}
    if len(guests) > 1:
        out.write("# note: the traces are of different guest images; sites may not correspond\n")
    table = site_table(traces)
    width = 34
    out.write(f"{'eip':>10}  {'instruction':<30} " + " ".join(f"{n:<{width}}" for n in names) + "\n")
    rows = sorted(table.items())
    for (eip, insn), counters in rows[:limit] if limit else rows:
        cells = []
        for c in counters:
            text = ", ".join(f"{label} x{n}" if n > 1 else label for label, n in c.most_common()) or "-"
            cells.append(f"{text[:width]:<{width}}")
        out.write(f"{eip:#10x}  {insn[:30]:<30} " + " ".join(cells) + "\n")
    if limit and len(rows) > limit:
        out.write(f"# ... {len(rows) - limit} more sites (--limit)\n")
    out.write("# totals: " + "; ".join(
        f"{n}: {sum(len(t.events) for t in [tr])} events at {sum(1 for c in table.values() if c[i])} sites"
        for i, (n, tr) in enumerate(zip(names, traces))) + "\n")


def compare_files(paths: list[str], out, limit: int | None = None) -> None:
    if len(paths) < 2:
        raise CpuvirtError("compare needs at least two traces")
    traces = [read_trace(p) for p in paths]
    names = [f"{t.header.get('mode')}" for t in traces]
    if len(set(names)) < len(names):
        names = [f"{n}#{i + 1}" for i, n in enumerate(names)]
    compare(traces, names, out, limit)
