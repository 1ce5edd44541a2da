"""`cpuvirt compare`: one guest under several techniques, side by side (DESIGN.md 5).

First a summary per run (outcome, the guest's own PASS/FAIL lines, whether the console equals the
reference run's, instructions, modelled cycles, host time, events by kind), then the site table: every
place in the guest where some technique had to act, one row per source line (or per address when the
image has no line information), and per run what happened there:

- the events recorded at that site (a trap, a callout, a hypercall, a VM exit with its reason...);
- for a sensitive instruction the reference run executed but a technique left alone, why: translated
  IDENT/inline by the binary translator, "no exit: CONTROL=0" under hw, the PV build's replacement
  under para, or "ran natively" at ring 1 under trap; for Popek & Goldberg's holes (pushf, popf,
  sgdt, smsw...) that is marked WRONG when the run's console differs from the reference's or has
  FAIL lines the reference does not (the guest's own checks).

Sites align across builds of one source (para's PV build against native) by file:line, so the para
column shows what the PV build has on the line where native has the privileged instruction, and when
that is a call to a PV-ops function, the hypercalls that function can make (read from the PV build's
own source: its HYPERCALL(NR) sites and the pv_* functions it calls). The hypercalls themselves are
rows of their own at the hypercall page, with their counts. Compared trace files carry no record of
the code that ran without an event, so their table lists the event sites only.
A mode the guest cannot run in is a column that says why. Runs of one mode are labelled by their
settings ("hw enable_ept=0").
"""

from __future__ import annotations

import difflib
import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from cpuvirt.trace.format import Trace, read_trace
from cpuvirt.trace.symbols import NONE, Symbols
from cpuvirt.x86.privilege import CPL0_ONLY, FAR_TRANSFERS, IO, IOPL_SENSITIVE

if TYPE_CHECKING:
    from cpuvirt.costs import Modelled
    from cpuvirt.result import RunResult

# Sensitive instructions by class (Robin & Irvine 2000 for the holes; the rest trap at ring 1).
HOLES = frozenset(
    ("pushfd", "pushf", "popfd", "popf", "sgdt", "sidt", "sldt", "str", "smsw", "lar", "lsl", "verr", "verw")
)
PRIVILEGED = CPL0_ONLY | IOPL_SENSITIVE | FAR_TRANSFERS | IO | {"iret"}
OTHER = frozenset(("cpuid", "rdtsc", "int", "int3", "into"))

# hw: the VM-execution control that decides whether an instruction exits (SDM Vol. 3C 25.6 / 26.1.3).
HW_CONTROL = {
    "hlt": "hlt_exiting",
    "invlpg": "invlpg_exiting",
    "rdtsc": "rdtsc_exiting",
    "rdpmc": "rdpmc_exiting",
    "mwait": "mwait_exiting",
    "monitor": "monitor_exiting",
    "pause": "pause_exiting",
    "sgdt": "descriptor_table_exiting",
    "sidt": "descriptor_table_exiting",
    "lgdt": "descriptor_table_exiting",
    "lidt": "descriptor_table_exiting",
    "sldt": "descriptor_table_exiting",
    "str": "descriptor_table_exiting",
    "lldt": "descriptor_table_exiting",
    "ltr": "descriptor_table_exiting",
    "in": "unconditional_io_exiting",
    "out": "unconditional_io_exiting",
    "wbinvd": "wbinvd_exiting",
}


def sensitive_class(insn: str) -> str | None:
    parts = insn.split(None, 1)
    if not parts:
        return None
    mnem, ops = parts[0], (parts[1] if len(parts) > 1 else "")
    if mnem.startswith("rep"):
        mnem = ops.split(None, 1)[0] if ops else mnem
    if mnem in HOLES:
        return "hole"
    if mnem in ("push", "pop") and ops.strip() in ("cs", "ss", "ds", "es", "fs", "gs"):
        return "privileged" if mnem == "pop" and ops.strip() != "cs" else "hole"
    if mnem == "mov" and any(r in ops for r in ("cr", "dr")):
        return "privileged"
    if mnem == "mov" and ops.split(",")[-1].strip() in ("cs", "ss"):
        return "hole"  # reads the selector: shows CPL 1
    if mnem == "mov" and ops.split(",")[0].strip() in ("ds", "es", "fs", "gs", "ss"):
        return "privileged"
    if mnem in PRIVILEGED:
        return "privileged"
    if mnem in OTHER:
        return "other"
    return None


@dataclass
class Column:
    label: str
    mode: str
    vmx: tuple = ()
    trace: Trace | None = None
    result: RunResult | None = None
    symbols: Symbols = NONE
    why_not: str = ""
    executed: dict = field(default_factory=dict)  # address -> instruction text (executed code)
    translated: dict = field(default_factory=dict)  # full: guest address -> IDENT/inline/callout/chain
    controls: dict = field(default_factory=dict)  # hw: control name -> 0/1
    modelled: Modelled | None = None
    console: bytes | None = None
    tally: Counter = field(default_factory=Counter)  # from a trace file (a run's is in its result)

    @property
    def ran(self) -> bool:
        return not self.why_not


def _label(e: dict) -> str:
    k, r = e["kind"], e["reason"]
    if k == "vmexit":
        return f"VM exit {r}"
    if k == "io":
        return f"io {r.lower()}"
    if k == "hypercall":
        return f"hypercall {r}"
    if k == "callout":
        return f"callout {r}"
    if k == "trap":
        return f"trap {r}"
    return f"{k} {r}"


def _verdicts(col: Column, ref: Column | None) -> tuple[bool, str]:
    """(wrong?, why): the run's own FAIL lines beyond the reference's, or a console that differs."""
    if col.console is None:
        return False, ""
    fails = col.console.count(b"FAIL")
    ref_fails = ref.console.count(b"FAIL") if ref is not None and ref.console is not None else 0
    if fails > ref_fails:
        return True, f"{fails - ref_fails} more FAIL lines than {ref.label if ref else 'expected'}"
    if ref is not None and ref.console is not None and col.console != ref.console:
        return True, f"console differs from {ref.label}'s"
    return False, ""


def trace_columns(paths: list[str], image: str | None = None) -> list[Column]:
    from cpuvirt import costs
    from cpuvirt.trace.symbols import for_trace

    cols = []
    for p in paths:
        t = read_trace(p)
        mode = str(t.header.get("mode"))
        vmx = t.header.get("options", {}).get("vmx") or {}
        cols.append(
            Column(
                mode,
                mode,
                trace=t,
                symbols=for_trace(t.header, image),
                controls={k: v for k, v in vmx.items() if isinstance(v, int)},
            )
        )
        cols[-1].tally = costs.tally_of_trace(t)
    _label_by_difference(cols)
    return cols


def _label_by_difference(cols: list[Column]) -> None:
    """Runs of one mode are told apart by the settings that differ (hw controls), else by number."""
    by_mode = defaultdict(list)
    for c in cols:
        by_mode[c.mode].append(c)
    for mode, same in by_mode.items():
        if len(same) < 2:
            continue
        keys = set().union(*(c.controls for c in same))
        differ = sorted(k for k in keys if len({c.controls.get(k, 0) for c in same}) > 1)
        for i, c in enumerate(same):
            c.label = (
                " ".join([mode] + [f"{k}={c.controls.get(k, 0)}" for k in differ]) if differ else f"{mode}#{i + 1}"
            )


# -- the table ------------------------------------------------------------------------------------------------
@dataclass
class Site:
    key: tuple
    where: str  # file:line or address
    symbol: str
    insn: str  # the reference build's instruction(s) there
    klass: str | None
    cells: list = field(default_factory=list)  # per column: (text, count)
    meaning: str = ""  # what it is in the kernel's own terms (an xv6 kernel: trace/xv6.py)


def _key(col: Column, addr: int, by_line: bool) -> tuple:
    if by_line:
        loc = col.symbols.line(addr)
        if loc:
            if col.symbols.inlined:  # C: x86.h's lcr3 line is in switchuvm and in switchkvm
                name = col.symbols.name(addr)
                return ("line", loc, name.split("+", 1)[0] if name else "")
            return ("line", loc)
    return ("addr", addr)


def _os_site(col: Column, e: dict):
    """A kernel's own row for the event (an xv6 system call, IRQ, user page fault), or None."""
    if col.symbols.kernel is None:
        return None
    from cpuvirt.trace import xv6

    return xv6.site(col.symbols.kernel, e)


def _meaning(col: Column, e: dict) -> str:
    k = col.symbols.kernel
    return (k.meaning(e, col.symbols) or "") if k is not None else ""


def build_sites(cols: list[Column]) -> list[Site]:
    ran = [c for c in cols if c.ran]
    by_line = bool(ran) and all(c.symbols.has_lines for c in ran)
    ref = ran[0] if ran else None
    events: dict[tuple, list[Counter]] = defaultdict(lambda: [Counter() for _ in cols])
    addrs_at: dict[tuple, dict[int, set]] = defaultdict(lambda: defaultdict(set))
    insn_at: dict[tuple, dict[int, str]] = defaultdict(dict)
    os_rows: dict[tuple, tuple[str, str, str]] = {}  # kernel rows: key -> (where, symbol, instruction)
    meanings: dict[tuple, str] = {}
    for i, c in enumerate(cols):
        if c.trace is None:
            continue
        for e in c.trace.events:
            if e["kind"] == "translate":
                continue
            a = int(e["eip"], 16)
            row = _os_site(c, e)
            if row is not None:
                k = row[0]
                os_rows.setdefault(k, row[1:])
            else:
                k = _key(c, a, by_line)
                addrs_at[k][i].add(a)
                insn_at[k].setdefault(i, e["insn"])
            events[k][i][_label(e)] += 1
            if k not in meanings and c.symbols.kernel is not None:
                meanings[k] = _meaning(c, e)
    # Sensitive instructions each run executed, events or not.
    for i, c in enumerate(cols):
        if (
            i > 0
            and c.trace is not None
            and cols[0].trace is not None
            and c.trace.header.get("image_sha256") != cols[0].trace.header.get("image_sha256")
        ):
            continue  # another build: its lines are shown beside the reference's
        for a, text in c.executed.items():
            if sensitive_class(text) is None:
                continue
            if c.symbols.kernel is not None and not c.symbols.owns(a):
                continue  # a user program's (its system calls have rows)
            k = _key(c, a, by_line)
            if k not in meanings and c.symbols.kernel is not None:
                meanings[k] = _meaning(c, {"kind": "", "reason": "", "eip": f"{a:#x}", "insn": text})
            addrs_at[k][i].add(a)
            insn_at[k].setdefault(i, text)
            events[k]  # the row exists
    ref_i = cols.index(ref) if ref is not None else 0
    _translations_from_trace(cols, ref)
    same_image = [
        c.trace is not None
        and ref is not None
        and ref.trace is not None
        and c.trace.header.get("image_sha256") == ref.trace.header.get("image_sha256")
        for c in cols
    ]
    # Another build of the source (para's PV build): what it has on each line the table shows.
    for i, c in enumerate(cols):
        if same_image[i] or not by_line or not c.ran:
            continue
        for k in events:
            if k[0] == "line" and c.symbols.statements.get(k[1]) and i not in insn_at[k]:
                insn_at[k][i] = _pv_line(c, c.symbols.statements[k[1]])
                addrs_at[k][i].add(-1)
    verdicts = [_verdicts(c, ref if c is not ref else None) for c in cols]
    sites = []
    for k, counters in events.items():
        if k in os_rows:
            where, symbol, insn = os_rows[k]
            site = Site(
                k, where, symbol, insn, "other" if insn.startswith("int") else None, meaning=meanings.get(k, "")
            )
            for i, c in enumerate(cols):
                site.cells.append(
                    _cell(c, counters[i], set(), None, insn, None, verdicts[i])
                    if counters[i] or not c.ran
                    else ("-", 0)
                )
            sites.append(site)
            continue
        texts = insn_at[k]
        insn = texts.get(ref_i) or next(iter(texts.values()), "?")
        klass = sensitive_class(insn) or next((sensitive_class(t) for t in texts.values() if sensitive_class(t)), None)
        first_addr = min(addrs_at[k].get(ref_i) or next(iter(addrs_at[k].values()), {0}))
        owner = (
            cols[ref_i]
            if addrs_at[k].get(ref_i)
            else next((cols[j] for j in addrs_at[k] if addrs_at[k][j]), cols[ref_i])
        )
        where = k[1] if k[0] == "line" else f"{k[1]:#x}"
        site = Site(
            k, where, owner.symbols.name(first_addr) or f"{first_addr:#x}", insn, klass, meaning=meanings.get(k, "")
        )
        for i, c in enumerate(cols):
            addrs = addrs_at[k].get(i) or (addrs_at[k].get(ref_i, set()) if same_image[i] else set())
            site.cells.append(_cell(c, counters[i], addrs, texts.get(i), insn, klass, verdicts[i]))
        sites.append(site)
    sites.sort(
        key=lambda s: (
            (0, s.where.rsplit(":", 1)[0], int(s.where.rsplit(":", 1)[1]), s.key[2:])
            if s.key[0] == "line"
            else (1, "", s.key[1:])
            if s.key[0] == "os"
            else (2, "", s.key[1])
        )
    )
    return sites


def _pv_line(c: Column, texts: list[str]) -> str:
    """What the PV build has on a line: 'hypercall mmuext_op (call pv_invlpg)' when it calls a PV-ops
    function that makes hypercalls (read from its source), else its instructions."""
    from cpuvirt.costs import _hypercall_name

    nrs, calls = [], []
    for t in texts:
        if t.startswith("call pv_"):
            calls.append(t)
            nrs += [n for n in c.symbols.hypercalls_of(t.split()[1]) if n not in nrs]
    if nrs:
        return f"hypercall {' | '.join(_hypercall_name(n) for n in nrs)} ({'; '.join(calls)})"
    return "; ".join(texts)


def _named(c: Column, text: str) -> str:
    """`call 0x10082b` -> `call pv_write_cr3` where the target is a symbol."""
    import re

    if not text.startswith(("call", "jmp")):
        return text
    return re.sub(r"0x[0-9a-f]+", lambda m: c.symbols.name(int(m.group(0), 16)) or m.group(0), text)


def _translations_from_trace(cols: list[Column], ref: Column | None) -> None:
    """full: what each guest instruction was translated into, from the `translate` events (block start
    and the kinds in order) laid over the reference run's executed instructions of the same image."""
    if ref is None or not ref.executed:
        return
    order = sorted(ref.executed)
    import bisect

    for c in cols:
        if c.mode != "full" or c.trace is None:
            continue
        for e in c.trace.events:
            if e["kind"] != "translate":
                continue
            kinds = e["detail"].get("kinds", [])
            k = bisect.bisect_left(order, int(e["eip"], 16))
            for addr, kind in zip(order[k : k + len(kinds)], kinds):
                c.translated.setdefault(addr, kind)


def _cell(c: Column, counter: Counter, addrs: set, text: str | None, ref_insn: str, klass, verdict) -> tuple:
    if not c.ran:
        return ("not run", 0)
    total = sum(counter.values())
    if counter:
        return (", ".join(f"{lab} x{n}" if n > 1 else lab for lab, n in counter.most_common()), total)
    if not addrs:
        return ("-", 0)
    wrong, why = verdict
    own = text or ref_insn
    mnem = own.split()[0] if own else ""
    if c.mode == "para" and text and text != ref_insn:
        return ((f"PV build: {text}" if not text.startswith("hypercall ") else f"PV build: {text}"), 0)
    if c.mode == "para" and text:
        return ("ran natively at ring 1" + (" (hole)" if klass == "hole" else ""), 0)
    if c.mode == "native":
        return ("ran natively", 0)
    if c.mode == "full":
        kinds = {str(c.translated[a]) for a in addrs if c.translated.get(a) is not None}
        if kinds:
            k = "/".join(sorted(kinds))
            base = f"translated {k}"
            if klass == "hole" and "IDENT" in kinds:
                return (base + (f", WRONG ({why})" if wrong else " (hole, copied as is)"), 0)
            return (base, 0)
        return ("ran natively at ring 3" if klass else "-", 0)
    if c.mode == "hw":
        ctl = HW_CONTROL.get(mnem)
        if ctl is not None and c.controls and not c.controls.get(ctl, 0):
            return (f"no exit: {ctl}=0", 0)
        if mnem == "mov" and "cr" in own:
            dst = own.split(None, 1)[1].split(",")[0].strip() if " " in own else ""
            if "cr3" in own:
                ctl = "cr3_load_exiting" if dst == "cr3" else "cr3_store_exiting"
                return (f"no exit: {ctl}=0", 0)
            if dst.startswith("cr"):
                return ("no exit: only guest-owned bits changed (CR guest/host mask)", 0)
            return ("no exit: the read comes from the CR read shadow", 0)
        return ("ran in guest mode, no exit", 0)
    if klass == "hole":
        return ("ran natively, WRONG (" + why + ")" if wrong else "ran natively at ring 1 (hole)", 0)
    return ("ran natively", 0)


# -- output ---------------------------------------------------------------------------------------------------
def summary_rows(cols: list[Column], table) -> list[dict]:
    from cpuvirt import costs

    ref = next((c for c in cols if c.ran), None)
    rows = []
    for c in cols:
        if not c.ran:
            rows.append({"run": c.label, "ran": False, "why": c.why_not})
            continue
        res, t = c.result, c.trace
        tally = res.tally if res is not None else c.tally
        modelled = c.modelled = costs.model(Counter(tally), table, c.mode)
        footer = t.footer if t is not None else None
        outcome = res.outcome if res is not None else (footer or {}).get("outcome", "?")
        status = res.status if res is not None else (footer or {}).get("status", "?")
        icount = res.icount if res is not None else (footer or {}).get("icount", 0)
        counts = res.counts if res is not None else (footer or {}).get("counts", {})
        row = {
            "run": c.label,
            "ran": True,
            "outcome": outcome,
            "status": status,
            "instructions": icount,
            "modelled_cycles": round(modelled.total),
            "cost_table": table.name,
            "shares": {k: round(v / (modelled.total or 1), 4) for k, v in modelled.by_kind().items()},
            "events": dict(counts),
            "host_s": round(res.wall_s, 4) if res is not None else None,
        }
        if c.console is not None:
            row["pass"], row["fail"] = c.console.count(b"PASS"), c.console.count(b"FAIL")
            row["console"] = (
                "reference" if c is ref else "same" if ref is not None and c.console == ref.console else "differs"
            )
        else:
            row["console"] = "n/a"  # a trace does not hold the console
        rows.append(row)
    return rows


def _diff(ref: Column, c: Column, limit: int = 12) -> list[str]:
    a = (ref.console or b"").decode(errors="replace").splitlines()
    b = (c.console or b"").decode(errors="replace").splitlines()
    d = list(difflib.unified_diff(a, b, ref.label, c.label, lineterm="", n=1))
    return d[:limit] + ([f"... ({len(d) - limit} more diff lines)"] if len(d) > limit else [])


def _short(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div * 10:
            return f"{n / div:.0f}{unit}"
    return f"{n:,.0f}"


def format_text(
    cols: list[Column],
    sites: list[Site],
    summary: list[dict],
    width: int = 100,
    wide: bool = False,
    limit: int | None = None,
) -> str:
    out = []
    ref = next((c for c in cols if c.ran), None)
    out.append(
        f"== summary (modelled cycles: {summary[0].get('cost_table', '') if summary else ''} cost table; "
        f"reference: {ref.label if ref else 'none'})"
    )
    out.append(
        f"{'run':<22} {'outcome':<12} {'PASS/FAIL':>9} {'console':<10} {'instructions':>12} "
        f"{'modelled':>10} {'host s':>7}"
    )
    for r in summary:
        if not r["ran"]:
            out.append(f"{r['run']:<22} not run: {r['why']}"[: max(width, 60) if not wide else 10**6])
            continue
        pf = f"{r['pass']}/{r['fail']}" if "pass" in r else "-"
        host = f"{r['host_s']:.2f}" if r["host_s"] is not None else "-"
        out.append(
            f"{r['run']:<22} {str(r['outcome']) + ' ' + str(r['status']):<12} {pf:>9} {r['console']:<10} "
            f"{r['instructions']:>12,} {_short(r['modelled_cycles']):>10} {host:>7}"
        )
    for r, _c in zip(summary, cols):
        if r["ran"]:
            shares = ", ".join(f"{k} {v:.0%}" for k, v in r["shares"].items() if v >= 0.005)
            events = ", ".join(f"{k} {v}" for k, v in r["events"].items()) or "none"
            out.append(f"  {r['run']}: cycles by kind: {shares}; events: {events}")
    for c in cols:
        if (
            c.ran
            and ref is not None
            and c is not ref
            and c.console is not None
            and ref.console is not None
            and c.console != ref.console
        ):
            out.append(f"  console of {c.label} vs {ref.label}:")
            out.extend("    " + line for line in _diff(ref, c))
    out.append("")
    shown = sites[:limit] if limit else sites
    out.append(
        f"== sites ({len(sites)}: every place a technique acted, and the sensitive instructions the runs executed)"
    )
    if wide:
        ws = [max([len(c.label)] + [len(s_cell(s.cells[i])) for s in shown]) for i, c in enumerate(cols)]
        ww = max([5] + [len(s.where) for s in shown])
        sw = max([6] + [len(s.symbol) for s in shown])
        iw = max([11] + [len(s.insn) for s in shown])
        out.append(
            f"{'where':<{ww}} {'symbol':<{sw}} {'instruction':<{iw}} "
            + " ".join(f"{c.label:<{w}}" for c, w in zip(cols, ws)).rstrip()
        )
        for s in shown:
            cells = " ".join(f"{s_cell(cell):<{w}}" for cell, w in zip(s.cells, ws))
            out.append(f"{s.where:<{ww}} {s.symbol:<{sw}} {s.insn:<{iw}} {cells}".rstrip())
    else:
        lw = max((len(c.label) for c in cols), default=4)
        for s in shown:
            tag = f"  [{s.klass}]" if s.klass else ""
            out.append(f"{s.where}  {s.symbol}  {s.insn}{tag}"[:width])
            if s.meaning:
                out.append(f"    = {s.meaning}"[:width])
            for c, cell in zip(cols, s.cells):
                import textwrap

                lines = textwrap.wrap(s_cell(cell), max(20, width - lw - 6), break_on_hyphens=False) or ["-"]
                out.append(f"    {c.label:<{lw}}  {lines[0]}")
                out.extend(f"    {'':<{lw}}  {more}" for more in lines[1:])
    if limit and len(sites) > limit:
        out.append(f"# ... {len(sites) - limit} more sites (--limit)")
    return "\n".join(out) + "\n"


def s_cell(cell) -> str:
    return cell[0]


def as_json(cols, sites, summary) -> str:
    return json.dumps(
        {
            "runs": summary,
            "sites": [
                {
                    "where": s.where,
                    "symbol": s.symbol,
                    "instruction": s.insn,
                    "class": s.klass,
                    **({"meaning": s.meaning} if s.meaning else {}),
                    "runs": {c.label: {"what": cell[0], "events": cell[1]} for c, cell in zip(cols, s.cells)},
                }
                for s in sites
            ],
        },
        indent=1,
    )


def as_csv(cols, sites) -> str:
    import csv
    import io

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["where", "symbol", "instruction", "class"] + [c.label for c in cols])
    for s in sites:
        w.writerow([s.where, s.symbol, s.insn, s.klass or ""] + [cell[0] for cell in s.cells])
    return buf.getvalue()
