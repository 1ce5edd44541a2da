"""The completion-order experiment: a virtqueue against the e1000's head/tail ring, same traffic, same
slow destination (docs/virtio.md, "The traditional NIC ring beside the virtqueue").

netdemo (`quiet`, peer=user: 303 or 304 frames, the burst of 300 queued a ring-full at a time) runs once
with `--device virtio-net,peer=user,slow=N:K` and once with `--device e1000,peer=user,slow=N:K`: every
N-th frame the device takes goes to a destination K virtual microseconds slower. Each transmit
completion is a `completion` trace event (cpuvirt/virtio/completion.py) with its latency, from the
doorbell that gave the frame to the device (the virtio kick, the TDT write) to the moment the driver
can see it done (the used-ring entry, the DD bit). Printed: per NIC, the latency distribution of all
frames and of the fast frames only, how many fast frames waited behind a slow one, how many completions
overtook an earlier frame, and the run's virtual time; the plot (latency per frame, and its CDF) is
written as an SVG. Everything is virtual time: the figures are the same on every machine and run.
usage: python bench/nic_order.py [--every N] [--delay K] [--svg docs/diagrams/nic-completion-order.svg]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cpuvirt.runner import run_guest  # noqa: E402
from cpuvirt.virtio.completion import SlowDestination  # noqa: E402
from cpuvirt.virtio.setup import DeviceSpec  # noqa: E402

NICS = ("virtio-net", "e1000")


def run(nic: str, slow: SlowDestination, workdir: Path):
    path = workdir / f"{nic}.jsonl"
    r = run_guest("netdemo", cmdline="quiet", devices=[DeviceSpec(nic, peer="user", slow=slow)],
                  trace_path=str(path), max_insns=0)
    if r.outcome != "exit" or r.status != 0:
        raise SystemExit(f"netdemo with {nic}: {r.outcome} {r.status} {r.message}")
    done = []
    with open(path) as f:
        for line in f:
            e = json.loads(line)
            if e.get("kind") == "completion":
                done.append(e["detail"])
    return r, done


def pct(values, p):
    s = sorted(values)
    return s[min(len(s) - 1, int(p / 100 * len(s)))] if s else 0


def row(nic, r, done):
    lat = [d["latency_ns"] / 1000 for d in done]
    fast = [d["latency_ns"] / 1000 for d in done if not d["slow"]]
    return {"nic": nic, "frames": len(done), "slow": sum(d["slow"] for d in done),
            "overtook": sum(1 for d in done if d["overtook"]),
            "fast_waited": sum(1 for x in fast if x > 0),
            "p50": pct(lat, 50), "p90": pct(lat, 90), "p99": pct(lat, 99), "max": max(lat, default=0),
            "mean": sum(lat) / len(lat) if lat else 0, "fast_mean": sum(fast) / len(fast) if fast else 0,
            "fast_p90": pct(fast, 90), "vtime_ms": r.vtime / 1e6}


def table(rows, slow) -> str:
    head = (f"netdemo quiet, peer=user, slow={slow.text()} (every {slow.every}th frame {slow.delay_us} us late); "
            "latency in virtual us, doorbell to completion")
    cols = ("nic", "frames", "slow", "overtook", "fast_waited", "p50", "p90", "p99", "max", "mean", "fast_mean",
            "fast_p90", "vtime_ms")
    lines = [head, "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [r["nic"]] + [f"{r[c]:.1f}" if isinstance(r[c], float) else str(r[c]) for c in cols[1:]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results, slow, out: Path) -> None:
    import matplotlib
    matplotlib.use("svg")
    import matplotlib.pyplot as plt
    plt.rcParams["svg.fonttype"] = "none"
    plt.rcParams["svg.hashsalt"] = "cpuvirt"        # the same run gives the same file
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.8))
    for nic, done in results:
        by_frame = sorted(done, key=lambda d: d["frame"])
        a.plot([d["frame"] for d in by_frame], [d["latency_ns"] / 1000 for d in by_frame], ".", ms=3, label=nic)
        lat = sorted(d["latency_ns"] / 1000 for d in done)
        b.step(lat, [(i + 1) / len(lat) for i in range(len(lat))], where="post", label=nic)
    a.set_xlabel("frame (in the order the device took it)")
    a.set_ylabel("completion latency (virtual us)")
    a.set_title(f"every {slow.every}th frame {slow.delay_us} us late")
    b.set_xlabel("completion latency (virtual us)")
    b.set_ylabel("fraction of frames")
    b.set_title("latency CDF")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out, format="svg", metadata={"Date": None})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--delay", type=int, default=50, help="virtual microseconds")
    ap.add_argument("--svg", type=Path, default=None, help="write the plot there")
    args = ap.parse_args()
    slow = SlowDestination.parse(f"{args.every}:{args.delay}")
    rows, results = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for nic in NICS:
            r, done = run(nic, slow, Path(tmp))
            rows.append(row(nic, r, done))
            results.append((nic, done))
    print(table(rows, slow))
    v, e = rows
    ratio = f"{e['mean'] / v['mean']:.1f}x" if v["mean"] else "n/a (no latency at all)"
    print(f"\nfast frames delayed by a slow one: virtio-net {v['fast_waited']}, e1000 {e['fast_waited']}; "
          f"mean latency e1000/virtio-net {ratio}; "
          f"run virtual time e1000/virtio-net {e['vtime_ms'] / v['vtime_ms']:.2f}x")
    if args.svg:
        plot(results, slow, args.svg)
        print(f"plot: {args.svg}")


if __name__ == "__main__":
    main()
