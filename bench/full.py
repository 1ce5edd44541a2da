"""Mode `full` (binary translation): speed against native and trap, and the cost of a callout.

- compute: bench/guests/compute.S (sieve, recursive fib, stores) under full vs native (DESIGN.md 7:
  full >= 0.7 of native), interleaved best of R; wall_s is the run loop only, start-up included.
- call/ret: a loop of N `call f` / `f: ret` pairs (inline caches for ret; target >= 0.5 of native).
- cli/sti and pushf/popf loops: full (native at ring 1 with IOPL 1; pushf rewritten inline) against
  trap (cli/sti trap and are emulated; pushf/popf run natively and show the holes) and native.
- callout round trip: a loop of N `cpuid` (a callout under full) minus the same loop with `nop; nop`,
  per iteration, as a multiple of a bare Unicorn hook call measured in the same run (bench/events.py);
  and `out 0x80, al` (a callout under full, an I/O hook under native) against the empty loop.
- mov to CR0 toggling WP and mov to CR4 toggling PGE (kvm-unit-tests' vmexit), per iteration.
The nanobenchmarks under full: `python bench/nanobench.py --modes native,trap,full`.
usage: python bench/full.py [--rounds R] [--n N] [--trap-n N] [--repeat R]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
import events  # noqa: E402
import rawuc  # noqa: E402

LOOP = """# description: full bench loop OP (N iterations)
#include "kernel.inc"
.text
main:
#if OP == 7
    mov eax, cr0
#elif OP == 8
    mov eax, cr4
#endif
    mov ecx, N
bench_loop:
#if OP == 1
    call bench_f
#elif OP == 2
    cli
    sti
#elif OP == 3
    pushfd
    popfd
#elif OP == 4
    push ecx
    xor eax, eax
    cpuid
    pop ecx
#elif OP == 5
    push ecx
    xor eax, eax
    nop
    nop
    pop ecx
#elif OP == 6
    out 0x80, al
#elif OP == 7
    xor eax, 0x10000
    mov cr0, eax
#elif OP == 8
    xor eax, 0x80
    mov cr4, eax
#else
    nop
#endif
    dec ecx
    jnz bench_loop
    ret
bench_f:
    ret
"""
OPS = {"empty": 0, "call_ret": 1, "cli_sti": 2, "pushf_popf": 3, "cpuid": 4, "cpuid_base": 5, "out": 6, "cr0_wp": 7,
       "cr4_pge": 8}


def build_loop(op: str, n: int) -> bytes:
    from cpuvirt.toolchain.build import include_dir
    from cpuvirt.toolchain.image import build_image
    from cpuvirt.toolchain.preprocess import preprocess
    src = Path(tempfile.mkdtemp()) / "fullloop.S"
    src.write_text(LOOP)
    pre = preprocess(src, {"PV": 0, "OP": OPS[op], "N": n}, [include_dir()])
    return build_image(pre.lines)[0]


def run(path: str, mode: str):
    from cpuvirt.runner import run_guest
    r = run_guest(path, mode=mode, max_insns=0)
    if r.outcome != "exit" or r.status != 0:
        raise RuntimeError(f"{path} under {mode}: {r.outcome} {r.status} {r.message}")
    return r


def best(path: str, modes, repeat: int) -> dict:
    out = {}
    for _ in range(repeat):
        for m in modes:
            r = run(path, m)
            if m not in out or r.wall_s < out[m].wall_s:
                out[m] = r
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=100, help="compute.S rounds")
    ap.add_argument("--n", type=int, default=1_000_000, help="loop iterations (native, full)")
    ap.add_argument("--trap-n", type=int, default=20_000, help="loop iterations under trap")
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args(argv)
    res = {}

    comp = best(C.write_temp(C.build("compute", ROUNDS=a.rounds), f"compute{a.rounds}"), ("native", "full"), a.repeat)
    if comp["native"].console != comp["full"].console:
        raise RuntimeError("compute: full's console differs from native's")
    res["compute"] = comp["native"].wall_s / comp["full"].wall_s

    loops = {op: C.write_temp(build_loop(op, a.n), f"fullloop-{op}") for op in OPS}
    t = {op: best(path, ("native", "full"), a.repeat) for op, path in loops.items()}
    # trap emulates cli/sti through #GP (tens of us each): fewer iterations for it
    tloops = {op: C.write_temp(build_loop(op, a.trap_n), f"traploop-{op}") for op in ("empty", "call_ret", "cli_sti",
                                                                                   "pushf_popf")}
    for op, path in tloops.items():
        t[op].update(best(path, ("trap",), a.repeat))
    n_of = lambda m: a.trap_n if m == "trap" else a.n
    per = lambda op, m: (t[op][m].wall_s - t["empty"][m].wall_s) / n_of(m) * 1e6
    res["call_ret"] = per("call_ret", "native") / per("call_ret", "full") if per("call_ret", "full") > 0 else None
    io_imgs = {e: C.build("events", EVENT=e, N=100_000) for e in (0, 1)}
    hook_us, _, _ = events.per_event(lambda img: rawuc.run(img, events.bare_out_hook)[1], io_imgs[1], io_imgs[0],
                                     100_000, a.repeat)
    callout_us = (t["cpuid"]["full"].wall_s - t["cpuid_base"]["full"].wall_s) / a.n * 1e6
    out_us = {m: per("out", m) for m in ("native", "full")}

    C.header("full mode (binary translation)")
    print(f"compute (sieve/fib/stores, {a.rounds} rounds): full runs at {res['compute']:.2f} of native "
          f"(target >= 0.7)  [native {comp['native'].wall_s:.3f} s, full {comp['full'].wall_s:.3f} s]")
    if res["call_ret"]:
        print(f"call/ret loop: full at {res['call_ret']:.2f} of native (target >= 0.5)  "
              f"[us per call+ret: native {per('call_ret', 'native'):.4f}, full {per('call_ret', 'full'):.4f}]")
    print(f"{'us per iteration':<18}{'native':>10}{'trap':>10}{'full':>10}")
    for op in ("call_ret", "cli_sti", "pushf_popf"):
        print(f"{op:<18}" + "".join(f"{per(op, m):10.4f}" for m in ("native", "trap", "full")))
    print(f"callout round trip (cpuid under full): {callout_us:.2f} us = {callout_us / hook_us:.1f}x a bare "
          f"hook call ({hook_us:.2f} us; target <= 10x)")
    print(f"`out 0x80, al`: native (an I/O hook) {out_us['native']:.2f} us = {out_us['native'] / hook_us:.1f}x, "
          f"full (a callout) {out_us['full']:.2f} us = {out_us['full'] / hook_us:.1f}x a bare hook call")
    cr_us = {op: {m: per(op, m) for m in ("native", "full")} for op in ("cr0_wp", "cr4_pge")}
    for op, what in (("cr0_wp", "CR0 (WP toggled)"), ("cr4_pge", "CR4 (PGE toggled)")):
        print(f"mov to {what}: native {cr_us[op]['native']:.2f} us, full (a callout) {cr_us[op]['full']:.2f} us = "
              f"{cr_us[op]['full'] / hook_us:.1f}x a bare hook call")
    res.update(callout_us=callout_us, hook_us=hook_us, out_us=out_us, cr_us=cr_us)
    return res


if __name__ == "__main__":
    main()
