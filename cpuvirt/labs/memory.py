"""Lab 5: memory virtualization: GVA -> GPA -> HPA, shadow paging against EPT's two-dimensional walk,
and direct paging."""

from cpuvirt.labs import Lab, Output, Question, Step


def _mmu(name: str):
    def observe(out: Output) -> dict:
        s = out.summary(f"{name}.json")
        m = s["mmu"]
        obs = {
            f"{name}_fills": m["fills"],
            f"{name}_walks": m["walks"],
            f"{name}_refs": m["walk_refs"],
            f"{name}_faults": m["faults"],
            f"{name}_pass": len(out.lines("PASS ")),
            f"{name}_refs_per_walk": round(m["walk_refs"] / m["walks"], 1) if m["walks"] else 0.0,
            f"{name}_hypercalls": s["counts"].get("hypercall", 0),
        }
        shadow = m.get("shadow")
        if shadow:
            for key in ("shadow_hits", "hidden_faults", "true_faults", "ptemods", "traced_frames", "cr3_switches"):
                obs[f"{name}_{key}"] = shadow[key]
        return obs

    return observe


LAB = Lab(
    name="memory",
    title="Memory virtualization: shadow paging, EPT and direct paging",
    goals=[
        "Follow one guest memory access through GVA -> GPA -> HPA in each technique.",
        "Tell hidden from true page faults under shadow paging, and see why page-table writes (ptemods) are costly.",
        "Count the memory references of EPT's two-dimensional walk against a one-dimensional one.",
    ],
    background="""
A guest kernel believes it owns physical memory: its page tables map guest-virtual addresses (GVA) to
guest-physical ones (GPA). The hypervisor must add a second map, GPA to host-physical (HPA), and the
processor can walk only one set of tables at a time. Three answers:

- **Shadow paging** (`trap`, `full`, `hw --no-ept`): the hypervisor builds its own tables, GVA -> HPA,
  from the guest's and its own map, and points the processor at them. An access the shadow does not map
  yet faults into the hypervisor: if the guest's tables map it, the fault is **hidden** (the shadow is
  filled, the guest never knows); if not, it is **true** and goes to the guest. The guest's page-table
  pages are write-protected (**traced**) so each store to them (a **ptemod**) comes to the hypervisor,
  which emulates it and keeps the shadow coherent.
- **Nested paging / EPT** (`hw`): the processor walks both: each reference the guest's walk makes is a
  guest-physical address that EPT translates in turn. A 2-level 32-bit guest walk over 4-level EPT makes
  up to 3 x 5 - 1 = 14 references per TLB miss (24 for 4-level tables on both sides), but no exits.
- **Direct paging** (`para`): the guest's tables hold host frame numbers and are read-only to the guest;
  every update is a hypercall the hypervisor validates.

![EPT's two-dimensional walk](../diagrams/two-dimensional-walk.svg)

The `paging` guest builds page tables, switches address spaces, takes demand faults and changes PTEs.
The summary's `memory` line counts **TLB fills** (pages the processor had to translate), **walks** and
their memory **refs**.
""",
    steps=[
        Step(
            "cpuvirt run paging -q --summary native.json",
            "The bare machine: one guest walk per TLB miss.",
            _mmu("native"),
            "{native_fills} TLB fills, {native_walks} walks, {native_refs} references ({native_refs_per_walk} "
            "per walk: the page directory and table entries, and the A/D bits written back); "
            "{native_faults} page faults, all the guest's own.",
        ),
        Step(
            "cpuvirt run paging --mode hw -q --summary ept.json",
            "EPT: the same walks, each reference translated by EPT.",
            _mmu("ept"),
            "{ept_walks} walks but {ept_refs} references ({ept_refs_per_walk} per walk against "
            "{native_refs_per_walk} natively): the two-dimensional walk, plus the EPT translations of pages "
            "touched while paging was still off. No exit was needed for any of it.",
        ),
        Step(
            "cpuvirt run paging --mode trap -q --summary shadow.json",
            "Shadow paging under trap-and-emulate.",
            _mmu("shadow"),
            "{shadow_shadow_hits} TLB refills hit the shadow (no walk), {shadow_hidden_faults} hidden faults "
            "filled it, {shadow_true_faults} true faults reached "
            "the guest, {shadow_ptemods} ptemods were emulated on {shadow_traced_frames} traced page-table "
            "frames, over {shadow_cr3_switches} CR3 switches.",
        ),
        Step(
            "cpuvirt run paging --mode hw --no-ept -q --summary noept.json",
            "VT-x without EPT: the same shadow paging, now driven by VM exits.",
            _mmu("noept"),
            "{noept_hidden_faults} hidden and {noept_true_faults} true faults, {noept_ptemods} ptemods.",
        ),
        Step(
            "cpuvirt run paging --mode para -q --summary direct.json",
            "Direct paging: the PV build updates its tables by hypercall.",
            _mmu("direct"),
            "{direct_hypercalls} hypercalls, no hidden faults: the guest's tables are the real ones.",
        ),
    ],
    questions=[
        Question(
            "q1",
            "How many memory references per walk does EPT make here (one decimal)?",
            lambda o: o["ept_refs_per_walk"],
            tolerance=0.02,
        ),
        Question(
            "q2", "How many hidden faults did shadow paging take under `trap`?", lambda o: o["shadow_hidden_faults"]
        ),
        Question(
            "q3",
            "How many true faults reached the guest under `trap`? Compare with the guest's own "
            "count of its page faults.",
            lambda o: o["shadow_true_faults"],
        ),
        Question(
            "q4",
            "The formula (n+1)(m+1)-1 gives 14 references for one walk of 2-level guest tables over "
            "4-level EPT, yet cpuvirt measures more per walk. What else does a walk do that touches "
            "guest memory, and what does each such access cost under EPT? (Hint: the A and D bits; "
            "and why can a walk also cost less: 4 MiB pages, non-present entries.)",
        ),
        Question(
            "q5",
            "Which technique would you choose for a guest that rewrites page tables constantly (a "
            "fork-heavy workload), and which for one that touches much memory with stable tables?",
        ),
    ],
    extend="""
Write a guest that maps one page and then rewrites its PTE 1,000 times in a loop (each time followed by
`invlpg`). Run it under `native`, `trap`, `hw` and `hw --no-ept` with `--stats`: how many ptemods, VM
exits and hidden faults does each technique take per rewrite? Start from guests/paging.S for the page
table set-up.
""",
)
