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
# RunResult.console keeps the first CONSOLE_HEAD and the last CONSOLE_TAIL bytes the guest wrote
# (docs/security.md, "Bounds"); all of it is streamed to the `console` callback as it is written.
CONSOLE_HEAD = 64 << 10
CONSOLE_TAIL = 1 << 20


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
    console_dropped: int = 0     # bytes written between the kept head and tail (not in `console`)


class ConsoleRecord:
    """The guest's console as RunResult keeps it: head and tail, bounded whatever the guest prints."""

    __slots__ = ("buf", "dropped")

    def __init__(self):
        self.buf = bytearray()
        self.dropped = 0

    def append(self, byte: int) -> None:
        buf = self.buf
        buf.append(byte)
        if len(buf) > CONSOLE_HEAD + 2 * CONSOLE_TAIL:      # amortized: one cut per CONSOLE_TAIL bytes
            cut = len(buf) - CONSOLE_TAIL
            self.dropped += cut - CONSOLE_HEAD
            del buf[CONSOLE_HEAD:cut]

    def kept(self) -> bytes:
        buf = self.buf
        if self.dropped and len(buf) > CONSOLE_HEAD + CONSOLE_TAIL:
            self.dropped += len(buf) - CONSOLE_HEAD - CONSOLE_TAIL
            del buf[CONSOLE_HEAD:len(buf) - CONSOLE_TAIL]
        return bytes(buf)


def read_input(path: str, limit: int, what: str) -> bytes:
    """A user's input file, refused before it is read when it cannot fit in `limit` bytes (guest
    RAM): os.stat first, then at most limit + 1 bytes read (a file that grows, or a device such as
    /dev/zero, is refused the same way). Errors are CpuvirtError lines naming `what`."""
    too_big = f"{what}: larger than the guest's {limit >> 20} MiB of RAM; give more memory (--mem)"
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size > limit:
                raise CpuvirtError(too_big)
            data = f.read(limit + 1)
    except OSError as e:
        raise CpuvirtError(f"{what}: {e.strerror}") from None
    if len(data) > limit:
        raise CpuvirtError(too_big)
    return data


def resolve_guest(guest: str, mode: str, mem_bytes: int = MAX_MEM_MIB << 20) -> tuple[str, bytes]:
    """A bundled guest's name, or a path to a Multiboot image -> (display name, image bytes). An
    image file larger than guest RAM is refused without being read."""
    if os.sep in guest or guest.endswith((".elf", ".bin", ".img")) or os.path.exists(guest):
        return os.path.basename(guest), read_input(guest, mem_bytes, guest)
    from cpuvirt.toolchain.build import build_guest
    return guest, build_guest(guest, pv=(mode == "para"))


def load_modules(modules: Sequence[tuple[str, str | None]], mem_bytes: int = MAX_MEM_MIB << 20) -> list[tuple[bytes, str]]:
    """Read each Multiboot module: [(contents, module string)]; a file that cannot be read, or that
    (with the modules before it) cannot fit in guest RAM, is a CpuvirtError naming it, and a file
    too large is never read."""
    loaded = []
    room = mem_bytes
    for path, args in modules:
        blob = read_input(path, room, f"--module {path}")
        room -= len(blob)
        loaded.append((blob, path if args is None else f"{path} {args}"))
    return loaded


def run_guest(guest: str, mode: str = "native", mem_mib: int = 32, max_insns: int = DEFAULT_MAX_INSNS,
              trace_path: str | None = None, console=None, cmdline: str = "",
              mode_options: dict | None = None, modules: Sequence[tuple[str, str | None]] = (),
              verbose_trace: bool = False) -> RunResult:
    """One run. `mode_options` go to the mode (hw: vmx=[NAME=VALUE...], ept=bool, dump_on=callback).

    `modules` are Multiboot modules as (file, command line or None), loaded and described as QEMU's
    `-initrd 'file cmdline,...'` does: the module's string is the file name as given, then a space
    and its command line when it has one. The kernel's command line starts with `guest` as given
    (QEMU's is the -kernel argument), then a space and `cmdline`.
    """
    mode_cls = get_mode(mode)
    if not MIN_MEM_MIB <= mem_mib <= MAX_MEM_MIB:
        raise CpuvirtError(f"--mem must be between {MIN_MEM_MIB} and {MAX_MEM_MIB} MiB (got {mem_mib})")
    name, data = resolve_guest(guest, mode, mem_mib << 20)
    image = load_image(data, name)
    check_fits(image, mem_mib << 20)
    boot = build_boot_info(image, mem_mib << 20, cmdline, load_modules(modules, mem_mib << 20), kernel_name=guest)

    record = ConsoleRecord()
    keep = record.append
    exit_value = []
    unhandled = []

    def on_console(byte: int) -> None:
        keep(byte)
        if console is not None:
            console(byte)

    try:
        trace_file = open(trace_path, "w", encoding="utf-8") if trace_path else None
    except OSError as e:
        raise CpuvirtError(f"--trace {trace_path}: {e.strerror}") from None
    try:
        trace = None
        machine = Machine(mem_mib, on_console=on_console, on_exit=None, on_unhandled_io=None)
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

        def on_mmio(gpa, size, is_write, value) -> None:
            eip = mmio_sites.site(gpa, is_write) if vcpu.trace is not None else 0
            vcpu.record("mmio", "WRITE" if is_write else "READ", None, eip,
                        {"gpa": f"{gpa:#x}", "size": size, "value": f"{value:#x}"}, "emulated by the device model")

        machine.mmio.on_access = on_mmio

        for gpa, blob in image.segments:
            machine.write_gpa(gpa, blob)
        for gpa, blob in boot.blobs:
            machine.write_gpa(gpa, blob)
        machine.set_flat_protected_mode(BOOT_GDT_GPA)
        machine.regs.write(R.EAX, MULTIBOOT_BOOTLOADER_MAGIC)
        machine.regs.write(R.EBX, boot.address)
        if hasattr(hv, "set_image"):
            hv.set_image(image, boot)     # para: its start pages go above the image and modules
        hv.boot()

        t0 = time.perf_counter()
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
        kept = record.kept()
        return RunResult(name, mode, outcome.kind, outcome.status, outcome.message, kept,
                         machine.clock.instructions, machine.clock.now, counts, mmu_stats, wall, vga,
                         unhandled, stats, record.dropped)
    finally:
        if trace_file:
            trace_file.close()
