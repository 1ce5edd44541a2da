"""`cpuvirt report GUEST --modes ... -o report.html`: one self-contained HTML page of a comparison.

The page holds the compare summary and site table, bar charts of events by reason and of modelled
cycles per mode (by event kind), a timeline of each run's events over its instructions, and the
nanobench table when asked (--bench N). Plots are drawn by matplotlib's SVG backend and inlined, the
style is inline too: the file opens with no network and no other file.
"""

from __future__ import annotations

import html
import io
from collections import Counter

from cpuvirt.errors import CpuvirtError

_STYLE = """
body { font-family: sans-serif; margin: 2em; max-width: 1200px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0; }
th, td { border: 1px solid #ddd; padding: 2px 6px; text-align: left; vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.wrong { background: #fdd; } td.event { background: #eef6ff; } td.notrun { color: #888; }
code, pre { font-family: monospace; } pre { background: #f6f6f6; padding: 0.5em; overflow-x: auto; }
.note { color: #555; font-size: 0.9em; }
"""


def _plt():
    try:
        import matplotlib
    except ImportError:
        raise CpuvirtError("report needs matplotlib (pip install matplotlib)") from None
    matplotlib.use("svg")
    import matplotlib.pyplot as plt

    plt.rcParams["svg.fonttype"] = "none"  # text stays text: smaller, searchable
    plt.rcParams["svg.hashsalt"] = "cpuvirt"  # stable ids: the same run gives the same file
    return plt


def _svg(fig) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    _plt().close(fig)
    text = buf.getvalue()
    return text[text.index("<svg") :]  # drop the XML prolog and doctype: inline SVG


def events_by_reason_plot(cols) -> str:
    plt = _plt()
    ran = [c for c in cols if c.ran and c.trace is not None]
    per = {
        c.label: Counter(f"{e['kind']}:{e['reason']}" for e in c.trace.events if e["kind"] != "translate") for c in ran
    }
    total: Counter[str] = Counter()
    for cnt in per.values():
        total.update(cnt)
    top = [k for k, _ in total.most_common(12)]
    fig, ax = plt.subplots(figsize=(9, 0.3 * len(top) + 1.5))
    h = 0.8 / max(1, len(ran))
    for i, c in enumerate(ran):
        ax.barh([j + i * h for j in range(len(top))], [per[c.label][k] for k in top], height=h, label=c.label)
    ax.set_yticks([j + 0.4 - h / 2 for j in range(len(top))], top)
    ax.invert_yaxis()
    ax.set_xlabel("events in the run")
    ax.set_title("Events by kind:reason (12 most frequent)")
    ax.legend(loc="lower right", fontsize="small")
    return _svg(fig)


def modelled_cycles_plot(cols) -> str:
    plt = _plt()
    ran = [c for c in cols if c.ran and c.modelled is not None]
    kinds = []
    for c in ran:
        for k in c.modelled.by_kind():
            if k not in kinds:
                kinds.append(k)
    fig, ax = plt.subplots(figsize=(9, 0.5 * len(ran) + 1.5))
    left = [0.0] * len(ran)
    for k in kinds:
        vals = [c.modelled.by_kind().get(k, 0.0) for c in ran]
        ax.barh([c.label for c in ran], vals, left=left, label=k)
        left = [a + b for a, b in zip(left, vals)]
    ax.invert_yaxis()
    ax.set_xlabel(f"modelled cycles ({ran[0].modelled.table if ran else ''} cost table)")
    ax.set_title("Modelled cycles per run, by event kind")
    ax.legend(fontsize="small", ncol=3, loc="lower right")
    return _svg(fig)


def timeline_plot(cols) -> str:
    plt = _plt()
    ran = [c for c in cols if c.ran and c.trace is not None]
    fig, ax = plt.subplots(figsize=(9, 0.6 * len(ran) + 1.5))
    kinds = sorted({e["kind"] for c in ran for e in c.trace.events if e["kind"] != "translate"})
    for k in kinds:
        xs, ys = [], []
        for i, c in enumerate(ran):
            for e in c.trace.events:
                if e["kind"] == k:
                    xs.append(e["icount"])
                    ys.append(i)
        ax.scatter(xs, ys, s=6, marker="|", label=k, rasterized=True)  # thousands of marks: one image
    ax.set_yticks(range(len(ran)), [c.label for c in ran])
    ax.invert_yaxis()
    ax.set_xlabel("instructions retired")
    ax.set_title("Events over the run")
    ax.legend(fontsize="small", ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.25))
    return _svg(fig)


def _table(head: list[str], rows: list[list], classes: list[list[str]] | None = None) -> str:
    out = ["<table><thead><tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in head) + "</tr></thead><tbody>"]
    for i, r in enumerate(rows):
        cells = []
        for j, v in enumerate(r):
            cls = classes[i][j] if classes else ("num" if isinstance(v, (int, float)) else "")
            text = f"{v:,}" if isinstance(v, int) else (f"{v:,.1f}" if isinstance(v, float) else str(v))
            cells.append(f'<td class="{cls}">{html.escape(text)}</td>')
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


def render(guest: str, cols, sites, summary, bench: dict | None = None, bench_specs=None) -> str:
    from cpuvirt import __version__
    from cpuvirt.trace.compare import _diff

    ref = next((c for c in cols if c.ran), None)
    parts = [
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>cpuvirt report: '
        f"{html.escape(guest)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>cpuvirt report: <code>{html.escape(guest)}</code> under "
        f"{html.escape(', '.join(c.label for c in cols))}</h1>",
        f'<p class="note">cpuvirt {__version__}. Modelled cycles are an accounting view (instructions '
        f"plus a published cost per event); the guest's own clock is the same in every mode.</p>",
    ]
    parts.append('<section id="summary"><h2>Summary</h2>')
    rows, classes = [], []
    for r in summary:
        if not r["ran"]:
            rows.append([r["run"], "not run: " + r["why"], "", "", "", "", ""])
            classes.append(["", "notrun", "", "", "", "", ""])
            continue
        shares = ", ".join(f"{k} {v:.0%}" for k, v in r["shares"].items() if v >= 0.005)
        rows.append(
            [
                r["run"],
                f"{r['outcome']} {r['status']}",
                f"{r.get('pass', '-')}/{r.get('fail', '-')}",
                r["console"],
                r["instructions"],
                r["modelled_cycles"],
                shares,
            ]
        )
        classes.append(["", "", "", "wrong" if r["console"] == "differs" else "", "num", "num", ""])
    parts.append(
        _table(
            ["run", "outcome", "PASS/FAIL", "console", "instructions", "modelled cycles", "modelled cycles by kind"],
            rows,
            classes,
        )
    )
    for c in cols:
        if c.ran and ref is not None and c is not ref and c.console is not None and c.console != ref.console:
            parts.append(
                f"<p>Console of {html.escape(c.label)} against {html.escape(ref.label)}:</p><pre>"
                + html.escape("\n".join(_diff(ref, c, 40)))
                + "</pre>"
            )
    parts.append("</section>")
    parts.append('<section id="plots"><h2>Events and modelled cycles</h2>')
    parts.append(f'<figure id="events-by-reason">{events_by_reason_plot(cols)}</figure>')
    parts.append(f'<figure id="modelled-cycles">{modelled_cycles_plot(cols)}</figure>')
    parts.append(f'<figure id="timeline">{timeline_plot(cols)}</figure></section>')
    parts.append(
        '<section id="sites"><h2>Sites</h2><p class="note">Every place a technique acted, and the '
        "sensitive instructions the runs executed; WRONG marks a hole the guest's own checks caught.</p>"
    )
    rows, classes = [], []
    for s in sites:
        row = [s.where, s.symbol, s.insn, s.klass or ""] + [cell[0] for cell in s.cells]
        cls = ["", "", "", ""] + [
            "wrong" if "WRONG" in cell[0] else "event" if cell[1] else "notrun" if cell[0] == "not run" else ""
            for cell in s.cells
        ]
        rows.append(row)
        classes.append(cls)
    parts.append(_table(["where", "symbol", "instruction", "class"] + [c.label for c in cols], rows, classes))
    parts.append("</section>")
    if bench is not None:
        parts.append('<section id="nanobench"><h2>Nanobenchmarks (modelled cycles per operation)</h2>')
        from cpuvirt.nanobench import OPS, PAPER

        shown = [s.label for s in bench_specs if s.label in bench["modes"]]
        rows = []
        for op in OPS:
            rows.append(
                [op]
                + [bench["modes"][m].get(op, {}).get("modelled_cycles", 0.0) for m in shown]
                + [" / ".join(str(v) for v in PAPER[op]) if op in PAPER else ""]
            )
        parts.append(_table(["op"] + shown + ["paper: native / BT / VT-x"], rows))
        parts.append(
            f'<p class="note">{bench["n"]} iterations per operation, {bench["cost_table"]} cost table.</p></section>'
        )
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
