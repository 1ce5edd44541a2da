"""The `cpuvirt` command (DESIGN.md section 6).

Exit status: the guest's debug-exit value; 123 hypervisor stopped the guest (hw); 124 instruction budget exhausted; 125 triple fault; 126
halted forever; 2 usage or input error (one line, no traceback); 1 internal error.
"""
from __future__ import annotations

import argparse
import os
import sys

from cpuvirt import __version__
from cpuvirt.errors import CpuvirtError


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


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, status 2
        self.exit(2, f"cpuvirt: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="cpuvirt", description="Run x86 guests under every classic CPU-virtualization technique.")
    p.add_argument("--version", action="version", version=f"cpuvirt {__version__}")
    sub = p.add_subparsers(dest="verb", required=True, parser_class=_Parser)

    r = sub.add_parser("run", help="run a guest (bundled name or Multiboot image path)")
    r.add_argument("guest")
    r.add_argument("--mode", default="native", help="native (default), trap (ring-1 trap-and-emulate), para (a PV build: Xen-style hypercalls), full (binary translation) or hw")
    r.add_argument("--mem", type=_int, default=32, metavar="MiB", help="guest RAM in MiB (default 32)")
    r.add_argument("--trace", metavar="FILE", help="write an exit trace (JSON Lines, cpuvirt-trace/1)")
    r.add_argument("--max-insns", type=_int, default=None, metavar="N",
                   help="budget in virtual cycles: one per instruction, plus 1000 per port access and idle time in hlt (default 1e9; 0 = unlimited); outcome 'budget', status 124")
    r.add_argument("--append", default="", metavar="CMDLINE", help="kernel command line")
    r.add_argument("--module", action="append", default=[], type=_module, metavar="FILE[,CMDLINE]",
                   help="a Multiboot module with its command line (repeatable; as QEMU's -initrd 'FILE CMDLINE')")
    r.add_argument("--quiet", "-q", action="store_true", help="no summary on stderr")
    r.add_argument("--stats", action="store_true", help="per-exit-reason table, like kvm_stat (hw), or events by kind")
    r.add_argument("--verbose-trace", action="store_true",
                   help="with --trace: also record each translated block (full) and each hidden shadow-paging "
                        "fault (trap, full, hw --no-ept); large traces")
    r.add_argument("--input", metavar="FILE",
                   help="type FILE into COM1, one byte at a time on the virtual clock (reproducible); "
                        "without it, a pipe on stdin is typed the same way, and a terminal is interactive")
    r.add_argument("--input-prompt", metavar="TEXT",
                   help="with scripted input: send each line only once the console ends with TEXT (e.g. '$ '), "
                        "and end the run (status 0) when TEXT follows the last line")
    r.add_argument("--rtc", metavar="DATE",
                   help="the CMOS clock's start, YYYY-MM-DDTHH:MM:SS (default 2000-01-01T00:00:00; it then "
                        "advances with virtual time)")
    _vmx_options(r)
    r.add_argument("--dump-vmcs-on", metavar="REASON", help="hw: dump the VMCS to stderr at the first exit of REASON")

    v = sub.add_parser("vmcs", help="hw mode: run a guest until a chosen VM exit and print the VMCS")
    v.add_argument("guest")
    at = v.add_mutually_exclusive_group(required=True)
    at.add_argument("--at-exit", type=_int, metavar="N", help="the Nth VM exit (1 = the first)")
    at.add_argument("--dump-vmcs-on", metavar="REASON", help="the first exit of this reason (name or number)")
    v.add_argument("--mem", type=_int, default=32, metavar="MiB")
    _vmx_options(v)

    sub.add_parser("guests", help="list the bundled guests")
    b = sub.add_parser("build", help="assemble the bundled guests into Multiboot images")
    b.add_argument("--out", default=None, help="output directory (default guests/build)")

    c = sub.add_parser("compare", help="align traces (or runs of one guest) site by site: what each technique did")
    c.add_argument("items", nargs="+", metavar="TRACE|GUEST",
                   help="two or more trace files, or one guest to run under --modes")
    c.add_argument("--modes", default="native,hw", help="with a guest: the modes to run (default native,hw)")
    c.add_argument("--limit", type=_int, default=None, metavar="N", help="show at most N sites")
    c.add_argument("--vmx", action="append", default=[], metavar="NAME=VALUE", help="with a guest: hw controls")

    bt = sub.add_parser("bt", help="full mode: show guest blocks beside their binary translation")
    bt.add_argument("guest")
    bt.add_argument("--at", type=_int, default=None, metavar="ADDR", help="the block starting at this guest EIP")
    bt.add_argument("--blocks", type=_int, default=3, metavar="N", help="without --at: the first N blocks translated")
    bt.add_argument("--mem", type=_int, default=32, metavar="MiB")
    bt.add_argument("--max-insns", type=_int, default=50_000_000, metavar="N", help="budget of the run first made")
    bt.add_argument("--trace", metavar="FILE", help="also write the run's trace, with a `translate` event per block")

    t = sub.add_parser("trace", help="read exit traces")
    tsub = t.add_subparsers(dest="trace_verb", required=True, parser_class=_Parser)
    ts = tsub.add_parser("show", help="print a trace readably")
    ts.add_argument("file")
    ts.add_argument("--kind", action="append", help="only events of this kind (repeatable)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except CpuvirtError as e:
        print(f"cpuvirt: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cpuvirt: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 1
    except Exception as e:  # an internal error is still one line unless asked for more
        if os.environ.get("CPUVIRT_DEBUG"):
            raise
        print(f"cpuvirt: internal error: {type(e).__name__}: {e} (set CPUVIRT_DEBUG=1 for a traceback)",
              file=sys.stderr)
        return 1


def _dispatch(args) -> int:
    if args.verb == "run":
        return _run(args)
    if args.verb == "vmcs":
        return _vmcs(args)
    if args.verb == "compare":
        return _compare(args)
    if args.verb == "guests":
        from cpuvirt.toolchain.build import list_guests
        for g in list_guests():
            pv = "  [pv build]" if g.has_pv else ""
            print(f"{g.name:<12} {g.description}{pv}")
        return 0
    if args.verb == "build":
        from cpuvirt.toolchain.build import build_all
        from cpuvirt.toolchain.build import guest_source_dir
        for path in build_all(args.out or guest_source_dir() / "build"):
            print(path)
        return 0
    if args.verb == "bt":
        from cpuvirt.bt.show import show
        if args.blocks < 0 or args.max_insns < 0:
            raise CpuvirtError("--blocks and --max-insns must be >= 0")
        text, _ = show(args.guest, at=args.at, blocks=args.blocks, max_insns=args.max_insns, mem_mib=args.mem,
                       trace_path=args.trace)
        sys.stdout.write(text)
        return 0
    if args.verb == "trace":
        from cpuvirt.trace.show import show
        show(args.file, sys.stdout, kinds=args.kind)
        return 0
    raise CpuvirtError(f"unknown verb {args.verb}")


def _vmx_options(p) -> None:
    p.add_argument("--vmx", action="append", default=[], metavar="NAME=VALUE",
                   help="hw: set a VMX control by its SDM name, e.g. hlt_exiting=0, io_bitmap=0x3f8,0x80 (repeatable)")
    p.add_argument("--no-ept", action="store_true", help="hw: shadow paging instead of EPT (KVM's shadow MMU: CR3, INVLPG and #PF exit)")


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
    shown = []

    def dump_on(cpu, x):
        if shown or (want is not None and x.reason != want) or (want is None and cpu.exits != args.at_exit):
            return
        shown.append(x)
        print(f"VM exit #{cpu.exits}: {x.reason.name} ({int(x.reason)}) at {x.rip:#x}  {x.insn}  -> {x.action}")
        print(x.vmcs_at_exit)
        cpu.finish("stopped", 0, "stopped after dumping the VMCS")

    res = run_guest(args.guest, "hw", args.mem, DEFAULT_MAX_INSNS, None, None, "", mode_options=_hw_options(args, dump_on))
    if not shown:
        what = want.name if want is not None else f"#{args.at_exit}"
        raise CpuvirtError(f"the guest ended ({res.outcome}) after {sum(r[2] for r in res.exit_stats)} exits, "
                           f"before exit {what}")
    return 0


def _compare(args) -> int:
    from cpuvirt.trace.compare import compare_files
    if len(args.items) >= 2:
        compare_files(args.items, sys.stdout, args.limit)
        return 0
    import tempfile
    from cpuvirt.runner import DEFAULT_MAX_INSNS, run_guest
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if len(modes) < 2:
        raise CpuvirtError("--modes needs at least two modes, e.g. native,hw")
    from cpuvirt.modes import get_mode
    from cpuvirt.runner import resolve_guest
    for mode in modes:            # every input error before the first (possibly long) run
        get_mode(mode)
    if "para" in modes:
        resolve_guest(args.items[0], "para")
    if args.vmx and "hw" not in modes:
        raise CpuvirtError("--vmx applies to the hw mode, which is not among --modes")
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for mode in modes:
            path = f"{tmp}/{mode}.jsonl"
            opts = {"vmx": args.vmx} if mode == "hw" else None
            res = run_guest(args.items[0], mode, 32, DEFAULT_MAX_INSNS, path, None, "", mode_options=opts)
            print(f"# {mode}: {res.outcome}, status {res.status}, {res.icount:,} instructions", file=sys.stderr)
            paths.append(path)
        compare_files(paths, sys.stdout, args.limit)
    return 0


def _run(args) -> int:
    from cpuvirt.runner import DEFAULT_MAX_INSNS, run_guest

    stdout = sys.stdout.buffer

    def console(byte: int) -> None:
        stdout.write(bytes((byte,)))
        if byte == 10:
            stdout.flush()

    max_insns = DEFAULT_MAX_INSNS if args.max_insns is None else args.max_insns
    if max_insns < 0:
        raise CpuvirtError("--max-insns must be >= 0")
    dump_on = None
    if args.dump_vmcs_on:
        want = _reason(args.dump_vmcs_on)
        done = []

        def dump_on(cpu, x):
            if not done and x.reason == want:
                done.append(1)
                stdout.flush()
                print(f"VM exit #{cpu.exits}: {x.reason.name} ({int(x.reason)}) at {x.rip:#x}  {x.insn}  -> {x.action}\n"
                      f"{x.vmcs_at_exit}", file=sys.stderr)
    if args.verbose_trace and not args.trace:
        raise CpuvirtError("--verbose-trace needs --trace FILE")
    options = _hw_options(args, dump_on)
    if args.verbose_trace and args.mode == "full":
        options = {"verbose": True}
    inputs = _input_options(args)
    with _terminal_mode(inputs.get("input_terminal")):
        res = run_guest(args.guest, args.mode, args.mem, max_insns, args.trace, console, args.append,
                        modules=args.module, mode_options=options, verbose_trace=args.verbose_trace,
                        interruptible=True, **inputs)
    stdout.flush()
    if args.dump_vmcs_on and not done:
        print(f"cpuvirt: no {args.dump_vmcs_on} exit happened in this run: no VMCS dumped", file=sys.stderr)
    if not args.quiet:
        print(format_summary(res), file=sys.stderr)
    if args.stats:
        print(format_stats(res), file=sys.stderr)
    return res.status


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
    if args.input_prompt is not None:
        opts["input_prompt"] = args.input_prompt.encode("utf-8", "surrogateescape")
        if not opts["input_prompt"]:
            raise CpuvirtError("--input-prompt must not be empty")
    if args.input:
        try:
            with open(args.input, "rb") as f:
                opts["input_data"] = f.read()
        except OSError as e:
            raise CpuvirtError(f"--input {args.input}: {e.strerror}") from None
        return opts
    try:
        mode = os.fstat(0).st_mode
    except OSError:
        return opts
    if stat.S_ISFIFO(mode) or stat.S_ISREG(mode):
        opts["input_more"] = lambda: os.read(0, 4096)     # read as the guest asks: never blocks others
    elif os.isatty(0):
        opts["input_terminal"] = 0
    if "input_prompt" in opts and "input_data" not in opts and "input_more" not in opts:
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


def format_stats(res) -> str:
    """kvm_stat's shape: one row per exit reason, busiest first."""
    if res.exit_stats:
        lines = [f"  {'exit reason':<28} {'count':>9} {'share':>7} {'mean handler':>14}"]
        for name, number, count, share, mean_us in res.exit_stats:
            lines.append(f"  {name + f' ({number})':<28} {count:>9} {share:>7.1%} {mean_us:>11.1f} us")
        lines.append(f"  {'total':<28} {sum(r[2] for r in res.exit_stats):>9}")
        return "\n".join(lines)
    total = sum(res.counts.values()) or 1
    lines = [f"  {'event kind':<28} {'count':>9} {'share':>7}"]
    for kind, n in sorted(res.counts.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {kind:<28} {n:>9} {n / total:>7.1%}")
    return "\n".join(lines)


def format_summary(res) -> str:
    from cpuvirt.machine.clock import TSC_HZ
    lines = [f"cpuvirt: {res.guest} under {res.mode}: {res.outcome}, status {res.status}"
             + (f" ({res.message})" if res.message and res.outcome != "exit" else "")]
    us = res.vtime * 1_000_000 / TSC_HZ
    lines.append(f"  virtual time   {res.vtime:,} cycles ({us:,.1f} us at 1 GHz); {res.icount:,} instructions retired")
    ev = ", ".join(f"{k} {v}" for k, v in res.counts.items()) or "none"
    lines.append(f"  events         {ev}")
    m = res.mmu
    lines.append(f"  memory         {m['fills']} TLB fills, {m['walks']} walks ({m['walk_refs']} refs), "
                 f"{m['faults']} faults, {m['unbacked']} unbacked")
    sh = m.get("shadow")
    if sh:
        lines.append(f"  shadow paging  {sh['hidden_faults']} hidden faults, {sh['true_faults']} true faults, "
                     f"{sh['ptemods']} ptemods ({sh['ptemod_fallbacks']} not emulated), {sh['cr3_switches']} CR3 switches "
                     f"(roots: {sh['root_hits']} reused, {sh['root_misses']} new, {sh['root_evictions']} evicted), "
                     f"{sh['traced_frames']} traced page-table frames")
    bt = m.get("translation")
    if bt:
        tc = bt["tc"]
        lines.append(f"  translation    {tc['translations']} blocks ({tc['bytes']:,} bytes), {tc['chained']} chained "
                     f"jumps, {tc['callouts']} callouts, {tc['lookups']} lookups ({tc['misses']} misses, "
                     f"{tc['ic_misses']} inline-cache misses), {tc['invalidations']} invalidations, "
                     f"{tc['flushes']} flushes; {bt['code_page_faults']} stores into code pages, "
                     f"{bt['adaptive_stores']} stores made callouts (adaptive)")
    mips = res.icount / res.wall_s / 1e6 if res.wall_s > 0 else 0.0
    lines.append(f"  wall time      {res.wall_s:.3f} s ({mips:,.1f} MIPS)")
    if res.vga:
        lines.append("  VGA text at exit:")
        lines.extend("    | " + row for row in res.vga.splitlines())
    return "\n".join(lines)
