"""The hypervisor's own TLB (GuestViewVcpu._rtlb) when a C path may flush it: modes full (bt/_callout.c,
a mov to CR0/CR4 served in C) and trap (modes/_trapfast.c, the same writes trapped) flush it by
bumping a generation count in their C table, which every look-up here checks first."""

from __future__ import annotations


class HvTlb(dict):
    """linear page -> host frame, as GuestViewVcpu._rtlb, emptied whenever `table.rtlb_gen` moved."""

    __slots__ = ("_table", "_gen")

    def __init__(self, table):
        super().__init__()
        self._table = table
        self._gen = table.rtlb_gen

    def _fresh(self) -> None:
        gen = self._table.rtlb_gen
        if gen != self._gen:
            self._gen = gen
            dict.clear(self)

    def get(self, key, default=None):
        self._fresh()
        return dict.get(self, key, default)

    def pop(self, key, *default):
        self._fresh()
        return dict.pop(self, key, *default)
