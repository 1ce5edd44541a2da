"""The C TLB-fill hooks that deliver the common true #PF under shadow paging (cpu/_truefault.h: trap's
modes/_trapfast.c true_fault, full's bt/_callout.c full_pf_hook): what they share on the Python side."""

from __future__ import annotations

import ctypes

from unicorn import UC_HOOK_TLB_FILL

from cpuvirt.engine.cext import add_c_hook, first_fill_hook


class TfCounts(ctypes.Structure):
    """Mirror of cpu/_truefault.h tf_counts_t: what the true faults delivered in C count."""

    _fields_ = [
        ("fills", ctypes.c_uint64),
        ("walks", ctypes.c_uint64),
        ("refs", ctypes.c_uint64),
        ("faults", ctypes.c_uint64),
    ]


class TrueFaultHook:
    """A C fill hook with its state (`STATE`, a ctypes mirror holding a TfCounts `pf`), added when the mode
    is built so that it comes before Mmu.fill's hook; the counts of the faults it delivers are the MMU's
    and the shadow's too (`count_in`)."""

    STATE: type[ctypes.Structure]

    def __init__(self, uc, fn, what: str):
        self.state = self.STATE()
        first_fill_hook(uc)
        self._handle = add_c_hook(
            uc._uch, UC_HOOK_TLB_FILL, fn, ctypes.cast(ctypes.pointer(self.state), ctypes.c_void_p), what=what
        )
        uc._callbacks[self._handle] = self  # its state lives as long as the engine may call it

    def count_in(self, mmu, shadow) -> None:
        """The true faults' fills, walks and faults are Mmu.fill's and ShadowPaging._resolve's."""
        mmu.counters.walkers.append(self)
        shadow.counters.walkers.append(self)

    def counts(self) -> tuple[int, int, int]:
        """(fills, walks, walk references) of the true faults delivered in C (MmuCounters.walkers)."""
        pf = self.state.pf  # type: ignore[attr-defined]
        return pf.fills, pf.walks, pf.refs

    @property
    def faults(self) -> int:
        """True #PFs delivered in C (Mmu's faults, the shadow's true_faults)."""
        return self.state.pf.faults  # type: ignore[attr-defined]
