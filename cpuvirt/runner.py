"""One run of one guest under one mode: load, boot, run, summarise. Used by the CLI and the tests."""
from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from cpuvirt.errors import CpuvirtError
from cpuvirt.loader.multiboot import MULTIBOOT_BOOTLOADER_MAGIC, build_boot_info, check_fits, load_image
from cpuvirt.machine.machine import MAX_MEM_MIB, MIN_MEM_MIB, Machine
from cpuvirt.machine.vga import render_text
from cpuvirt.modes import get_mode
from cpuvirt.trace.format import TraceWriter
from cpuvirt.cpu import regs as R
from cpuvirt.cpu.mmiosite import MmioSites

BOOT_GDT_GPA = 0x500   # BIOS data area: free at Multiboot entry, below anything a loader places
DEFAULT_MAX_INSNS = 1_000_000_000
EXIT_INTERRUPTED = 130


@dataclass
class RunResult:
    guest: str
    mode: str
    outcome: str
    status: int
    message: str
    console: bytes
    icount: int
    vtime: int
    counts: dict
    mmu: dict
    wall_s: float
    vga: str = ""
    unhandled_ports: list = field(default_factory=list)
    exit_stats: list = field(default_factory=list)


def resolve_guest(guest: str, mode: str) -> tuple[str, bytes]:
    """A bundled guest's name, or a path to a Multiboot image -> (display name, image bytes)."""
    if os.sep in guest or guest.endswith((".elf", ".bin", ".img")) or os.path.exists(guest):
        try:
            with open(guest, "rb") as f:
                return os.path.basename(guest), f.read()
        except OSError as e:
            raise CpuvirtError(f"{guest}: {e.strerror}") from None
    from cpuvirt.toolchain.build import build_guest
    return guest, build_guest(guest, pv=(mode == "para"))


def load_modules(modules: Sequence[tuple[str, str | None]]) -> list[tuple[bytes, str]]:
    """Read each Multiboot module: [(contents, module string)]; a file that cannot be read is a
    CpuvirtError naming it."""
    loaded = []
    for path, args in modules:
        try:
            with open(path, "rb") as f:
                blob = f.read()
        except OSError as e:
            raise CpuvirtError(f"--module {path}: {e.strerror}") from None
        loaded.append((blob, path if args is None else f"{path} {args}"))
    return loaded


class _sigint_ends:
    """Ctrl-C (SIGINT) during the run ends it as an outcome, `interrupted` with status 130, so that
    the summary and the trace's footer are still written (the handler runs at the next hook)."""

    def __init__(self, vcpu):
        self.vcpu, self.saved = vcpu, None

    def __enter__(self):
        import signal
        import threading
        if self.vcpu is not None and threading.current_thread() is threading.main_thread():
            vcpu = self.vcpu
            self.saved = signal.signal(signal.SIGINT, lambda *_: vcpu.finish(
                "interrupted", EXIT_INTERRUPTED, "interrupted (Ctrl-C)"))
        return self

    def __exit__(self, *exc):
        if self.saved is not None:
            import signal
            signal.signal(signal.SIGINT, self.saved)
        return False


def run_guest(guest: str, mode: str = "native", mem_mib: int = 32, max_insns: int = DEFAULT_MAX_INSNS,
              trace_path: str | None = None, console=None, cmdline: str = "",
              mode_options: dict | None = None, modules: Sequence[tuple[str, str | None]] = (),
              verbose_trace: bool = False, input_data: bytes | None = None, input_prompt: bytes | None = None,
              input_terminal: int | None = None, rtc_base=None, interruptible: bool = False,
              input_more=None) -> RunResult:
    """One run. `mode_options` go to the mode (hw: vmx=[NAME=VALUE...], ept=bool, dump_on=callback).

    `modules` are Multiboot modules as (file, command line or None), loaded and described as QEMU's
    `-initrd 'file cmdline,...'` does: the module's string is the file name as given, then a space
    and its command line when it has one. The kernel's command line starts with `guest` as given
    (QEMU's is the -kernel argument), then a space and `cmdline`.

    COM1's receiver gets `input_data` (scripted, paced on the virtual clock; then what `input_more()`
    reads, when given, as a pipe is read; with `input_prompt`,
    line by line after each prompt, and the run ends with outcome `input_end` when the prompt follows
    the last line), or what is typed on the terminal whose descriptor is `input_terminal`
    (machine/serial_input.py). `rtc_base` is the date the CMOS clock starts from (machine/rtc.py).
    """
    mode_cls = get_mode(mode)
    if not MIN_MEM_MIB <= mem_mib <= MAX_MEM_MIB:
        raise CpuvirtError(f"--mem must be between {MIN_MEM_MIB} and {MAX_MEM_MIB} MiB (got {mem_mib})")
    name, data = resolve_guest(guest, mode)
    image = load_image(data, name)
    check_fits(image, mem_mib << 20)
    boot = build_boot_info(image, mem_mib << 20, cmdline, load_modules(modules), kernel_name=guest)

    out = bytearray()
    exit_value = []
    unhandled = []

    source = []

    def on_console(byte: int) -> None:
        out.append(byte)
        if console is not None:
            console(byte)
        if source:
            source[0].console_output(byte)

    try:
        trace_file = open(trace_path, "w", encoding="utf-8") if trace_path else None
    except OSError as e:
        raise CpuvirtError(f"--trace {trace_path}: {e.strerror}") from None
    try:
        trace = None
        extra = {} if rtc_base is None else {"rtc_base": rtc_base}
        machine = Machine(mem_mib, on_console=on_console, on_exit=None, on_unhandled_io=None, **extra)
        hv = mode_cls(machine, trace=None, max_insns=max_insns, **(mode_options or {}))
        if verbose_trace and hasattr(machine.mmu.strategy, "verbose"):
            machine.mmu.strategy.verbose = True        # shadow paging: hidden faults become trace events
        if trace_file:
            options = {"mem_mib": mem_mib, "max_insns": max_insns, "cmdline": cmdline}
            if modules:
                options["modules"] = [string for _, _, string in boot.modules]
            if hasattr(hv, "settings"):
                options["vmx"] = hv.settings.as_dict()
            trace = hv.vcpu.trace = TraceWriter(trace_file, name, hashlib.sha256(data).hexdigest(), mode, options)
        vcpu = hv.vcpu

        def on_exit(value: int) -> None:
            exit_value.append(value)
            vcpu.record("io", "DEBUG_EXIT", None, vcpu.io_site()[0], {"port": "0xf4", "value": value},
                        "machine powered off")
            vcpu.finish("exit", value)

        def on_unhandled(port, size, is_write, value) -> None:
            unhandled.append(port)
            eip = vcpu.io_site()[0]
            vcpu.record("unhandled_io", "OUT" if is_write else "IN", None, eip,
                        {"port": f"{port:#x}", "size": size}, "ignored (reads all-ones); reported once per port")

        machine.debug_exit.on_exit = on_exit
        machine.bus.on_unhandled = on_unhandled
        machine.mmu.on_unbacked = lambda gpa: vcpu.record(
            "unbacked_memory", "UNBACKED", None, vcpu.regs.read(R.EIP), {"gpa": f"{gpa:#x}"},
            "reads all-ones, writes dropped; reported once per page")
        mmio_sites = MmioSites(machine.mmu, machine.regs, machine.clock)

        event_counts = vcpu.counts

        def on_mmio(gpa, size, is_write, value) -> None:
            if vcpu.trace is None:
                event_counts["mmio"] += 1    # the hot path of untraced runs: no event to build
                return
            eip = mmio_sites.site(gpa, is_write)
            vcpu.record("mmio", "WRITE" if is_write else "READ", None, eip,
                        {"gpa": f"{gpa:#x}", "size": size, "value": f"{value:#x}"}, "emulated by the device model")

        machine.mmio.on_access = on_mmio

        for gpa, blob in machine.bios_tables():
            machine.write_gpa(gpa, blob)
        for gpa, blob in image.segments:
            machine.write_gpa(gpa, blob)
        for gpa, blob in boot.blobs:
            machine.write_gpa(gpa, blob)
        machine.set_flat_protected_mode(BOOT_GDT_GPA)
        machine.regs.write(R.EAX, MULTIBOOT_BOOTLOADER_MAGIC)
        machine.regs.write(R.EBX, boot.address)
        if input_data is not None or input_terminal is not None or input_more is not None:
            from cpuvirt.machine.serial_input import ScriptedInput, TerminalInput
            now = lambda: machine.clock.now       # noqa: E731
            if input_terminal is not None:
                src = TerminalInput(input_terminal, machine.uart, now)
            else:
                src = ScriptedInput(input_data or b"", machine.uart, now, prompt=input_prompt, more=input_more)
                src.on_finished = lambda: vcpu.finish(
                    "input_end", 0, "the scripted input is consumed and the guest prompted again")
            source.append(src)
            machine.attach_input(src)
        if hasattr(hv, "set_image"):
            hv.set_image(image, boot)     # para: its start pages go above the image and modules
        hv.boot()

        t0 = time.perf_counter()
        with _sigint_ends(vcpu if interruptible else None):
            outcome = hv.run(image.entry)
        wall = time.perf_counter() - t0
        counts = dict(sorted(vcpu.counts.items()))
        if trace:
            trace.footer(outcome.kind, outcome.status, machine.clock.instructions, counts)
        vga = render_text(machine.vga_text())
        stats = vcpu.summary_stats() if hasattr(vcpu, "summary_stats") else []
        mmu_stats = machine.mmu.counters.as_dict()
        shadow = getattr(machine.mmu.strategy, "counters", None)     # shadow paging's own counters
        if shadow is not None:
            mmu_stats["shadow"] = shadow.as_dict()
        tcache = getattr(hv, "translation_stats", None)       # full: the translation cache's counters
        if tcache is not None:
            mmu_stats["translation"] = tcache()
        return RunResult(name, mode, outcome.kind, outcome.status, outcome.message, bytes(out),
                         machine.clock.instructions, machine.clock.now, counts, mmu_stats, wall, vga,
                         unhandled, stats)
    finally:
        if trace_file:
            trace_file.close()
