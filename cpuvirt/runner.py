"""One run of one guest under one mode: load, boot, run, summarise. Used by the CLI and the tests."""

from __future__ import annotations

import contextlib
import functools
import gc
import hashlib
import os
import select
import signal
import threading
import time
from collections.abc import Sequence

from cpuvirt import status
from cpuvirt.cpu.mmiosite import MmioSites
from cpuvirt.engine import regs as R
from cpuvirt.errors import CpuvirtError
from cpuvirt.loader.multiboot import (
    MULTIBOOT_BOOTLOADER_MAGIC,
    build_boot_info,
    check_fits,
    load_image,
    overwritten_boot_info,
)
from cpuvirt.machine.machine import MAX_MEM_MIB, MIN_MEM_MIB, Machine
from cpuvirt.machine.testdev import TestdevSpec, attach_testdev
from cpuvirt.machine.vga import render_text
from cpuvirt.modes import get_mode
from cpuvirt.modes.base import Mode
from cpuvirt.result import RunResult
from cpuvirt.trace.format import TraceWriter

BOOT_GDT_GPA = 0x500  # BIOS data area: free at Multiboot entry, below anything a loader places
DEFAULT_MAX_INSNS = 1_000_000_000
_PCI_ACTIONS = {
    "CONFIG_READ": "configuration space read",
    "CONFIG_WRITE": "configuration space written",
    "BAR_MAPPED": "the BAR decodes here: the device's registers moved",
    "BAR_CONFLICT": "not decoded",
}
# RunResult.console keeps the first CONSOLE_HEAD and the last CONSOLE_TAIL bytes the guest wrote
# (docs/security.md, "Bounds"); all of it is streamed to the `console` callback as it is written.
CONSOLE_HEAD = 64 << 10
CONSOLE_TAIL = 1 << 20
INPUT_CHUNK = 4096  # --input FILE is read this much at a time, as the guest takes it


def _device_summary(transport) -> dict:
    """What a device did in the run (the CLI prints it in the summary)."""
    dev = transport.device
    return {
        "name": dev.name,
        "slot": transport.slot,
        "mac": ":".join(f"{b:02x}" for b in dev.mac),
        "reset_name": getattr(dev, "reset_name", "DEVICE_NEEDS_RESET"),
        **transport.counters,
        **dev.counters,
    }


class SigintStop:
    """Ctrl-C ends the run as an outcome ("interrupted", status 130) with the trace footer written.

    Python runs a signal handler only between bytecodes of the main thread, which may be inside an
    engine hook (where a KeyboardInterrupt would unwind through C) or never, while guest code runs
    without Python. So the handler does nothing, and a thread woken through the signal wakeup fd
    stops the engine: uc_emu_stop is meant to be called from another thread, and the engine
    releases the GIL while it runs. A Ctrl-C before the vCPU exists stops it as soon as it does.
    The thread asks again every few milliseconds until the run is over: translated blocks count the
    virtual clock down in the engine's exit-request word (engine/_vclock.c, "Counting in the block"),
    and a request that lands inside one block's read-modify-write of it is written over.
    """

    AGAIN_S = 0.005

    def __init__(self):
        self.vcpu = None
        self.pending = False

    def attach(self, vcpu) -> None:
        self.vcpu = vcpu
        if self.pending:
            self._stop()

    def _stop(self) -> None:
        self.vcpu.finish("interrupted", status.INTERRUPTED, "interrupted (Ctrl-C)")

    def _watch(self, r: int) -> None:
        stopping = False
        while True:
            if stopping and not select.select([r], [], [], self.AGAIN_S)[0]:
                self.vcpu.uc.emu_stop()  # (the run is not over yet: ask again)
                continue
            data = os.read(r, 64)
            if not data or b"\xff" in data:  # closed, or told to go (perhaps behind a late SIGINT): the run is over
                return
            if signal.SIGINT in data:
                if self.vcpu is None:
                    self.pending = True
                else:
                    self._stop()
                    stopping = True

    @contextlib.contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        r, w = os.pipe()
        os.set_blocking(w, False)
        old_handler = signal.signal(signal.SIGINT, lambda *_: None)
        old_fd = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        watcher = threading.Thread(target=self._watch, args=(r,), name="cpuvirt-sigint", daemon=True)
        watcher.start()
        try:
            yield self
        finally:
            signal.set_wakeup_fd(old_fd)
            signal.signal(signal.SIGINT, old_handler)
            os.write(w, b"\xff")
            watcher.join()
            os.close(r)
            os.close(w)


class ConsoleRecord:
    """The guest's console as RunResult keeps it: head and tail, bounded whatever the guest prints."""

    __slots__ = ("buf", "dropped")

    def __init__(self):
        self.buf = bytearray()
        self.dropped = 0

    def append(self, byte: int) -> None:
        buf = self.buf
        buf.append(byte)
        if len(buf) > CONSOLE_HEAD + 2 * CONSOLE_TAIL:  # amortized: one cut per CONSOLE_TAIL bytes
            cut = len(buf) - CONSOLE_TAIL
            self.dropped += cut - CONSOLE_HEAD
            del buf[CONSOLE_HEAD:cut]

    def kept(self) -> bytes:
        buf = self.buf
        if self.dropped and len(buf) > CONSOLE_HEAD + CONSOLE_TAIL:
            self.dropped += len(buf) - CONSOLE_HEAD - CONSOLE_TAIL
            del buf[CONSOLE_HEAD : len(buf) - CONSOLE_TAIL]
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
    if guest.endswith(".S"):
        from cpuvirt.toolchain.build import build_source

        return os.path.basename(guest), build_source(guest, pv=(mode == "para"))
    if os.sep in guest or guest.endswith((".elf", ".bin", ".img")) or os.path.exists(guest):
        return os.path.basename(guest), read_input(guest, mem_bytes, guest)
    from cpuvirt.toolchain.build import build_guest

    return guest, build_guest(guest, pv=(mode == "para"))


def load_modules(
    modules: Sequence[tuple[str, str | None]], mem_bytes: int = MAX_MEM_MIB << 20
) -> list[tuple[bytes, str]]:
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


def run_guest(
    guest: str,
    mode: str = "native",
    mem_mib: int = 32,
    max_insns: int = DEFAULT_MAX_INSNS,
    trace_path: str | None = None,
    console=None,
    cmdline: str = "",
    mode_options: dict | None = None,
    modules: Sequence[tuple[str, str | None]] = (),
    verbose_trace: bool = False,
    devices: Sequence = (),
    pcap_path: str | None = None,
    on_start=None,
    input_data: bytes | None = None,
    input_prompt: bytes | None = None,
    input_terminal: int | None = None,
    rtc_base=None,
    input_more=None,
    input_file: str | None = None,
) -> RunResult:
    """One run. `mode_options` go to the mode (hw: vmx=[NAME=VALUE...], ept=bool, dump_on=callback).

    `devices` are PCI devices (virtio/setup.py DeviceSpec) in slot order; `pcap_path` captures their frames.
    `on_start(hv)` is called once the mode is built (bench takes cost tallies during the run).
    `modules` are Multiboot modules as (file, command line or None), loaded and described as QEMU's
    `-initrd 'file cmdline,...'` does: the module's string is the file name as given, then a space
    and its command line when it has one. The kernel's command line starts with `guest` as given
    (QEMU's is the -kernel argument), then a space and `cmdline`.

    COM1's receiver gets `input_data` (scripted, paced on the virtual clock; then what `input_more()`
    reads, when given, as a pipe is read; `input_file` is read the same way, a chunk at a time as the
    guest takes its bytes, so a file of any size costs no more host memory than a chunk; with `input_prompt`,
    line by line after each prompt, and the run ends with outcome `input_end` when the prompt follows
    the last line), or what is typed on the terminal whose descriptor is `input_terminal`
    (machine/serial_input.py). `rtc_base` is the date the CMOS clock starts from (machine/rtc.py).
    """
    # Collect what earlier runs in this process left (their engines, hooks and callbacks) now, not at
    # an allocation-dependent moment inside this run. (The one case where a run's outcome did depend
    # on what ran before was the assembler: see toolchain/assemble.py, new_keystone.)
    gc.collect()
    mode_cls = get_mode(mode)
    if mode == "para" and any(getattr(d, "backend", "") == "vhost-user" for d in devices):
        # The backend process writes guest RAM behind the hypervisor: it cannot honour direct
        # paging's typed frames (a receive buffer over a page table would be written unvalidated).
        raise CpuvirtError(
            "--device ...,backend=vhost-user is refused in para mode: the backend process would "
            "write guest frames direct paging has typed (page tables) without validation"
        )
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

    source: list = []

    def on_console(byte: int) -> None:
        keep(byte)
        if console is not None:
            console(byte)
        if source:
            source[0].console_output(byte)

    stack = contextlib.ExitStack()
    sigint = stack.enter_context(SigintStop().installed())  # from here on Ctrl-C is an outcome
    try:
        trace_file = open(trace_path, "w", encoding="utf-8") if trace_path else None
    except OSError as e:
        stack.close()
        raise CpuvirtError(f"--trace {trace_path}: {e.strerror}") from None
    if input_file is not None:
        try:
            script = stack.enter_context(open(input_file, "rb"))
        except OSError as e:
            stack.close()
            if trace_file:
                trace_file.close()
            raise CpuvirtError(f"--input {input_file}: {e.strerror}") from None
        input_more = functools.partial(script.read, INPUT_CHUNK)
    pcap = None
    transports = []
    try:
        trace = None
        extra = {} if rtc_base is None else {"rtc_base": rtc_base}
        machine = Machine(
            mem_mib,
            on_console=on_console,
            on_exit=None,
            on_unhandled_io=None,
            shared_ram=any(getattr(d, "backend", "") == "vhost-user" for d in devices),
            **extra,
        )
        hv: Mode = mode_cls(machine, trace=None, max_insns=max_insns, **(mode_options or {}))
        if verbose_trace and hv.shadow is not None:
            hv.shadow.verbose = True  # shadow paging: hidden faults become trace events
        if trace_file:
            options = {"mem_mib": mem_mib, "max_insns": max_insns, "cmdline": cmdline}
            if modules:
                options["modules"] = [string for _, _, string in boot.modules]
            if hv.settings is not None:
                options["vmx"] = hv.settings.as_dict()
            if devices:
                options["devices"] = [spec.as_dict() for spec in devices]
            trace = hv.vcpu.trace = TraceWriter(trace_file, name, hashlib.sha256(data).hexdigest(), mode, options)
        vcpu = hv.vcpu

        def on_exit(value: int) -> None:
            exit_value.append(value)
            vcpu.record(
                "io", "DEBUG_EXIT", None, vcpu.io_site()[0], {"port": "0xf4", "value": value}, "machine powered off"
            )
            vcpu.finish("exit", value)

        def on_unhandled(port, size, is_write, value) -> None:
            unhandled.append(port)
            eip = vcpu.io_site()[0]
            vcpu.record(
                "unhandled_io",
                "OUT" if is_write else "IN",
                None,
                eip,
                {"port": f"{port:#x}", "size": size},
                "ignored (reads all-ones); reported once per port",
            )

        machine.debug_exit.on_exit = on_exit
        machine.on_reset = lambda why: vcpu.finish(
            "reset", status.TRIPLE_FAULT, f"the guest reset the machine ({why}); QEMU with -no-reboot powers off here"
        )
        machine.bus.on_unhandled = on_unhandled
        machine.mmu.on_unbacked = lambda gpa: vcpu.record(
            "unbacked_memory",
            "UNBACKED",
            None,
            vcpu.regs.read(R.EIP),
            {"gpa": f"{gpa:#x}"},
            "reads all-ones, writes dropped; reported once per page",
        )
        mmio_sites = MmioSites(machine.mmu, machine.regs, machine.clock)

        event_counts = vcpu.counts

        def on_mmio(gpa, size, is_write, value) -> None:
            if vcpu.trace is None:
                event_counts["mmio"] += 1  # the hot path of untraced runs: no event to build
                return
            eip = mmio_sites.site(gpa, is_write)
            vcpu.record(
                "mmio",
                "WRITE" if is_write else "READ",
                None,
                eip,
                {"gpa": f"{gpa:#x}", "size": size, "value": f"{value:#x}"},
                "emulated by the device model",
            )

        machine.mmio.on_access = on_mmio
        if machine.apic_mmio is not None:
            machine.apic_mmio.count_into(vcpu, traced=vcpu.trace is not None)

        def device_site() -> int:
            return vcpu.io_site()[0] if vcpu.trace is not None else 0

        def device_event_site(mmio, timer: bool) -> int:
            """Where a device event happened: the register access it serves (MMIO, or the port I/O
            instruction), or, for work the device does on its own timer, where the guest was."""
            if vcpu.trace is None:
                return 0
            if mmio is not None:
                gpa, is_write = mmio
                return mmio_sites.site(gpa, is_write, advance=False)
            return vcpu.regs.read(R.EIP) if timer else device_site()

        attach_testdev(machine, devices)  # --device pc-testdev: a machine device, not PCI
        pci_devices = [d for d in devices if d.kind != TestdevSpec.kind]
        if pci_devices or pcap_path:  # the virtio package only when asked for (start-up time)
            from cpuvirt.virtio.setup import attach_devices

            transports, pcap = attach_devices(
                machine,
                pci_devices,
                lambda reason, detail, action, kind="virtio", mmio=None, timer=False: vcpu.record(
                    kind, reason, None, device_event_site(mmio, timer), detail, action
                ),
                pcap_path,
            )
        machine.pci.firmware_setup()  # as SeaBIOS leaves the bus, before the guest runs
        machine.pci.on_event = lambda reason, detail: vcpu.record(
            "pci", reason, None, device_site(), detail, _PCI_ACTIONS.get(reason, "done")
        )

        for gpa, blob in machine.bios_tables():
            machine.write_gpa(gpa, blob)
        for gpa, blob in boot.blobs:  # then the kernel over them, as QEMU's option ROM does
            machine.write_gpa(gpa, blob)
        for gpa, blob in image.segments:
            machine.write_gpa(gpa, blob)
        for gpa, n in overwritten_boot_info(image, boot.blobs):
            machine.write_gpa(gpa, bytes(n))
        machine.set_flat_protected_mode(BOOT_GDT_GPA)
        machine.regs.write(R.EAX, MULTIBOOT_BOOTLOADER_MAGIC)
        machine.regs.write(R.EBX, boot.address)
        if input_data is not None or input_terminal is not None or input_more is not None:
            from cpuvirt.machine.serial_input import ScriptedInput, TerminalInput

            now = lambda: machine.clock.now  # noqa: E731
            src: TerminalInput | ScriptedInput
            if input_terminal is not None:
                src = TerminalInput(input_terminal, machine.uart, now)
            else:
                src = ScriptedInput(
                    input_data or b"",
                    machine.uart,
                    now,
                    prompt=input_prompt,
                    more=input_more,
                    more_blocks=input_file is None,
                )
                src.on_finished = lambda: vcpu.finish(
                    "input_end", 0, "the scripted input is consumed and the guest prompted again"
                )
            source.append(src)
            machine.attach_input(src)
        hv.set_image(image, boot)  # para: its start pages go above the image and modules
        hv.boot()
        if on_start is not None:
            on_start(hv)

        sigint.attach(vcpu)  # not before: a mode's boot may run the engine itself (para)
        t0 = time.perf_counter()
        outcome = hv.run(image.entry)
        wall = time.perf_counter() - t0
        sync = getattr(vcpu, "sync_counts", None)  # full: callouts the C hook answered
        if sync is not None:
            sync()
        counts = dict(sorted(vcpu.counts.items()))
        if trace:
            trace.footer(outcome.kind, outcome.status, machine.clock.instructions, counts)
        vga = render_text(machine.vga_text())
        stats = hv.summary_stats()
        mmu_stats = machine.mmu.counters.as_dict()
        if hv.shadow is not None:
            mmu_stats["shadow"] = hv.shadow.counters.as_dict()  # shadow paging's own counters
        translation = hv.translation_stats()  # full: the translation cache's counters
        if translation is not None:
            mmu_stats["translation"] = translation
        from cpuvirt.costs import tally_of

        kept = record.kept()
        return RunResult(
            name,
            mode,
            outcome.kind,
            outcome.status,
            outcome.message,
            kept,
            machine.clock.instructions,
            machine.clock.now,
            counts,
            mmu_stats,
            wall,
            vga,
            unhandled,
            stats,
            [_device_summary(t) for t in transports],
            dict(tally_of(vcpu, machine.mmu)),
            record.dropped,
            list(image.warnings),
        )
    finally:
        for t in transports:
            close = getattr(t.device, "close", None)
            if close is not None:  # a vhost-user backend process is stopped with the run
                close()
        stack.close()
        if trace_file:
            trace_file.close()
        if pcap is not None:
            pcap.close()
