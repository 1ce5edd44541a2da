"""The 32-bit guest page walk against the SDM (Vol. 3A 4.3, 4.6-4.8), one promise per test.

Two kinds of test:
- hand-written cases, each naming the architectural rule it checks;
- property tests: random page tables in a dict-backed guest-physical memory, random accesses,
  compared with a reference model written the other way round (the whole address space is first
  enumerated top-down into a map {virtual page -> mapping}, then accesses are answered from that
  map with a decision table).
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cpuvirt.memory import types as T
from cpuvirt.memory.types import Access
from cpuvirt.memory.walk import Fault, Translation, walk
from cpuvirt.x86 import flags as F

READ, WRITE, FETCH = Access.READ, Access.WRITE, Access.FETCH
PG = F.CR0_PG | F.CR0_PE
PG_WP = PG | F.CR0_WP
P, RW, US, A, D, PS, G = T.PTE_P, T.PTE_RW, T.PTE_US, T.PTE_A, T.PTE_D, T.PTE_PS, T.PTE_G


class Memory:
    """Guest-physical memory as a dict of 32-bit words (absent = 0), counting references."""

    def __init__(self, words: dict[int, int] | None = None):
        self.words = dict(words or {})
        self.reads = 0
        self.writes: list[tuple[int, int]] = []

    def read32(self, gpa: int) -> int:
        assert gpa % 4 == 0, f"misaligned entry read at {gpa:#x}"
        self.reads += 1
        return self.words.get(gpa, 0)

    def write32(self, gpa: int, value: int) -> None:
        assert gpa % 4 == 0 and 0 <= value < 2**32
        self.writes.append((gpa, value))
        self.words[gpa] = value

    def walk(self, gva, access=READ, user=False, cr0=PG_WP, cr3=0x1000, cr4=F.CR4_PSE, probe=False):
        self.reads = 0
        self.writes = []
        result = walk(gva, access, user, cr0, cr3, cr4, self.read32,
                      None if probe else self.write32)
        assert result.refs == self.reads + len(self.writes), "refs counts every read32/write32"
        return result


PD = 0x1000          # page directory
PT = 0x2000          # one page table
DATA = 0x7000        # a data page


def tables(pde_flags=P | RW | US, pte_flags=P | RW | US, pdi=0, pti=5) -> Memory:
    """A page directory at PD whose entry pdi points to PT, whose entry pti maps DATA."""
    return Memory({PD + 4 * pdi: PT | pde_flags, PT + 4 * pti: DATA | pte_flags})


# --------------------------------------------------------------------------------------------
# Constants (SDM Vol. 3A 2.5, 4.3, 4.7)

def test_constants_are_the_sdm_bit_positions():
    assert (T.PFEC_P, T.PFEC_W, T.PFEC_U, T.PFEC_RSVD, T.PFEC_I) == (1, 2, 4, 8, 16)
    assert (F.CR0_PE, F.CR0_WP, F.CR0_PG) == (1, 1 << 16, 1 << 31)
    assert (F.CR4_PSE, F.CR4_PGE, F.CR4_SMEP) == (1 << 4, 1 << 7, 1 << 20)
    assert [T.PTE_P, T.PTE_RW, T.PTE_US, T.PTE_PWT, T.PTE_PCD, T.PTE_A, T.PTE_D, T.PTE_PS,
            T.PTE_G] == [1 << b for b in range(9)]
    assert (int(READ), int(WRITE), int(FETCH)) == (0, 1, 2)


# --------------------------------------------------------------------------------------------
# Paging off

@pytest.mark.parametrize("access", list(Access))
@pytest.mark.parametrize("user", [False, True])
def test_paging_off_is_the_identity_with_full_rights_and_no_references(access, user):
    mem = Memory()
    t = mem.walk(0xDEADBEEF, access, user, cr0=F.CR0_PE | F.CR0_WP, cr4=F.CR4_SMEP)
    assert t == Translation(0xDEADBEEF, 0xDEADB000, True, True, False, True, False, 0)


# --------------------------------------------------------------------------------------------
# Not-present entries (SDM 4.7: P = 0 when a P flag was 0)

@pytest.mark.parametrize("access,user,code", [
    (READ, False, 0), (WRITE, False, 2), (READ, True, 4), (WRITE, True, 6), (FETCH, True, 4)])
def test_not_present_pde_faults_with_p_clear_after_one_reference(access, user, code):
    mem = Memory({PD + 4: PT | P | RW | US})    # only entry 1 is present
    assert mem.walk(0x0000_5000, access, user) == Fault(code, 1)
    assert mem.writes == []


@pytest.mark.parametrize("access,user,code", [(READ, False, 0), (WRITE, True, 6)])
def test_not_present_pte_faults_with_p_clear_after_two_reads(access, user, code):
    mem = tables(pde_flags=P | RW | US | A, pte_flags=RW | US)      # PTE P = 0
    assert mem.walk(0x5000, access, user) == Fault(code, 2)
    assert mem.writes == []


def test_not_present_pte_wins_over_a_pde_that_denies_the_access():
    """No translation is reported before a rights violation (P = 0, not P = 1)."""
    mem = tables(pde_flags=P | A, pte_flags=0)        # PDE supervisor, read-only
    assert mem.walk(0x5000, WRITE, user=True) == Fault(T.PFEC_W | T.PFEC_U, 2)


def test_a_pde_used_to_reach_a_not_present_pte_is_marked_accessed():
    """SDM 4.8: the PDE was used for the translation, so A is set, as QEMU 7.2 does."""
    mem = tables(pde_flags=P | RW, pte_flags=0)
    assert mem.walk(0x5000, READ) == Fault(0, 3)
    assert mem.writes == [(PD, PT | P | RW | A)]
    assert mem.walk(0x5000, READ) == Fault(0, 2)        # and only once
    assert mem.writes == []


# --------------------------------------------------------------------------------------------
# Rights (SDM 4.6)

@pytest.mark.parametrize("ro_level", ["pde", "pte"])
@pytest.mark.parametrize("cr0,user,access,expect", [
    (PG, False, WRITE, "ok"),           # CR0.WP = 0: supervisor writes ignore R/W
    (PG_WP, False, WRITE, 0x3),         # CR0.WP = 1: P | W
    (PG, True, WRITE, 0x7),             # user writes always need R/W: P | W | U
    (PG_WP, True, WRITE, 0x7),
    (PG_WP, True, READ, "ok"),
    (PG_WP, False, READ, "ok"),
    (PG_WP, True, FETCH, "ok"),         # no NX in 32-bit paging: fetch is checked like a read
])
def test_read_only_page(ro_level, cr0, user, access, expect):
    pde, pte = (P | US | A, P | RW | US | A) if ro_level == "pde" else (P | RW | US | A, P | US | A)
    mem = tables(pde_flags=pde, pte_flags=pte)
    result = mem.walk(0x5ABC, access, user, cr0=cr0)
    if expect == "ok":
        assert isinstance(result, Translation)
        assert result.gpa == DATA | 0xABC
        assert result.writable == (not user and not cr0 & F.CR0_WP)
    else:
        assert result == Fault(expect, 2)
        assert mem.writes == []


@pytest.mark.parametrize("pde_us,pte_us", [(0, US), (US, 0), (0, 0)])
def test_user_access_needs_us_at_both_levels(pde_us, pte_us):
    mem = tables(pde_flags=P | RW | A | pde_us, pte_flags=P | RW | A | pte_us)
    assert mem.walk(0x5000, READ, user=True) == Fault(T.PFEC_P | T.PFEC_U, 2)
    assert mem.walk(0x5000, WRITE, user=True) == Fault(T.PFEC_P | T.PFEC_W | T.PFEC_U, 2)
    t = mem.walk(0x5000, WRITE, user=False)
    assert isinstance(t, Translation) and not t.user and t.writable


def test_user_page_reports_user_and_writable_for_user():
    t = tables().walk(0x5000, READ, user=True)
    assert isinstance(t, Translation) and t.user and t.writable and not t.large


# --------------------------------------------------------------------------------------------
# SMEP and the I/D bit (SDM 4.6, 4.7)

SMEP = F.CR4_PSE | F.CR4_SMEP


def test_smep_supervisor_fetch_from_user_page_faults_with_id():
    mem = tables()
    assert mem.walk(0x5000, FETCH, user=False, cr4=SMEP) == Fault(T.PFEC_P | T.PFEC_I, 3)
    assert mem.writes == [(PD, PT | P | RW | US | A)]   # the PDE was used; the PTE is left alone


def test_smep_allows_what_it_does_not_forbid():
    mem = tables()
    assert isinstance(mem.walk(0x5000, FETCH, user=True, cr4=SMEP), Translation)
    assert isinstance(mem.walk(0x5000, READ, user=False, cr4=SMEP), Translation)   # no SMAP
    assert isinstance(mem.walk(0x5000, FETCH, user=False, cr4=F.CR4_PSE), Translation)
    for pde_us, pte_us in [(US, 0), (0, US)]:      # a supervisor page: U/S = 0 at some level
        sup = tables(pde_flags=P | RW | pde_us, pte_flags=P | RW | pte_us)
        assert isinstance(sup.walk(0x5000, FETCH, user=False, cr4=SMEP), Translation)


def test_id_bit_only_with_smep_even_on_not_present_faults():
    mem = Memory()
    assert mem.walk(0x5000, FETCH, cr4=SMEP) == Fault(T.PFEC_I, 1)
    assert mem.walk(0x5000, FETCH, user=True, cr4=SMEP) == Fault(T.PFEC_I | T.PFEC_U, 1)
    assert mem.walk(0x5000, FETCH, cr4=F.CR4_PSE) == Fault(0, 1)
    sup = tables(pde_flags=P | RW | US | A, pte_flags=P | RW | A)
    assert sup.walk(0x5000, FETCH, user=True, cr4=SMEP) == Fault(
        T.PFEC_P | T.PFEC_U | T.PFEC_I, 2)
    assert sup.walk(0x5000, FETCH, user=True, cr4=0) == Fault(T.PFEC_P | T.PFEC_U, 2)


# --------------------------------------------------------------------------------------------
# 4 MiB pages (SDM 4.3, table 4-4)

def test_4mib_page_with_pse():
    mem = Memory({PD + 4 * 3: 0x0C00_0000 | P | RW | US | PS})
    t = mem.walk(0x00F2_3456, WRITE, user=True)
    assert t == Translation(0x0C32_3456, 0x0C32_3000, True, True, True, True, False, 2)
    assert mem.writes == [(PD + 12, 0x0C00_0000 | P | RW | US | PS | A | D)]


def test_pat_bit_12_of_a_4mib_pde_is_not_an_address_bit():
    mem = Memory({PD: 0x0040_0000 | 1 << 12 | P | PS | A})
    t = mem.walk(0x1234, READ)
    assert t.gpa == 0x0040_1234 and t.large


def test_without_pse_the_ps_bit_is_ignored_and_the_pde_points_to_a_table():
    mem = tables(pde_flags=P | RW | US | PS | A)
    t = mem.walk(0x5123, READ, cr4=0)
    assert isinstance(t, Translation) and t.gpa == DATA | 0x123 and not t.large and t.refs == 3


@pytest.mark.parametrize("hi", [0x01, 0x80, 0xFF])
def test_pse36_bits_20_13_are_address_bits_39_32(hi):
    mem = Memory({PD + 4: 0x8000_0000 | hi << 13 | P | RW | PS | A | D})
    t = mem.walk(0x0052_3456, READ)
    assert t.gpa == hi << 32 | 0x8012_3456 and t.gpa >= 2**32
    assert t.page_gpa == t.gpa & ~0xFFF


@pytest.mark.parametrize("access,user,code", [
    (READ, False, 0x9), (WRITE, False, 0xB), (READ, True, 0xD), (FETCH, False, 0x9)])
def test_reserved_bit_21_of_a_4mib_pde_is_a_reserved_bit_fault(access, user, code):
    mem = Memory({PD: 1 << 21 | P | RW | US | PS})
    assert mem.walk(0x1000, access, user) == Fault(code, 1)
    assert mem.writes == []
    # Without PSE the entry is a table pointer and bit 21 an address bit: no fault from it.
    assert mem.walk(0x1000, access, user, cr4=0) == Fault(code & ~0x9, 3)   # empty table


def test_reserved_bit_fault_reports_i_d_with_smep():
    mem = Memory({PD: 1 << 21 | P | RW | US | PS})
    assert mem.walk(0x1000, FETCH, cr4=SMEP) == Fault(T.PFEC_P | T.PFEC_RSVD | T.PFEC_I, 1)


def test_rights_fault_on_a_4mib_page_writes_nothing():
    mem = Memory({PD: P | PS})               # supervisor, read-only
    assert mem.walk(0x1000, WRITE, user=True) == Fault(0x7, 1)
    assert mem.walk(0x1000, WRITE, cr0=PG_WP) == Fault(0x3, 1)
    assert mem.writes == []


# --------------------------------------------------------------------------------------------
# Accessed and dirty (SDM 4.8), counted exactly

def test_read_then_write_then_again_sets_a_then_d_then_nothing():
    mem = tables(pde_flags=P | RW | US, pte_flags=P | RW | US)
    t = mem.walk(0x5000, READ)
    assert mem.writes == [(PD, PT | P | RW | US | A), (PT + 20, DATA | P | RW | US | A)]
    assert t.refs == 4 and not t.dirty
    t = mem.walk(0x5000, WRITE)
    assert mem.writes == [(PT + 20, DATA | P | RW | US | A | D)]
    assert t.refs == 3 and t.dirty
    for access in Access:
        t = mem.walk(0x5000, access)
        assert mem.writes == [] and t.refs == 2 and t.dirty


def test_first_write_sets_a_and_d_of_the_pte_in_one_write():
    mem = tables(pde_flags=P | RW | US, pte_flags=P | RW | US)
    t = mem.walk(0x5000, WRITE, user=True)
    assert mem.writes == [(PD, PT | P | RW | US | A), (PT + 20, DATA | P | RW | US | A | D)]
    assert t.refs == 4 and t.dirty


def test_d_is_never_set_in_a_pde_that_points_to_a_table():
    mem = tables(pde_flags=P | RW | US, pte_flags=P | RW | US | A)
    mem.walk(0x5000, WRITE)
    assert mem.words[PD] == PT | P | RW | US | A


def test_4mib_page_a_and_d():
    mem = Memory({PD: P | RW | PS})
    assert mem.walk(0x10, READ).refs == 2 and mem.writes == [(PD, P | RW | PS | A)]
    assert mem.walk(0x10, WRITE).refs == 2 and mem.writes == [(PD, P | RW | PS | A | D)]
    assert mem.walk(0x10, WRITE).refs == 1 and mem.writes == []


def test_a_rights_fault_leaves_the_pte_untouched_but_marks_the_pde():
    mem = tables(pde_flags=P | RW | US, pte_flags=P | US)
    assert mem.walk(0x5000, WRITE, user=True) == Fault(0x7, 3)
    assert mem.writes == [(PD, PT | P | RW | US | A)]


def test_probe_without_write32_changes_nothing():
    mem = tables(pde_flags=P | RW | US, pte_flags=P | RW | US)
    before = dict(mem.words)
    t = mem.walk(0x5000, WRITE, probe=True)
    assert t.refs == 2 and not t.dirty and t.writable
    assert mem.walk(0x6000, READ, probe=True) == Fault(0, 2)
    assert mem.words == before


def test_self_mapped_page_directory():
    """A PDE pointing to the directory itself: the PTE read sees the A just set in the PDE."""
    mem = Memory({PD + 4 * 0x3FF: PD | P | RW})
    t = mem.walk(0xFFFF_F000 | 0xFFC, WRITE)
    assert t.gpa == PD | 0xFFC
    assert mem.writes == [(PD + 0xFFC, PD | P | RW | A), (PD + 0xFFC, PD | P | RW | A | D)]
    assert mem.walk(0xFFFF_FFFC, WRITE).refs == 2


# --------------------------------------------------------------------------------------------
# Global pages, CR3 low bits

def test_global_needs_the_leaf_g_bit_and_cr4_pge():
    mem = tables(pde_flags=P | RW | US | A | G, pte_flags=P | RW | US | A)
    assert not mem.walk(0x5000, cr4=F.CR4_PGE).global_            # G in a table PDE is ignored
    mem = tables(pte_flags=P | RW | US | A | G)
    assert mem.walk(0x5000, cr4=F.CR4_PGE).global_
    assert not mem.walk(0x5000, cr4=0).global_
    big = Memory({PD: P | PS | A | G})
    assert big.walk(0x5000, cr4=F.CR4_PSE | F.CR4_PGE).global_


def test_cr3_low_bits_are_ignored():
    t = tables().walk(0x5000, cr3=PD | 0x18 | 0xFE7)
    assert isinstance(t, Translation) and t.gpa == DATA


# ============================================================================================
# Reference model: enumerate the whole address space, then answer from the map.

NOT_PRESENT, LARGE, TABLE = "not present", "4 MiB page", "page table"


def build_model(words: dict[int, int], cr3: int, pse: bool):
    """Enumerate the page directory top-down.

    Returns (directory, pages): directory[pdi] is (kind, pde gpa); pages[vpn] is
    (frame, rw, us, reserved, large, pde_gpa, leaf_gpa, g) for every mapped 4 KiB virtual page.
    """
    directory, pages = {}, {}
    pd_base = cr3 >> 12 << 12
    for pdi in range(1024):
        pde_gpa = pd_base + pdi * 4
        pde = words.get(pde_gpa, 0)
        if pde % 2 == 0:
            directory[pdi] = (NOT_PRESENT, pde_gpa)
            continue
        if pse and (pde >> 7) % 2:
            directory[pdi] = (LARGE, pde_gpa)
            base = ((pde >> 13) & 0xFF) * 2**32 + (pde >> 22) * 2**22
            rw, us, rsvd, g = ((pde >> n) & 1 == 1 for n in (1, 2, 21, 8))
            for pti in range(1024):
                pages[pdi * 1024 + pti] = (base + pti * 4096, rw, us, rsvd, True,
                                           pde_gpa, pde_gpa, g)
            continue
        directory[pdi] = (TABLE, pde_gpa)
        pt_base = pde >> 12 << 12
        for pti in range(1024):
            pte_gpa = pt_base + pti * 4
            pte = words.get(pte_gpa, 0)
            if pte % 2:
                both = lambda n, a=pde, b=pte: (a >> n) & (b >> n) & 1 == 1   # noqa: E731
                pages[pdi * 1024 + pti] = (pte >> 12 << 12, both(1), both(2), False, False,
                                           pde_gpa, pte_gpa, (pte >> 8) & 1 == 1)
    return directory, pages


# Decision table: the first row whose condition holds decides the outcome. Columns of the
# condition: page (None = no translation), kind, user, wp, smep. Outcome: cause bits, or None.
DECISIONS = [
    ("no translation",                       lambda pg, k, u, wp, sm: pg is None,       0),
    ("reserved bit in a 4 MiB PDE",          lambda pg, k, u, wp, sm: pg[3],            9),
    ("user access to a supervisor page",     lambda pg, k, u, wp, sm: u and not pg[2],  1),
    ("user write to a read-only page",       lambda pg, k, u, wp, sm: u and k == 1
                                                                       and not pg[1],   1),
    ("supervisor write, read-only, CR0.WP",  lambda pg, k, u, wp, sm: not u and k == 1 and wp
                                                                       and not pg[1],   1),
    ("SMEP: supervisor fetch, user page",    lambda pg, k, u, wp, sm: not u and k == 2 and sm
                                                                       and pg[2],       1),
    ("allowed",                              lambda pg, k, u, wp, sm: True,             None),
]


def model_access(directory, pages, words, gva, kind, user, wp, smep, pge, probe):
    """Expected (Translation or Fault, words after the access, number of writes) for one access."""
    pg = pages.get(gva >> 12)
    for _name, applies, cause in DECISIONS:
        if applies(pg, kind, user, wp, smep):
            break
    dir_kind, pde_gpa = directory[gva >> 22]
    reads = 2 if dir_kind == TABLE else 1
    updates = []                                 # (gpa, bits to OR in), in hardware order
    if dir_kind == TABLE:
        updates.append((pde_gpa, 1 << 5))        # the PDE was used: accessed
    if cause is None:
        updates.append((pg[6], (1 << 5) | ((1 << 6) if kind == 1 else 0)))
    new, writes = dict(words), 0
    for gpa, bits in ([] if probe else updates):
        old = new.get(gpa, 0)
        if old | bits != old:
            new[gpa] = old | bits
            writes += 1
    if cause is not None:
        code = cause + (2 if kind == 1 else 0) + (4 if user else 0) + (16 if kind == 2 and smep
                                                                         else 0)
        return Fault(code, reads + writes), new, writes
    frame, rw, us, _rsvd, large, _pde, leaf_gpa, g = pg
    writable = rw if user else (rw or not wp)
    dirty = (new.get(leaf_gpa, 0) >> 6) & 1 == 1
    gpa = frame + gva % 4096
    return Translation(gpa, frame, writable, us, large, dirty, g and pge, reads + writes), new, \
        writes


# --------------------------------------------------------------------------------------------
# Random page tables. A few frames hold all entries, so that directories, tables and data pages
# alias each other (self-maps, shared tables) as real kernels' do.

TABLE_FRAMES = [0x1000, 0x2000, 0x3000, 0x0040_0000]
OTHER_FRAMES = [0x0, 0x7000, 0x0080_0000, 0xC000_0000, 0xFFC0_0000, 0xFFFF_F000]
HOT_INDICES = [0, 1, 2, 0x3FF]
# Entries and indices are a few plain integer draws shaped by a little arithmetic: generation,
# not the walk, dominates the run time, and each draw costs.
ENTRY_FRAMES = TABLE_FRAMES * 4 + OTHER_FRAMES
HIGH_BITS = [0] * 8 + [0x1, 0x200]          # bits 21:12 of an entry: mostly clear, PAT, bit 21


def shape_entry(where: int, low: int) -> int:
    """Two draws -> an entry. ``where`` picks the frame and bits 21:12 (mostly clear, now and
    then PAT, bit 21, or PSE-36 bits); ``low`` gives flags 11:1 and, one time in five, P = 0."""
    frame, high = divmod(where, len(HIGH_BITS) + 1)
    flags, absent = divmod(low, 5)
    high_bits = HIGH_BITS[high] if high < len(HIGH_BITS) else (flags * 0x9E37 >> 4) & 0x3FF
    return ENTRY_FRAMES[frame] | high_bits << 12 | (flags & 0xFFE) | (0 if absent == 4 else 1)


def shape_index(pick: int, anywhere: int) -> int:
    """Mostly one of the hot slots, so that walks meet the entries written; now and then any."""
    return HOT_INDICES[pick] if pick < len(HOT_INDICES) else anywhere


entry_value = st.builds(shape_entry, st.integers(0, len(ENTRY_FRAMES) * (len(HIGH_BITS) + 1) - 1),
                        st.integers(0, 5 * 0x1000 - 1))
index = st.builds(shape_index, st.integers(0, len(HOT_INDICES)), st.integers(0, 1023))

HOT_SLOTS = [frame + 4 * i for frame in TABLE_FRAMES for i in HOT_INDICES]
# Every hot slot of every table frame holds an entry, plus a few anywhere in those frames.
memory_words = st.builds(
    lambda hot, extra: {**extra, **dict(zip(HOT_SLOTS, hot))},
    st.lists(entry_value, min_size=len(HOT_SLOTS), max_size=len(HOT_SLOTS)),
    st.dictionaries(st.builds(lambda frame, i: frame + 4 * i, st.sampled_from(TABLE_FRAMES),
                              st.integers(0, 1023)), entry_value, max_size=8))

access_st = st.tuples(
    index, index, st.integers(0, 0xFFF),               # pdi, pti, offset
    st.sampled_from([0, 1, 2]), st.booleans(),         # kind, user
    st.sampled_from([False] * 4 + [True]))             # probe (write32=None), now and then

config_st = st.fixed_dictionaries({
    "cr3": st.builds(lambda f, low: f | low, st.sampled_from(TABLE_FRAMES), st.integers(0, 0xFFF)),
    "wp": st.booleans(), "pse": st.booleans(), "smep": st.booleans(), "pge": st.booleans()})


def registers(cfg):
    cr0 = F.CR0_PG | F.CR0_PE | (F.CR0_WP if cfg["wp"] else 0)
    cr4 = ((F.CR4_PSE if cfg["pse"] else 0) | (F.CR4_SMEP if cfg["smep"] else 0)
           | (F.CR4_PGE if cfg["pge"] else 0))
    return cr0, cfg["cr3"], cr4


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(words=memory_words, cfg=config_st, accesses=st.lists(access_st, min_size=3, max_size=10))
def test_walk_agrees_with_the_enumerated_model(words, cfg, accesses):
    cr0, cr3, cr4 = registers(cfg)
    mem = Memory(words)
    # A/D updates only touch bits 5 and 6, which no translation depends on: the map stays valid
    # for the whole sequence, while A/D expectations are taken from the current words.
    directory, pages = build_model(words, cr3, cfg["pse"])
    for pdi, pti, off, kind, user, probe in accesses:
        gva = pdi << 22 | pti << 12 | off
        expected, new_words, writes = model_access(
            directory, pages, mem.words, gva, kind, user, cfg["wp"], cfg["smep"], cfg["pge"],
            probe)
        got = mem.walk(gva, Access(kind), user, cr0, cr3, cr4, probe=probe)
        assert type(got) is type(expected) and got == expected, (hex(gva), kind, user)
        assert len(mem.writes) == writes
        assert mem.words == new_words, "A/D bits changed as the model says, nothing else"

        # The same access again: same answer, and no further write.
        again = mem.walk(gva, Access(kind), user, cr0, cr3, cr4, probe=probe)
        assert mem.writes == []
        assert again == expected._replace(refs=expected.refs - writes)


@settings(max_examples=100, deadline=None)
@given(words=memory_words, cfg=config_st, access=access_st)
def test_probe_answers_like_the_real_walk_without_side_effects(words, cfg, access):
    cr0, cr3, cr4 = registers(cfg)
    pdi, pti, off, kind, user, _ = access
    gva = pdi << 22 | pti << 12 | off
    probe_mem, real_mem = Memory(words), Memory(words)
    seen = probe_mem.walk(gva, Access(kind), user, cr0, cr3, cr4, probe=True)
    assert probe_mem.words == words and probe_mem.writes == []
    done = real_mem.walk(gva, Access(kind), user, cr0, cr3, cr4)
    assert type(seen) is type(done)
    if isinstance(done, Fault):
        assert seen.error_code == done.error_code
    else:
        assert seen._replace(dirty=done.dirty, refs=done.refs) == done


@settings(max_examples=50, deadline=None)
@given(gva=st.integers(0, 2**32 - 1), kind=st.sampled_from([0, 1, 2]), user=st.booleans(),
       cr4=st.integers(0, 2**32 - 1), cr3=st.integers(0, 2**32 - 1))
def test_paging_off_never_reads_memory(gva, kind, user, cr4, cr3):
    mem = Memory()
    t = mem.walk(gva, Access(kind), user, cr0=F.CR0_PE | F.CR0_WP, cr3=cr3, cr4=cr4)
    assert (t.gpa, t.page_gpa, t.writable, t.user, t.refs) == (gva, gva >> 12 << 12, True, True, 0)
