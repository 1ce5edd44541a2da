"""Address spaces, access kinds and architectural bit names shared by the memory layer.

Three address spaces meet in the memory layer (DESIGN.md 4):

- ``GVA``: guest-virtual (linear) address, what guest instructions use;
- ``GPA``: guest-physical address, what the guest's page tables produce;
- ``HPA``: host-physical address, where cpuvirt really keeps the bytes (p2m or EPT output).

They are ``typing.NewType`` over ``int``, written in the signatures at the memory layer's borders
(walk, mmu, p2m, ept, nested, shadow) and checked by mypy where [tool.mypy] lists the module
(tests/test_lint.py). Calling one costs a Python call, so the per-fill paths compute plain ints
inside; the signatures carry the types.

Bit names follow the Intel SDM Vol. 3A: 4.3 (32-bit paging entries, tables 4-4 to 4-6) and 4.7
(page-fault error code); the control-register bits are cpuvirt/x86/flags.py's.
"""

from __future__ import annotations

from enum import IntEnum
from typing import NewType

GVA = NewType("GVA", int)
GPA = NewType("GPA", int)
HPA = NewType("HPA", int)


class Access(IntEnum):
    """Kind of memory access being translated.

    The values are QEMU's ``MMUAccessType`` (load, store, instruction fetch), so ``1 << access``
    names the permission needed, as in QEMU's ``PAGE_READ/PAGE_WRITE/PAGE_EXEC``. Unicorn's
    TLB-fill hook reports 16/17/18 (``UC_MEM_READ/WRITE/FETCH``): subtract 16.
    """

    READ = 0
    WRITE = 1
    FETCH = 2


# Page-fault error code (SDM Vol. 3A 4.7, figure 4-12).
PFEC_P = 1 << 0  # 0: no translation (a P bit was 0); 1: protection or reserved-bit violation
PFEC_W = 1 << 1  # the access was a write
PFEC_U = 1 << 2  # the access was a user-mode access (CPL 3)
PFEC_RSVD = 1 << 3  # a reserved bit was set in a paging-structure entry (always with P)
PFEC_I = 1 << 4  # instruction fetch; reported only with CR4.SMEP (or PAE+NXE, not modelled)

# Paging-structure entry bits, 32-bit paging (SDM Vol. 3A 4.3, tables 4-4 to 4-6).
PTE_P = 1 << 0  # present
PTE_RW = 1 << 1  # read/write (0: read-only)
PTE_US = 1 << 2  # user/supervisor (0: supervisor only)
PTE_PWT = 1 << 3  # page-level write-through
PTE_PCD = 1 << 4  # page-level cache disable
PTE_A = 1 << 5  # accessed
PTE_D = 1 << 6  # dirty (leaf entries only)
PTE_PS = 1 << 7  # page size, in a PDE: 1 = 4 MiB page when CR4.PSE = 1 (PAT in a PTE)
PTE_G = 1 << 8  # global (leaf entries only, with CR4.PGE)

__all__ = [
    "GVA",
    "GPA",
    "HPA",
    "Access",
    "PFEC_P",
    "PFEC_W",
    "PFEC_U",
    "PFEC_RSVD",
    "PFEC_I",
    "PTE_P",
    "PTE_RW",
    "PTE_US",
    "PTE_PWT",
    "PTE_PCD",
    "PTE_A",
    "PTE_D",
    "PTE_PS",
    "PTE_G",
]
