"""The 32-bit guest page walk: GVA -> GPA, written once for every memory strategy.

This is the walk the processor does on a TLB miss with 32-bit (non-PAE) paging, SDM Vol. 3A:
4.3 (32-bit paging), 4.6 (access rights), 4.7 (page-fault error code), 4.8 (accessed and dirty
flags). It is pure Python and knows nothing of Unicorn or of where guest memory really lives:
guest page-table entries are read and written only through the two callables it is given, which
take guest-PHYSICAL addresses. The caller maps those through its p2m (native, shadow, direct
paging) or through EPT (hw mode, where every reference is counted), so one walk serves all.

Rules, and how the SDM's loose ends are settled (QEMU 7.2 TCG, the project's reference, was
measured with a small Multiboot probe where the SDM leaves room):

- CR0.PG = 0: the identity, read/write/execute for every privilege, no memory reference.
- PDE at (CR3 & ~0xFFF) + 4 * gva[31:22]; PTE at (PDE & ~0xFFF) + 4 * gva[21:12].
- A PDE with PS = 1 maps a 4 MiB page only when CR4.PSE = 1; without CR4.PSE the bit is ignored
  and the PDE points to a page table. In a 4 MiB PDE, bits 20:13 are PSE-36/PSE-40 address bits
  39:32 (MAXPHYADDR = 40, as QEMU), so such a page lies at or above 4 GiB and the returned gpa is
  >= 2**32: the caller's p2m decides what is there (normally nothing). Bit 21 is reserved: a set
  bit 21 is a reserved-bit fault, error code RSVD | P (SDM 4.7: "bit 3 of the error code can be
  set only if bit 0 is also set"). QEMU since 7.2 reports RSVD without P there; the SDM and
  hardware win. Bit 12 of a 4 MiB PDE is PAT, not an address bit. 32-bit paging has no other
  reserved bits (PAT is taken as supported, so PTE bit 7 is PAT, not reserved).
- Rights are those of SDM 4.6 for the combined path (a 4 KiB page: PDE AND PTE):
  user access needs U/S = 1 at both levels, and R/W = 1 at both levels to write;
  supervisor access may read anything, and may write a read-only page unless CR0.WP = 1.
  Fetches are checked as reads (no NX without PAE), except that with CR4.SMEP a supervisor fetch
  from a user page (U/S = 1 at both levels) faults. SMAP and protection keys are not modelled.
- A not-present entry at either level gives P = 0, even when the PDE alone would already have
  denied the access (the SDM reports "no translation" first; QEMU and kvm-unit-tests agree).
- Error code: P as above, W for a write, U for a user access, I/D for a fetch only when
  CR4.SMEP = 1 (SDM 4.7; without PAE+NXE or SMEP no I/D bit, as QEMU does).
- Accessed and dirty (SDM 4.8: "whenever the processor uses a paging-structure entry as part of
  linear-address translation, it sets the accessed flag in that entry"): a PDE that points to a
  page table has been used as soon as the walk reads the PTE through it, so its A bit is set at
  that point, before the PTE is read, and stays set even if the PTE then faults. This is what
  QEMU does (measured: a not-present PTE and a read-only-PTE write fault both leave PDE.A set)
  and what kvm-unit-tests' access test expects of hardware. The leaf entry (PTE, or the 4 MiB
  PDE) gets A, and D on a write, only when the access is allowed, in one write of the updated
  entry. A write is made only when it changes the entry, so a repeated access writes nothing.
  A walk that faults at the PDE (not present, reserved bit, rights of a 4 MiB page) writes
  nothing. With ``write32=None`` nothing is ever written: a side-effect-free probe.

Writes go through ``write32`` as read-modify-write of the value the walk itself read, which is
exact for one vCPU (there is no other writer between the read and the write).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, final

from cpuvirt.memory.types import (
    GPA,
    GVA,
    PFEC_I,
    PFEC_P,
    PFEC_RSVD,
    PFEC_U,
    PFEC_W,
    PTE_A,
    PTE_D,
    PTE_G,
    PTE_P,
    PTE_PS,
    PTE_RW,
    PTE_US,
    Access,
)
from cpuvirt.x86.flags import CR0_PG, CR0_WP, CR4_PGE, CR4_PSE, CR4_SMEP

__all__ = ["Translation", "Fault", "walk"]


@final  # final: `type(t) is Fault` then narrows a walk's result for mypy
class Translation(NamedTuple):
    """A successful walk.

    ``gpa``: guest-physical address of the gva (may be >= 2**32 for a PSE-36 4 MiB page).
    ``page_gpa``: gpa of the 4 KiB page holding gva (what a 4 KiB TLB entry maps).
    ``writable``: a write at this privilege (``user``) and CR0.WP would be allowed. It does not
    look at D: a caller that must see the first write (to set D) maps the page writable only
    when ``dirty`` is also true, as QEMU does.
    ``user``: U/S = 1 along the whole path (a "user-mode address", SDM 4.6); with CR4.SMEP a
    supervisor must not fetch from such a page even if this walk was for a read.
    ``large``: mapped by a 4 MiB PDE.
    ``dirty``: the leaf's D bit as it is in guest memory after this walk (true after a write walk,
    unless ``write32`` was None). With paging off there is no D bit to maintain: true.
    ``global_``: the leaf's G bit with CR4.PGE = 1, i.e. the translation survives a CR3 write.
    ``refs``: read32 + write32 calls this walk made (a 2-D walk's cost grows with it).
    """

    gpa: GPA
    page_gpa: GPA
    writable: bool
    user: bool
    large: bool
    dirty: bool
    global_: bool
    refs: int


@final
class Fault(NamedTuple):
    """A walk that ends in #PF: the error code to push (CR2 is the gva) and the references made."""

    error_code: int
    refs: int


# tuple.__new__ skips the Python-level __new__ that NamedTuple generates: one frame less per walk.
_tuple_new = tuple.__new__

_WRITE = int(Access.WRITE)
_FETCH = int(Access.FETCH)
_PAGE_MASK = 0xFFFFF000  # bits 31:12 of an entry or of CR3
_LARGE_MASK = 0xFFC00000  # bits 31:22 of a 4 MiB PDE
_PSE36_BITS = 0x001FE000  # bits 20:13 of a 4 MiB PDE = address bits 39:32
_PSE36_SHIFT = 32 - 13
_LARGE_RSVD = 1 << 21  # reserved in a 4 MiB PDE (SDM table 4-4, MAXPHYADDR = 40)
_LARGE_OFFSET = 0x003FFFFF


def _fault(cause: int, access: int, user: bool, cr4: int, refs: int) -> Fault:
    """Build the #PF error code (SDM 4.7) from the cause bits (0, P, or P | RSVD)."""
    code = cause
    if user:
        code |= PFEC_U
    if access == _WRITE:
        code |= PFEC_W
    elif access == _FETCH and cr4 & CR4_SMEP:
        code |= PFEC_I
    return _tuple_new(Fault, (code, refs))


def walk(
    gva: GVA,
    access: Access,
    user: bool,
    cr0: int,
    cr3: int,
    cr4: int,
    read32: Callable[[int], int],
    write32: Callable[[int, int], None] | None,
) -> Translation | Fault:
    """Translate ``gva`` (a 32-bit linear address) for ``access`` at ``user`` privilege (CPL 3).

    ``read32(gpa)``/``write32(gpa, value)`` read and write one 32-bit page-table entry at a
    guest-physical address. Returns a ``Translation`` or a ``Fault``; see the module docstring
    for the rules and ``Translation`` for the meaning of each field.
    """
    if not cr0 & CR0_PG:
        return _tuple_new(Translation, (gva, gva & ~0xFFF, True, True, False, True, False, 0))

    # Page directory (SDM table 4-4/4-5).
    pde_addr = (cr3 & _PAGE_MASK) | ((gva >> 20) & 0xFFC)
    pde = read32(pde_addr)
    if not pde & PTE_P:
        return _fault(0, access, user, cr4, 1)

    if pde & PTE_PS and cr4 & CR4_PSE:
        # 4 MiB page: the PDE is the leaf.
        if pde & _LARGE_RSVD:
            return _fault(PFEC_P | PFEC_RSVD, access, user, cr4, 1)
        refs = 1
        large = True
        leaf = rights = pde
        leaf_addr = pde_addr
    else:
        # The PDE is used to reach the page table: it is "accessed" from here on (SDM 4.8).
        refs = 2
        if not pde & PTE_A and write32 is not None:
            pde |= PTE_A
            write32(pde_addr, pde)
            refs = 3
        leaf_addr = (pde & _PAGE_MASK) | ((gva >> 10) & 0xFFC)
        leaf = read32(leaf_addr)
        if not leaf & PTE_P:
            return _fault(0, access, user, cr4, refs)
        large = False
        rights = pde & leaf

    # Access rights of the combined path (SDM 4.6).
    if user:
        if not rights & PTE_US:
            return _fault(PFEC_P, access, user, cr4, refs)
        writable = (rights & PTE_RW) != 0
    else:
        writable = (rights & PTE_RW) != 0 or not cr0 & CR0_WP
        if access == _FETCH and rights & PTE_US and cr4 & CR4_SMEP:
            return _fault(PFEC_P, access, user, cr4, refs)
    if access == _WRITE:
        if not writable:
            return _fault(PFEC_P, access, user, cr4, refs)
        if leaf & (PTE_A | PTE_D) != (PTE_A | PTE_D) and write32 is not None:
            leaf |= PTE_A | PTE_D
            write32(leaf_addr, leaf)
            refs += 1
    elif not leaf & PTE_A and write32 is not None:
        leaf |= PTE_A
        write32(leaf_addr, leaf)
        refs += 1

    if large:
        gpa = ((leaf & _PSE36_BITS) << _PSE36_SHIFT) | (leaf & _LARGE_MASK) | (gva & _LARGE_OFFSET)
    else:
        gpa = (leaf & _PAGE_MASK) | (gva & 0xFFF)
    return _tuple_new(
        Translation,
        (
            gpa,
            gpa & ~0xFFF,
            writable,
            (rights & PTE_US) != 0,
            large,
            (leaf & PTE_D) != 0,
            (leaf & PTE_G) != 0 and (cr4 & CR4_PGE) != 0,
            refs,
        ),
    )
