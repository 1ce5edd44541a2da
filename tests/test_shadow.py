"""Shadow paging (memory/shadow.py) and write traces (memory/traces.py): the shadow gives the guest walk's
answers, stays coherent when the guest writes its page tables, tells hidden from true faults, reuses
cached roots; hw --no-ept runs on it as KVM without EPT does."""
import json
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cpuvirt.cpu.vcpu import Vcpu
from cpuvirt.engine import regs as R
from cpuvirt.machine.machine import Machine
from cpuvirt.memory.mmu import GUEST, GuestWalk
from cpuvirt.memory.shadow import GuestStoreFault, ShadowPaging
from cpuvirt.memory.traces import TracedWrite, TraceError
from cpuvirt.runner import run_guest
from cpuvirt.toolchain.build import list_guests
from cpuvirt.x86.flags import CR0_PG, CR0_WP, CR4_PGE, CR4_PSE, EFLAGS_DF

PE_PG = CR0_PG | 1
PD1, PD2, PT_BASE = 0x100000, 0x101000, 0x102000      # property tests: 2 directories, 4 page tables


# -- the shadow answers as the walk does (property) ----------------------------------------------------
class _Crs:
    def __init__(self):
        self.cr0, self.cr3, self.cr4 = PE_PG | CR0_WP, PD1, CR4_PSE

    def __call__(self):
        return self.cr0, self.cr3, self.cr4


def _pair():
    """Two machines with the same memory: A walks directly (native), B through the shadow."""
    a, b = Machine(4), Machine(4)
    crs = _Crs()
    for m in (a, b):
        m.mmu.crs_source = crs
    shadow = ShadowPaging(b.mmu)
    assert isinstance(a.mmu.strategy, GuestWalk)
    return a, b, shadow, crs


# Entry flags P RW US PWT PCD A D PS G, present 3 times in 4; a small space (2 directories x 2 PDEs,
# 2 page tables x 2 PTEs) so that accesses, rewrites of the same entry and re-accesses meet often.
_flags = st.tuples(st.integers(0, 0x1FE), st.integers(0, 3)).map(lambda t: t[0] | (t[1] != 0))
_entry = st.tuples(st.integers(0, 1), _flags, st.integers(0, 15))     # (page table or frame, flags, frame)
_op = st.one_of(
    st.tuples(st.just("access"), st.integers(0, 1), st.integers(0, 1), st.integers(0, 2), st.booleans()),
    st.tuples(st.just("access"), st.integers(0, 1), st.integers(0, 1), st.integers(0, 2), st.booleans()),
    st.tuples(st.just("pde"), st.integers(0, 1), st.integers(0, 1), _entry),
    st.tuples(st.just("pte"), st.integers(0, 1), st.integers(0, 1), _entry),
    st.tuples(st.just("cr3"), st.integers(0, 1)),
    st.tuples(st.just("wp"), st.booleans()),
    st.tuples(st.just("pse"), st.booleans()),
)


def _pde_value(e):
    table, flags, frame = e
    if flags & 0x80:                  # a 4 MiB page
        return (frame << 22) | flags
    return (PT_BASE + table * 0x1000) | (flags & 0x7F)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pdes=st.lists(_entry, min_size=4, max_size=4), ptes=st.lists(_entry, min_size=4, max_size=4),
       ops=st.lists(_op, min_size=30, max_size=80))
def test_shadow_translations_equal_the_guest_walk(pdes, ptes, ops):
    a, b, shadow, crs = _pair()

    def store(addr, value):
        for m in (a, b):
            m.write_gpa(addr, struct.pack("<I", value))
        b.mmu.traces.hv_wrote(0, addr, 4)         # as Mmu.write_linear reports a store it made

    def set_pde(d, i, e):
        store((PD1, PD2)[d] + 4 * i, _pde_value(e))

    def set_pte(t, i, e):
        store(PT_BASE + t * 0x1000 + 4 * i, (e[2] << 12) | (e[1] & 0x17F))

    for n, e in enumerate(pdes):
        set_pde(n >> 1, n & 1, e)
    for n, e in enumerate(ptes):
        set_pte(n >> 1, n & 1, e)
    for op in ops:
        a.mmu.crs = b.mmu.crs = None
        if op[0] == "access":
            _, di, ti, access, user = op
            gva = (di << 22) | (ti << 12) | 0x123
            ra = a.mmu.strategy.gva_to_gpa(gva, access, user, GUEST)
            rb = shadow.gva_to_gpa(gva, access, user, GUEST)
            assert ra[0] == rb[0], (op, ra, rb)                 # the same page, or a fault ...
            if ra[0] is None:
                assert ra[1] == rb[1], (op, ra, rb)             # ... with the same error code
            elif access == 1:
                assert bool(ra[1]) == bool(rb[1]), (op, ra, rb)
            else:
                # Write permission on a read fill: never more than the walk grants. It may be less
                # when another 4 KiB page of the same 4 MiB page set D meanwhile (the entry keeps the
                # D it was walked with, as a TLB does); the write then misses and walks.
                assert bool(rb[1]) <= bool(ra[1]), (op, ra, rb)
        elif op[0] == "pde":
            set_pde(op[1], op[2], op[3])
        elif op[0] == "pte":
            set_pte(op[1], op[2], op[3])
        elif op[0] == "cr3":
            crs.cr3 = (PD1, PD2)[op[1]]
            shadow.on_cr3_write(crs.cr3)
        elif op[0] == "wp":
            crs.cr0 = PE_PG | (CR0_WP if op[1] else 0)
        elif op[0] == "pse":
            crs.cr4 = CR4_PSE if op[1] else 0
    # The A/D bits both set in the guest's tables are the same too.
    assert a.read_gpa(PD1, 0x6000) == b.read_gpa(PD1, 0x6000)


def test_root_cache_reuse_and_eviction():
    a, b, shadow, crs = _pair()
    shadow.max_roots = 2
    dirs = [PD1, PD2, 0x106000]
    for d in dirs:       # each directory maps 0-4 MiB with one 4 MiB page
        b.write_gpa(d, struct.pack("<I", 0x83 | 0x20))
    c = shadow.counters

    def touch(d):
        crs.cr3 = d
        shadow.on_cr3_write(d)
        b.mmu.crs = None
        assert shadow.gva_to_gpa(0x5123, 0, False, GUEST)[0] == 0x5123

    touch(PD1)
    touch(PD2)
    assert (c.root_misses, c.hidden_faults) == (2, 2)
    touch(PD1)                       # cached: no walk
    assert (c.root_hits, c.hidden_faults, c.shadow_hits) == (1, 2, 1)
    touch(0x106000)                  # a third space evicts the least recently used (PD2)
    assert c.root_evictions == 1 and list(shadow.roots) == [PD1, 0x106000]
    touch(PD2)                       # evicted: walked again
    assert c.hidden_faults == 4 and c.root_misses == 4


def test_paging_mode_change_drops_the_shadow_but_wp_and_pge_keep_it():
    """CR0.WP and CR4.PGE do not change what a shadow entry holds (WP is applied per lookup): toggling
    them keeps the tables (kvm-unit-tests' vmexit toggles them millions of times); CR4.PSE does not."""
    _, b, shadow, crs = _pair()
    b.write_gpa(PD1, struct.pack("<I", 0x81 | 0x20))  # a read-only 4 MiB page (P, PS, A)
    assert shadow.gva_to_gpa(0x1000, 0, False, GUEST)[0] == 0x1000
    assert shadow.roots[PD1].entries and PD1 in b.mmu.traces
    assert shadow.gva_to_gpa(0x1000, 1, False, GUEST)[0] is None  # WP = 1: a supervisor write is refused
    crs.cr0 = PE_PG  # CR0.WP cleared: the same entry
    b.mmu.crs = None
    faults = shadow.counters.hidden_faults
    assert shadow.gva_to_gpa(0x1000, 0, False, GUEST)[0] == 0x1000
    assert shadow.counters.hidden_faults == faults
    assert shadow.tlb_flush(wp_set=True) is False  # no write was let through by WP = 0 yet
    assert shadow.gva_to_gpa(0x1000, 1, False, GUEST)[0] == 0x1000  # WP = 0: the write goes through
    faults = shadow.counters.hidden_faults
    assert shadow.tlb_flush(wp_set=True) is True  # setting WP again must flush the engine's TLB
    crs.cr4 = CR4_PSE | CR4_PGE
    b.mmu.crs = None
    assert shadow.gva_to_gpa(0x1000, 0, False, GUEST)[0] == 0x1000
    assert shadow.counters.hidden_faults == faults
    assert shadow.tlb_flush(wp_set=False) is False  # nothing unsynchronised: no engine flush needed
    assert shadow.counters.root_misses == 1
    crs.cr4 = CR4_PGE  # PSE cleared: the walk rules changed, every table goes
    b.mmu.crs = None
    shadow.gva_to_gpa(0x1000, 0, False, GUEST)
    assert shadow.counters.root_misses == 2


# -- traces -----------------------------------------------------------------------------------------------
def test_trace_dispatch_order_and_a_write_nobody_completes():
    m = Machine(2)
    seen = []

    def code_owner(tw):                  # the translator: drops its translations, untraces
        seen.append(("code", tw.done))
        m.mmu.traces.untrace_frame(0x5000, "code")
        return False

    def emulator(tw):
        seen.append(("pt", tw.done))
        return not tw.done

    m.mmu.traces.trace_frame(0x5000, "code", code_owner)
    m.mmu.traces.trace_frame(0x5000, "pt", emulator)
    tw = TracedWrite(0x5004, 0x5004, eip=0x100000)
    m.mmu.traces.dispatch(tw)
    assert tw.done and seen == [("code", False), ("pt", False)]
    m.mmu.traces.trace_frame(0x6000, "code", lambda tw: False)     # a buggy owner: neither emulates nor untraces
    with pytest.raises(TraceError, match="no owner"):
        m.mmu.traces.dispatch(TracedWrite(0x6000, 0x6000, eip=0x100000))


# -- coherence through the engine: a guest writes its own page tables -----------------------------------
CODE, DATA, STACK, PD, PT0 = 0x100000, 0x120000, 0x130000, 0x200000, 0x201000
X, FRAME_A, FRAME_B, FRAME_C = 0x300000, 0x310000, 0x311000, 0x312000
PTE_X = PT0 + 4 * (X >> 12)

COHERENCE = f"""
    mov eax, dword ptr [{X:#x}]
    mov dword ptr [{DATA:#x}], eax
    mov dword ptr [{PTE_X:#x}], {FRAME_B | 3:#x}
    mov eax, dword ptr [{X:#x}]
    mov dword ptr [{DATA + 4:#x}], eax
    mov ecx, {FRAME_C | 3:#x}
    xchg dword ptr [{PTE_X:#x}], ecx
    mov dword ptr [{DATA + 8:#x}], ecx
    mov eax, dword ptr [{X:#x}]
    mov dword ptr [{DATA + 12:#x}], eax
    mov edi, {PTE_X:#x}
    mov eax, {FRAME_A | 3:#x}
    stosd
    mov dword ptr [{DATA + 20:#x}], edi
    mov eax, dword ptr [{X:#x}]
    mov dword ptr [{DATA + 16:#x}], eax
    mov edi, {PTE_X:#x}
    mov eax, {FRAME_B | 3:#x}
    mov ecx, 1
    rep stosd
    mov eax, dword ptr [{X:#x}]
    mov dword ptr [{DATA + 24:#x}], eax
    mov dword ptr [{PTE_X:#x}], {FRAME_C | 3:#x}
    mov eax, {X:#x}
    invlpg [eax]
    mov eax, dword ptr [{X:#x}]
    mov dword ptr [{DATA + 28:#x}], eax
    mov eax, cr3
    mov cr3, eax
    mov eax, dword ptr [{X:#x}]
    and dword ptr [{PTE_X:#x}], 0xFFFFFFDF
    pushfd
    pop dword ptr [{DATA + 32:#x}]
    mov eax, dword ptr [{PTE_X:#x}]
    mov dword ptr [{DATA + 36:#x}], eax
    xor eax, eax
    out 0xf4, al
"""


def run_direct(source: str):
    """The guest code at CODE on a bare machine with paging on, under shadow paging; invlpg and
    mov-to-CR3 are told to the shadow as a trap-and-emulate hypervisor would."""
    from cpuvirt.toolchain.assemble import new_keystone
    code = bytes(new_keystone().asm(source, CODE)[0])
    m = Machine(8)
    vcpu = Vcpu(m)
    vcpu.install_hooks()
    shadow = ShadowPaging(m.mmu)
    shadow.attach(vcpu)
    from cpuvirt.x86.faultaddr import operand_address

    def on_hit(address, size, mnem, ops):
        if mnem == "invlpg":
            shadow.invlpg(operand_address(m.mmu.fetch_bytes(address, 15), address, m.regs))
        elif ops.startswith("cr3,"):
            shadow.on_cr3_write(m.regs.read(getattr(R, ops.split(",")[1].strip().upper())))
    vcpu.enable_intercepts(frozenset(("invlpg", "mov")), on_hit)
    m.debug_exit.on_exit = lambda v: vcpu.finish("exit", v)
    m.write_gpa(CODE, code)
    m.write_gpa(PD, struct.pack("<I", PT0 | 3))
    m.write_gpa(PT0, b"".join(struct.pack("<I", (i << 12) | 3) for i in range(1024)))
    for frame, marker in ((FRAME_A, 0xAAAA0001), (FRAME_B, 0xBBBB0002), (FRAME_C, 0xCCCC0003)):
        m.write_gpa(frame, struct.pack("<I", marker))
    m.write_gpa(PTE_X, struct.pack("<I", FRAME_A | 3))
    m.set_flat_protected_mode(0x500)
    m.regs.write(R.ESP, STACK)
    m.regs.write(R.CR3, PD)
    m.regs.write(R.CR0, 0x80010011)
    out = vcpu.run(CODE)
    return m, shadow, out


def test_guest_page_table_writes_are_traced_emulated_and_coherent():
    m, shadow, out = run_direct(COHERENCE)
    assert (out.kind, out.status) == ("exit", 0), out.message
    r = struct.unpack("<10I", m.read_gpa(DATA, 40))
    assert r[0] == 0xAAAA0001                      # frame A through X
    assert r[1] == 0xBBBB0002                      # mov to the PTE: emulated; the shadow followed it
    assert r[2] & ~0x60 == FRAME_B | 3             # xchg gave back the old PTE (A/D as the walk set them)
    assert r[3] == 0xCCCC0003                      # ... and mapped frame C
    assert r[4] == 0xAAAA0001 and r[5] == PTE_X + 4   # stosd: emulated, EDI advanced
    assert r[6] == 0xBBBB0002                      # rep stosd: not emulated; zapped, re-executed natively
    assert r[7] == 0xCCCC0003                      # unsynchronised frame: a native store, then invlpg
    assert not r[8] & 0x40 and r[9] == FRAME_C | 3 | 0x40 & r[9]   # and: ZF clear, A cleared in the PTE
    c = shadow.counters
    assert (c.ptemods, c.ptemod_fallbacks, c.true_faults) == (4, 1, 0)   # mov, xchg, stosd, and; rep stosd
    assert c.hidden_faults >= 6 and c.cr3_switches == 1 and c.invlpgs == 1
    assert sum(shadow.traced_writes.values()) == 5 and len(shadow.traced_writes) == 5
    assert PT0 in m.mmu.traces and "PTE@" in shadow.dump()


def test_guest_store_keeps_the_shadow_coherent_and_faults_like_the_guest():
    _, b, shadow, crs = _pair()
    crs.cr4 = 0
    b.write_gpa(PD1, struct.pack("<I", PT_BASE | 3))
    pt = [(i << 12) | 3 for i in range(1024)]
    pt[0x200] = 0x300000 | 1                       # 0x200000 is read-only
    b.write_gpa(PT_BASE, struct.pack("<1024I", *pt))
    assert shadow.gva_to_gpa(0x5000, 0, False, GUEST)[0] == 0x5000      # PT_BASE is now traced
    assert PT_BASE in b.mmu.traces
    shadow.guest_store(PT_BASE + 4 * 5, 4, 0x7000 | 3)                   # remap 0x5000 -> 0x7000
    b.mmu.crs = None
    assert shadow.gva_to_gpa(0x5000, 0, False, GUEST)[0] == 0x7000
    with pytest.raises(GuestStoreFault) as e:
        shadow.guest_store(0x200010, 4, 1)          # CR0.WP: a supervisor write to a read-only page
    assert e.value.error_code == 3 and e.value.gva == 0x200010
    assert shadow.counters.guest_stores == 1


# -- hw --no-ept -------------------------------------------------------------------------------------------
def test_hw_no_ept_controls_are_kvm_shadow_paging():
    from cpuvirt.modes.hw import HwMode
    from cpuvirt.modes.hw.vmcs import Field
    hw = HwMode(Machine(8), ept=False)
    cpu = hw.vcpu
    for name, on in (("enable_ept", False), ("cr3_load_exiting", True), ("cr3_store_exiting", True),
                     ("invlpg_exiting", True)):
        assert cpu.ctl(name) is on, name
    assert cpu.vmcs.vmread(Field.EXCEPTION_BITMAP) >> 14 & 1
    assert cpu.vmcs.vmread(Field.CR0_GUEST_HOST_MASK) & CR0_WP
    assert isinstance(cpu.mmu.strategy, ShadowPaging) and cpu.shadow.exit_on_miss
    assert not HwMode(Machine(8)).vcpu.ctl("cr3_load_exiting")      # with EPT: no CR3 exits
    same = HwMode(Machine(8), vmx=["enable_ept=0", "invlpg_exiting=0"]).vcpu     # = --no-ept, then overrides
    assert same.shadow is not None and same.ctl("cr3_load_exiting") and not same.ctl("invlpg_exiting")


def test_hw_no_ept_hidden_true_and_ptemod_exits(tmp_path):
    trace = tmp_path / "p.jsonl"
    res = run_guest("paging", "hw", trace_path=str(trace), mode_options={"ept": False})
    assert (res.outcome, res.status) == ("exit", 0), res.message
    native = tmp_path / "n.jsonl"
    run_guest("paging", trace_path=str(native))
    events = [json.loads(l) for l in trace.read_text().splitlines()]
    pf = [e for e in events if e.get("kind") == "vmexit" and e["reason"] == "EXCEPTION_NMI"
          and e["detail"].get("vector") == 14]
    by = {k: [e for e in pf if e["detail"].get("fault") == k] for k in ("hidden", "true", "ptemod")}
    sh = res.mmu["shadow"]
    assert len(pf) == sum(len(v) for v in by.values())
    assert (len(by["hidden"]), len(by["true"]), len(by["ptemod"])) == (
        sh["hidden_faults"], sh["true_faults"], sh["ptemods"])
    # The true faults are exactly the #PFs the guest sees natively, with its CR2 and error code.
    nat = [json.loads(l) for l in native.read_text().splitlines()]
    nat_pf = [(e["detail"]["cr2"], e["detail"]["error_code"]) for e in nat if e.get("kind") == "page_fault"]
    assert [(e["detail"]["linear_address"], e["detail"]["guest_error_code"]) for e in by["true"]] == nat_pf
    assert by["hidden"] and by["ptemod"]
    assert sh["root_hits"] >= 1 and sh["cr3_switches"] >= 2
    reasons = {e["reason"] for e in events if e.get("kind") == "vmexit"}
    assert {"INVLPG", "CR_ACCESS"} <= reasons and "EPT_VIOLATION" not in reasons


@pytest.mark.parametrize("guest", [g.name for g in list_guests()])
def test_every_bundled_guest_in_hw_no_ept_gives_the_native_console(guest, tmp_path):
    if guest == "nanobench":             # the same kernel with 500 iterations per benchmark (not 5000)
        from cpuvirt.toolchain.build import guest_source_dir, include_dir
        from cpuvirt.toolchain.image import build_image
        from cpuvirt.toolchain.preprocess import preprocess
        pre = preprocess(guest_source_dir() / "nanobench.S", {"N_ITER": 500, "PV": 0}, [include_dir()])
        guest = str(tmp_path / "nanobench.bin")
        (tmp_path / "nanobench.bin").write_bytes(build_image(pre.lines)[0])
    from tests.guest_args import RUN_ARGS, run_kwargs
    kwargs = run_kwargs(guest) if "devices" in RUN_ARGS.get(guest, {}) else {}   # netdemo needs its NIC
    res = run_guest(guest, "hw", mode_options={"ept": False}, **kwargs)
    assert (res.outcome, res.status) == ("exit", 0), (res.outcome, res.message)
    assert res.console == run_guest(guest, **kwargs).console


# -- the store emulator agrees with the engine ---------------------------------------------------------
_FORMS = ["mov dword ptr [ebx + 8], ecx", "mov byte ptr [ebx], 0x7f", "mov word ptr [ebx + 2], cx",
          "or dword ptr [ebx], ecx", "lock or dword ptr [ebx], 0x20", "and dword ptr [ebx + 4], 0xfffffffd",
          "xor byte ptr [ebx + 1], cl", "xchg dword ptr [ebx], ecx", "lock cmpxchg dword ptr [ebx], ecx",
          "cmpxchg byte ptr [ebx + 3], cl", "stosd", "stosb", "stosw"]


@settings(max_examples=150, deadline=None)
@given(form=st.sampled_from(_FORMS), eax=st.integers(0, 0xFFFFFFFF), ecx=st.integers(0, 0xFFFFFFFF),
       mem=st.binary(min_size=16, max_size=16), df=st.booleans(), same=st.booleans())
def test_emulate_store_matches_the_engine(form, eax, ecx, mem, df, same):
    from unicorn import UC_ARCH_X86, UC_MODE_32, Uc

    from cpuvirt.toolchain.assemble import new_keystone
    from cpuvirt.x86.emulate import emulate_store
    if same:                               # cmpxchg: make the comparison succeed sometimes
        mem = eax.to_bytes(4, "little") + mem[4:]
    code = bytes(new_keystone().asm(form, 0x1000)[0])
    ucs = []
    for _ in range(2):
        uc = Uc(UC_ARCH_X86, UC_MODE_32)
        uc.mem_map(0, 0x10000)
        uc.mem_write(0x1000, code)
        uc.mem_write(0x2000, mem)
        for reg, v in ((R.EAX, eax), (R.ECX, ecx), (R.EBX, 0x2000), (R.EDI, 0x2004),
                       (R.EFLAGS, 0x2 | (EFLAGS_DF if df else 0))):
            uc.reg_write(reg, v)
        ucs.append(uc)
    ucs[0].emu_start(0x1000, 0x1000 + len(code))
    regs = R.Regs(ucs[1])

    def read(gva, size):
        return int.from_bytes(ucs[1].mem_read(gva, size), "little")

    def write(gva, size, value):
        ucs[1].mem_write(gva, value.to_bytes(size, "little"))

    length, *_ = emulate_store(code, 0x1000, regs, read, write)
    assert length == len(code)
    assert ucs[0].mem_read(0x2000, 16) == ucs[1].mem_read(0x2000, 16)
    for reg in (R.EAX, R.ECX, R.EDI):
        assert ucs[0].reg_read(reg) == ucs[1].reg_read(reg), form
    flags = 0x8D5 & ~0x10 if form.split()[0] in ("or", "and", "xor", "lock") and "cmpxchg" not in form else 0x8D5
    assert ucs[0].reg_read(R.EFLAGS) & flags == ucs[1].reg_read(R.EFLAGS) & flags, form
