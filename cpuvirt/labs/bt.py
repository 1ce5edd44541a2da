"""Lab 2: binary translation (mode `full`): what is translated how, the translation cache, and
self-modifying code."""

from cpuvirt.labs import Lab, Output, Question, Step


def _bt_show(out: Output) -> dict:
    kinds = {"IDENT": 0, "inline": 0, "callout": 0, "chain": 0}
    for line in out.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0].startswith("0x") and not line.startswith(" " * 20):
            for word in parts[1:]:
                if word in kinds:
                    kinds[word] += 1
                    break
    return {f"bt_{k.lower()}": v for k, v in kinds.items()}


def _translation(name: str):
    def observe(out: Output) -> dict:
        s = out.summary(f"{name}.json")
        tc = s["mmu"]["translation"]["tc"]
        obs = {
            f"{name}_{k}": tc[k]
            for k in (
                "translations",
                "callouts",
                "chained",
                "invalidations",
                "flushes",
                "code_stores",
                "ic_misses",
                "adaptive",
            )
        }
        obs[f"{name}_pass"] = len(out.lines("PASS "))
        obs[f"{name}_fail"] = len(out.lines("FAIL "))
        obs[f"{name}_icount"] = s["icount"]
        return obs

    return observe


def _native(name: str):
    def observe(out: Output) -> dict:
        s = out.summary(f"{name}.json")
        return {f"{name}_icount": s["icount"], f"{name}_events": sum(s["counts"].values())}

    return observe


LAB = Lab(
    name="bt",
    title="Binary translation",
    goals=[
        "Read a guest block beside its translation and classify each instruction: IDENT, inline, callout, chain.",
        "Explain why a translator needs a translation cache, chaining and inline caches, and read their counters.",
        "Watch the translator stay correct when the guest rewrites its own code.",
    ],
    background="""
Before VT-x, VMware ran guest kernels with **binary translation**: the guest kernel's code never runs in
place. Just before a block of it runs for the first time (at most 12 instructions, or up to a jump), the
translator decodes it and writes a translated block into a **translation cache** (TC), then runs that.

- Most instructions are copied unchanged: **IDENT**.
- A sensitive instruction with a cheap equivalent is rewritten **inline** (e.g. `cli` at ring 1 with
  IOPL 1 clears the real IF, which is the virtual IF here; `pushf` is rewritten to show the virtual IOPL).
- An instruction that needs the hypervisor becomes a **callout** (`lgdt`, `mov cr3`, `out`...).
- A direct jump or call becomes a jump inside the TC, patched once its target is translated:
  **chaining**, so that running translated code does not enter the hypervisor between blocks.

The guest's code pages are write-traced: a store into a page that was translated invalidates the
translations made from it (self-modifying code stays correct). In cpuvirt the guest kernel runs at ring 1
and the TC sits in an execute-only window the guest cannot read or write.

![Guest code, the translator and the translation cache](../diagrams/translation-cache.svg)
""",
    steps=[
        Step(
            "cpuvirt bt hello --blocks 2",
            "Show the first two blocks `hello` executes, each guest instruction beside what the translator made of it.",
            _bt_show,
            "In these two blocks: {bt_ident} IDENT, {bt_inline} inline, {bt_callout} callout and {bt_chain} "
            "chained instructions. The first is `cli` (inline); the `call` at the end becomes a `push` of the "
            "guest return address and a jump that will be patched (chained).",
            show_lines=30,
        ),
        Step("cpuvirt run paging --summary native.json -q", "Run `paging` natively for reference.", _native("native")),
        Step(
            "cpuvirt run paging --mode full --stats --summary full.json",
            "Run it under binary translation with statistics.",
            _translation("full"),
            "{full_pass} PASS. The run made {full_translations} translations and {full_callouts} callouts; "
            "{full_chained} jumps were chained. Native retired {native_icount:,} instructions, `full` "
            "{full_icount:,} (it counts instructions of the translated code, which differ from the guest's).",
            show_lines=40,
        ),
        Step(
            "cpuvirt run smc --mode full -q --summary smc.json",
            "`smc` rewrites its own code while it runs (immediates, whole instructions, a loop that patches "
            "itself, generated code).",
            _translation("smc"),
            "{smc_pass} PASS, {smc_fail} FAIL: {smc_code_stores} stores faulted on translated code pages "
            "(store sites that kept doing so became adaptive callouts, which store without a fault: "
            "{smc_adaptive}), and {smc_invalidations} translations were invalidated and redone.",
        ),
        Step(
            "cpuvirt compare exceptions --modes native,trap,full --limit 14",
            "Compare, site by site, where trap-and-emulate trapped and where the translator made a callout "
            "in the `exceptions` guest.",
            show_lines=18,
            expect="`cli` and `sti` trap under `trap` but need no callout under `full` (inline); `lidt`, "
            "segment loads and port I/O are callouts.",
        ),
    ],
    questions=[
        Question("q1", "How many callouts did `paging` need under `full`?", lambda o: o["full_callouts"]),
        Question("q2", "How many translations were invalidated while `smc` ran?", lambda o: o["smc_invalidations"]),
        Question(
            "q3",
            "Why is `cli` inline but `lgdt` a callout? What would `popf` have to do if the translated "
            "code ran with IOPL 0?",
        ),
        Question(
            "q4",
            "Chaining avoids hypervisor entries between blocks. Which instructions cannot be chained, "
            "and what does the translator do for them "
            "(look for inline caches in docs/binary-translation.md)?",
        ),
    ],
    extend="""
Write a guest whose inner loop is pure computation (no sensitive instructions) and one whose loop does
`pushf; popf` each iteration. Run both with `--mode full --stats`: how many callouts does each make, and
how do their instruction counts compare with `native`? Explain with `cpuvirt bt mine.S --blocks 5`.
""",
)
