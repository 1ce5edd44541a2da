"""The `cpuvirt` command (DESIGN.md section 6).

Exit status (defined once in cpuvirt/status.py): the guest's debug-exit value; 123 the hypervisor stopped
the guest (the reason on one line); 124 budget exhausted; 125 triple fault; 126 halted forever; 2 usage or
input error (one line, no traceback); 1 internal error (a cpuvirt bug, never a guest's doing).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import TYPE_CHECKING

from cpuvirt import __version__
from cpuvirt.errors import CpuvirtError
from cpuvirt.status import BAD_INPUT, INTERNAL_ERROR

if TYPE_CHECKING:
    from cpuvirt.virtio.setup import DeviceSpec


def _int(text: str) -> int:
    try:
        return int(text.replace("_", ""), 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def _module(text: str) -> tuple[str, str | None]:
    """FILE[,CMDLINE]: the file, and everything after the first comma as its command line."""
    path, comma, args = text.partition(",")
    if not path:
        raise argparse.ArgumentTypeError(f"no file name in --module {text!r}")
    return path, args if comma else None


def _parse_devices(texts) -> list:
    """--device values: pc-testdev (a machine device, machine/testdev.py) or a PCI device (virtio/setup.py)."""
    from cpuvirt.machine.testdev import TestdevSpec

    devices: list[TestdevSpec | DeviceSpec] = []
    for text in texts:
        if text.split(",")[0] == TestdevSpec.kind:
            if text != TestdevSpec.kind:
                raise CpuvirtError(f"--device {text}: pc-testdev takes no options")
            if TestdevSpec() in devices:
                raise CpuvirtError("--device pc-testdev is given twice (the machine has one)")
            devices.append(TestdevSpec())
            continue
        from cpuvirt.virtio.setup import parse_device  # only when a PCI device is asked for

        devices.append(parse_device(text))
    return devices


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, status 2
        self.exit(2, f"cpuvirt: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="cpuvirt", description="Run x86 guests under every classic CPU-virtualization technique.")
    p.add_argument("--version", action="version", version=f"cpuvirt {__version__}")
    sub = p.add_subparsers(dest="verb", required=True, parser_class=_Parser)

    r = sub.add_parser("run", help="run a guest (bundled name or Multiboot image path)")
    r.add_argument("guest")
    r.add_argument(
        "--mode",
        default="native",
        help="native (default), trap (ring-1 trap-and-emulate), "
        "para (a PV build: Xen-style hypercalls), full (binary translation) or hw",
    )
    r.add_argument("--mem", type=_int, default=32, metavar="MiB", help="guest RAM in MiB (default 32)")
    r.add_argument("--trace", metavar="FILE", help="write an exit trace (JSON Lines, cpuvirt-trace/1)")
    r.add_argument(
        "--max-insns",
        type=_int,
        default=None,
        metavar="N",
        help="budget in virtual cycles: one per instruction, plus 1000 per port access and idle time "
        "in hlt (default 1e9; 0 = unlimited); outcome 'budget', status 124",
    )
    r.add_argument("--append", default="", metavar="CMDLINE", help="kernel command line")
    r.add_argument(
        "--module",
        action="append",
        default=[],
        type=_module,
        metavar="FILE[,CMDLINE]",
        help="a Multiboot module with its command line (repeatable; as QEMU's -initrd 'FILE CMDLINE')",
    )
    r.add_argument(
        "--device",
        action="append",
        default=[],
        metavar="virtio-net|e1000[,mac=M][,peer=P][,backend=B][,slow=N:K]|pc-testdev",
        help="a PCI device, in slot order from 00:02.0 (repeatable), or pc-testdev (QEMU's test device "
        "for test kernels: docs/platform.md); peer loopback (default: echo "
        "every frame) or user (answers ARP and ping for 10.0.2.2 as QEMU's -netdev user does); backend "
        "userspace (default: the device model serves the rings), vhost (an in-hypervisor worker "
        "behind an ioeventfd and irqfd) or vhost-user (a separate backend process; socket=PATH to "
        "use one already listening)",
    )
    r.add_argument("--pcap", metavar="FILE", help="write every frame the devices send and receive to a pcap file")
    r.add_argument("--quiet", "-q", action="store_true", help="no summary on stderr")
    r.add_argument("--summary", metavar="FILE", help="also write the run's summary as JSON (for scripts and labs)")
    r.add_argument(
        "--stats",
        action="store_true",
        help="per-exit-reason table, like kvm_stat (hw), and modelled cycles by event kind and reason",
    )
    _costs_option(r)
    r.add_argument(
        "--verbose-trace",
        action="store_true",
        help="with --trace: also record each translated block (full) and each hidden shadow-paging "
        "fault (trap, full, hw --no-ept); large traces",
    )
    r.add_argument(
        "--input",
        metavar="FILE",
        help="type FILE into COM1, one byte at a time on the virtual clock (reproducible); "
        "without it, a pipe on stdin is typed the same way, and a terminal is interactive",
    )
    r.add_argument(
        "--input-prompt",
        metavar="TEXT",
        help="with scripted input: send each line only once the console ends with TEXT (e.g. '$ '), "
        "and end the run (status 0) when TEXT follows the last line",
    )
    r.add_argument(
        "--rtc",
        metavar="DATE",
        help="the CMOS clock's start, YYYY-MM-DDTHH:MM:SS (default 2000-01-01T00:00:00; it then "
        "advances with virtual time)",
    )
    _vmx_options(r)
    r.add_argument(
        "--dump-vmcs-on",
        metavar="REASON|SYMBOL",
        help="hw: dump the VMCS to stderr at the first exit of "
        "REASON, or the first exit at a guest symbol (symbol+offset)",
    )

    v = sub.add_parser("vmcs", help="hw mode: run a guest until a chosen VM exit and print the VMCS")
    v.add_argument("guest")
    at = v.add_mutually_exclusive_group(required=True)
    at.add_argument("--at-exit", type=_int, metavar="N", help="the Nth VM exit (1 = the first)")
    at.add_argument("--dump-vmcs-on", metavar="REASON", help="the first exit of this reason (name or number)")
    at.add_argument(
        "--at-rip", metavar="ADDR|SYMBOL", help="the first exit at this guest RIP (symbol, symbol+offset, or number)"
    )
    v.add_argument("--mem", type=_int, default=32, metavar="MiB")
    _vmx_options(v)

    sub.add_parser("guests", help="list the bundled guests")
    b = sub.add_parser("build", help="assemble guests into Multiboot images: the bundled ones, or the files named")
    b.add_argument("sources", nargs="*", metavar="FILE.S", help="guest source files (default: every bundled guest)")
    b.add_argument(
        "--out",
        "-o",
        default=None,
        help="output directory (default guests/build); with one FILE.S, the image file (default FILE.bin)",
    )
    b.add_argument("--pv", action="store_true", help="with FILE.S: its paravirtualized build (PV = 1)")

    c = sub.add_parser("compare", help="align traces (or runs of one guest) site by site: what each technique did")
    c.add_argument(
        "items", nargs="+", metavar="TRACE|GUEST", help="two or more trace files, or one guest to run under --modes"
    )
    c.add_argument(
        "--modes",
        default="native,hw",
        help="with a guest: the modes to run, each MODE[:NAME=VALUE...] (hw controls, e.g. hw:ept=0); "
        "default native,hw",
    )
    c.add_argument("--limit", type=_int, default=None, metavar="N", help="show at most N sites")
    c.add_argument(
        "--vmx", action="append", default=[], metavar="NAME=VALUE", help="with a guest: hw controls for every hw run"
    )
    c.add_argument(
        "--site",
        action="append",
        default=[],
        metavar="SYMBOL|ADDR|FILE:LINE",
        help="only the sites at this symbol (symbol+offset), address or source line (repeatable)",
    )
    c.add_argument("--image", metavar="FILE", help="with trace files: the image they were made from (symbols)")
    c.add_argument("--max-insns", type=_int, default=None, metavar="N", help="with a guest: budget of each run")
    c.add_argument("--wide", action="store_true", help="one line per site, a column per run (wider than 100)")
    c.add_argument("--csv", action="store_true", help="the site table as CSV")
    c.add_argument("--json", action="store_true", help="summary and sites as JSON")
    _costs_option(c)
    c.add_argument(
        "--device",
        action="append",
        default=[],
        metavar="virtio-net|e1000[,mac=M][,peer=P][,backend=B][,slow=N:K]",
        help="with a guest: PCI devices, as for run",
    )
    c.add_argument("--append", default="", metavar="CMDLINE", help="with a guest: its kernel command line")
    c.add_argument(
        "--mem", type=_int, default=32, metavar="MiB", help="with a guest: RAM of each run (default 32; xv6 needs 256)"
    )
    c.add_argument("--input", metavar="FILE", help="with a guest: type FILE into COM1 in every run, as for run")
    c.add_argument(
        "--input-prompt", metavar="TEXT", help="with --input: send each line after TEXT (e.g. '$ '), as for run"
    )

    bt = sub.add_parser("bt", help="full mode: show guest blocks beside their binary translation")
    bt.add_argument("guest")
    bt.add_argument(
        "--at",
        default=None,
        metavar="ADDR|SYMBOL",
        help="the block starting at this guest EIP (a number, a symbol or symbol+offset)",
    )
    bt.add_argument("--blocks", type=_int, default=3, metavar="N", help="without --at: the first N blocks translated")
    bt.add_argument("--mem", type=_int, default=32, metavar="MiB")
    bt.add_argument("--max-insns", type=_int, default=50_000_000, metavar="N", help="budget of the run first made")
    bt.add_argument("--trace", metavar="FILE", help="also write the run's trace, with a `translate` event per block")

    ng = sub.add_parser("new-guest", help="write a skeleton guest (assembler, or C with --c) that PASSes in every mode")
    ng.add_argument("name")
    ng.add_argument(
        "--c", action="store_true", help="a C kernel (NAME/ with a Makefile; needs gcc -m32) instead of NAME.S"
    )
    ng.add_argument("--dir", default=".", help="where to write it (default: here)")

    lab = sub.add_parser("lab", help="run a lab: its commands, their output, and checks of your answers")
    lab.add_argument("name", nargs="?", help="the lab (name or number); none: list the labs")
    lab.add_argument("--answer", action="append", default=[], metavar="Q=VALUE", help="check an answer (repeatable)")
    lab.add_argument("--write-doc", metavar="DIR", help="write the lab's handout with this run's observations into DIR")
    lab.add_argument("--quiet", "-q", action="store_true", help="do not show the commands' output")
    be = sub.add_parser(
        "bench",
        help="Adams & Agesen's nanobenchmarks per mode: host time, events and modelled "
        "cycles per operation, the paper's cycles beside",
    )
    be.add_argument(
        "--modes",
        default=None,
        metavar="MODE[:NAME=VALUE],...",
        help="modes to run (default native,trap,full,para,hw,hw:ept=0; hw:ept=0 is the paper's "
        "first-generation VT-x, which had no EPT)",
    )
    be.add_argument("--n", type=_int, default=2000, metavar="N", help="iterations per operation (default 2000)")
    be.add_argument("--json", action="store_true", help="the results as JSON")
    _costs_option(be)

    sw = sub.add_parser("sweep", help="hw: run a guest under every combination of VMX control values, in parallel")
    sw.add_argument("guest")
    sw.add_argument(
        "--vmx",
        action="append",
        default=[],
        metavar="NAME=V1,V2",
        help="a control and the values to try (repeatable; io_bitmap/msr_bitmap alternatives split on '|')",
    )
    sw.add_argument("--modes", default="hw", help="hw is swept; other modes listed run once as references (default hw)")
    sw.add_argument("--max-insns", type=_int, default=None, metavar="N")
    sw.add_argument("--jobs", type=_int, default=None, metavar="N", help="parallel processes (default: one per core)")
    sw.add_argument("--json", action="store_true")
    _costs_option(sw)

    vx = sub.add_parser("vmx", help="hw: the VMX controls cpuvirt simulates")
    vsub = vx.add_subparsers(dest="vmx_verb", required=True, parser_class=_Parser)
    vc = vsub.add_parser("controls", help="every control: SDM name, field and bit, default per preset, effect")
    vc.add_argument("--json", action="store_true")

    rp = sub.add_parser("report", help="one self-contained HTML page: compare summary, sites, plots (needs matplotlib)")
    rp.add_argument("guest")
    rp.add_argument("--modes", default="native,trap,full,para,hw", metavar="MODE[:NAME=VALUE],...")
    rp.add_argument("-o", "--output", required=True, metavar="FILE.html")
    rp.add_argument("--bench", type=_int, default=None, metavar="N", help="also the nanobench table, N iterations")
    rp.add_argument("--max-insns", type=_int, default=None, metavar="N")
    _costs_option(rp)

    co = sub.add_parser("costs", help="show a cost table (modelled cycles per event, with sources)")
    co.add_argument(
        "table", nargs="?", default=None, metavar="NAME|FILE", help="a preset or a TOML/JSON file (default p4-2006)"
    )
    co.add_argument("--json", action="store_true", help="the table as JSON")

    vu = sub.add_parser(
        "vhost-user-backend",
        help="a vhost-user virtio-net backend process on a Unix socket "
        "(for --device virtio-net,backend=vhost-user,socket=PATH or QEMU's -netdev vhost-user)",
    )
    vu.add_argument("--socket", required=True, metavar="PATH", help="the Unix socket to listen on")
    vu.add_argument(
        "--peer", default="loopback", choices=("loopback", "user"), help="where frames go (default loopback)"
    )
    vu.add_argument("--verbose", "-v", action="store_true", help="log every frame on stderr")
    vu.add_argument(
        "--report-fd",
        type=int,
        default=None,
        metavar="FD",
        help="measurement mode (cpuvirt "
        "starts it so with cachelines=on): after each in-band kick, the ring lines touched and the "
        "data path's counters, a JSON line on FD",
    )

    nb = sub.add_parser(
        "net-bench",
        help="per frame under each virtio-net backend and CPU mode: exits, copies, "
        "kicks, interrupts, host time, cache-line transfers (progress on stderr)",
    )
    nb.add_argument("--modes", default="native,trap,full,hw", help="comma-separated (default native,trap,full,hw)")
    nb.add_argument("--backends", default="userspace,vhost,vhost-user", help="comma-separated (default all three)")
    nb.add_argument("--frames", type=_int, default=300, metavar="N", help="frames in the burst (default 300)")
    nb.add_argument("--repeat", type=_int, default=1, metavar="R", help="host time: best of R runs (default 1)")
    nb.add_argument("--no-cachelines", action="store_true", help="skip the cache-line model's runs")
    nb.add_argument("--json", action="store_true", help="the figures as JSON on stdout")

    vs = sub.add_parser(
        "vswitch",
        help="a learning Ethernet switch process: vhost-user, Unix datagram, UDP "
        "(QEMU -netdev dgram) and user-network ports",
    )
    vs.add_argument(
        "--port",
        action="append",
        default=[],
        metavar="SPEC",
        help="vhost-user:SOCKET, unix:PATH, udp:LOCAL_PORT:REMOTE_PORT (127.0.0.1) or user (repeatable)",
    )
    vs.add_argument("--pcap", metavar="FILE", help="record every frame the switch receives")
    vs.add_argument("--verbose", "-v", action="store_true", help="log connections and frames on stderr")

    t = sub.add_parser("trace", help="read exit traces")
    tsub = t.add_subparsers(dest="trace_verb", required=True, parser_class=_Parser)
    ts = tsub.add_parser("show", help="print a trace readably")
    ts.add_argument("file")
    ts.add_argument("--kind", action="append", help="only events of this kind (repeatable)")
    ts.add_argument(
        "--image",
        metavar="FILE",
        help="the image the trace was made from, for symbols and lines "
        "(bundled guests are found by name; the sha256 must match)",
    )
    return p


def _costs_option(p) -> None:
    p.add_argument(
        "--costs",
        default=None,
        metavar="NAME|FILE",
        help="cost table for modelled cycles: a preset (p4-2006 default, nehalem, amd-2020) or a "
        "TOML/JSON file; see `cpuvirt costs`",
    )


def main(argv: list[str] | None = None) -> int:
    """The process entry (`cpuvirt`, `python -m cpuvirt`): the command's status, then no Ctrl-C can change it."""
    try:
        status = command(argv)
    except KeyboardInterrupt:  # also while the parser is built and the arguments read
        print("cpuvirt: interrupted", file=sys.stderr)
        status = 130
    if argv is None:  # a Ctrl-C after the outcome is printed would kill the interpreter by SIGINT (status -2)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    return status


def command(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except CpuvirtError as e:
        print(f"cpuvirt: {e}", file=sys.stderr)
        return BAD_INPUT
    except BrokenPipeError:
        return INTERNAL_ERROR
    except Exception as e:  # an internal error is still one line unless asked for more
        if os.environ.get("CPUVIRT_DEBUG"):
            raise
        print(
            f"cpuvirt: internal error: {type(e).__name__}: {e} (set CPUVIRT_DEBUG=1 for a traceback)", file=sys.stderr
        )
        return INTERNAL_ERROR


def _dispatch(args) -> int:
    if args.verb == "run":
        return _run(args)
    if args.verb == "vmcs":
        return _vmcs(args)
    if args.verb == "compare":
        return _compare(args)
    if args.verb == "guests":
        from cpuvirt.toolchain.build import guest_source_dir, list_guests

        print(f"# bundled guests, from {guest_source_dir()}", file=sys.stderr)
        for g in list_guests():
            pv = "  [pv build]" if g.has_pv else ""
            print(f"{g.name:<12} {g.description}{pv}")
        return 0
    if args.verb == "build":
        return _build(args)
    if args.verb == "bt":
        from cpuvirt.bt.show import show

        if args.blocks < 0 or args.max_insns < 0:
            raise CpuvirtError("--blocks and --max-insns must be >= 0")
        at = None
        if args.at is not None:
            from cpuvirt.trace.symbols import for_guest

            at = for_guest(args.guest, "full").resolve(args.at)
        from cpuvirt.runner import run_guest

        holder: list = []
        res = run_guest(
            args.guest,
            mode="full",
            mem_mib=args.mem,
            max_insns=args.max_insns,
            trace_path=args.trace,
            mode_options={"observer": holder.append, "verbose": bool(args.trace)},
        )
        text = show(args.guest, holder[0], res, at=at, blocks=args.blocks)
        sys.stdout.write(_annotate_guest_blocks(text, args.guest))
        return 0
    if args.verb == "new-guest":
        from cpuvirt.toolchain.newguest import new_guest

        for path in new_guest(args.name, args.dir, c=args.c):
            print(path)
        print(
            f"next: cd {args.dir} && make -C {args.name} && cpuvirt run {args.name}/{args.name}.elf"
            if args.c
            else f"next: cpuvirt run {os.path.join(args.dir, args.name)}.S --mode native   (or trap, full, para, hw)",
            file=sys.stderr,
        )
        return 0
    if args.verb == "lab":
        return _lab(args)
    if args.verb == "costs":
        return _costs(args)
    if args.verb == "bench":
        return _bench(args)
    if args.verb == "sweep":
        return _sweep(args)
    if args.verb == "vmx":
        return _vmx_controls(args)
    if args.verb == "report":
        return _report(args)
    if args.verb == "net-bench":
        from cpuvirt.netbench import main as net_bench

        return net_bench(args.modes, args.backends, args.frames, args.repeat, args.json, not args.no_cachelines)
    if args.verb == "vswitch":
        from cpuvirt.net.switch import main as vswitch

        return vswitch(args.port, args.pcap, args.verbose)
    if args.verb == "vhost-user-backend":
        from cpuvirt.virtio.vhost_user_backend import serve

        return serve(args.socket, args.peer, verbose=args.verbose, report_fd=args.report_fd)
    if args.verb == "trace":
        from cpuvirt.trace.show import show as show_trace

        show_trace(args.file, sys.stdout, kinds=args.kind, image=args.image)
        return 0
    raise CpuvirtError(f"unknown verb {args.verb}")


def _lab(args) -> int:
    from pathlib import Path

    from cpuvirt import labs

    if not args.name:
        for lab in labs.all_labs():
            print(f"{lab.number}  {lab.name:<8} {lab.title}")
        return 0
    lab = labs.get_lab(args.name)
    answers = {}
    for item in args.answer:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise CpuvirtError(f"--answer {item!r}: write Q=VALUE, e.g. q1=8")
        answers[key] = value
    if args.write_doc and not Path(args.write_doc).is_dir():
        raise CpuvirtError(f"--write-doc {args.write_doc}: no such folder")
    known = {q.key for q in lab.questions}
    for key in answers:  # every input error before the (possibly long) run
        if key not in known:
            raise CpuvirtError(f"lab {lab.name} has no question {key!r} (questions: {', '.join(sorted(known))})")
    echo = None if args.quiet else (lambda text: (sys.stdout.write(text), sys.stdout.flush()))
    if echo:
        echo(f"Lab {lab.number}: {lab.title}\n")
    outputs, observed = labs.run_lab(lab, echo=echo)
    if args.write_doc:
        path = Path(args.write_doc) / labs.doc_name(lab)
        path.write_text(labs.render_markdown(lab, outputs, observed))
        print(f"wrote {path}")
    wrong = 0
    for key, ok, message in labs.check_answers(lab, observed, answers):
        print(f"{key}: {message}")
        wrong += not ok
    if not answers and not args.write_doc:
        print("\nQuestions:")
        for q in lab.questions:
            print(f"  {q.key}. {' '.join(q.text.split())}")
        print(f"Check a numeric answer with: cpuvirt lab {lab.name} --answer q1=N")
    return 1 if wrong else 0


def _progress(i: int, total: int, what: str) -> None:
    """A progress bar on stderr, when it is a terminal."""
    if not sys.stderr.isatty():
        return
    width = 30
    done = width * i // max(total, 1)
    end = "\n" if i >= total else ""
    sys.stderr.write(f"\r[{'#' * done}{'.' * (width - done)}] {i}/{total} {what:<24}{end}")
    sys.stderr.flush()


def _report(args) -> int:
    from cpuvirt import costs, modespec, nanobench, report
    from cpuvirt.comparerun import run_columns
    from cpuvirt.runner import DEFAULT_MAX_INSNS
    from cpuvirt.trace import compare as C

    table = costs.load(args.costs)
    specs = modespec.parse_list(args.modes)
    report._plt()  # matplotlib missing: say so before running anything
    try:
        out = open(args.output, "w", encoding="utf-8")
    except OSError as e:
        raise CpuvirtError(f"-o {args.output}: {e.strerror}") from None
    with out:
        budget = DEFAULT_MAX_INSNS if args.max_insns is None else args.max_insns
        cols = run_columns(args.guest, specs, budget)
        sites = C.build_sites(cols)
        summary = C.summary_rows(cols, table)
        bench = None
        if args.bench:
            bench = nanobench.measure(specs, args.bench, table, progress=_progress)
        out.write(report.render(args.guest, cols, sites, summary, bench, specs))
    print(args.output)
    return 0


def _vmx_controls(args) -> int:
    import json

    from cpuvirt.modes.hw.controls import CONTROLS, PIN, PRIMARY, VmxSettings
    from cpuvirt.modes.hw.explain import EFFECT, SDM_NAMES

    ept, shadow = VmxSettings([]).bits, VmxSettings([], ept=False).bits
    field = {PIN: "pin-based", PRIMARY: "primary"}
    rows = [
        {
            "name": n,
            "sdm_name": SDM_NAMES.get(n, n),
            "field": field.get(f, "secondary"),
            "bit": b,
            "default": ept[n],
            "default_no_ept": shadow[n],
            "effect": EFFECT.get(n, ""),
        }
        for n, (f, b) in CONTROLS.items()
    ]
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print("# VM-execution controls cpuvirt simulates (SDM Vol. 3C 25.6); set with --vmx NAME=0|1.")
    print("# default: KVM's setup with EPT; no-ept: KVM's shadow-MMU setup (--no-ept)")
    print(f"{'name':<28} {'SDM name':<29} {'field':<10} {'bit':>3} {'default':>7} {'no-ept':>6}")
    for r in rows:
        print(
            f"{r['name']:<28} {r['sdm_name']:<29} {r['field']:<10} {r['bit']:>3} {r['default']:>7} "
            f"{r['default_no_ept']:>6}"
        )
        import textwrap

        print(textwrap.fill(str(r["effect"]), 100, initial_indent="    ", subsequent_indent="    "))
    return 0


def _sweep(args) -> int:
    import json

    from cpuvirt import costs, sweep
    from cpuvirt.modes import get_mode
    from cpuvirt.runner import DEFAULT_MAX_INSNS

    table = costs.load(args.costs)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for m in modes:
        get_mode(m)
    if not args.vmx:
        raise CpuvirtError("sweep needs at least one --vmx NAME=V1,V2")
    if "hw" not in modes:
        raise CpuvirtError("--vmx sweeps the hw mode, which is not among --modes")
    if args.jobs is not None and args.jobs < 1:
        raise CpuvirtError("--jobs must be >= 1")
    axes = sweep.parse_axes(args.vmx)
    budget = DEFAULT_MAX_INSNS if args.max_insns is None else args.max_insns
    rows = sweep.sweep(args.guest, axes, modes, budget, args.jobs)
    text = sweep.format_table(rows, table)
    if args.json:
        for r in rows:
            r.pop("tally", None)
        print(json.dumps({"guest": args.guest, "cost_table": table.name, "runs": rows}, indent=1))
    else:
        sys.stdout.write(text)
    return 0


def _bench(args) -> int:
    import json

    from cpuvirt import costs, modespec, nanobench

    table = costs.load(args.costs)
    specs = modespec.parse_list(args.modes or nanobench.DEFAULT_MODES)
    if not 1 <= args.n <= 10_000_000:
        raise CpuvirtError("--n must be between 1 and 10,000,000")
    result = nanobench.measure(specs, args.n, table, progress=_progress)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        sys.stdout.write(nanobench.format_tables(result, specs))
    return 0


def _costs(args) -> int:
    import json

    from cpuvirt import costs

    t = costs.load(args.table)
    if args.json:
        print(
            json.dumps(
                {
                    "name": t.name,
                    "description": t.description,
                    "costs": {k: {"cycles": e.cycles, "source": e.source} for k, e in t.entries.items()},
                },
                indent=1,
            )
        )
        return 0
    print(f"# {t.name}: {t.description}")
    print(f"# presets: {', '.join(costs.presets())}; keys: KIND, KIND:REASON, either with @MODE (most specific wins)")
    w = max(len(k) for k in t.entries)
    for k, e in t.entries.items():
        print(f"{k:<{w}} {e.cycles:>8g}  {e.source}")
    return 0


def _annotate_guest_blocks(text: str, guest: str) -> str:
    """`guest 0x0010072f..` block headers of `bt`, followed by the block's symbol and source line."""
    import re

    from cpuvirt.trace.symbols import for_guest

    syms = for_guest(guest, "full")

    def note(m):
        where = syms.describe(int(m.group(1), 16))
        return m.group(0) + (f"  [{where}]" if where else "")

    return re.sub(r"^guest (0x[0-9a-f]+)\.\.\S+.*$", note, text, flags=re.M)


def _build(args) -> int:
    from pathlib import Path

    from cpuvirt.toolchain.build import build_all, build_source, guest_source_dir

    try:
        if not args.sources:
            if args.pv:
                raise CpuvirtError("--pv applies to FILE.S; the bundled PV builds are made with the rest")
            for path in build_all(args.out or guest_source_dir() / "build"):
                print(path)
            return 0
        single = len(args.sources) == 1 and args.out is not None and not Path(args.out).is_dir()
        for source in args.sources:
            image = build_source(source, pv=args.pv)
            suffix = ".pv.bin" if args.pv else ".bin"
            if single:
                out = Path(args.out)
            else:
                folder = Path(args.out) if args.out else Path(source).parent
                out = folder / (Path(source).stem + suffix)
            out.write_bytes(image)
            print(out)
    except OSError as e:  # an unwritable --out is the user's input, not cpuvirt's bug
        raise CpuvirtError(f"{e.filename or args.out}: {e.strerror}") from None
    return 0


def _vmx_options(p) -> None:
    p.add_argument(
        "--vmx",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="hw: set a VMX control by its SDM name, e.g. hlt_exiting=0, io_bitmap=0x3f8,0x80 (repeatable)",
    )
    p.add_argument(
        "--no-ept",
        action="store_true",
        help="hw: shadow paging instead of EPT (KVM's shadow MMU: CR3, INVLPG and #PF exit)",
    )


def _reason(text: str):
    from cpuvirt.modes.hw.exits import ExitReason

    try:
        return ExitReason(int(text, 0))
    except ValueError:
        pass
    try:
        return ExitReason[text.upper()]
    except KeyError:
        raise CpuvirtError(f"unknown exit reason {text!r} (e.g. CPUID, IO_INSTRUCTION, 30)") from None


def _hw_options(args, dump_on=None) -> dict | None:
    if args.mode != "hw":
        if args.vmx or args.no_ept or getattr(args, "dump_vmcs_on", None):
            raise CpuvirtError("--vmx, --no-ept and --dump-vmcs-on apply to --mode hw")
        return None
    return {"vmx": args.vmx, "ept": not args.no_ept, "dump_on": dump_on}


def _vmcs(args) -> int:
    from cpuvirt.runner import DEFAULT_MAX_INSNS, run_guest

    args.mode = "hw"
    want = _reason(args.dump_vmcs_on) if args.dump_vmcs_on else None
    if args.at_exit is not None and args.at_exit < 1:
        raise CpuvirtError("--at-exit counts from 1")
    shown: list = []
    from cpuvirt.trace.symbols import for_guest

    syms = for_guest(args.guest, "hw")
    rip = syms.resolve(args.at_rip) if args.at_rip else None

    def dump_on(cpu, x):
        if shown:
            return
        if rip is not None:
            if x.rip != rip:
                return
        elif (want is not None and x.reason != want) or (want is None and cpu.exits != args.at_exit):
            return
        shown.append(x)
        where = syms.describe(x.rip)
        print(
            f"VM exit #{cpu.exits}: {x.reason.name} ({int(x.reason)}) at {x.rip:#x}"
            f"{' (' + where + ')' if where else ''}  {x.insn}  -> {x.action}"
        )
        print(x.vmcs_at_exit)
        cpu.finish("stopped", 0, "stopped after dumping the VMCS")

    res = run_guest(
        args.guest, "hw", args.mem, DEFAULT_MAX_INSNS, None, None, "", mode_options=_hw_options(args, dump_on)
    )
    if not shown:
        what = want.name if want is not None else (f"at {args.at_rip}" if rip is not None else f"#{args.at_exit}")
        raise CpuvirtError(
            f"the guest ended ({res.outcome}) after {sum(r[2] for r in res.exit_stats)} exits, before exit {what}"
        )
    return 0


def _compare(args) -> int:
    from cpuvirt import costs, modespec
    from cpuvirt.comparerun import run_columns
    from cpuvirt.runner import DEFAULT_MAX_INSNS
    from cpuvirt.trace import compare as C

    table = costs.load(args.costs)
    if len(args.items) >= 2:
        cols = C.trace_columns(args.items, args.image)
    else:
        specs = modespec.parse_list(args.modes)  # every input error before the first (possibly long) run
        if len(specs) < 2:
            raise CpuvirtError("--modes needs at least two modes, e.g. native,hw")
        if args.vmx and not any(s.mode == "hw" for s in specs):
            raise CpuvirtError("--vmx applies to the hw mode, which is not among --modes")
        if args.vmx:
            from cpuvirt.modes.hw.controls import VmxSettings

            VmxSettings(args.vmx)
        if args.image:
            raise CpuvirtError("--image applies to trace files (a guest's symbols come with it)")
        inputs = _scripted_input(args)
        if "input_prompt" in inputs and "input_file" not in inputs:
            raise CpuvirtError("--input-prompt needs --input FILE")
        budget = DEFAULT_MAX_INSNS if args.max_insns is None else args.max_insns
        devices = _parse_devices(args.device)
        cols = run_columns(
            args.items[0],
            specs,
            budget,
            args.mem,
            extra_vmx=args.vmx,
            cmdline=args.append,
            devices=devices,
            inputs=inputs,
        )
        for c in cols:
            if c.ran and c.result is not None:
                print(
                    f"# {c.label}: {c.result.outcome}, status {c.result.status}, {c.result.icount:,} instructions",
                    file=sys.stderr,
                )
    sites = C.build_sites(cols)
    if args.site:
        sites = _select_sites(cols, sites, args.site)
    summary = C.summary_rows(cols, table)
    if args.json:
        sys.stdout.write(C.as_json(cols, sites, summary) + "\n")
    elif args.csv:
        sys.stdout.write(C.as_csv(cols, sites))
    else:
        sys.stdout.write(C.format_text(cols, sites, summary, wide=args.wide, limit=args.limit))
    return 0


def _select_sites(cols, sites, wanted: list[str]):
    """--site: symbols (with +offset), addresses or FILE:LINE, resolved through the runs' symbols."""
    ref = next((c for c in cols if c.ran), None)
    keep: list = []
    for text in wanted:
        if ":" in text and text.rsplit(":", 1)[1].isdigit():
            match = [s for s in sites if s.key[0] == "line" and (s.where == text or s.where.endswith("/" + text))]
        else:
            addr = ref.symbols.resolve(text) if ref is not None else int(text, 0)
            targets = {addr}
            match = []
            for s in sites:
                if s.key[0] == "addr" and s.key[1] in targets:
                    match.append(s)
                elif s.key[0] == "line" and ref is not None and ref.symbols.line(addr) == s.where:
                    match.append(s)
        if not match:
            raise CpuvirtError(
                f"--site {text}: no site there (a site is where some run had an event or executed "
                "a sensitive instruction)"
            )
        keep.extend(m for m in match if m not in keep)
    return keep


def _run(args) -> int:
    from cpuvirt.runner import DEFAULT_MAX_INSNS, run_guest

    stdout = sys.stdout.buffer

    def console(byte: int) -> None:
        stdout.write(bytes((byte,)))
        if byte == 10:
            stdout.flush()

    from cpuvirt import costs

    table = costs.load(args.costs)  # a bad --costs is an input error before the run
    max_insns = DEFAULT_MAX_INSNS if args.max_insns is None else args.max_insns
    if max_insns < 0:
        raise CpuvirtError("--max-insns must be >= 0")
    dump_on = None
    if args.dump_vmcs_on:
        # An exit reason, or a guest address (symbol, symbol+offset, FILE:LINE is not taken): the first
        # exit of that reason, or at that RIP.
        from cpuvirt.trace.symbols import for_guest

        syms = for_guest(args.guest, "hw")
        try:
            want, rip = _reason(args.dump_vmcs_on), None
        except CpuvirtError:
            if args.dump_vmcs_on.split("+")[0] not in syms.by_name:
                raise
            want, rip = None, syms.resolve(args.dump_vmcs_on)
        done: list = []

        def dump_on(cpu, x):
            if not done and (x.reason == want if rip is None else x.rip == rip):
                done.append(1)
                stdout.flush()
                where = syms.describe(x.rip)
                print(
                    f"VM exit #{cpu.exits}: {x.reason.name} ({int(x.reason)}) at {x.rip:#x}"
                    f"{' (' + where + ')' if where else ''}  {x.insn}  -> {x.action}\n"
                    f"{x.vmcs_at_exit}",
                    file=sys.stderr,
                )

    if args.summary and not os.access(os.path.dirname(os.path.abspath(args.summary)), os.W_OK):
        raise CpuvirtError(f"--summary {args.summary}: its folder does not exist or is not writable")
    if args.verbose_trace and not args.trace:
        raise CpuvirtError("--verbose-trace needs --trace FILE")
    options = _hw_options(args, dump_on)
    if args.verbose_trace and args.mode == "full":
        options = {"verbose": True}
    devices = _parse_devices(args.device)
    if args.pcap and not devices:
        raise CpuvirtError("--pcap needs a --device virtio-net or e1000 to capture")
    inputs = _input_options(args)
    with _terminal_mode(inputs.get("input_terminal")):
        res = run_guest(
            args.guest,
            args.mode,
            args.mem,
            max_insns,
            args.trace,
            console,
            args.append,
            modules=args.module,
            mode_options=options,
            verbose_trace=args.verbose_trace,
            devices=devices,
            pcap_path=args.pcap,
            **inputs,
        )
    stdout.flush()
    if args.dump_vmcs_on and not done:
        print(f"cpuvirt: no {args.dump_vmcs_on} exit happened in this run: no VMCS dumped", file=sys.stderr)
    modelled = costs.model(res.tally, table, res.mode)
    if not args.quiet:
        print(format_summary(res, modelled), file=sys.stderr)
    elif res.outcome != "exit":  # -q silences the summary, never why a run stopped abnormally
        print(
            f"cpuvirt: {res.guest} under {res.mode}: {res.outcome}, status {res.status}"
            + (f" ({res.message})" if res.message else ""),
            file=sys.stderr,
        )
    if args.stats:
        print(format_stats(res, modelled), file=sys.stderr)
    if args.summary:
        write_summary_json(res, args.summary)
    return res.status


def write_summary_json(res, path: str) -> None:
    """Every figure of the summary, machine-readable: the RunResult, the console as text."""
    import dataclasses
    import json

    data = dataclasses.asdict(res)
    data["console"] = res.console.decode("utf-8", "replace")
    try:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, sort_keys=True)
            f.write("\n")
    except OSError as e:
        raise CpuvirtError(f"--summary {path}: {e.strerror}") from None


def _scripted_input(args) -> dict:
    """--input FILE and --input-prompt TEXT, as run_guest takes them (input_file, input_prompt)."""
    opts: dict = {}
    if args.input_prompt is not None:
        opts["input_prompt"] = args.input_prompt.encode("utf-8", "surrogateescape")
        if not opts["input_prompt"]:
            raise CpuvirtError("--input-prompt must not be empty")
    if args.input:
        try:  # refused here, before any run, when it cannot be read; read as the guest types
            with open(args.input, "rb"):
                pass
        except OSError as e:
            raise CpuvirtError(f"--input {args.input}: {e.strerror}") from None
        opts["input_file"] = args.input
    return opts


def _input_options(args) -> dict:
    """What COM1 receives: --input FILE, else a pipe or file on stdin (both scripted), else the
    terminal when stdin is one (interactive), else nothing."""
    import datetime
    import stat

    opts: dict = {}
    if args.rtc:
        try:
            opts["rtc_base"] = datetime.datetime.fromisoformat(args.rtc).replace(tzinfo=None)
        except ValueError:
            raise CpuvirtError(f"--rtc: not a date and time: {args.rtc!r} (e.g. 2024-09-01T08:30:00)") from None
        if not 1900 <= opts["rtc_base"].year <= 2099:
            raise CpuvirtError("--rtc: the CMOS clock holds years 1900 to 2099")
    opts.update(_scripted_input(args))
    if "input_file" in opts:
        return opts
    try:
        mode = os.fstat(0).st_mode
    except OSError:
        return opts
    if stat.S_ISFIFO(mode) or stat.S_ISREG(mode):
        opts["input_more"] = lambda: os.read(0, 4096)  # read as the guest asks: never blocks others
    elif os.isatty(0):
        opts["input_terminal"] = 0
    if "input_prompt" in opts and "input_file" not in opts and "input_more" not in opts:
        raise CpuvirtError("--input-prompt needs scripted input (--input FILE or a pipe on stdin)")
    return opts


class _terminal_mode:
    """cbreak mode on an interactive terminal for the run (the guest echoes and edits lines; Ctrl-C
    still reaches cpuvirt), the terminal's settings restored whatever happens."""

    def __init__(self, fd: int | None):
        self.fd, self.saved = fd, None

    def __enter__(self):
        if self.fd is not None:
            import termios
            import tty

            self.saved = termios.tcgetattr(self.fd)
            tty.setcbreak(self.fd)
        return self

    def __exit__(self, *exc):
        if self.saved is not None:
            import termios

            termios.tcsetattr(self.fd, termios.TCSADRAIN, self.saved)
        return False


def format_stats(res, modelled=None) -> str:
    """kvm_stat's shape (hw: one row per exit reason, busiest first), then the modelled cycles by
    event kind and reason, each with the cost charged and its source."""
    lines = []
    if res.exit_stats:
        lines.append(f"  {'exit reason':<28} {'count':>9} {'share':>7} {'mean handler':>14}")
        for name, number, count, share, mean_us in res.exit_stats:
            lines.append(f"  {name + f' ({number})':<28} {count:>9} {share:>7.1%} {mean_us:>11.1f} us")
        lines.append(f"  {'total':<28} {sum(r[2] for r in res.exit_stats):>9}")
    if modelled is None:
        from cpuvirt import costs

        modelled = costs.model(res.tally, costs.load(), res.mode)
    lines.append(format_cost_rows(modelled))
    return "\n".join(lines)


def format_cost_rows(m, source_width: int = 60) -> str:
    total = m.total or 1
    lines = [
        f"  {'event (kind:reason)':<28} {'count':>11} {'each':>7} {'modelled cycles':>16} {'share':>6}  "
        f"source ({m.table})"
    ]
    for r in m.rows:
        src = r.source if len(r.source) <= source_width else r.source[: source_width - 3] + "..."
        lines.append(
            f"  {r.key[:28]:<28} {r.count:>11,} {r.each:>7g} {r.cycles:>16,.0f} {r.cycles / total:>6.1%}  {src}"
        )
    lines.append(f"  {'total':<28} {'':>11} {'':>7} {m.total:>16,.0f}")
    if m.uncosted:
        lines.append(f"  not in the cost table (charged 0): {', '.join(m.uncosted)}")
    return "\n".join(lines)


def format_summary(res, modelled=None) -> str:
    from cpuvirt.engine.clock import TSC_HZ

    lines = [
        f"cpuvirt: {res.guest} under {res.mode}: {res.outcome}, status {res.status}"
        + (f" ({res.message})" if res.message and res.outcome != "exit" else "")
    ]
    lines += [f"  warning        {w}" for w in getattr(res, "warnings", ())]
    us = res.vtime * 1_000_000 / TSC_HZ
    # Under full the processor runs translations, whose instructions differ from the guest's (a call
    # becomes push + jmp, a callout replaces a sensitive instruction): say what the figure counts.
    what = "instructions retired (of the translated code)" if res.mode == "full" else "instructions retired"
    lines.append(f"  virtual time   {res.vtime:,} cycles ({us:,.1f} us at 1 GHz); {res.icount:,} {what}")
    ev = ", ".join(f"{k} {v}" for k, v in res.counts.items()) or "none"
    lines.append(f"  events         {ev}")
    if modelled is not None:
        from cpuvirt.costs import format_shares

        lines.append(
            f"  modelled       {modelled.total:,.0f} cycles ({modelled.table} cost table): {format_shares(modelled)}"
        )
    m = res.mmu
    lines.append(
        f"  memory         {m['fills']} TLB fills, {m['walks']} walks ({m['walk_refs']} refs), "
        f"{m['faults']} faults, {m['unbacked']} unbacked"
    )
    sh = m.get("shadow")
    if sh:
        lines.append(
            f"  shadow paging  {sh['shadow_hits']} hits, {sh['hidden_faults']} hidden faults, "
            f"{sh['true_faults']} true faults, "
            f"{sh['ptemods']} ptemods ({sh['ptemod_fallbacks']} not emulated), "
            f"{sh['cr3_switches']} CR3 switches "
            f"(roots: {sh['root_hits']} reused, {sh['root_misses']} new, {sh['root_evictions']} evicted), "
            f"{sh['traced_frames']} traced page-table frames"
        )
    bt = m.get("translation")
    if bt:
        tc = bt["tc"]
        lines.append(
            f"  translation    {tc['translations']} blocks ({tc['bytes']:,} bytes), {tc['chained']} chained "
            f"jumps, {tc['callouts']} callouts, {tc['lookups']} lookups ({tc['misses']} misses, "
            f"{tc['ic_misses']} inline-cache misses, {tc['widened']} compare trees built), "
            f"{tc['invalidations']} invalidations, "
            f"{tc['flushes']} flushes; {bt['code_page_faults']} stores into code pages, "
            f"{bt['adaptive_stores']} stores made callouts (adaptive; {tc['adaptive']} sites, "
            f"{tc['unadapted']} made native again)"
        )
    for d in res.devices:
        lines.append(
            f"  {d['name']} 00:{d['slot']:02x}.0 {d['mac']}: tx {d['tx_frames']} frames "
            f"({d['tx_dropped']} dropped), rx {d['rx_frames']} ({d['rx_dropped']} dropped), "
            f"{d['notifications']} notifications, {d['interrupts']} interrupts, "
            f"{d['needs_reset']} {d.get('reset_name', 'DEVICE_NEEDS_RESET')}"
        )
    if res.console_dropped:
        lines.append(
            f"  console        {res.console_dropped:,} bytes streamed but not kept in the run record "
            "(its first 64 KiB and last 1 MiB are)"
        )
    mips = res.icount / res.wall_s / 1e6 if res.wall_s > 0 else 0.0
    lines.append(f"  wall time      {res.wall_s:.3f} s ({mips:,.1f} MIPS)")
    if res.vga:
        lines.append("  VGA text at exit:")
        lines.extend("    | " + row for row in res.vga.splitlines())
    return "\n".join(lines)
