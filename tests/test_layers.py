"""The floors of cpuvirt (docs/design.md, "Floors"): no import runs upward, no cycle between parts, nor
between the modules of one part.

Every module under cpuvirt/ is parsed with `ast` (nothing is imported), and each import, at module level
or inside a function, becomes an arrow between the two parts (the top-level subpackages and modules of
the FLOORS table below) that hold the importing and the imported module. An import inside a function is
an arrow like any other: it only defers the cost, the dependency is the same; the messages mark it.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "cpuvirt"

# Bottom floor first. A part may import parts on lower floors only; parts on one floor are siblings and
# import none of each other. A dotted name is a part of its own inside a package (the longest name wins):
# the trace file format is written by the runner and read by the trace views above it.
FLOORS: list[tuple[str, ...]] = [
    ("errors", "status", "limits", "result", "__init__"),  # the ground: errors, statuses, caps, a run's record
    ("engine",),                                  # libunicorn below the wrapper: registers, the hook guard
    ("x86", "xen"),                               # stateless architecture facts and decoders; the Xen PV ABI
    ("memory",),                                  # the guest walk, the TLB-fill hook and its strategies
    ("machine", "loader", "toolchain", "trace.format"),  # pc-lite; Multiboot; guest builds; the trace format
    ("cpu", "virtio"),                            # the vCPU run loop and event delivery; virtio devices
    ("bt", "net"),                                # the binary translator; the virtual switch
    ("modes",),                                   # native, trap, full, para, hw
    ("costs", "modespec"),                        # the cost model over a run's tallies; MODE:K=V specs
    ("runner",),                                  # one run of one guest under one mode
    ("trace", "sweep", "nanobench", "netbench", "labs"),   # views over runs
    ("comparerun",),                              # the runs compare and report line up
    ("report",),                                  # the HTML report over sweeps and nanobench
    ("cli",),
    ("__main__",),
]
FLOOR = {part: n for n, parts in enumerate(FLOORS) for part in parts}


def _module_name(path: Path, root: Path = PKG) -> str:
    parts = ["cpuvirt", *path.relative_to(root).with_suffix("").parts]
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def part_of(module: str) -> str:
    """The FLOORS part holding `module` (a dotted name under cpuvirt)."""
    rest = module.split(".")[1:] or ["__init__"]
    for n in range(len(rest), 0, -1):
        name = ".".join(rest[:n])
        if name in FLOOR:
            return name
    raise KeyError(f"{module}: on no floor; add its part to FLOORS in tests/test_layers.py and docs/design.md")


def imports(root: Path = PKG) -> list[tuple[str, str, int, bool]]:
    """(importing module, imported module, line, inside a function) for every import of cpuvirt."""
    modules = {_module_name(p, root) for p in root.rglob("*.py")}
    found = []
    for path in sorted(root.rglob("*.py")):
        me = _module_name(path, root)
        tree = ast.parse(path.read_text(), str(path))
        in_function = {id(sub) for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                       for sub in ast.walk(node)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = me.split(".") if path.name == "__init__.py" else me.split(".")[:-1]
                    anchor = anchor[:len(anchor) - node.level + 1]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                # `from cpuvirt.cpu import events`: the submodule when there is one, else the package.
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            for t in dict.fromkeys(targets):
                if t == "cpuvirt" or t.startswith("cpuvirt."):
                    found.append((me, t, node.lineno, id(node) in in_function))
    return found


def arrows(root: Path = PKG) -> dict[tuple[str, str], list[str]]:
    """(part, part) -> where each import between two different parts is written."""
    out: dict[tuple[str, str], list[str]] = {}
    for me, target, line, deferred in imports(root):
        a, b = part_of(me), part_of(target)
        if a != b:
            out.setdefault((a, b), []).append(f"{me}:{line} imports {target}" + (" (inside a function)" if deferred else ""))
    return out


def cycles(edges) -> list[list[str]]:
    """The strongly connected components of more than one part (Tarjan), each sorted."""
    graph: dict[str, set[str]] = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)
        graph.setdefault(b, set())
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_every_module_is_on_a_floor():
    for path in PKG.rglob("*.py"):
        part_of(_module_name(path))


def test_no_cycle_between_parts():
    found = arrows()
    bad = cycles(found)
    detail = [f"cycle {' <-> '.join(c)}: " + "; ".join(w for (a, b), ws in found.items() if a in c and b in c for w in ws)
              for c in bad]
    assert not bad, "\n".join(detail)


def module_cycles(root: Path = PKG) -> list[str]:
    """Every cycle of imports between modules, inside a part too (cpu/events.py <-> cpu/tasks.py),
    each as its modules and the import lines that close it."""
    found = imports(root)
    edges = {(me, target) for me, target, _, _ in found if me != target}
    out = []
    for c in cycles(edges):
        lines = [f"{me}:{line} imports {target}" + (" (inside a function)" if deferred else "")
                 for me, target, line, deferred in found if me in c and target in c and me != target]
        out.append(f"cycle {' <-> '.join(c)}: " + "; ".join(lines))
    return out


def test_no_cycle_between_modules():
    """No two modules import each other, even within one package: a cycle there is as hard to read as one
    between floors (which module is the lower one?) and only import order keeps it working."""
    bad = module_cycles()
    assert not bad, "\n".join(bad)


def test_no_import_runs_upward():
    upward = [w for (a, b), ws in sorted(arrows().items()) if FLOOR[b] >= FLOOR[a] for w in ws]
    assert not upward, "imports against the floors (docs/design.md, \"Floors\"):\n" + "\n".join(upward)


def test_the_floors_are_written_in_the_design():
    """docs/design.md draws the same floors, bottom floor last."""
    text = (PKG.parent / "docs" / "design.md").read_text()
    section = text.split("## Floors", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and line[2:3].isdigit()]
    drawn = {int(r.split("|")[1]): {p.strip(" `") for p in r.split("|")[2].split(",")} for r in rows}
    assert drawn == {n: set(parts) for n, parts in enumerate(FLOORS)}


@pytest.mark.parametrize("edges, expect", [
    ([("a", "b"), ("b", "c")], []),
    ([("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")], [["a", "b", "c"]]),
])
def test_cycle_finder(edges, expect):
    assert cycles(edges) == expect


def test_a_cycle_is_caught(tmp_path):
    """The checks read the code: an upward import added to a copy of the tree is reported, with its line."""
    import shutil
    copy = tmp_path / "cpuvirt"
    shutil.copytree(PKG, copy, ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.c"))
    mmu = copy / "memory" / "mmu.py"
    mmu.write_text(mmu.read_text() + "\n\ndef _late():\n    from cpuvirt.cpu import vcpu  # noqa\n")
    found = arrows(copy)
    assert ("memory", "cpu") in found and "(inside a function)" in found[("memory", "cpu")][0]
    assert any({"cpu", "memory"} <= set(c) for c in cycles(found))
    assert FLOOR["cpu"] > FLOOR["memory"]      # so test_no_import_runs_upward names that line too


def test_a_cycle_inside_a_package_is_caught(tmp_path):
    """The module-level check reads the code too: tasks.py importing events.py back, in a function, is a cycle."""
    import shutil
    copy = tmp_path / "cpuvirt"
    shutil.copytree(PKG, copy, ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.c"))
    assert module_cycles(copy) == []
    faults = copy / "cpu" / "faults.py"
    faults.write_text(faults.read_text() + "\n\ndef _late():\n    from cpuvirt.cpu.events import EventDelivery  # noqa\n")
    bad = module_cycles(copy)
    assert len(bad) == 1 and "cpuvirt.cpu.events" in bad[0] and "cpuvirt.cpu.faults" in bad[0], bad
    assert "cpuvirt/cpu/faults.py" not in bad[0] and "(inside a function)" in bad[0]
