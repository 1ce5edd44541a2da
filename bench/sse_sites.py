"""Host time of a guest that spreads legacy-SSE instructions over many code pages (bounded hooks).

tests/guests/sse_sites.S writes PAGES pages of 1,365 `movaps xmm0, [esi]` each and runs every page
once. Each aligned-SSE site gets a code hook (cpu/ssealign.py), and Unicorn walks every code hook when
it translates an instruction and when a hooked one runs; limits.SSE_SITES, SCAN_SITES and
INTERCEPT_SITES bound them. Printed: wall seconds per page for each PAGES (one run each, best of
--repeat), and the ratio of the largest to the smallest: about 1 when the host cost is linear in the
guest's code, growing with PAGES when it is quadratic (uncapped hooks: 249 s for 64 pages, 2.6 s for 4).
usage: python bench/sse_sites.py [--pages 4,16,64] [--modes native,full] [--repeat 1]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def image(pages: int) -> str:
    import tempfile

    from cpuvirt.toolchain.build import include_dir
    from cpuvirt.toolchain.image import build_image
    from cpuvirt.toolchain.preprocess import preprocess
    pre = preprocess(ROOT / "tests" / "guests" / "sse_sites.S", {"PAGES": str(pages)}, [include_dir()])
    path = Path(tempfile.gettempdir()) / f"cpuvirt-sse-sites-{pages}.bin"
    path.write_bytes(build_image(pre.lines)[0])
    return str(path)


def main(argv=None) -> dict:
    from cpuvirt.runner import run_guest
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pages", default="4,16,64")
    ap.add_argument("--modes", default="native,full")
    ap.add_argument("--repeat", type=int, default=1)
    a = ap.parse_args(argv)
    out = {}
    for mode in a.modes.split(","):
        per_page = {}
        for pages in (int(p) for p in a.pages.split(",")):
            path = image(pages)
            best = None
            for _ in range(a.repeat):
                r = run_guest(path, mode=mode, max_insns=0)
                if r.outcome != "exit" or r.status != 0:
                    raise SystemExit(f"{mode} PAGES={pages}: {r.outcome} {r.status} {r.message}")
                best = r.wall_s if best is None else min(best, r.wall_s)
            per_page[pages] = best / pages
            print(f"{mode:7s} PAGES={pages:4d}  {best:8.2f} s  {1000 * best / pages:8.1f} ms/page", flush=True)
        lo, hi = min(per_page), max(per_page)
        print(f"{mode:7s} per-page time, {hi} pages / {lo} pages: {per_page[hi] / per_page[lo]:.2f}x")
        out[mode] = per_page
    return out


if __name__ == "__main__":
    main()
