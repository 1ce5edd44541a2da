"""Lab 1: why x86 was not classically virtualizable, and how each technique closes the holes."""

from cpuvirt.labs import Lab, Output, Question, Step


def _checks(prefix: str, out: Output) -> dict:
    passed, failed = out.lines("PASS "), out.lines("FAIL ")
    return {
        f"{prefix}_pass": len(passed),
        f"{prefix}_fail": len(failed),
        f"{prefix}_failed": "; ".join(line[5:].split(":")[0] for line in failed) or "none",
    }


def _trap_run(out: Output) -> dict:
    obs = _checks("trap", out)
    events = out.events("trap.jsonl")
    trapped = sorted({e["reason"] for e in events if e["kind"] == "trap" and e["reason"] not in ("in", "out")})
    obs["trap_events"] = sum(1 for e in events if e["kind"] == "trap")
    obs["trapped_kinds"] = ", ".join(trapped)
    obs["trapped_kind_count"] = len(trapped)
    return obs


def _mode(mode: str, kind: str):
    def observe(out: Output) -> dict:
        obs = _checks(mode, out)
        s = out.summary(f"{mode}.json")
        obs[f"{mode}_{kind}"] = s["counts"].get(kind, 0)
        obs[f"{mode}_status"] = s["status"]
        return obs

    return observe


LAB = Lab(
    name="holes",
    title="Why x86 is not classically virtualizable",
    goals=[
        "State Popek and Goldberg's condition for trap-and-emulate, and find the x86 instructions that break it.",
        "Run one guest under naive trap-and-emulate and read, from its own checks and from the trace, what went wrong.",
        "See how binary translation, paravirtualization and VT-x each close the same holes, "
        "and what each costs in events.",
    ],
    background="""
A virtual machine monitor (VMM) must give the guest an *equivalent* machine, keep *control* of the real
resources, and be *efficient*: most instructions run directly on the processor. Popek and Goldberg (1974)
showed that a VMM with all three properties can be built by **trap-and-emulate** (run the guest kernel
deprivileged; every privileged instruction faults into the VMM, which emulates it) if every
*sensitive* instruction (one that reads or changes the machine's privileged state) is *privileged*
(faults when run outside ring 0).

32-bit x86 before VT-x fails that condition. Some sensitive instructions do not fault at ring 1 or 3;
they quietly do something different: `popf` ignores a change of the interrupt flag, `pushf` shows the
real one, `sgdt`, `sidt`, `sldt`, `str` and `smsw` reveal the real (VMM's) descriptor tables and CR0,
and `mov ax, cs` or `push cs` reveal the real privilege level in the selector's low bits.

cpuvirt's `trap` mode is that naive VMM: the guest kernel runs at ring 1 in place, and only what faults
is emulated. The bundled guest `holes` checks each of these instructions from (what it believes is)
ring 0 and prints PASS or FAIL for each.

![Which ring runs what in each mode](../diagrams/privilege-layouts.svg)

![The life of mov cr3, eax in each mode](../diagrams/sensitive-instruction.svg)
""",
    steps=[
        Step(
            "cpuvirt run holes --summary native.json",
            "Run `holes` on the bare machine (`native`, the reference: no VMM at all).",
            lambda out: _checks("native", out),
            "All {native_pass} checks PASS: this is what a correct VMM must reproduce.",
        ),
        Step(
            "cpuvirt run holes --mode trap --trace trap.jsonl -q",
            "Run it under naive trap-and-emulate, writing an exit trace.",
            _trap_run,
            "{trap_fail} of {native_pass} checks FAIL ({trap_failed}); the guest exits with status 1. The "
            "guest kernel runs at ring 1, so each hole shows the real state instead of the virtual one.",
        ),
        Step(
            "cpuvirt trace show trap.jsonl --kind trap",
            "List what the VMM did see: every event of kind `trap` (a privileged instruction that faulted "
            "and was emulated).",
            expect="{trap_events} traps, of {trapped_kind_count} kinds besides port I/O: {trapped_kinds}. None "
            "of them is at a failing check's instruction: the holes never reached the VMM.",
            show_lines=14,
        ),
        Step(
            "cpuvirt compare holes --modes native,trap,full,hw --limit 30",
            "Line up what each technique did: a summary per run (checks passed, console against native's, "
            "instructions, modelled cycles), then every sensitive instruction the guest executed.",
            expect="Under `trap` the console differs from native's; each privileged instruction (`cli`, "
            "`lgdt`, `lidt`, `ltr`) is a trap.",
            show_lines=36,
        ),
        Step(
            "cpuvirt compare holes --modes native,trap,full,hw --site main+0x9 --site main+0x7a",
            "Look at two holes by their place in the source (`popfd` and `sidt` in `main`; `--site` takes a "
            "symbol, an address or file:line).",
            expect="Under `trap` both ran natively and were WRONG: nothing reached the VMM. `full` translated "
            "them inline; under `hw` they ran in guest mode with no exit (the `sidt` row names the control, "
            "`descriptor_table_exiting`, that would make it exit).",
            show_lines=44,
        ),
        Step(
            "cpuvirt run holes --mode full -q --summary full.json",
            "Binary translation: the guest kernel's code is never run in place; each block is translated "
            "first, and sensitive instructions (holes included) are rewritten.",
            _mode("full", "callout"),
            "{full_pass} PASS, {full_fail} FAIL, with {full_callout} callouts: the translator saw every hole.",
        ),
        Step(
            "cpuvirt run holes --mode para -q --summary para.json",
            "Paravirtualization: the guest's *source* was changed (a PV build) so that it asks the "
            "hypervisor instead of executing the sensitive instructions.",
            _mode("para", "hypercall"),
            "{para_pass} PASS with {para_hypercall} hypercalls. The PV build checks the paravirtual state "
            "(see guests/README.md): the guest knows it is virtualized.",
        ),
        Step(
            "cpuvirt run holes --mode hw -q --summary hw.json",
            "Hardware assistance: VT-x runs the guest kernel at ring 0 in VMX non-root operation, so the "
            "holes show the guest's own state and nothing needs to trap.",
            _mode("hw", "vmexit"),
            "{hw_pass} PASS; the {hw_vmexit} VM exits are the guest's port I/O (its console), not the holes.",
        ),
    ],
    questions=[
        Question("q1", "How many of the guest's checks FAIL under `trap`?", lambda o: o["trap_fail"]),
        Question(
            "q2",
            "One check passes under `trap`. Which, and why does this VMM get away with it? Would "
            "a VMM with its own GDT (as VMware's had) pass it? (Hint: docs/deprivileging.md.)",
        ),
        Question(
            "q3",
            "How many distinct privileged instructions (not counting `in`/`out`) trapped under `trap`?",
            lambda o: o["trapped_kind_count"],
        ),
        Question("q4", "How many callouts did `full` make for the whole run?", lambda o: o["full_callout"]),
        Question(
            "q5",
            "Which technique needed a modified guest, and what did it gain in events compared to "
            "`full` and `hw`? Count: how many hypercalls?",
            lambda o: o["para_hypercall"],
        ),
    ],
    extend="""
Write a guest that tests one more sensitive-but-unprivileged instruction: `lar` (load access rights) on
the code selector reveals the descriptor's DPL. Start from guests/README.md ("Writing your own guest"):

```asm
# description: lar reveals the code segment's DPL
#include "kernel.inc"
main:
    mov eax, 0x08
    lar ebx, eax
    and ebx, 0x6000          # DPL bits of the access rights
    CHECK_EQ("lar shows DPL 0", ebx, 0)
    ret
```

Run it with `cpuvirt run lar.S --mode M` for every mode. Which modes pass, and why?
""",
    notes=["The whole lab runs in a few seconds; `cpuvirt lab holes` shows every output."],
)
