"""Native mode's C event delivery (cpu/_delivery.c) against the Python path (EventDelivery), state for state.

The guest #PF found and delivered from the TLB fill (delivery_pf_hook) is compared the same way, by
running one faulting access on two machines through the vCPU's loop (see the second half).

Two machines get the same random IDT, GDT, TSS, page tables (present, R/W, A, D, PS bits, tables and
frames beyond RAM), CR0.WP/PG, CR4.PSE, CPL 0 or 3, stack pointers next to page ends, EFLAGS and event
(vector, error code, `int n` or not). Machine A tries the C path; machine B delivers in Python. When C
delivers, A must equal B afterwards: every register, every byte of guest RAM (the frame, the A/D bits)
and the MMU's walk counters. When C falls back, A must be exactly as before, and Python then delivers
on both alike. Both outcomes must occur often, or the test would pass with the C path switched off.
The C reader behind Mmu.fetch_bytes (delivery_peek) is checked on the same states: the Python read's
bytes whenever it answers, and no side effect.
"""
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from unicorn import UC_CTL_IO_WRITE, UC_CTL_TLB_FLUSH

from cpuvirt.cpu.events import DeliveryFault, TripleFault, Unsupported
from cpuvirt.cpu.fastdelivery import FastDelivery, _lib
from cpuvirt.engine import regs as R
from cpuvirt.machine.machine import Machine
from cpuvirt.modes import get_mode

pytestmark = pytest.mark.skipif(_lib() is None,
                                reason="the C delivery is not built (python setup.py build_ext --inplace)")

MEM = 8 << 20
PD, PT = 0x10000, 0x11000
GDT, IDT, TSS, STACK, STACK0 = 0x20000, 0x30000, 0x40000, 0x50000, 0x60000
# The GDT: null, ring-0 code, ring-0 data, ring-3 code, ring-3 data, conforming code, ring-1 data,
# a data segment that is not present, an expand-down... every slot a test may name.
CODE0, DATA0, CODE3, DATA3, CONF, DATA1, DATA0_NP = 0x08, 0x10, 0x18, 0x20, 0x28, 0x30, 0x38
DESCRIPTORS = [0, 0x00CF9A000000FFFF, 0x00CF92000000FFFF, 0x00CFFA000000FFFF, 0x00CFF2000000FFFF,
               0x00CF9E000000FFFF, 0x00CFB2000000FFFF, 0x00CF12000000FFFF]
REGS = (R.EAX, R.ECX, R.EDX, R.EBX, R.ESP, R.EBP, R.ESI, R.EDI, R.EIP, R.EFLAGS, R.CS, R.SS, R.DS, R.ES,
        R.CR0, R.CR2, R.CR3, R.CR4)

_machines = {}


def machines():
    """Two native machines, made once (an engine takes a while to build), reset by every example."""
    if not _machines:
        for side in "ab":
            m = Machine(MEM >> 20)
            hv = get_mode("native")(m)
            _machines[side] = (m, hv.vcpu)
        assert isinstance(_machines["a"][1].delivery.fast, FastDelivery)
        _machines["b"][1].delivery.fast = None            # B: the Python path only
        _machines["b"][0].mmu.peek = None
    return _machines["a"], _machines["b"]


@st.composite
def scenario(draw):
    """One state. A "tidy" state takes each setting's first (valid) value most of the time, so that the
    C path delivers often; an untidy one draws every setting from all of its values."""
    tidy = draw(st.integers(0, 2)) > 0

    def pick(*values):
        return draw(st.sampled_from((values[0],) * (12 if tidy else 1) + values[1:]))

    def page_flags():
        """PTE/PDE low bits: present or not, R/W, A and D at random; U/S set."""
        return pick(1, 0) | draw(st.integers(0, 1)) << 1 | 1 << 2 | draw(st.integers(0, 1)) << 5 \
            | draw(st.integers(0, 1)) << 6

    s = {}
    s["paging"] = draw(st.booleans())
    s["wp"] = draw(st.booleans())
    s["pse"] = draw(st.booleans())
    s["large"] = pick(False, True)                                 # a 4 MiB PDE over low memory
    s["pde"] = page_flags()
    s["pt_outside"] = pick(False, True)                            # the page table beyond RAM
    s["cpl3"] = draw(st.booleans())
    s["vector"] = draw(st.integers(0, 255))
    s["idt_off"] = draw(st.sampled_from((0, 0, 0x1000 - 4 - 8 * s["vector"] % 0x1000)))
    s["idt_limit"] = pick(0x7FF, 8 * s["vector"] + 7, 8 * s["vector"] + 6)
    s["gate_type"] = draw(st.sampled_from((0xE, 0xF))) if tidy else draw(st.sampled_from((0xE, 0xF, 0x5, 0x6, 0xC, 0)))
    s["gate_dpl"] = pick(3, 0, 1, 2)
    s["gate_present"] = pick(True, False)
    s["selector"] = pick(CODE0, CODE3 | 3, CODE3, CONF, DATA0, 0, 0x0C, 0x80, CODE0 | 3)
    s["offset"] = draw(st.integers(0, 0xFFFFFFFF))
    s["code_present"] = pick(True, False)
    s["gdt_off"] = draw(st.sampled_from((0, 0, 0x1000 - 0x10, 0x1000 - 0x0C)))
    s["gdt_limit"] = pick(0x3F, 0x17)
    s["tss_off"] = draw(st.sampled_from((0, 0, 0x1000 - 6, 0x1000 - 4)))
    s["tr_limit"] = pick(0x67, 0x8, 0x9)
    s["ss0"] = pick(DATA0, 0, 0x3, DATA3, DATA1, CODE0, DATA0_NP, 0x13, 0x84)
    s["esp"] = STACK + draw(st.sampled_from((0x800, 0x1000, 0x1008, 0x1010, 0x1014, 0x1018, 0x1002, 0)))
    s["esp0"] = STACK0 + draw(st.sampled_from((0x800, 0x1000, 0x1008, 0x1010, 0x1014, 0x1018, 0x100A, 0)))
    s["eflags"] = 0x2 | draw(st.integers(0, 1)) << 9 | draw(st.integers(0, 1)) << 8 \
        | draw(st.integers(0, 1)) << 14 | draw(st.integers(0, 1)) << 16 | draw(st.integers(0, 0xFF)) & 0xD5
    # the pages holding each structure and stack, each two pages (an access may straddle)
    s["ptes"] = {page: page_flags() for page in (IDT, IDT + 0x1000, GDT, GDT + 0x1000, TSS, TSS + 0x1000,
                                                 STACK, STACK + 0x1000, STACK0, STACK0 + 0x1000)}
    s["frame_outside"] = pick(None, IDT, GDT + 0x1000, TSS, STACK0)
    s["error_code"] = draw(st.sampled_from((None, 0, 0x1234, 0xFFFFFFFF)))
    s["soft"] = draw(st.booleans())
    s["external"] = draw(st.booleans())
    s["return_eip"] = draw(st.integers(0, 0xFFFFFFFF))
    return s


def set_up(m, vcpu, s):
    """Write the scenario into machine m (the same bytes and registers on both machines)."""
    uc, regs = m.uc, m.regs
    m.mmu.ram.buf[:0x100000] = bytes(0x100000)        # the low 1 MiB holds every table of the test
    regs.write(R.CR0, 0x11)                          # paging off, ring 0, flat segments first
    regs.write(R.CR4, 0)
    uc.ctl(UC_CTL_TLB_FLUSH, UC_CTL_IO_WRITE)
    vcpu.faults.set_cpl(0)
    m.set_flat_protected_mode(0x500)
    gdt = GDT + s["gdt_off"]
    table = list(DESCRIPTORS)
    uc.reg_write(R.GDTR, (0, gdt, 0x3F, 0))
    m.write_gpa(gdt, struct.pack("<8Q", *table))
    if s["cpl3"]:
        vcpu.faults.set_cpl(3)                        # the engine takes an SS of ring 3 only at CPL 3
        regs.write(R.SS, DATA3 | 3)
        regs.write(R.CS, CODE3 | 3)
    else:
        regs.write(R.SS, DATA0)
        regs.write(R.CS, CODE0)
    if not s["code_present"]:
        for i in (1, 3, 5):
            table[i] &= ~(1 << 47)
    m.write_gpa(gdt, struct.pack("<8Q", *table))
    uc.reg_write(R.GDTR, (0, gdt, s["gdt_limit"], 0))
    # IDT: the one gate that matters
    idt = IDT + s["idt_off"]
    sel, off = s["selector"], s["offset"]
    lo = (sel << 16) | (off & 0xFFFF)
    hi = (off & 0xFFFF0000) | (0x8000 if s["gate_present"] else 0) | s["gate_dpl"] << 13 | s["gate_type"] << 8
    m.write_gpa(idt + 8 * s["vector"], struct.pack("<II", lo, hi))
    uc.reg_write(R.IDTR, (0, idt, s["idt_limit"], 0))
    # TSS: ESP0 and SS0 (a TR cache loaded by hand: the descriptor is never read)
    tss = TSS + s["tss_off"]
    m.write_gpa(tss + 4, struct.pack("<IH", s["esp0"], s["ss0"]))
    uc.reg_write(R.TR, (0x40, tss, s["tr_limit"], 0x8B00))
    regs.write(R.ESP, s["esp"])
    regs.write(R.EFLAGS, s["eflags"])
    regs.write(R.EIP, 0x1000)
    regs.write(R.CR2, 0)
    if s["paging"]:
        pt = MEM + 0x2000 if s["pt_outside"] else PT
        if s["large"]:
            m.write_gpa(PD, struct.pack("<I", 0x80 | s["pde"]))
        else:
            m.write_gpa(PD, struct.pack("<I", pt | s["pde"]))
        if not s["pt_outside"]:
            for page in range(0, 0x400000, 0x1000):
                flags = s["ptes"].get(page, 0x67)
                frame = MEM + 0x10000 if page == s["frame_outside"] else page
                m.write_gpa(PT + 4 * (page >> 12), struct.pack("<I", frame | flags)) if page < 0x100000 \
                    else None
        regs.write(R.CR3, PD)
        regs.write(R.CR4, 0x10 if s["pse"] else 0)
        regs.write(R.CR0, 0x80000011 | (0x10000 if s["wp"] else 0))
    uc.ctl(UC_CTL_TLB_FLUSH, UC_CTL_IO_WRITE)
    m.mmu.crs = None


def state(m):
    regs = m.regs
    return ([regs.read(r) for r in REGS], bytes(m.mmu.ram.buf), m.mmu.counters.as_dict())


def python_delivery(vcpu, s):
    """What the Python path does with the event (an exception it ends in counts as the outcome)."""
    try:
        return vcpu.delivery.deliver(s["vector"], s["return_eip"], s["error_code"], s["soft"], s["external"])
    except (DeliveryFault, TripleFault, Unsupported, RuntimeError) as e:
        return type(e).__name__


seen = {"delivered": 0, "fallback": 0, "peeked": 0}


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(s=scenario())
def test_c_delivery_equals_the_python_delivery(s):
    (ma, va), (mb, vb) = machines()
    set_up(ma, va, s)
    set_up(mb, vb, s)
    before = state(ma)
    assert before == state(mb)
    fast = va.delivery.fast
    for gva in (s["esp"] - 8, s["esp0"] - 12, IDT + s["idt_off"] + 8 * s["vector"], GDT + s["gdt_off"] + 0x18,
                TSS + s["tss_off"], MEM - 4, 0xFFFFFFF8):
        # the C reader of Mmu.fetch_bytes: the same bytes as the Python read when it answers, and no side effect
        peeked = fast.peek(gva, 12)
        if peeked is not None:
            seen["peeked"] += 1
            assert peeked == mb.mmu.fetch_bytes(gva, 12), f"peek at {gva:#x}"
    assert state(ma) == before
    delivered = fast.deliver(s["vector"], s["return_eip"], s["error_code"], s["soft"], s["external"])
    expect = python_delivery(vb, s)
    if delivered:
        seen["delivered"] += 1
        assert expect == s["vector"], f"C delivered what Python ends in {expect}"
        got, want = state(ma), state(mb)
        assert got[0] == want[0], f"registers differ:\n C {[hex(v) for v in got[0]]}\n Py {[hex(v) for v in want[0]]}"
        if got[1] != want[1]:
            diff = next(i for i in range(len(got[1])) if got[1][i] != want[1][i])
            pytest.fail(f"guest RAM differs first at {diff:#x}: C {got[1][diff:diff + 8].hex()} "
                        f"Python {want[1][diff:diff + 8].hex()}")
        assert got[2] == want[2], "walk counters differ"
    else:
        seen["fallback"] += 1
        assert state(ma) == before, "the C path fell back but changed something"
        assert python_delivery(va, s) == expect
        assert state(ma) == state(mb)


def test_both_outcomes_were_exercised():
    """The property above means little unless C both delivered and declined many times."""
    if seen["delivered"] + seen["fallback"] == 0:
        pytest.skip("run with the property test")
    assert seen["delivered"] >= 60 and seen["fallback"] >= 60 and seen["peeked"] >= 400, seen


@pytest.mark.parametrize("guest", ["nanobench", "usermode", "exceptions", "interrupts"])
def test_a_guest_runs_the_same_without_the_c_path(guest, tmp_path, monkeypatch):
    """Whole guests (system calls from ring 3, page faults, #DE, timer interrupts) under native with
    and without the C path (as when the extension is not built): the same console, virtual time,
    event counts (by reason) and MMU counters; with a trace (no C INTR or #PF hook then, the C delivery
    and iret hooks still) the same trace, byte for byte. And the C path did deliver most events (the
    #PFs from the fill hook among them) and answer the irets."""
    from cpuvirt.runner import run_guest
    fasts = []

    def run(trace=None):
        return run_guest(guest, "native", trace_path=trace and str(trace),
                         on_start=lambda hv: fasts.append(hv.vcpu.delivery.fast))
    with_c, traced_c = run(), run(tmp_path / "c.jsonl")
    monkeypatch.setattr(FastDelivery, "install", classmethod(lambda cls, delivery: None))
    without, traced = run(), run(tmp_path / "py.jsonl")
    assert fasts[2] is None and fasts[0] is not None
    events = sum(with_c.counts.get(k, 0) for k in ("exception", "interrupt", "page_fault"))
    assert fasts[0].delivered > 0.8 * events, (fasts[0].delivered, with_c.counts)
    if with_c.counts.get("interrupt", 0) > 100:           # the guests that make system calls
        assert fasts[0].soft_delivered > 100 and fasts[1].soft_delivered == 0
    if with_c.counts.get("exception", 0) > 100:           # nanobench's #DE loop
        assert fasts[0].faults_delivered > 100 and fasts[1].faults_delivered == 0
    if with_c.counts.get("page_fault", 0) > 100:        # nanobench's #PF loop: delivery_pf_hook (off with a trace)
        assert fasts[0].faults > 0.9 * with_c.counts["page_fault"] and fasts[1].faults == 0
    if guest == "nanobench":                              # every handler returns with iret
        assert fasts[0].irets > 10_000 and fasts[1].irets > 10_000
    for field in ("outcome", "status", "console", "icount", "vtime", "counts", "mmu", "tally"):
        assert getattr(with_c, field) == getattr(without, field), field
        assert getattr(traced_c, field) == getattr(traced, field), field
    assert (tmp_path / "c.jsonl").read_bytes() == (tmp_path / "py.jsonl").read_bytes()


def test_the_c_iret_hook_hands_nmi_unblocking_to_python():
    """An iret ends NMI blocking (SDM 6.7.1): the C iret hook answers an iret only while no NMI is
    blocked, and then the Python intercept's work is nothing; with an NMI blocked the Python hook runs
    and unblocks. Checked on the engine: one `iretd` at ring 0 returning to a `hlt`."""
    (m, vcpu), _ = machines()
    fast = vcpu.delivery.fast
    uc, regs = m.uc, m.regs
    for blocked in (True, False, True):
        regs.write(R.CR0, 0x11)
        uc.ctl(UC_CTL_TLB_FLUSH, UC_CTL_IO_WRITE)
        vcpu.faults.set_cpl(0)
        m.set_flat_protected_mode(0x500)
        m.write_gpa(0x1000, b"\xcf")                                  # iretd
        m.write_gpa(0x2000, b"\xf4")                                  # hlt
        m.write_gpa(0x8000, struct.pack("<III", 0x2000, 0x08, 0x2))   # the frame: EIP, CS, EFLAGS
        regs.write(R.ESP, 0x8000)
        if 0x1000 not in vcpu.intercepts.sites:
            vcpu.intercepts._hook(0x1000, 1, "iretd", "", b"\xcf")
        vcpu.nmi_blocked = blocked
        before = fast.irets
        uc.emu_start(0x1000, 0x3000)
        assert vcpu.error is None and regs.read(R.EIP) == 0x2001
        assert vcpu.nmi_blocked is False, "the iret did not end NMI blocking"
        assert fast.irets == before + (0 if blocked else 1), "the C hook answered an iret it must hand on"


def test_the_c_cr4_hook_hands_reserved_bits_to_python(monkeypatch):
    """A mov to CR4 is intercepted for the #GP the engine does not raise (a bit the CPU model lacks):
    the C hook lets the common write through with no Python, and hands a write setting a reserved bit
    (or a site whose bytes changed) to the Python gate. Checked on the engine: `mov cr4, eax; hlt`."""
    (m, vcpu), _ = machines()
    fast = vcpu.delivery.fast
    uc, regs = m.uc, m.regs
    gated = []
    monkeypatch.setattr(vcpu, "cr4_gate", lambda address, size, ops: gated.append((address, ops)))
    m.write_gpa(0x5000, b"\x0f\x22\xe0\xf4")                          # mov cr4, eax; hlt
    m.write_gpa(0x5100, b"\x0f\x22\xe3\xf4")                          # mov cr4, ebx; hlt
    for value, python in ((0x10, False), (0x90, False), (1 << 13, True), (0x10, False)):   # PSE, PGE, VMXE
        regs.write(R.CR0, 0x11)
        uc.ctl(UC_CTL_TLB_FLUSH, UC_CTL_IO_WRITE)
        vcpu.faults.set_cpl(0)
        m.set_flat_protected_mode(0x500)
        for site, reg in ((0x5000, R.EAX), (0x5100, R.EBX)):
            regs.write(R.CR4, 0)                                      # "newly set" bits are what count
            if site not in vcpu.intercepts.sites:
                vcpu.intercepts._hook(site, 3, "mov", "cr4, " + ("eax" if reg == R.EAX else "ebx"),
                                      bytes(m.read_gpa(site, 3)))
            regs.write(reg, value)
            before, seen = fast.cr4_passed(), len(gated)
            uc.emu_start(site, site + 0x10, count=2)
            assert vcpu.error is None
            assert (len(gated) - seen, fast.cr4_passed() - before) == ((1, 0) if python else (0, 1)), \
                (hex(value), hex(site), hex(regs.read(R.CR4)))
    m.write_gpa(0x5000, b"\x0f\x22\xe3")                              # the site's bytes changed: Python
    before, seen = fast.cr4_passed(), len(gated)
    regs.write(R.EBX, 0x10)
    uc.emu_start(0x5000, 0x5010, count=2)
    assert (len(gated) - seen, fast.cr4_passed() - before) == (1, 0)


# -- the guest #PF in C (delivery_pf_hook) against the Python path (Mmu.fill, the run loop) ----------------
D = 0x400000          # the data page of the accesses: in the second 4 MiB, mapped by PDE 1 (PT2 or a large page)
PT2, CODE, HANDLER = 0x12000, 0x1000, 0x3000
# (bytes, name): the faulting instruction, followed by hlt. {d8}/{d32} are filled with the scenario's
# displacement; the C path decodes the first group, Python decodes the rest (the C path declines).
ACCESSES = [
    ("8b43{d8}", "mov eax, [ebx+d8]"), ("890b", "mov [ebx], ecx"), ("0144b3{d8}", "add [ebx+esi*4+d8], eax"),
    ("0fb603", "movzx eax, byte [ebx]"), ("0fbf03", "movsx eax, word [ebx]"), ("ff33", "push dword [ebx]"),
    ("ff03", "inc dword [ebx]"), ("c705{d32}78563412", "mov dword [d32], imm"), ("66890b", "mov [ebx], cx"),
    ("870b", "xchg [ebx], ecx"), ("8f03", "pop dword [ebx]"), ("50", "push eax"), ("e800000000", "call next"),
    ("c3", "ret"), ("8b83{d32}", "mov eax, [ebx+d32]"), ("f733", "div dword [ebx]"), ("ffe3", "jmp ebx"),
    ("a1{d32}", "mov eax, moffs d32],"), ("a2{d32}", "mov moffs d32], al"), ("3e8b04{sib}", "mov eax, ds:[sib]"), ("800b01", "or byte [ebx], 1"), ("d123", "shl dword [ebx], 1"),
    ("f3a5", "rep movsd"), ("ad", "lodsd"), ("0fb10b", "cmpxchg [ebx], ecx"), ("f00103", "lock add [ebx], eax"),
    ("ff1b", "call far [ebx]"), ("ab", "stosd"),
]


@st.composite
def pf_scenario(draw):
    """Random paging (PDE 1 a page table or a 4 MiB page, random P/RW/US/A/D, a reserved bit, the table
    beyond RAM), CR0.WP, CR4.PSE, CPL 0 or 3, and one access near or on the page at D."""
    s = {}
    s["insn"] = draw(st.integers(0, len(ACCESSES) - 1))
    s["large"] = draw(st.booleans())
    s["pse"] = draw(st.booleans())
    s["pde"] = draw(st.integers(0, 0x7F)) | draw(st.sampled_from((0, 0, 0, 1 << 21)))
    s["pte"] = draw(st.integers(0, 0x7F))
    s["pt_outside"] = draw(st.sampled_from((False,) * 8 + (True,)))
    s["wp"] = draw(st.booleans())
    s["cpl3"] = draw(st.booleans())
    s["offset"] = draw(st.sampled_from((0, 4, 0x7FC, 0xFFC, 0xFFE, 0x1000, -2, -4, 0x2000)))
    s["d8"] = draw(st.sampled_from((0, 4, -4, 0x7C, -0x80)))
    s["d32"] = draw(st.sampled_from((0, 0x10, -0x10, 0x1000)))
    s["esi"] = draw(st.sampled_from((0, 1, D, D + 0xFFC, 0x50000)))
    s["edi"] = draw(st.sampled_from((0, D + 8, 0x50000)))
    s["esp"] = draw(st.sampled_from((0x50800,) * 4 + (D + 0x10, D + 0x1000, D + 2)))
    return s


def pf_set_up(m, vcpu, s):
    """The scenario on machine m: flat segments, every gate to a `hlt` at ring 0, the instruction at CODE."""
    uc, regs = m.uc, m.regs
    m.mmu.ram.buf[:0x500000] = bytes(0x500000)
    regs.write(R.CR0, 0x11)
    regs.write(R.CR4, 0)
    uc.ctl(UC_CTL_TLB_FLUSH, UC_CTL_IO_WRITE)
    uc.ctl_flush_tb()
    vcpu.faults.set_cpl(0)
    m.set_flat_protected_mode(0x500)
    m.write_gpa(GDT, struct.pack("<8Q", *DESCRIPTORS))
    uc.reg_write(R.GDTR, (0, GDT, 0x3F, 0))
    gate = struct.pack("<II", (CODE0 << 16) | HANDLER, 0xEE00)          # interrupt gate, DPL 3, present
    m.write_gpa(IDT, gate * 256)
    uc.reg_write(R.IDTR, (0, IDT, 0x7FF, 0))
    m.write_gpa(TSS + 4, struct.pack("<IH", STACK0 + 0x800, DATA0))
    uc.reg_write(R.TR, (0x40, TSS, 0x67, 0x8B00))
    m.write_gpa(HANDLER, b"\xf4")
    code, name = ACCESSES[s["insn"]]
    target = (D + s["offset"]) & 0xFFFFFFFF
    code = code.format(d8=struct.pack("<b", s["d8"]).hex(), d32=struct.pack("<i", (target + s["d32"]) & 0xFFFFFFFF
                                                                              if "d32]," in name or name.endswith("imm")
                                                                              else s["d32"]).hex(),
                       sib=bytes((0x33,)).hex())                        # [ebx+esi]
    m.write_gpa(CODE, bytes.fromhex(code) + b"\xf4")
    if s["cpl3"]:
        vcpu.faults.set_cpl(3)
        regs.write(R.SS, DATA3 | 3)
        regs.write(R.CS, CODE3 | 3)
    else:
        regs.write(R.SS, DATA0)
        regs.write(R.CS, CODE0)
    for reg, value in ((R.EAX, 7), (R.ECX, 3), (R.EDX, 0), (R.EBX, target), (R.ESI, s["esi"]),
                       (R.EDI, s["edi"]), (R.EBP, 0), (R.ESP, s["esp"]), (R.EFLAGS, 0x2), (R.EIP, CODE),
                       (R.CR2, 0)):
        regs.write(reg, value)
    m.write_gpa(STACK + 0x7F0, struct.pack("<4I", CODE, CODE, CODE, CODE))
    for page in range(0, 0x100000, 0x1000):                             # low 1 MiB: user, present, writable
        m.write_gpa(PT + 4 * (page >> 12), struct.pack("<I", page | 0x67))
    m.write_gpa(PD, struct.pack("<I", PT | 0x67))
    pt2 = MEM + 0x3000 if s["pt_outside"] else PT2
    if s["large"]:
        m.write_gpa(PD + 4, struct.pack("<I", (0x400000 | 0x80 | s["pde"]) & ~(0x1FE000 & ~(1 << 21))))
    else:
        m.write_gpa(PD + 4, struct.pack("<I", pt2 | (s["pde"] & ~0x80)))
    for i in range(3):                                                  # D - 1 page, D, D + 1 page... as drawn
        flags = s["pte"] if i == 0 else 0x67
        page = D + 0x1000 * i
        m.write_gpa(PT2 + 4 * ((page >> 12) & 0x3FF), struct.pack("<I", (page + 0x10000) | flags))
    m.write_gpa(PT2 + 4 * 0x3FF, struct.pack("<I", 0x4FF000 | s["pte"]))   # the page before D (D - 4 KiB)
    regs.write(R.CR3, PD)
    regs.write(R.CR4, 0x10 if s["pse"] else 0)
    regs.write(R.CR0, 0x80000011 | (0x10000 if s["wp"] else 0))
    uc.ctl(UC_CTL_TLB_FLUSH, UC_CTL_IO_WRITE)
    m.mmu.crs = None
    vcpu.outcome, vcpu.error = None, None
    vcpu.counts.clear()
    vcpu.reasons.clear()
    vcpu.budget = vcpu.clock.now + 100_000


_pf_machines = {}


def pf_machines():
    """Two more native machines: A with delivery_pf_hook on (as `cpuvirt run` has it without a trace),
    B with the Python path only."""
    if not _pf_machines:
        for side in "ab":
            m = Machine(MEM >> 20)
            hv = get_mode("native")(m)
            _pf_machines[side] = (m, hv.vcpu)
        a = _pf_machines["a"][1]
        a.delivery.fast.install_intr(a)
        assert a.delivery.fast._state.pf_enabled, "the C #PF path did not find its way into this libunicorn"
        _pf_machines["b"][1].delivery.fast = None
        _pf_machines["b"][0].mmu.peek = None
    return _pf_machines["a"], _pf_machines["b"]


pf_seen = {"c": 0, "python": 0, "pf": 0}


def pf_run(m, vcpu):
    """Run from CODE to the hlt the handler (or the instruction's end) halts at; the state after it."""
    regs = m.regs
    now, counters = vcpu.clock.now, m.mmu.counters.as_dict()
    outcome = vcpu.run(CODE)
    after = m.mmu.counters.as_dict()
    return ([regs.read(r) for r in REGS], bytes(m.mmu.ram.buf[:0x500000]), (outcome.kind, outcome.message),
            vcpu.clock.now - now, {k: after[k] - counters[k] for k in after}, dict(vcpu.counts), dict(vcpu.reasons))


@settings(max_examples=500, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(s=pf_scenario())
def test_c_page_fault_equals_the_python_page_fault(s):
    """The same access on both machines, run by the vCPU's own loop: registers (CR2 among them), RAM
    (the frame, A/D bits), the outcome, virtual time, the MMU's counters and the event counts equal."""
    (ma, va), (mb, vb) = pf_machines()
    pf_set_up(ma, va, s)
    pf_set_up(mb, vb, s)
    assert state(ma)[:2] == state(mb)[:2]
    faults = va.delivery.fast.faults
    got, want = pf_run(ma, va), pf_run(mb, vb)
    assert va.error is None and vb.error is None
    pf_seen["c" if va.delivery.fast.faults > faults else "python"] += 1
    pf_seen["pf"] += bool(want[5].get("page_fault"))
    assert got[0] == want[0], f"registers differ:\n C {[hex(v) for v in got[0]]}\n Py {[hex(v) for v in want[0]]}"
    if got[1] != want[1]:
        diff = next(i for i in range(len(got[1])) if got[1][i] != want[1][i])
        pytest.fail(f"guest RAM differs first at {diff:#x}: C {got[1][diff:diff + 8].hex()} "
                    f"Python {want[1][diff:diff + 8].hex()}")
    assert got[2:] == want[2:]


def test_both_page_fault_paths_were_exercised():
    """The property above means little unless the C path delivered many #PFs and declined others."""
    if pf_seen["c"] + pf_seen["python"] == 0:
        pytest.skip("run with the property test")
    assert pf_seen["c"] >= 100 and pf_seen["pf"] - pf_seen["c"] >= 50, pf_seen


# -- hw under EPT: the same C delivery with every guest-physical reference through EPT ----------------------
_ept_machines = {}


def ept_machines():
    """Two native machines whose MMU walks through EPT (hw's EptWalk over RAM mapped read/write/execute,
    as VmxCpu maps it): A with the C delivery over the same tables (FastDelivery.install_ept), B Python."""
    if not _ept_machines:
        from cpuvirt.engine.hostmem import HostRegion, HvAllocator
        from cpuvirt.memory.ept import Ept
        from cpuvirt.memory.nested import EptWalk
        from cpuvirt.memory.p2m import HV_HPA, RAM_HPA
        for side in "ab":
            m = Machine(MEM >> 20)
            hv = get_mode("native")(m)
            region = HostRegion(m.uc, HV_HPA, 1 << 20)
            ept = Ept(region, HvAllocator(region))
            ept.map_range(0, RAM_HPA, MEM)
            m.mmu.strategy = EptWalk(m.mmu, ept)
            m.mmu.counters.fast._state.enabled = 0        # native's C fill walks without EPT: off, as under hw
            m.mmu.peek = None
            hv.vcpu.delivery.fast = None
            m.mmu.counters.walkers.clear()
            _ept_machines[side] = (m, hv.vcpu, ept, region)
        a = _ept_machines["a"]
        assert isinstance(FastDelivery.install_ept(a[1].delivery, a[2]), FastDelivery)
    return _ept_machines["a"], _ept_machines["b"]


ept_seen = {"delivered": 0, "fallback": 0}


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(s=scenario(), hole=st.sampled_from((None,) * 3 + (IDT, TSS, STACK, STACK + 0x1000, STACK0, STACK0 + 0x1000)),
       perms=st.sampled_from((0, 1, 5, 3)))
def test_c_delivery_under_ept_equals_the_python_delivery(s, hole, perms):
    """As above, with the walks through EPT and, now and then, one page that EPT maps with fewer rights
    (none, read, read+execute) or write-only (a misconfiguration): registers, RAM and the walk counters
    (EPT's references among them) equal when C delivers; nothing changed when it declines. (Not the
    GDT's page nor the guest's page tables: the engine's own descriptor reads for the segment loads,
    here outside a run, would then be refused where only a running engine can report it.)"""
    from cpuvirt.memory.p2m import RAM_HPA
    (ma, va, ea, _), (mb, vb, eb, _) = ept_machines()
    set_up(ma, va, s)
    set_up(mb, vb, s)
    for ept in (ea, eb):
        if hole is not None:
            ept.write_entry(hole, (RAM_HPA + hole) | perms)
    try:
        before = state(ma)
        assert before == state(mb)
        delivered = va.delivery.fast.deliver(s["vector"], s["return_eip"], s["error_code"], s["soft"], s["external"])
        expect = python_delivery(vb, s)
        if delivered:
            ept_seen["delivered"] += 1
            assert expect == s["vector"], f"C delivered what Python ends in {expect}"
            got, want = state(ma), state(mb)
            assert got[0] == want[0], f"registers differ:\n C {[hex(v) for v in got[0]]}\n Py {[hex(v) for v in want[0]]}"
            assert got[1] == want[1], "guest RAM differs"
            assert got[2] == want[2], f"walk counters differ: C {got[2]} Python {want[2]}"
        else:
            ept_seen["fallback"] += 1
            assert state(ma) == before, "the C path fell back but changed something"
            assert python_delivery(va, s) == expect
            assert state(ma) == state(mb)
    finally:
        for ept in (ea, eb):
            if hole is not None:
                ept.write_entry(hole, (RAM_HPA + hole) | 7)


def test_both_ept_outcomes_were_exercised():
    if ept_seen["delivered"] + ept_seen["fallback"] == 0:
        pytest.skip("run with the property test")
    assert ept_seen["delivered"] >= 40 and ept_seen["fallback"] >= 40, ept_seen
