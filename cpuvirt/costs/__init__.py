"""Modelled cycles: an accounting view of a run that charges each event what it costs on real hardware.

Virtual time (what the guest reads through the PIT, the APIC timer and `rdtsc`) charges one cycle per
instruction and a bus cycle per port access, whatever the technique: it must, so that every mode
shows the guest the same machine. So it cannot say which technique is cheaper. The cost model can:

    modelled cycles = instructions retired + sum over events (count x cycles charged for its kind)

A *tally* is what a run did, counted where it happens (`Vcpu.record` keeps a Counter keyed by
(kind, reason); the memory module counts walk references, shadow paging its hidden faults and PTE
emulations; hw mode its exits by reason). A *cost table* (presets/*.toml, or a user's TOML/JSON file)
says what each event costs, with the source of every number. Nothing here changes the guest's time.

Keys of a table: `KIND` (every event of a kind), `KIND:REASON` (one reason), either followed by
`@MODE` (the figure for that mode only). The most specific key wins:
KIND:REASON@MODE, KIND:REASON, KIND@MODE, KIND. An event with no entry costs 0 and is listed as
uncosted.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cpuvirt.errors import CpuvirtError

PRESET_DIR = Path(__file__).resolve().parent / "presets"
DEFAULT = "p4-2006"

# Tally keys that are not trace event kinds: what the memory module and VT-x count.
INSTRUCTION, WALK_REF, HIDDEN_FAULT, PTEMOD, VMENTRY = "instruction", "walk_ref", "hidden_fault", "ptemod", "vmentry"


@dataclass
class Entry:
    key: str
    cycles: float
    source: str


@dataclass
class CostTable:
    name: str
    description: str
    entries: dict[str, Entry]

    def lookup(self, key: str, mode: str) -> Entry | None:
        kind, _, reason = key.partition(":")
        candidates = ([f"{key}@{mode}", key] if reason else []) + [f"{kind}@{mode}", kind]
        for k in candidates:
            e = self.entries.get(k)
            if e is not None:
                return e
        return None


def presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


def _read(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise CpuvirtError(f"--costs {path}: {e.strerror}") from None
    try:
        if path.suffix == ".json":
            return json.loads(text)
        import tomllib

        return tomllib.loads(text)
    except (ValueError, json.JSONDecodeError) as e:
        raise CpuvirtError(
            f"--costs {path}: not a valid {'JSON' if path.suffix == '.json' else 'TOML'} cost table ({e})"
        ) from None


def load(spec: str | None = None, _seen: tuple = ()) -> CostTable:
    """A preset by name (`p4-2006`, `nehalem`, `amd-2020`) or a TOML/JSON file: a `[costs]` table of
    KEY = {cycles = N, source = "..."}, optionally `base = "PRESET"` to start from another table."""
    spec = spec or DEFAULT
    path = PRESET_DIR / f"{spec}.toml"
    if not path.is_file():
        path = Path(spec)
        if not path.is_file():
            raise CpuvirtError(f"--costs {spec}: neither a preset ({', '.join(presets())}) nor a file")
    data = _read(path)
    if not isinstance(data, dict) or not isinstance(data.get("costs"), dict):
        raise CpuvirtError(f"--costs {spec}: a cost table needs a 'costs' table of KEY = {{cycles, source}}")
    entries: dict[str, Entry] = {}
    base = data.get("base")
    if base:
        if base in _seen:
            raise CpuvirtError(f"--costs {spec}: 'base' chain loops through {base}")
        entries.update(load(str(base), _seen + (spec,)).entries)
    for key, value in data["costs"].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = {"cycles": value, "source": "(no source given)"}
        if (
            not isinstance(value, dict)
            or not isinstance(value.get("cycles"), (int, float))
            or isinstance(value.get("cycles"), bool)
            or value["cycles"] < 0
        ):
            raise CpuvirtError(f"--costs {spec}: {key!r} needs cycles = a number >= 0")
        entries[key] = Entry(key, value["cycles"], str(value.get("source", "(no source given)")))
    if "instruction" not in entries:
        entries["instruction"] = Entry("instruction", 1, "model: one cycle per retired instruction")
    return CostTable(str(data.get("name", path.stem)), str(data.get("description", "")), entries)


# -- what a run did ------------------------------------------------------------------------------------------
def _hypercall_name(nr) -> str:
    from cpuvirt.modes.para.hypercalls import HYPERCALLS

    entry = HYPERCALLS.get(nr)
    return entry[0] if entry else f"unknown_{nr}"


def tally_of(vcpu, mmu) -> Counter:
    """The run's events so far as a Counter of tally keys ("kind", "kind:reason", "walk_ref"...).

    Cheap enough to call at any point of a run (bench takes one per nanobenchmark phase)."""
    sync = getattr(vcpu, "sync_counts", None)  # full: callouts the C hook answered
    if sync is not None:
        sync()
    fold = getattr(vcpu, "fold_fast_exits", None)
    if fold is not None:
        fold()  # hw: exits answered in C since the last Python exit (modes/hw/fastexit.py)
    t: Counter = Counter()
    t[INSTRUCTION] = vcpu.clock.instructions
    attributed: Counter = Counter()
    for (kind, reason), n in vcpu.reasons.items():
        if kind == "hypercall":
            reason = _hypercall_name(reason)
        t[f"{kind}:{reason}"] += n
        attributed[kind] += n
    vm_stats = getattr(vcpu, "stats", None)
    for kind, n in vcpu.counts.items():
        if kind == "vmexit" and isinstance(vm_stats, Counter):
            continue  # by reason, below
        rest = n - attributed[kind]
        if rest > 0:
            t[kind] += rest
    if isinstance(vm_stats, Counter):
        for reason, n in vm_stats.items():
            if reason.name.startswith("ENTRY_FAIL"):
                continue
            t[f"vmexit:{reason.name}"] += n
        t[VMENTRY] = getattr(vcpu, "exits", 0)
    t[WALK_REF] = mmu.counters.as_dict()["walk_refs"]  # with the walks made in C (fills, deliveries)
    shadow = getattr(mmu.strategy, "counters", None)
    if shadow is not None and hasattr(shadow, "hidden_faults"):
        t[HIDDEN_FAULT] = shadow.hidden_faults
        t[PTEMOD] = shadow.ptemods
    return +t


def tally_of_trace(trace) -> Counter:
    """A tally rebuilt from a trace file's events (walk references, hidden shadow faults and PTE
    emulations without --verbose-trace are not in a trace, so it undercounts those)."""
    t: Counter = Counter()
    if trace.footer:
        t[INSTRUCTION] = trace.footer.get("icount", 0)
    elif trace.events:
        t[INSTRUCTION] = trace.events[-1]["icount"]
    for e in trace.events:
        kind, reason = e["kind"], e["reason"]
        if kind == "io":
            t["io"] += 1
        else:
            t[f"{kind}:{reason}"] += 1
        if kind == "vmexit":
            t[VMENTRY] += 1
    return t


# -- the model ------------------------------------------------------------------------------------------------
@dataclass
class Row:
    key: str
    count: int
    each: float
    cycles: float
    source: str


@dataclass
class Modelled:
    table: str
    mode: str
    total: float
    rows: list[Row] = field(default_factory=list)
    uncosted: list[str] = field(default_factory=list)

    def by_kind(self) -> dict[str, float]:
        """Cycles per event kind (the part before ':'), busiest first; 'instruction' included."""
        out: defaultdict[str, float] = defaultdict(float)
        for r in self.rows:
            out[r.key.partition(":")[0]] += r.cycles
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    def as_dict(self) -> dict:
        return {
            "table": self.table,
            "mode": self.mode,
            "modelled_cycles": round(self.total),
            "by_kind": {k: round(v) for k, v in self.by_kind().items()},
            "rows": [
                {"event": r.key, "count": r.count, "cycles_each": r.each, "cycles": round(r.cycles), "source": r.source}
                for r in self.rows
            ],
            "uncosted": self.uncosted,
        }


def model(tally: Mapping[str, int], table: CostTable, mode: str) -> Modelled:
    """Charge every tallied event by `table` for a run under `mode` (the mode's base name: hw, full...)."""
    base_mode = mode.split(":")[0].split()[0]
    m = Modelled(table.name, base_mode, 0.0)
    for key, n in sorted(tally.items()):
        if n <= 0:
            continue
        e = table.lookup(key, base_mode)
        if e is None:
            m.uncosted.append(key)
            continue
        cycles = n * e.cycles
        m.rows.append(Row(key, n, e.cycles, cycles, e.source))
        m.total += cycles
    m.rows.sort(key=lambda r: -r.cycles)
    return m


def format_shares(m: Modelled, width: int = 6) -> str:
    """'instruction 61%, vmexit 30%, io 9%' (shares of modelled cycles by kind, largest first)."""
    total = m.total or 1
    parts = [f"{k} {v / total:.0%}" for k, v in m.by_kind().items() if v / total >= 0.005]
    return ", ".join(parts[:width]) or "none"
