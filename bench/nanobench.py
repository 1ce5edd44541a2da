"""Adams & Agesen's nanobenchmarks under every mode, beside the paper's figures (DESIGN.md section 7).

Runs guests/nanobench.S (its PV build under `para`) with N_ITER iterations per operation under each
registered mode. The guest prints "done <op>" after each loop and nothing else; the host stamps the
wall clock when a line's first byte arrives (end of that phase) and when its newline arrives (start of
the next), so the printing itself is not timed. Per operation: (phase time) / N_ITER, in microseconds,
then as a multiple of native and of a bare Unicorn hook call measured in the same run
(bench/events.py's unit). The paper's columns are cycles on a 2006 CPU: compare the ratios, not the units.
The first phase (syscall) starts when the guest enters its ring-3 loop (a one-address code hook on
`user_syscall_loop`, which runs once), so that neither the machine's construction nor the guest's own
set-up is counted; where that address never runs as such (full translates it) the phase starts when
the guest does, and the table marks it with `*`.
With --marginal each mode also runs a build of 2N iterations, and an operation's time is
(phase(2N) - phase(N)) / N: what one more iteration costs, without what a phase pays once (the first
translation of its code, Python counting its new blocks, and under full the guest's set-up, which the
syscall phase holds there: the `*` mark). It takes three times as long.
usage: python bench/nanobench.py [--n N] [--modes native,hw,...] [--repeat R] [--marginal]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
import events  # noqa: E402
import rawuc  # noqa: E402

# The operations, the paper's figures and the image builder are shared with `cpuvirt bench`
# (cpuvirt/nanobench.py), which reports the same phases in events and modelled cycles.
from cpuvirt.nanobench import OPS, PAPER, build  # noqa: E402


def loop_address(n: int, pv: bool) -> int:
    """Where the ring-3 system-call loop starts in the image build(n, pv) makes."""
    from cpuvirt.toolchain.build import guest_source_dir, include_dir
    from cpuvirt.toolchain.image import build_image
    from cpuvirt.toolchain.preprocess import preprocess

    pre = preprocess(guest_source_dir() / "nanobench.S", {"PV": int(pv), "N_ITER": n}, [include_dir()])
    return build_image(pre.lines)[1].symbols["user_syscall_loop"]


def phases(path: str, mode: str, loop: int | None = None) -> tuple[dict, object]:
    """{op: seconds} for one run of the image under `mode`; the first phase starts at `loop` if the
    guest runs that address (out["from_loop"] says whether it did)."""
    from unicorn import UC_HOOK_CODE

    from cpuvirt.runner import run_guest
    stamps = []          # (time, byte) for line starts and ends
    line = bytearray()
    start = [None, False]

    def console(byte: int) -> None:
        now = time.perf_counter()
        if not line:
            stamps.append(("end", now))
        line.append(byte)
        if byte == 10:
            stamps.append(("line", bytes(line).decode().strip(), now))
            line.clear()

    def at_loop(_uc, _address, _size, _data) -> None:
        if not start[1]:
            start[0], start[1] = time.perf_counter(), True

    def on_start(hv) -> None:
        start[0] = time.perf_counter()   # the machine is built and booted: the guest starts
        if loop is not None:
            hv.vcpu.uc.hook_add(UC_HOOK_CODE, at_loop, begin=loop, end=loop)

    from cpuvirt.modespec import parse
    spec = parse(mode)  # MODE[:NAME=VALUE...]: hw with VMX controls, e.g. hw:ept=0 (shadow paging)
    r = run_guest(path, mode=spec.mode, max_insns=0, console=console, on_start=on_start, mode_options=spec.options())
    if r.outcome != "exit" or r.status != 0:
        raise RuntimeError(f"nanobench under {mode}: {r.outcome} {r.status} {r.message} {r.console[-300:]!r}")
    out, begin, ended = {"from_loop": start[1]}, start[0], None
    for s in stamps:
        if s[0] == "end":
            ended = s[1]
        else:
            _, text, now = s
            if text.startswith("done "):
                out[text[5:]] = ended - begin
            begin = now
    return out, r


def main(argv=None) -> dict:
    from cpuvirt.modes import MODES
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=5_000, help="iterations per operation")
    ap.add_argument("--modes", default=",".join(MODES), help="modes to run, each MODE[:NAME=VALUE...] (hw:ept=0: shadow paging; default: every registered one)")
    ap.add_argument("--repeat", type=int, default=3, help="best of this many runs per mode")
    ap.add_argument("--marginal", action="store_true", help="per op: (phase(2N) - phase(N)) / N, see above")
    a = ap.parse_args(argv)
    modes = [m for m in a.modes.split(",") if m]

    from cpuvirt.toolchain.build import list_guests
    has_pv = any(g.name == "nanobench" and g.has_pv for g in list_guests())
    counts = (a.n, 2 * a.n) if a.marginal else (a.n,)
    paths = {(False, n): C.write_temp(build(n, False), f"nanobench{n}") for n in counts}
    if has_pv:
        paths.update({(True, n): C.write_temp(build(n, True), f"nanobench{n}.pv") for n in counts})
    loops = {key: loop_address(key[1], key[0]) for key in paths}

    # The unit: a bare Unicorn hook call (an OUT hook that returns at once), as in bench/events.py.
    io_imgs = {e: C.build("events", EVENT=e, N=100_000) for e in (0, 1)}
    hook_us, _, _ = events.per_event(lambda img: rawuc.run(img, events.bare_out_hook)[1], io_imgs[1], io_imgs[0],
                                     100_000, a.repeat)

    best: dict[str, dict] = {}
    lengths: dict[str, dict[int, dict]] = {}   # mode -> N_ITER -> op -> best seconds
    skipped = {}
    marked: set[str] = set()   # modes whose syscall phase holds the guest's set-up (the loop hook never ran)
    for mode in modes:
        pv = mode == "para"
        if pv and not has_pv:
            skipped[mode] = "nanobench has no PV build"
            continue
        for _ in range(a.repeat):
            try:
                runs = [phases(paths[pv, n], mode, loops[pv, n])[0] for n in counts]
            except Exception as e:  # a mode that cannot run the guest yet is reported, not fatal
                skipped[mode] = str(e).splitlines()[0][:120]
                break
            if not all(ph.pop("from_loop") for ph in runs) and not a.marginal:
                marked.add(mode)
            for n, ph in zip(counts, runs):   # the best of each length (a difference of bests: no bias down)
                cur = lengths.setdefault(mode, {}).setdefault(n, {})
                for op, s in ph.items():
                    cur[op] = min(cur.get(op, s), s)
        if mode in lengths:
            by_n = lengths[mode]
            best[mode] = by_n[a.n] if not a.marginal else {op: by_n[2 * a.n][op] - by_n[a.n][op] for op in by_n[a.n]}

    how = f"the cost of iterations {a.n + 1}-{2 * a.n} of each" if a.marginal else f"{a.n} iterations"
    C.header(f"nanobench: {how} per operation; us per operation (x native) [x bare hook call "
             f"{hook_us:.2f} us]")
    shown = [m for m in modes if m in best]
    print(f"{'op':<11}" + "".join(f"{m:>24}" for m in shown) + "   paper: native / BT / VT-x (cycles)")
    for op in OPS:
        nat = best.get("native", {}).get(op)
        cells = []
        for m in shown:
            s = best[m].get(op)
            if s is None:
                cells.append(f"{'-':>24}")
                continue
            us = s / a.n * 1e6
            rel = f"x{us / (nat / a.n * 1e6):.1f}" if nat else "-"
            mark = "*" if op == "syscall" and m in marked else " "
            cells.append(f"{us:7.2f}{mark} ({rel:>6}) [{us / hook_us:5.1f}]")
        paper = PAPER.get(op)
        print(f"{op:<11}" + "".join(cells) + ("   " + " / ".join(str(x) for x in paper) if paper else ""))
    for m, why in skipped.items():
        print(f"  {m}: skipped ({why})")
    return {"hook_us": hook_us, "modes": {m: {op: s / a.n * 1e6 for op, s in ph.items()} for m, ph in best.items()}}


if __name__ == "__main__":
    main()
