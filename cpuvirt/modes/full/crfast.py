"""The state a `mov` to CR0 or CR4 served in C needs (bt/_callout.c, `mov_cr`), kept where C reads it.

kvm-unit-tests' `vmexit` toggles CR0.WP and CR4.PGE some 67 million times each; a callout served in
Python costs tens of microseconds. A write that changes only WP or PGE, while nothing else has to
happen, is stored by the C callout hook: the virtual CR0 and CR4 therefore live in the C table
(`evfast.FullEvVirtualCpu`), and the conditions under which the Python path would do more than store the value
are mirrored there by the Python side (`CrState`): translations that baked the register in, shadow
paging needing an engine TLB flush, the page-table frames of the last code-mapping check; whenever
one of them may hold, C leaves the write to Python. The hypervisor's own TLB learns of the flushes
done in C from a generation count (cpu/evseg.EvHvTlb over cpu/hvtlb.HvTlb).
"""

from __future__ import annotations

# The virtual CR0 and CR4 in the table: evfast.FullEvVirtualCpu (with CR2, IOPL and GDTR in its `ev`).


class CrState:
    """The Python side's view of the C table's mov-to-CR fields."""

    def __init__(self, table):
        self.t = table

    def deps(self, dep_blocks: dict) -> None:
        """Translations that baked CR0 / CR4 in (coherence.py's index): C must not change them."""
        self.t.deps[0] = 1 if dep_blocks.get("cr0") else 0
        self.t.deps[1] = 1 if dep_blocks.get("cr4") else 0

    def arm(self, strategy) -> None:
        """After Python served a CR write: what shadow paging would need from the next one."""
        t = self.t
        if getattr(strategy, "on_dirty", 0) is None:
            strategy.on_dirty = self.shadow_dirty
        if not hasattr(strategy, "tlb_flush"):
            t.shadow_ok = 0
            return
        t.shadow_ok = 0 if strategy.unsync or strategy._engine_stale else 1
        t.wp_granted = 1 if strategy._wp_granted else 0

    def shadow_dirty(self, wp: bool) -> None:
        """Shadow paging: an engine TLB flush became necessary (wp: only when WP is set)."""
        if wp:
            self.t.wp_granted = 1
        else:
            self.t.shadow_ok = 0
