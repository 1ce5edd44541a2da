"""Lab 4: hardware-assisted virtualization (mode `hw`, simulated VT-x): the VMCS, exit reasons, and what
the controls change."""

from cpuvirt.labs import Lab, Output, Question, Step


def _exits(name: str):
    def observe(out: Output) -> dict:
        s = out.summary(f"{name}.json")
        by_reason = {row[0]: row[2] for row in s["exit_stats"]}
        obs = {
            f"{name}_exits": sum(by_reason.values()),
            f"{name}_pass": len(out.lines("PASS ")),
            f"{name}_fail": len(out.lines("FAIL ")),
        }
        for reason in (
            "IO_INSTRUCTION",
            "CR_ACCESS",
            "HLT",
            "EXTERNAL_INTERRUPT",
            "EXCEPTION_NMI",
            "INVLPG",
            "EPT_VIOLATION",
            "CPUID",
        ):
            obs[f"{name}_{reason.lower()}"] = by_reason.get(reason, 0)
        return obs

    return observe


def _vmcs(out: Output) -> dict:
    first = (out.stdout.splitlines() or [""])[0]
    return {"vmcs_first_line": first.strip()}


LAB = Lab(
    name="vtx",
    title="VT-x: the VMCS, exit reasons and controls",
    goals=[
        "Read a VM exit: its basic exit reason, its exit qualification, and the VMCS state it leaves.",
        "Change VMCS execution controls and predict, then measure, which exits appear or disappear.",
        "See what EPT saves by turning it off (shadow paging under VT-x).",
    ],
    background="""
Intel VT-x (2005) made x86 classically virtualizable by adding a mode instead of changing instructions.
The hypervisor runs in *VMX root operation*; the guest runs in *VMX non-root operation*, at ring 0 of its
own. A **VMCS** (virtual-machine control structure) holds the guest's state, the host's state, and the
**execution controls**: for each sensitive operation, whether it causes a **VM exit** to the hypervisor.
A VM exit saves the guest's state in the VMCS with a **basic exit reason** (`CPUID` 10, `HLT` 12,
`CR_ACCESS` 28, `IO_INSTRUCTION` 30, `EPT_VIOLATION` 48...) and an **exit qualification** that says
more (which control register, which port); the hypervisor handles it and resumes the guest with a **VM
entry**. Some exits are unconditional (`CPUID`); most are what the controls ask for (`hlt_exiting`,
`cr3_load_exiting`, `unconditional_io_exiting` or I/O bitmaps...). **EPT** adds a second level of
address translation in hardware, so guest page-table updates need no exit at all.

cpuvirt's `hw` mode simulates this with the SDM's names and numbers; its default controls are KVM's.
`--vmx NAME=VALUE` changes a control, `--no-ept` turns EPT off (KVM's shadow MMU then needs CR3, INVLPG
and #PF exits). docs/hw.md lists what is simulated.
""",
    steps=[
        Step(
            "cpuvirt run paging --mode hw -q --stats --summary base.json",
            "Run `paging` under `hw` with KVM's default controls, with a kvm_stat-style table of exits.",
            _exits("base"),
            "{base_exits} exits: {base_io_instruction} IO_INSTRUCTION (the console) and {base_cr_access} "
            "CR_ACCESS; no exit for its `mov cr3` or `invlpg`: with EPT the guest owns its page tables.",
            show_lines=8,
        ),
        Step(
            "cpuvirt vmcs paging --dump-vmcs-on CR_ACCESS",
            "Stop at the first CR_ACCESS exit and print the VMCS: the exit reason, the decoded "
            "qualification (which CR, which register), the guest state and the controls.",
            _vmcs,
            show_lines=40,
        ),
        Step(
            "cpuvirt run paging --mode hw -q --stats --vmx cr3_load_exiting=1 --summary cr3.json",
            "Turn on CR3-load exiting (as hypervisors without EPT must).",
            _exits("cr3"),
            "CR_ACCESS exits go from {base_cr_access} to {cr3_cr_access}: every `mov cr3` of the guest now exits.",
            show_lines=8,
        ),
        Step(
            "cpuvirt run interrupts --mode hw -q --stats --summary irq.json",
            "`interrupts` programs the PIT and waits with `sti; hlt` for five timer ticks.",
            _exits("irq"),
            "{irq_hlt} HLT exits and {irq_external_interrupt} EXTERNAL_INTERRUPT exits (one per tick), "
            "besides its port I/O.",
            show_lines=8,
        ),
        Step(
            "cpuvirt run interrupts --mode hw -q --stats --vmx hlt_exiting=0 --summary nohlt.json",
            "Turn HLT exiting off: the guest's `hlt` now idles the (virtual) processor without leaving it.",
            _exits("nohlt"),
            "HLT exits: {nohlt_hlt}; the guest still PASSes ({nohlt_pass} checks).",
            show_lines=8,
        ),
        Step(
            "cpuvirt run paging --mode hw --no-ept -q --stats --summary noept.json",
            "Turn EPT off: the hypervisor must keep shadow page tables, so it asks for CR3, INVLPG and page "
            "fault exits.",
            _exits("noept"),
            "{noept_exits} exits instead of {base_exits}: {noept_exception_nmi} EXCEPTION_NMI (page faults, "
            "mostly hidden from the guest), {noept_cr_access} CR_ACCESS, {noept_invlpg} INVLPG.",
            show_lines=9,
        ),
    ],
    questions=[
        Question("q1", "How many VM exits did `paging` cause with the default controls?", lambda o: o["base_exits"]),
        Question("q2", "How many CR_ACCESS exits with cr3_load_exiting=1?", lambda o: o["cr3_cr_access"]),
        Question("q3", "How many EXCEPTION_NMI exits without EPT?", lambda o: o["noept_exception_nmi"]),
        Question(
            "q4",
            "Almost all exits here are IO_INSTRUCTION from the polled console. Which control would "
            "let the console's ports through without exits, and why might a hypervisor refuse to "
            "(hint: `--vmx io_bitmap=...` in docs/hw.md)?",
        ),
        Question(
            "q5",
            "Adams and Agesen (2006) found that first-generation VT-x often lost to binary "
            "translation. From the exit counts here, which workloads would you expect to suffer "
            "most from a costly VM exit?",
        ),
    ],
    extend="""
Write a guest that executes `cpuid` in a loop 100 times, and run it with `--mode hw --stats`. CPUID exits
unconditionally: check that the count is exactly what you expect. Then run the same guest under `trap`
and `full`: does `cpuid` trap there? Why not? (Look at what the guest sees in the CPUID results under
each mode.)
""",
)
