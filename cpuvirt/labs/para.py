"""Lab 3: paravirtualization (mode `para`): the hypercall ABI, a PV build beside the native one, and
the price: the guest must be changed."""

from collections import Counter

from cpuvirt.labs import Lab, Output, Question, Step


def _para(out: Output) -> dict:
    events = out.events("para.jsonl")
    calls = Counter(e["reason"] for e in events if e["kind"] == "hypercall")
    top = ", ".join(f"{name} {n}" for name, n in calls.most_common(4))
    return {
        "para_hypercalls": sum(calls.values()),
        "para_kinds": len(calls),
        "para_top": top,
        "para_mmu_updates": calls.get("mmu_update", 0) + calls.get("update_va_mapping", 0),
        "para_pass": len(out.lines("PASS ")),
        "para_fail": len(out.lines("FAIL ")),
    }


def _native(out: Output) -> dict:
    s = out.summary("native.json")
    return {"native_io": s["counts"].get("io", 0), "native_pass": len(out.lines("PASS "))}


def _irq_native(out: Output) -> dict:
    counts = out.summary("irq-native.json")["counts"]
    return {
        "irq_native_pass": len(out.lines("PASS ")),
        "irq_native_interrupts": counts.get("interrupt", 0),
        "irq_native_io": counts.get("io", 0),
    }


def _irq_para(out: Output) -> dict:
    events = out.events("irq-para.jsonl")
    kinds = Counter(e["kind"] for e in events)
    calls = Counter(e["reason"] for e in events if e["kind"] == "hypercall")
    blocks = sum(1 for e in events if e["reason"] == "sched_op" and e["detail"].get("cmd") == "block")
    return {
        "irq_para_pass": len(out.lines("PASS ")),
        "irq_upcalls": kinds.get("upcall", 0),
        "irq_virq": kinds.get("event_channel", 0),
        "irq_timer_ops": calls.get("set_timer_op", 0),
        "irq_evtchn_ops": calls.get("event_channel_op", 0),
        "irq_blocks": blocks,
        "irq_para_io": kinds.get("io", 0),
    }


def _unmodified(out: Output) -> dict:
    first = (out.stderr.splitlines() or [""])[0]
    why = first.split(" (", 1)[-1]
    return {"unmodified_status": out.status, "unmodified_why": why[:-1] if why.endswith(")") else why}


LAB = Lab(
    name="para",
    title="Paravirtualization",
    goals=[
        "Read a paravirtual ABI (Xen's, for 32-bit x86) and see a guest call it.",
        "Compare a paravirtualized build with the native build of the same source, operation by operation.",
        "Measure what paravirtualization saves, and see its price: an unmodified guest cannot run.",
    ],
    background="""
Xen took the other road out of the x86 holes: instead of hiding them from an unmodified guest, change the
guest. A **paravirtualized** kernel runs at ring 1 and never executes a sensitive instruction; it calls
the hypervisor instead, through **hypercalls** (like system calls, one level down: number in EAX,
arguments in EBX, ECX, EDX, ESI, EDI, result in EAX). The hypervisor fills a **hypercall page** with
one stub per call (`mov eax, NR; int 0x82; ret`) and the guest calls `hypercall_page + NR * 32`.

Interrupt masking needs no hypercall: the guest writes a flag (`evtchn_upcall_mask`) in a page it shares
with the hypervisor. Page tables are the guest's own, holding machine frame numbers, but read-only to it:
every update is a validated `mmu_update` or `update_va_mapping` (**direct paging**).

A PV guest owns no interrupt controller and no timer chip. Its interrupts are **event channels**: ports
whose pending and mask bits are bitmaps in the shared page. It binds a virtual IRQ (`VIRQ_TIMER`) to a
port, sets one-shot deadlines with `set_timer_op`, idles with `sched_op(SCHEDOP_block)`, and receives
each event as an **upcall**: the hypervisor jumps to the callback the guest registered (`set_callbacks`)
with events masked; the callback finds the port in the bitmaps and clears its pending bit, the PV EOI.

cpuvirt's bundled guests that opt in have a PV build made from the same source: every privileged
operation is a macro of `guests/include/pvops.inc` with a native body and a PV body (Linux calls the same
idea *paravirt-ops*). `cpuvirt run GUEST --mode para` runs the PV build. docs/pv-abi.md is the ABI.
""",
    steps=[
        Step(
            "cpuvirt run usermode -q --summary native.json",
            "Run `usermode` natively (a kernel that runs a ring-3 task making system calls).",
            _native,
            "{native_pass} PASS; its console alone costs {native_io} port accesses (the UART, polled).",
        ),
        Step(
            "cpuvirt run usermode --mode para -q --trace para.jsonl",
            "Run its PV build and trace it.",
            _para,
            "{para_pass} PASS with {para_hypercalls} hypercalls of {para_kinds} kinds (most frequent: "
            "{para_top}). The console is one `console_io` hypercall per line, not one port access per byte.",
        ),
        Step(
            "cpuvirt trace show para.jsonl --kind hypercall",
            "Read the hypercalls in order: set-up "
            "(`set_trap_table`, `set_gdt`, `stack_switch`), page-table updates, the console, `iret` "
            "back to ring 3.",
            show_lines=16,
        ),
        Step(
            "cpuvirt run interrupts -q --summary irq-native.json",
            "Run `interrupts` natively: it programs "
            "the 8259A interrupt controller and the 8254 timer (100 Hz), waits with `sti; hlt` for five "
            "ticks and acknowledges each with an EOI.",
            _irq_native,
            "{irq_native_pass} PASS, {irq_native_interrupts} timer interrupts through IDT vector 0x20 and "
            "{irq_native_io} port accesses (PIC, PIT and the polled UART).",
        ),
        Step(
            "cpuvirt run interrupts --mode para -q --trace irq-para.jsonl",
            "Run its PV build. Put the two "
            "consoles side by side: each line about the 8259A or the 8254 names its paravirtual counterpart "
            "(guests/interrupts.S has a table of them).",
            _irq_para,
            "{irq_para_pass} PASS: {irq_evtchn_ops} `event_channel_op` (bind VIRQ_TIMER, then unmask), "
            "{irq_timer_ops} `set_timer_op`, {irq_blocks} `sched_op(block)`, {irq_virq} VIRQ_TIMER "
            "firings and {irq_upcalls} upcalls, and {irq_para_io} port accesses.",
            show_lines=14,
        ),
        Step(
            "cpuvirt trace show irq-para.jsonl --kind upcall --kind event_channel",
            "Follow the timer: "
            "each deadline sets the port pending, then an upcall enters the callback (its EIP is where the "
            "guest was: the `ret` after `int 0x82` in the block hypercall's slot). The sixth firing comes "
            "while the port is masked (`port_masked=1`): no upcall until the guest unmasks it.",
            show_lines=16,
        ),
        Step(
            "cpuvirt build --out images",
            "Build the bundled guests' images (native and PV builds) into a folder `images`.",
            show_lines=3,
        ),
        Step(
            "cpuvirt run images/hello.bin --mode para",
            "Now give `para` an *unmodified* image: the native build of `hello`.",
            _unmodified,
            "It stops at once with status {unmodified_status}: {unmodified_why}. That is the price of "
            "paravirtualization: only a modified guest runs.",
            show_lines=3,
        ),
    ],
    questions=[
        Question("q1", "How many hypercalls does the PV `usermode` make in all?", lambda o: o["para_hypercalls"]),
        Question("q2", "With what status does `para` stop an unmodified guest?", lambda o: o["unmodified_status"]),
        Question(
            "q3",
            "Open guests/include/pvops.inc: which macro replaces `cli`, and why does it need no "
            "hypercall? What must the guest check right after unmasking?",
        ),
        Question(
            "q4",
            "Why must every page-table update be validated by the hypervisor under direct paging? "
            "What could a guest do with one writable page-table page?",
        ),
        Question("q5", "How many upcalls does the PV `interrupts` receive in all?", lambda o: o["irq_upcalls"]),
        Question(
            "q6",
            "In the PV `interrupts`, what replaces the EOI, and what would happen if its handler "
            "left it out (docs/pv-abi.md 5.2)? Why is `sched_op(SCHEDOP_block)` not two "
            "operations, as `sti; hlt` is?",
        ),
    ],
    extend="""
Write a small PV guest: opt in with `#if PV` / `#define PARAVIRT 1` before including `kernel.inc` (see
guests/README.md, "Paravirtualized builds"), then print a line with the `console_io` hypercall through the
hypercall page. Run it with `cpuvirt run mine.S --mode para --trace t.jsonl` and find your call in the trace.
""",
)
