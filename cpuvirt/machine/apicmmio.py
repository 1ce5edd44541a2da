"""The local APIC's MMIO region with its ID register read in C (`_apicmmio.c`).

A kernel that finds its CPU by the APIC ID reads it on every spinlock (xv6's `mycpu()`: tens of
millions of reads in `usertests`), and each read was the engine's MMIO callback into Python. The C
read callback answers a 4-byte read of the ID register while the model's timer catch-up would do
nothing (before its next zero crossing); every other access goes to the Python callbacks exactly as
before. The model tells this object whenever the ID or the timer's crossing changes
(`LocalApic.on_registers`). Counting: the run's `mmio` events; `count_into(vcpu)` turns the C path on
for an untraced run and folds its reads into the counts before anyone reads them. A traced run records
every access in Python (C off), and so does `CPUVIRT_APIC_MMIO_C=0`.
"""

from __future__ import annotations

import ctypes
import os

from unicorn.unicorn_py3.unicorn import MMIO_READ_CFUNC, MMIO_WRITE_CFUNC, uccallback, uclib

from cpuvirt.engine.cext import load

NEVER = (1 << 64) - 1


class _State(ctypes.Structure):
    """Mirror of apicmmio_t (checked against apicmmio_sizeof at load)."""

    _fields_ = [
        ("now", ctypes.c_void_p),
        ("fire_at", ctypes.c_uint64),
        ("reads", ctypes.c_uint64),
        ("python_read", ctypes.c_void_p),
        ("python_write", ctypes.c_void_p),
        ("id_value", ctypes.c_uint32),
        ("enabled", ctypes.c_uint32),
    ]


def enabled_by_environment() -> bool:
    return os.environ.get("CPUVIRT_APIC_MMIO_C", "1") != "0"


class ApicMmio:
    """The APIC's engine MMIO region at host-physical `hpa`, read by C, written by `write`."""

    def __init__(self, lib, uc, apic, clock_now: int, hpa: int, size: int, read, write):
        self.apic = apic
        self._folded = 0
        st = self._state = _State()
        st.now = clock_now
        # the binding's guard: an exception in the model is recorded on the engine and stops it
        self._py = (
            uccallback(uc, MMIO_READ_CFUNC)(lambda _uc, off, size, _key: read(_uc, off, size, None)),
            uccallback(uc, MMIO_WRITE_CFUNC)(lambda _uc, off, size, value, _key: write(_uc, off, size, value, None)),
        )
        st.python_read = ctypes.cast(self._py[0], ctypes.c_void_p).value
        st.python_write = ctypes.cast(self._py[1], ctypes.c_void_p).value
        self._c = (ctypes.cast(lib.apicmmio_read, MMIO_READ_CFUNC), ctypes.cast(lib.apicmmio_write, MMIO_WRITE_CFUNC))
        ud = ctypes.cast(ctypes.pointer(st), ctypes.c_void_p)
        err = uclib.uc_mmio_map(uc._uch, ctypes.c_uint64(hpa), ctypes.c_size_t(size), self._c[0], ud, self._c[1], ud)
        if err:
            raise RuntimeError(f"cannot map the local APIC's registers (uc error {err})")
        apic.on_registers = self.sync
        self.sync()

    @classmethod
    def map(cls, uc, apic, clock_now: int, hpa: int, size: int, read, write) -> "ApicMmio | None":
        """Map the region with the C read callback; None (the caller maps it in Python) when the
        extension is not built or is turned off."""
        lib = load("cpuvirt.machine._apicmmio", {"apicmmio_sizeof": _State}) if enabled_by_environment() else None
        return None if lib is None else cls(lib, uc, apic, clock_now, hpa, size, read, write)

    def sync(self) -> None:
        st, apic = self._state, self.apic
        st.id_value = (apic.id << 24) & 0xFFFFFFFF
        due = apic.catch_up_due()
        st.fire_at = NEVER if due is None else min(due, NEVER)

    def count_into(self, vcpu, traced: bool) -> None:
        """Serve ID reads in C for this run, their `mmio` events folded into the vCPU's counts
        before anyone reads them (untraced runs only: a trace records each access)."""
        self._state.enabled = 0 if traced else 1
        if not traced:
            counts = vcpu._counts

            def fold() -> None:
                n = self._state.reads - self._folded
                if n:
                    self._folded += n
                    counts["mmio"] += n

            vcpu.device_folds.append(fold)

    @property
    def reads(self) -> int:
        """ID reads answered in C."""
        return self._state.reads
