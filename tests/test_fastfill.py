"""Native mode's C TLB fill (memory/_tlbfill.c) against the Python fill (Mmu.fill), on the same states.

For random page-directory and page-table entries (present, R/W, U/S, A, D, PS bits), frames in RAM,
beyond it and in the APIC page, CR0.WP, CR4.PSE and read/write accesses at CPL 0 (the engine refuses
a ring-3 SS outside a ring change, so CPL 3 is covered by the golden traces instead): whenever the C fill answers, Mmu.fill on the same state must answer the same frame
and permissions, leave the same entries (the accessed and dirty bits the walk sets: C sets them too) and
count the same walk references; where C declines it must have changed nothing. The C fill must also
answer a good share of them, or the test would pass with it switched off.
"""
import ctypes
import random

import pytest

from cpuvirt.engine import regs as R
from cpuvirt.machine.machine import Machine
from cpuvirt.memory.fastfill import FastFill, _lib
from cpuvirt.modes import get_mode

pytestmark = pytest.mark.skipif(_lib() is None, reason="the C TLB fill is not built (python setup.py build_ext --inplace)")

PD, PT, DATA = 0x10000, 0x11000, 0x200000
MEM = 8 << 20


class Entry(ctypes.Structure):
    _fields_ = [("paddr", ctypes.c_uint64), ("perms", ctypes.c_uint32)]


def test_c_fill_agrees_with_the_python_fill():
    m = Machine(MEM >> 20)
    hv = get_mode("native")(m)
    mmu = m.mmu
    fast = mmu.counters.fast
    assert isinstance(fast, FastFill)
    hook = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int, ctypes.POINTER(Entry),
                            ctypes.c_void_p)(ctypes.cast(_lib().fastfill_hook, ctypes.c_void_p).value)
    state = ctypes.cast(ctypes.pointer(fast._state), ctypes.c_void_p)
    rng = random.Random(12)
    answered = 0
    m.set_flat_protected_mode(0x500)
    mmu.fill(m.uc, DATA + 0x7000, 18, Entry(), None)        # paging off: a fetch makes a code frame
    for i in range(3000):
        pde_bits = rng.choice((0, 1)) | rng.getrandbits(1) << 1 | rng.getrandbits(1) << 2 \
            | rng.getrandbits(1) << 5 | rng.getrandbits(1) << 6 | rng.getrandbits(1) << 7
        pte_bits = rng.choice((0, 1, 1)) | rng.getrandbits(1) << 1 | rng.getrandbits(1) << 2 \
            | rng.getrandbits(1) << 5 | rng.getrandbits(1) << 6
        frame = rng.choice((DATA, DATA + 0x7000, MEM + 0x1000, 0xFEE00000))
        large_frame = rng.choice((0, 0x400000, 0x1000000))
        pde = (large_frame | pde_bits) if pde_bits & 0x80 else (PT | pde_bits)
        m.write_gpa(PD, pde.to_bytes(4, "little"))
        m.write_gpa(PT, (frame | pte_bits).to_bytes(4, "little"))
        cr0 = 0x80000011 | (rng.getrandbits(1) << 16)
        cr4 = rng.getrandbits(1) << 4
        m.regs.write(R.CR3, PD)
        m.regs.write(R.CR4, cr4)
        m.regs.write(R.CR0, cr0)
        mmu.crs = None
        access = rng.choice((16, 17))
        answered += _same_as_python(m, fast, hook, state, 0, access, (PD, PT), (hex(pde), hex(pte_bits), hex(cr0), cr4))
    assert answered > 100, answered


def _same_as_python(m, fast, hook, state, vaddr, access, tables, why) -> int:
    """Run the C fill, then Mmu.fill on the state C started from: 1 if C answered (and agreed), 0 if it
    declined (and changed nothing)."""
    mmu = m.mmu
    before = [m.read_gpa(t, 4) for t in tables]
    c0 = fast.counts()
    e = Entry()
    if not hook(m.uc._uch, vaddr, access, ctypes.byref(e), state):
        assert [m.read_gpa(t, 4) for t in tables] == before, ("a declined C fill changed an entry", why)
        return 0
    c1 = fast.counts()
    after_c = [m.read_gpa(t, 4) for t in tables]
    for t, v in zip(tables, before):
        m.write_gpa(t, v)
    k = mmu.counters
    py0 = (k.fills, k.walks, k.walk_refs)
    p = Entry()
    assert mmu.fill(m.uc, vaddr, access, p, None)
    assert (e.paddr, e.perms) == (p.paddr, p.perms), why
    assert [m.read_gpa(t, 4) for t in tables] == after_c, ("A/D bits differ", why)
    assert tuple(b - a for a, b in zip(c0, c1)) == (k.fills - py0[0], k.walks - py0[1], k.walk_refs - py0[2]), why
    return 1


def test_c_fill_answers_fetches_only_from_pairs_python_has_seen():
    """A fetch is answered in C only from a (linear page, frame) pair that Mmu.fill granted a fetch
    before, with the permissions Mmu.fill gives; so the intercepts scan every pair exactly once."""
    m = Machine(MEM >> 20)
    hv = get_mode("native")(m)
    mmu = m.mmu
    fast = mmu.counters.fast
    hook = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int, ctypes.POINTER(Entry),
                            ctypes.c_void_p)(ctypes.cast(_lib().fastfill_hook, ctypes.c_void_p).value)
    state = ctypes.cast(ctypes.pointer(fast._state), ctypes.c_void_p)
    scans = []
    mmu.on_code_frame = lambda page, hpa: scans.append((page, hpa))
    m.set_flat_protected_mode(0x500)
    m.write_gpa(PD, (PT | 0x27).to_bytes(4, "little"))               # P RW US A
    m.write_gpa(PT, (DATA | 0x67).to_bytes(4, "little"))             # linear 0 -> DATA, A and D set
    m.write_gpa(PT + 4, (DATA | 0x67).to_bytes(4, "little"))         # linear 0x1000 -> the same frame
    m.regs.write(R.CR3, PD)
    m.regs.write(R.CR0, 0x80000011)
    mmu.crs = None
    answered = fast.counts()[0]
    e = Entry()
    assert not hook(m.uc._uch, 0, 18, ctypes.byref(e), state)        # never fetched: Python's
    p = Entry()
    assert mmu.fill(m.uc, 0, 18, p, None) and scans == [(0, m.p2m.ram_hpa + DATA)]
    for _ in range(3):
        e = Entry()
        assert hook(m.uc._uch, 0x123, 18, ctypes.byref(e), state)    # the same pair: C, no new scan
        assert (e.paddr, e.perms) == (p.paddr, p.perms)
    assert not hook(m.uc._uch, 0x1000, 18, ctypes.byref(Entry()), state)   # same frame, new page
    assert mmu.fill(m.uc, 0x1000, 18, Entry(), None) and len(scans) == 2
    m.write_gpa(PT + 4, (DATA | 0x47).to_bytes(4, "little"))         # A clear: the walk sets it, in C too
    assert hook(m.uc._uch, 0x1000, 18, ctypes.byref(Entry()), state)
    assert m.read_gpa(PT + 4, 4) == (DATA | 0x67).to_bytes(4, "little")
    assert len(scans) == 2 and fast.counts()[0] == answered + 4
    # SMEP: a kernel fetch from a user page, even of a pair fetched before, is the walk's #PF, never C's
    m.regs.write(R.CR4, 0x100000)
    mmu.crs = None
    assert not hook(m.uc._uch, 0x1000, 18, ctypes.byref(Entry()), state)
    assert not mmu.fill(m.uc, 0x1000, 18, Entry(), None)             # the walk: #PF (P | I)
    assert mmu.take_pending().error_code == 0x11


def test_c_ept_fill_agrees_with_the_python_ept_walk():
    """hw's C fill under EPT (eptfill_hook) against Mmu.fill over EptWalk: same frame, permissions, A/D
    bits set and walk and reference counts (an A/D write is an EPT translation too) whenever C answers; frames include one EPT
    maps read-only (C must decline it: an EPT entry without every right) and the APIC-access page, and one
    whose EPT entry is written again and again (another frame, read-only, all rights: the C walk caches
    translations, and must follow every write Ept makes)."""
    from cpuvirt.memory.ept import EPT_R, EPT_RWX
    from cpuvirt.memory.fastfill import EptFastFill
    from cpuvirt.memory.p2m import RAM_HPA
    m = Machine(MEM >> 20)
    hv = get_mode("hw")(m)
    hv.boot()
    mmu = m.mmu
    fast = mmu.counters.fast
    assert isinstance(fast, EptFastFill) and fast._state.enabled
    hv.vcpu.ept.map(DATA + 0x3000, RAM_HPA + DATA + 0x3000, EPT_R)     # read-only in EPT
    hook = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int, ctypes.POINTER(Entry),
                            ctypes.c_void_p)(ctypes.cast(_lib().eptfill_hook, ctypes.c_void_p).value)
    state = ctypes.cast(ctypes.pointer(fast._state), ctypes.c_void_p)
    rng = random.Random(13)
    answered = 0
    for i in range(3000):
        pde_bits = rng.choice((0, 1)) | rng.getrandbits(1) << 1 | rng.getrandbits(1) << 2 \
            | rng.getrandbits(1) << 5 | rng.getrandbits(1) << 6 | rng.getrandbits(1) << 7
        pte_bits = rng.choice((0, 1, 1)) | rng.getrandbits(1) << 1 | rng.getrandbits(1) << 2 \
            | rng.getrandbits(1) << 5 | rng.getrandbits(1) << 6
        frame = rng.choice((DATA, DATA + 0x3000, DATA + 0x7000, MEM + 0x1000, 0xFEE00000))
        large_frame = rng.choice((0, 0x400000, 0x1000000))
        pde = (large_frame | pde_bits) if pde_bits & 0x80 else (PT | pde_bits)
        m.write_gpa(PD, pde.to_bytes(4, "little"))
        m.write_gpa(PT, (frame | pte_bits).to_bytes(4, "little"))
        if rng.random() < 0.2:
            hv.vcpu.ept.map(DATA + 0x7000, RAM_HPA + rng.choice((DATA + 0x7000, DATA + 0x8000)),
                            rng.choice((EPT_RWX, EPT_RWX, EPT_R)))
        paging = rng.random() < 0.9
        cr0 = (0x80000011 if paging else 0x11) | (rng.getrandbits(1) << 16)
        m.regs.write(R.CR3, PD)
        m.regs.write(R.CR4, rng.getrandbits(1) << 4)
        m.regs.write(R.CR0, cr0)
        mmu.crs = None
        access = rng.choice((16, 17))
        vaddr = 0 if paging else rng.choice((DATA, DATA + 0x3000, MEM + 0x1000))
        answered += _same_as_python(m, fast, hook, state, vaddr, access, (PD, PT),
                                    (hex(pde), hex(pte_bits), hex(cr0), access))
    assert answered > 100, answered


def test_c_direct_fill_agrees_with_para_direct_paging():
    """para's C fill (DirectFastFill: entries hold machine addresses) against Mmu.fill over DirectPaging
    on random entries: the same frame, permissions and counts whenever C answers, nothing changed; the
    hypervisor's window (HYPERVISOR_VIRT_START up) and machine frames outside the guest's are declined."""
    from cpuvirt.memory.fastfill import DirectFastFill
    from cpuvirt.memory.p2m import RAM_HPA
    from cpuvirt.xen import HYPERVISOR_VIRT_START
    m = Machine(MEM >> 20)
    hv = get_mode("para")(m)
    mmu = m.mmu
    fast = mmu.counters.fast
    assert isinstance(fast, DirectFastFill) and fast._state.hv_start == HYPERVISOR_VIRT_START
    m.set_flat_protected_mode(0x500)          # loads descriptors: before the strategy changes
    paging = hv.paging
    mmu.strategy = paging
    paging.base = RAM_HPA + PD
    m.regs.write(R.CR4, 0x10)
    m.regs.write(R.CR3, paging.base)
    m.regs.write(R.CR0, 0x80010033)
    mmu.crs = None
    hook = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int, ctypes.POINTER(Entry),
                            ctypes.c_void_p)(ctypes.cast(_lib().fastfill_hook, ctypes.c_void_p).value)
    state = ctypes.cast(ctypes.pointer(fast._state), ctypes.c_void_p)
    rng = random.Random(14)
    answered = declined_window = 0
    for i in range(3000):
        pde_bits = rng.choice((0, 1)) | rng.getrandbits(1) << 1 | rng.getrandbits(1) << 2 \
            | rng.getrandbits(1) << 5 | rng.getrandbits(1) << 6 | rng.getrandbits(1) << 7
        pte_bits = rng.choice((0, 1, 1)) | rng.getrandbits(1) << 1 | rng.getrandbits(1) << 2 \
            | rng.getrandbits(1) << 5 | rng.getrandbits(1) << 6
        # machine frames: the guest's, below its first frame, beyond its last
        frame = rng.choice((RAM_HPA + DATA, RAM_HPA + DATA + 0x7000, RAM_HPA - 0x1000, RAM_HPA + MEM + 0x1000))
        table = rng.choice((RAM_HPA + PT, RAM_HPA + PT, PT))        # a table outside the guest's frames too
        pde = ((RAM_HPA + rng.choice((0, 0x400000))) | pde_bits) if pde_bits & 0x80 else (table | pde_bits)
        window = rng.random() < 0.1
        vaddr = HYPERVISOR_VIRT_START if window else 0
        m.write_gpa(PD + (vaddr >> 22) * 4, pde.to_bytes(4, "little"))
        m.write_gpa(PT, (frame | pte_bits).to_bytes(4, "little"))
        access = rng.choice((16, 17))
        took = _same_as_python(m, fast, hook, state, vaddr, access, (PD + (vaddr >> 22) * 4, PT),
                               (hex(pde), hex(frame | pte_bits), access))
        assert not (took and window), "the C fill answered in the hypervisor's window"
        answered += took
        declined_window += window and not took
    assert answered > 100 and declined_window > 100, (answered, declined_window)
    # A write-traced frame (para: the shared-info frame while an event waits behind the mask) must reach
    # Mmu.fill, which the C walk cannot tell: it steps aside while any frame is traced.
    m.write_gpa(PD, (RAM_HPA + PT | 0x27).to_bytes(4, "little"))
    m.write_gpa(PT, (RAM_HPA + DATA | 0x67).to_bytes(4, "little"))
    assert hook(m.uc._uch, 0, 17, ctypes.byref(Entry()), state)
    mmu.traces.trace_frame(RAM_HPA + DATA, "upcall_mask", lambda tw: True)
    assert not hook(m.uc._uch, 0, 17, ctypes.byref(Entry()), state)
    mmu.traces.untrace_frame(RAM_HPA + DATA, "upcall_mask")
    assert hook(m.uc._uch, 0, 17, ctypes.byref(Entry()), state)


def test_c_direct_fill_reads_the_hypervisors_window_as_direct_paging_shows_it():
    """The hypervisor's window (HYPERVISOR_VIRT_START up: the GDT frames, then the LDT frames) in C
    (directfill_hook, the hook para installs): a read of a page showing a frame gets Mmu.fill's frame and
    permissions, with the same counts; a write, a fetch, a page showing nothing or beyond the window is
    declined; and the frames follow set_gdt and set_ldt."""
    from cpuvirt.memory.p2m import RAM_HPA
    from cpuvirt.xen import GDT_WINDOW_FRAMES, HYPERVISOR_VIRT_START

    m = Machine(MEM >> 20)
    hv = get_mode("para")(m)
    mmu = m.mmu
    fast = mmu.counters.fast
    m.set_flat_protected_mode(0x500)
    paging = hv.paging
    mmu.strategy = paging
    hook = ctypes.CFUNCTYPE(
        ctypes.c_int, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int, ctypes.POINTER(Entry), ctypes.c_void_p
    )(ctypes.cast(_lib().directfill_hook, ctypes.c_void_p).value)
    state = ctypes.cast(ctypes.pointer(fast._state), ctypes.c_void_p)
    frames = [(RAM_HPA + DATA + k * 0x1000) >> 12 for k in range(6)]
    answered = 0
    for gdt, ldt in ((frames[:2], []), (frames[2:5], frames[5:]), ([frames[0]], frames[1:3])):
        paging.set_gdt(gdt)
        paging.set_ldt(ldt)
        for page in list(range(0, 4)) + list(range(GDT_WINDOW_FRAMES, GDT_WINDOW_FRAMES + 4)) + [32, 40]:
            vaddr = HYPERVISOR_VIRT_START + page * 0x1000 + 0x18
            shown = gdt if page < GDT_WINDOW_FRAMES else ldt
            index = page if page < GDT_WINDOW_FRAMES else page - GDT_WINDOW_FRAMES
            for access in (16, 17, 18):
                took = _same_as_python(m, fast, hook, state, vaddr, access, (), (gdt, ldt, page, access))
                assert took == (access == 16 and page < 2 * GDT_WINDOW_FRAMES and index < len(shown)), (
                    gdt,
                    ldt,
                    page,
                    access,
                )
                if took:
                    e = Entry()
                    hook(m.uc._uch, vaddr, access, ctypes.byref(e), state)
                    assert e.paddr == shown[index] << 12
                answered += took
    assert answered == 2 + 3 + 1 + 1 + 2, answered


def test_a_directory_that_maps_itself_gets_the_walks_bits_once():
    """A recursive mapping (a PDE pointing at the directory itself: the walk's PDE and leaf are then one
    entry when the two indexes agree): the C fill must set A (and D) as walk.py does, where the PDE.A
    write is seen by the leaf read that follows it, and count the same references."""
    m = Machine(MEM >> 20)
    get_mode("native")(m)
    mmu = m.mmu
    fast = mmu.counters.fast
    hook = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int, ctypes.POINTER(Entry),
                            ctypes.c_void_p)(ctypes.cast(_lib().fastfill_hook, ctypes.c_void_p).value)
    state = ctypes.cast(ctypes.pointer(fast._state), ctypes.c_void_p)
    m.set_flat_protected_mode(0x500)
    m.regs.write(R.CR3, PD)
    m.regs.write(R.CR0, 0x80000011)
    m.regs.write(R.CR4, 0)
    slot = 0x300
    vaddr = (slot << 22) | (slot << 12)  # PDE index == PTE index: leaf entry == the PDE
    answered = 0
    for bits in (0x03, 0x23, 0x63, 0x43, 0x07, 0x27):   # P RW [US], A and D in every combination
        for access in (16, 17):
            m.write_gpa(PD + slot * 4, (PD | bits).to_bytes(4, "little"))
            mmu.crs = None
            answered += _same_as_python(m, fast, hook, state, vaddr, access, (PD + slot * 4,), (hex(bits), access))
    assert answered == 12


def test_a_directory_that_maps_itself_under_ept():
    """The same under hw's EPT fill: each A/D write is also an EPT translation for write (EptWalk's)."""
    from cpuvirt.memory.fastfill import EptFastFill
    m = Machine(MEM >> 20)
    hv = get_mode("hw")(m)
    hv.boot()
    mmu = m.mmu
    fast = mmu.counters.fast
    assert isinstance(fast, EptFastFill)
    hook = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int, ctypes.POINTER(Entry),
                            ctypes.c_void_p)(ctypes.cast(_lib().eptfill_hook, ctypes.c_void_p).value)
    state = ctypes.cast(ctypes.pointer(fast._state), ctypes.c_void_p)
    m.regs.write(R.CR3, PD)
    m.regs.write(R.CR4, 0)
    m.regs.write(R.CR0, 0x80000011)
    slot = 0x300
    vaddr = (slot << 22) | (slot << 12)
    answered = 0
    for bits in (0x03, 0x23, 0x63, 0x43, 0x07, 0x27):
        for access in (16, 17):
            m.write_gpa(PD + slot * 4, (PD | bits).to_bytes(4, "little"))
            mmu.crs = None
            answered += _same_as_python(m, fast, hook, state, vaddr, access, (PD + slot * 4,), (hex(bits), access))
    assert answered == 12


def test_c_fill_maps_device_pages_as_the_python_fill_and_follows_the_p2m():
    """A page of the local APIC's registers (a kernel reads it after every CR3 load): the C fill maps it to
    the p2m's MMIO region, read-write, never execute, as Mmu.fill does; a fetch from it stays Python's
    (the run ends there); a range the p2m drops or moves is dropped or moved for C at once."""
    m = Machine(MEM >> 20)
    get_mode("native")(m)
    mmu, p2m = m.mmu, m.p2m
    fast = mmu.counters.fast
    hook = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int, ctypes.POINTER(Entry),
                            ctypes.c_void_p)(ctypes.cast(_lib().fastfill_hook, ctypes.c_void_p).value)
    state = ctypes.cast(ctypes.pointer(fast._state), ctypes.c_void_p)
    m.set_flat_protected_mode(0x500)
    m.write_gpa(PD, (PT | 0x27).to_bytes(4, "little"))
    m.write_gpa(PT, (0xFEE00000 | 0x67).to_bytes(4, "little"))   # P, W, A, D
    m.regs.write(R.CR3, PD)
    m.regs.write(R.CR0, 0x80000011)
    mmu.crs = None
    apic = p2m.mmio_to_hpa(0xFEE00000)
    for access in (16, 17):
        assert _same_as_python(m, fast, hook, state, 0x123, access, (PD, PT), access) == 1
        e = Entry()
        assert hook(m.uc._uch, 0, access, ctypes.byref(e), state)
        assert (e.paddr, e.perms) == (apic, 3)            # UC_PROT_READ | UC_PROT_WRITE
    assert not hook(m.uc._uch, 0, 18, ctypes.byref(Entry()), state)   # a fetch: Python's
    lo, hi, hpa = next(r for r in p2m.mmio if r[0] == 0xFEE00000)
    p2m.remove_mmio(0xFEE00000)
    assert not hook(m.uc._uch, 0, 16, ctypes.byref(Entry()), state)   # unbacked now: Python's
    p2m.add_mmio(0xFEE00000, hi - lo, hpa + 0x1000)
    e = Entry()
    assert hook(m.uc._uch, 0, 16, ctypes.byref(e), state) and e.paddr == hpa + 0x1000
    assert _same_as_python(m, fast, hook, state, 0, 16, (PD, PT), "moved") == 1
