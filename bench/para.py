"""Cost of a para-mode hypercall round trip, and para-mode compute speed as a share of native mode.

Per hypercall = (time of a PV guest loop making N xen_version hypercalls - time of the same loop
without the `call` into the hypercall page) / N, under `run_guest(mode="para")`. The unit, measured
in the same run: a bare Unicorn hook call (bench/events.py's raw-Unicorn OUT-hook loop).
Then bench/guests/compute.S built PV (PV=1, PARAVIRT=1: the paravirt-ops kernel.inc) under para vs
its native build under native, interleaved best of R; then the nanobenchmarks (bench/nanobench.py)
under native and para.
DESIGN.md 7 / issue 5: a hypercall round trip <= 10x a bare hook call; para compute >= 0.9 of native.
usage: python bench/para.py [--n N] [--rounds R] [--repeat R] [--nano-n N] [--no-nano]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C
import rawuc
from events import bare_out_hook, per_event

LOOP = """# description: para bench: N hypercalls (EVENT=1) or the same loop without them (EVENT=0)
#define PARAVIRT 1
#include "kernel.inc"
.text
main:
    mov ecx, N
bench_loop:
    push ecx
    xor ebx, ebx
    mov eax, dword ptr [pv_hypercall_page]
    add eax, 32 * 17
#if EVENT
    call eax
#else
    nop
#endif
    pop ecx
    dec ecx
    jnz bench_loop
    ret
"""


def build_loop(event: int, n: int) -> bytes:
    from cpuvirt.toolchain.build import include_dir
    from cpuvirt.toolchain.image import build_image
    from cpuvirt.toolchain.preprocess import preprocess
    src = Path(tempfile.mkdtemp()) / "pvloop.S"
    src.write_text(LOOP)
    pre = preprocess(src, {"PV": 1, "EVENT": event, "N": n}, [include_dir()])
    return build_image(pre.lines)[0]


def run(path: str, mode: str):
    from cpuvirt.runner import run_guest
    r = run_guest(path, mode=mode, max_insns=0)
    if r.outcome != "exit" or r.status != 0:
        raise RuntimeError(f"{path} ({mode}): {r.outcome} {r.status} {r.message} {r.console[-300:]!r}")
    return r


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=50_000, help="hypercalls (bare hook calls: 4x this)")
    ap.add_argument("--rounds", type=int, default=100, help="compute.S rounds (~1.2 M instructions each)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--nano-n", type=int, default=2000, help="nanobench iterations per operation")
    ap.add_argument("--no-nano", action="store_true")
    a = ap.parse_args(argv)

    hook_n = a.n * 4
    raw_imgs = {e: C.build("events", EVENT=e, N=hook_n) for e in (0, 1)}
    paths = {e: C.write_temp(build_loop(e, a.n), f"para-loop{e}") for e in (0, 1)}
    last = {}

    def para(k):
        r = run(paths[k], "para")
        last[k] = r
        return r.wall_s

    hook_us, raw_w, raw_wo = per_event(lambda img: rawuc.run(img, bare_out_hook)[1], raw_imgs[1], raw_imgs[0],
                                       hook_n, a.repeat)
    hc_us, hc_w, hc_wo = per_event(para, 1, 0, a.n, a.repeat)
    n_hc = last[1].counts.get("hypercall", 0) - last[0].counts.get("hypercall", 0)

    native_path = C.write_temp(C.build("compute", ROUNDS=a.rounds), f"compute{a.rounds}")
    pv_path = C.write_temp(C.build("compute", ROUNDS=a.rounds, PV=1, PARAVIRT=1), f"compute{a.rounds}-pv")
    nat = pvr = None
    for _ in range(a.repeat):
        r = run(native_path, "native")
        nat = r if nat is None or r.wall_s < nat.wall_s else nat
        r = run(pv_path, "para")
        pvr = r if pvr is None or r.wall_s < pvr.wall_s else pvr
    if nat.console != pvr.console:
        raise RuntimeError(f"para console {pvr.console!r} != native {nat.console!r}")

    C.header(f"para: {a.n} xen_version hypercalls; compute ROUNDS={a.rounds}")
    print(f"hypercall round trip / bare hook call : {hc_us / hook_us:7.1f}x   (target <= 10x)")
    print(f"para / native compute speed           : {nat.wall_s / pvr.wall_s:7.2f}    (target >= 0.9)")
    print(f"  bare Unicorn hook call : {hook_us:8.2f} us  (raw loop, {hook_n} OUTs: {raw_w:.3f} s - {raw_wo:.3f} s)")
    print(f"  hypercall round trip   : {hc_us:8.2f} us  ({hc_w:.3f} s - {hc_wo:.3f} s; {n_hc} extra hypercalls)")
    print(f"  compute.S              : native {nat.wall_s:.3f} s ({nat.icount / nat.wall_s / 1e6:.0f} MIPS), "
          f"para {pvr.wall_s:.3f} s ({pvr.icount / pvr.wall_s / 1e6:.0f} MIPS); para events "
          + ", ".join(f"{k} {v}" for k, v in pvr.counts.items()))
    out = {"hook_us": hook_us, "hypercall_us": hc_us, "native_s": nat.wall_s, "para_s": pvr.wall_s}
    if not a.no_nano:
        import nanobench
        nanobench.main(["--n", str(a.nano_n), "--modes", "native,para", "--repeat", str(a.repeat)])
    return out


if __name__ == "__main__":
    main()
