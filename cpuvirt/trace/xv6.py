"""xv6's events in its own terms: system calls by name, its interrupt vectors, page faults, context switches.

A trace knows an event as `int 0x40` with EAX 0x10, or `IRQ vector 0x20`, or a `mov cr3` trap at
0x801067e5; a student of xv6 knows them as `write`, the timer tick and `switchuvm` switching to a
process's page table. This module is the dictionary between the two, for an xv6 kernel ELF
(x86 xv6-public, `kernel` or `kernelmemfs`), recognised by its symbols.

What comes from the ELF: the system-call names, from xv6's own dispatch table `syscalls[]` (syscall.c:
`[SYS_write] sys_write`, one function pointer per number, read from the image and named through its
symbol table), and the function each event is in. What xv6 defines only as C macros, and so is
written here (xv6-public traps.h): T_SYSCALL 64, T_IRQ0 32 and the IRQ numbers of its devices.
"""

from __future__ import annotations

import re

T_SYSCALL = 64
T_IRQ0 = 32
IRQS = {0: "timer", 1: "keyboard", 4: "COM1", 14: "IDE disk", 19: "LAPIC error", 31: "spurious"}  # traps.h IRQ_*
# The symbols that tell an xv6 kernel apart (trapasm.S, swtch.S, vm.c, syscall.c).
SIGNATURE = ("alltraps", "trapret", "swtch", "switchuvm", "switchkvm", "syscalls")

# What xv6 does where a technique meets it: (function, mnemonic) -> meaning.
WHERE = {
    ("switchuvm", "mov cr3"): "context switch: switchuvm loads the process's page table (lcr3)",
    ("switchuvm", "ltr"): "context switch: switchuvm loads the process's TSS (ltr)",
    ("switchkvm", "mov cr3"): "back to the scheduler: switchkvm loads the kernel's page table (lcr3)",
    ("pushcli", "cli"): "pushcli: interrupts off while a spinlock is held",
    ("popcli", "sti"): "popcli: interrupts back on",
    ("scheduler", "sti"): "scheduler: interrupts on between processes",
    ("trapret", "iretd"): "trapret: return from a trap or system call",
    ("trapret", "pop"): "trapret: restore the trap frame's segment registers",
    ("alltraps", "mov"): "alltraps: load the kernel's data segments",
    ("lapicid", "mmio"): "mycpu() reads the local APIC ID (lapicid)",
    ("lapiceoi", "mmio"): "lapiceoi: end of interrupt",
    ("lapicw", "mmio"): "lapicw: a local APIC register write",
    ("seginit", "lgdt"): "seginit loads the GDT",
    ("idtinit", "lidt"): "idtinit loads the IDT",
    ("kvmalloc", "mov cr3"): "kvmalloc: the kernel's own page table (lcr3)",
}
# Port I/O by the PC device xv6 drives there: (port, direction) -> meaning; None: either direction.
PORTS = {
    (0x3F8, "out"): "uartputc: a byte to COM1",
    (0x3F8, "in"): "uartgetc: a byte from COM1",
    (0x3FD, "in"): "COM1 line status: room to send, a byte waiting?",
    (0x3FA, "in"): "COM1 interrupt identification",
    (0x3D4, None): "cgaputc: the VGA cursor position",
    (0x3D5, None): "cgaputc: the VGA cursor position",
    (0x20, None): "picinit: the 8259 PIC (masked)",
    (0x21, None): "picinit: the 8259 PIC (masked)",
    (0xA0, None): "picinit: the 8259 PIC (masked)",
    (0xA1, None): "picinit: the 8259 PIC (masked)",
    (0x64, "in"): "kbdgetc: i8042 status (is a key waiting?)",
    (0x60, "in"): "kbdgetc: a scan code",
    (0x70, None): "cmostime: the CMOS clock",
    (0x71, None): "cmostime: the CMOS clock",
}


class Xv6:
    """The meaning of a trace event (a dict as `read_trace` gives) in an xv6 kernel."""

    name = "xv6"

    def __init__(self, syscalls: dict[int, str]):
        self.syscalls = syscalls  # number -> name ("write"), from the image's syscalls[]

    def syscall(self, number: int) -> str:
        name = self.syscalls.get(number)
        return f"{name} ({number})" if name else f"{number} (no such call: xv6 prints 'unknown sys call')"

    def meaning(self, e: dict, symbols) -> str | None:
        kind, code, detail = e["kind"], e.get("code"), e.get("detail") or {}
        vector = detail.get("vector", code)
        if kind == "interrupt" and vector == T_SYSCALL and detail.get("software"):
            number = self.syscall(int(detail["eax"], 16)) if "eax" in detail else "(number not recorded)"
            return "system call " + number
        if kind == "interrupt" and isinstance(code, int) and e["reason"].startswith("IRQ") and code - T_IRQ0 in IRQS:
            return f"{IRQS[code - T_IRQ0]} interrupt (IRQ {code - T_IRQ0}, vector {code})"
        if kind == "vmexit" and e["reason"] == "EXTERNAL_INTERRUPT":
            return "a device interrupt arrives while the guest runs: the host takes it, then injects it"
        if kind == "vmexit" and e["reason"] == "INTERRUPT_WINDOW":
            irq = (_vector_of(e) or 0) - T_IRQ0
            what = f"the {IRQS[irq]} interrupt (IRQ {irq})" if irq in IRQS else "a device interrupt"
            return f"{what} is injected: the guest's interrupts are on again"
        if kind in ("io", "trap") and "port" in detail or kind == "vmexit" and e["reason"] == "IO_INSTRUCTION":
            port = int(str(detail.get("port", "-1")), 0)
            direction = str(detail.get("direction") or e["reason"] or "").lower()
            if direction not in ("in", "out"):
                direction = (e.get("insn") or "").split(None, 1)[0][:3].rstrip("s")
            said = PORTS.get((port, direction)) or PORTS.get((port, None))
            if said:
                return said
        if (
            (kind == "page_fault" and e["reason"] == "#PF")
            or (kind == "exception" and code == 14)
            or (kind == "vmexit" and detail.get("vector") == 14)
        ):
            where = "user code" if e.get("cpl") == 3 else "the kernel"
            cr2 = detail.get("cr2") or detail.get("exit_qualification") or detail.get("gva")
            return f"page fault in {where}" + (f" at {cr2}" if cr2 else "")
        if kind == "page_fault" and e["reason"] == "ptemod":
            fn = _function(symbols, e["eip"])
            return f"{fn or 'the kernel'} writes into a page-table page (shadow paging follows it)"
        fn = _function(symbols, e["eip"])
        if fn is None:
            return None
        insn = e.get("insn", "")
        mnem = insn.split(None, 1)[0] if insn else ""
        if mnem == "mov" and "cr3" in insn:
            mnem = "mov cr3"
        if kind == "mmio" or (kind == "vmexit" and e["reason"] == "EPT_VIOLATION"):
            mnem = "mmio"
        return WHERE.get((fn, mnem))


def _function(symbols, eip: str) -> str | None:
    name = symbols.name(int(eip, 16))
    return name.split("+", 1)[0] if name else None


def detect(elf, syms: dict[str, int], sizes: dict[str, int]) -> Xv6 | None:
    """An Xv6 profile when the ELF is an xv6 kernel: its system-call table read from the image."""
    if not all(s in syms for s in SIGNATURE):
        return None
    addr, size = syms["syscalls"], sizes.get("syscalls", 0)
    table = _read(elf, addr, size)
    if table is None or size % 4:
        return None
    by_addr: dict[int, str] = {}
    for name, a in syms.items():
        if name.startswith("sys_"):
            by_addr.setdefault(a, name[4:])
    calls = {}
    for n in range(size // 4):
        target = int.from_bytes(table[4 * n : 4 * n + 4], "little")
        if target and target in by_addr:
            calls[n] = by_addr[target]
    return Xv6(calls) if calls else None


def _read(elf, addr: int, size: int) -> bytes | None:
    """`size` bytes at virtual address `addr` of a loaded segment's file image."""
    for seg in elf.iter_segments():
        if seg["p_type"] != "PT_LOAD":
            continue
        start = seg["p_vaddr"]
        if start <= addr and addr + size <= start + seg["p_filesz"]:
            return seg.data()[addr - start : addr - start + size]
    return None


def _vector_of(e: dict) -> int | None:
    """The interrupt vector an event delivers: an IRQ event's code, or the vector hw names in its action."""
    if e["kind"] == "interrupt" and e["reason"].startswith("IRQ") and isinstance(e.get("code"), int):
        return e["code"]
    if e["kind"] == "vmexit" and e["reason"] in ("INTERRUPT_WINDOW", "EXTERNAL_INTERRUPT"):
        m = re.search(r"vector (0x[0-9a-f]+|\d+)", e.get("action", ""))
        return int(m.group(1), 0) if m else None
    return None


def site(kernel: Xv6, e: dict) -> tuple[tuple, str, str, str] | None:
    """Events that belong to a row of their own rather than to the address they happened at:
    (key, where, symbol, instruction). A system call is a row per call (its `int 0x40` is in
    whichever user program made it); a device interrupt is a row per IRQ (it lands wherever the CPU
    was); a page fault in user code is one row."""
    detail = e.get("detail") or {}
    if e["kind"] == "interrupt" and detail.get("vector") == T_SYSCALL and detail.get("software") and "eax" in detail:
        n = int(detail["eax"], 16)
        name = kernel.syscalls.get(n)
        return (("os", 0, n), f"system call {n}", f"sys_{name}" if name else "(none)", "int 0x40")
    vector = _vector_of(e)
    if vector is not None:
        irq = vector - T_IRQ0
        return (
            ("os", 1, vector),
            f"IRQ {irq}" if 0 <= irq < 32 else f"vector {vector}",
            IRQS.get(irq, "device"),
            f"(interrupt, vector {vector})",
        )
    if e["kind"] == "vmexit" and e["reason"] == "EXTERNAL_INTERRUPT":
        return (("os", 2, 0), "interrupts", "any device", "(a device interrupt arrives)")
    if e.get("cpl") == 3 and (
        (e["kind"] == "page_fault" and e["reason"] == "#PF") or (e["kind"] == "exception" and e.get("code") == 14)
    ):
        return (("os", 3, 0), "user page fault", "trap", "(any user instruction)")
    return None
