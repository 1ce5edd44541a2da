"""Write traces on guest frames: one mechanism for shadow paging ("pt") and binary translation ("code").

Adams & Agesen 2006: the VMM keeps shadow page tables (and translated code) coherent by tracing the
guest pages they derive from. A traced frame is never mapped writable by a TLB fill, so a guest store
to it refuses the fill with a pending `TracedWrite`, which the run loop hands to the owners here
instead of raising a #PF. See docs/shadow-paging.md for the protocol.
"""

from __future__ import annotations

from typing import Callable

from unicorn import UC_CTL_IO_WRITE, UC_CTL_TLB_FLUSH

PAGE_MASK = 0xFFFFF000


class TracedWrite:
    """A store to a traced guest frame: refused by the fill, handed to the trace owners.

    `gva`/`gpa`: the exact linear and guest-physical address once the run loop decoded the
    instruction (the fill hook knows only the page); `eip`: the storing instruction (None for a
    store the hypervisor made itself); `done`: the store has been performed (emulated, or made
    by the hypervisor), owners only drop what they derived.
    """

    __slots__ = ("gva", "gpa", "access", "eip", "size", "done", "unbacked_fetch", "error_code")

    def __init__(self, gva: int, gpa: int, eip: int | None = None, size: int = 0, done: bool = False):
        self.gva, self.gpa, self.eip, self.size, self.done = gva, gpa, eip, size, done
        self.access = 1
        self.unbacked_fetch = False
        self.error_code = 0


class TraceError(Exception):
    """A traced write nobody could complete (a bug in an owner): ends the run with this message."""


class Traces:
    """Traced guest frames: gpa page -> {kind: callback}."""

    def __init__(self, uc):
        self.uc = uc
        self.frames: dict[int, dict] = {}
        self.order: list[str] = []  # kinds in the order first registered (dispatch order)
        self.writes = 0  # traced writes dispatched (guest stores)
        # told after a frame is first traced or last untraced (a C TLB fill that cannot see the traced
        # frames steps aside while there are any: memory/fastfill.py DirectFastFill)
        self.on_change: Callable[[], None] | None = None

    def __contains__(self, gpa_page: int) -> bool:
        return gpa_page in self.frames

    def __len__(self) -> int:
        return len(self.frames)

    def kinds(self, gpa_page: int) -> frozenset:
        return frozenset(self.frames.get(gpa_page & PAGE_MASK, ()))

    def trace_frame(self, gpa_page: int, kind: str, callback) -> None:
        """Write-protect a guest frame for `kind`; a newly traced frame flushes the engine TLB so
        that no writable mapping of it survives."""
        gpa_page &= PAGE_MASK
        owners = self.frames.get(gpa_page)
        if kind not in self.order:
            self.order.append(kind)
        if owners is None:
            self.frames[gpa_page] = {kind: callback}
            self.uc.ctl(UC_CTL_TLB_FLUSH, UC_CTL_IO_WRITE)
            if self.on_change is not None:
                self.on_change()
        else:
            owners[kind] = callback
            self.frames[gpa_page] = owners  # (a copy that keeps the owners' kinds sees the change)

    def untrace_frame(self, gpa_page: int, kind: str) -> None:
        gpa_page &= PAGE_MASK
        owners = self.frames.get(gpa_page)
        if owners is not None:
            owners.pop(kind, None)
            if not owners:
                del self.frames[gpa_page]
                if self.on_change is not None:
                    self.on_change()
            else:
                self.frames[gpa_page] = owners

    def untrace_all(self, kind: str) -> None:
        for page in [p for p, o in self.frames.items() if kind in o]:
            self.untrace_frame(page, kind)

    def dispatch(self, tw: TracedWrite, vcpu=None) -> None:
        """A guest store hit a traced frame: every owner sees it; one may emulate it (tw.done)."""
        page = tw.gpa & PAGE_MASK
        owners = self.frames.get(page)
        if owners is None:
            return  # untraced meanwhile: the store simply re-executes
        self.writes += 1
        for kind in list(self.order):
            cb = owners.get(kind)
            if cb is not None:
                if cb(tw):
                    tw.done = True
        if not tw.done and page in self.frames:
            raise TraceError(
                f"traced write at {tw.gva:#x} (guest-physical {tw.gpa:#x}) by the instruction at "
                f"{tw.eip:#x}: no owner of the trace ({', '.join(self.frames[page])}) completed or "
                "untraced it"
            )

    def hv_wrote(self, gva: int, gpa: int, size: int, skip: str | None = None) -> None:
        """The hypervisor stored into guest memory at gpa (event frames, emulated stores): owners of
        a traced frame there drop what they derived (their callback sees tw.done = True)."""
        first, last = gpa & PAGE_MASK, (gpa + max(size, 1) - 1) & PAGE_MASK
        for page in {first, last}:
            owners = self.frames.get(page)
            if owners is None:
                continue
            for kind in list(self.order):
                cb = owners.get(kind)
                if cb is not None and kind != skip:
                    cb(TracedWrite(gva, gpa, None, size, done=True))
