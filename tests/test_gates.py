"""Privilege-changing control transfers are decided by cpuvirt, never by the engine (cpu/tasks.py).

tests/guests/gates.S writes call gates, TSS descriptors and an IDT task gate into its own tables and
uses them from ring 0 and ring 3, returns with iret/NT, tries iretd with EFLAGS.VM = 1 from ring 3
and enters V86 mode from ring 0 (QEMU 7.2 TCG passes all but the VM=1 iretd at CPL 3, which it
honours: the SDM ignores VM there, and cpuvirt follows the SDM). Before cpu/tasks.py the engine performed these itself: the host
process died with SIGABRT (a call gate needing a TSS stack) or the run ended "unsupported" (status 1),
and under trap a ring-0 task reached real CPL 0. Every mode must now run it exactly as native does;
under deprivileging the code that believes it runs at CPL 0 reads the guest's CR0, never the
hypervisor's (which it would see at real ring 0).
"""
from __future__ import annotations

import pytest

from cpuvirt.runner import run_guest
from tests.conftest import requires_qemu

MODES = ("native", "hw", "trap", "full")


@pytest.fixture(scope="module")
def gates(test_guest):
    return str(test_guest("gates"))


@pytest.mark.parametrize("mode", MODES)
def test_gates_and_task_switches_run_as_on_hardware(gates, mode):
    r = run_guest(gates, mode, max_insns=20_000_000)
    console = r.console.decode()
    assert "FAIL" not in console, console
    assert console.count("PASS") == 26, console
    assert (r.outcome, r.status) == ("exit", 0), r.message


def test_gates_console_is_identical_in_every_mode(gates):
    outs = {m: run_guest(gates, m, max_insns=20_000_000).console for m in MODES}
    assert len(set(outs.values())) == 1


def test_deprivileged_task_never_runs_at_real_ring_0(gates, monkeypatch):
    """The real CPL right after every task switch under trap and full: ring 1 or 3, never 0."""
    from cpuvirt.engine import regs as R
    from cpuvirt.cpu import tasks
    seen = []
    inner = tasks.switch_task

    def spy(view, *a, **k):
        inner(view, *a, **k)
        seen.append(view.regs.read(R.CS) & 3)

    monkeypatch.setattr(tasks, "switch_task", spy)
    for mode in ("trap", "full"):
        seen.clear()
        r = run_guest(gates, mode, max_insns=20_000_000)
        assert r.status == 0, r.console.decode()
        assert len(seen) == 10 and set(seen) == {1, 3}, (mode, seen)


@pytest.mark.parametrize("mode", MODES)
def test_tss_outside_ram_is_a_guest_fault(test_guest, mode):
    """Item 6: a TSS whose base lies outside RAM, then `int 0x80` from ring 3. Unbacked memory reads
    all-ones, so SS0 = 0xFFFF: #TS, whose delivery needs that stack again (#DF), then a triple
    fault, as on hardware; it used to end as an internal error (status 1)."""
    r = run_guest(str(test_guest("tss_outside")), mode, max_insns=5_000_000)
    assert (r.outcome, r.status) == ("triple_fault", 125), r.message
    assert "#TS while delivering #DF" in r.message


@pytest.mark.parametrize("mode", MODES)
def test_io_permission_bitmap_and_cr4_reserved_bits(test_guest, mode):
    """cpu/ioperm.py: ring 3 with IOPL 0 may use exactly the ports its TSS I/O bitmap grants (the
    engine checks nothing: native and hw used to perform them all, trap and full to refuse them
    all, then to drop a granted one after the gate let it through: the COM1 LSR read now checks the
    value); a CR4 bit the CPU model lacks (LA57) raises #GP; mov from cr0 and hlt at ring 3 raise #GP
    (hw used to emulate the read, or take a HLT exit). QEMU runs this guest the same way."""
    r = run_guest(str(test_guest("ioperm")), mode, max_insns=20_000_000)
    console = r.console.decode()
    assert "FAIL" not in console and console.count("PASS") == 9, console
    # the granted accesses were performed (trap and full used to drop a granted one above IOPL)
    assert "unhandled_io" not in r.counts, r.counts
    assert "X" not in console.replace("EXPECT", "")          # the denied out never reached COM1
    assert (r.outcome, r.status) == ("exit", 0)


def test_para_iretd_with_vm_does_not_enter_v86(test_guest):
    """Item 4 (para): the engine honours EFLAGS.VM in an iretd image at any CPL, and from V86 mode
    `int 0x82` used to pass as a kernel hypercall (its CS RPL was not 3). VM is honoured only at
    CPL 0, which a PV guest never has: tests/guests/pv_v86.S's ring-1 iretd with VM = 1 must return
    in protected mode (the run used to crash the domain executing garbage as 16-bit code)."""
    r = run_guest(str(test_guest("pv_v86")), "para", max_insns=1_000_000)
    console = r.console.decode()
    assert console.count("PASS") == 3 and "FAIL" not in console, console
    assert (r.outcome, r.status) == ("exit", 0), r.message


def _build(tmp_path, name: str, **defines) -> str:
    from cpuvirt.toolchain.build import include_dir
    from cpuvirt.toolchain.image import build_image
    from cpuvirt.toolchain.preprocess import preprocess
    from tests.conftest import TEST_GUESTS
    pre = preprocess(TEST_GUESTS / f"{name}.S", {k: "1" for k in defines}, [include_dir()])
    path = tmp_path / f"{name}-{'-'.join(defines)}.bin"
    path.write_bytes(build_image(pre.lines)[0])
    return str(path)


@pytest.mark.parametrize("mode", MODES)
def test_call_gate_needing_an_unusable_tss(tmp_path, mode):
    """Item 1's first finding: a call gate the guest wrote, called from ring 3 when the TSS cannot
    give a stack (here it lies outside RAM: SS0 reads 0xFFFF). The engine performed such calls itself
    (SIGABRT with a null TR, an internal error here); cpuvirt checks the stack as hardware does:
    #TS, whose delivery needs the same stack (#DF), then shutdown. From ring 0 the same gate works."""
    r = run_guest(_build(tmp_path, "tss_outside", CALL_GATE=1), mode, max_insns=5_000_000)
    assert r.console.decode().count("PASS") == 1, r.console.decode()
    assert (r.outcome, r.status) == ("triple_fault", 125), r.message


@pytest.mark.parametrize("mode", ("native", "hw", "full"))
def test_cr0_reads_smsw_and_lmsw_with_memory_operands(test_guest, mode):
    """hw used to let `smsw m16` and `lmsw m16` bypass the CR0 guest/host mask and read shadow (the
    guest saw NE, which the hypervisor forces behind the shadow) and read CR0 without ET."""
    r = run_guest(str(test_guest("crread")), mode, max_insns=5_000_000)
    console = r.console.decode()
    assert console.count("PASS") == 6 and "FAIL" not in console, console


def test_cr0_reads_under_trap_fail_only_at_the_smsw_hole(test_guest):
    r = run_guest(str(test_guest("crread")), "trap", max_insns=5_000_000)
    fails = [ln.split(":")[0] for ln in r.console.decode().splitlines() if ln.startswith("FAIL")]
    assert fails == ["FAIL smsw ax gives CR0's low 16 bits", "FAIL smsw to memory gives the same bits",
                     "FAIL and smsw to memory shows it"]


# -- a property: whatever descriptor the guest writes, a far transfer to it ends as on hardware ------
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_SELECTORS = st.sampled_from((0, 0x08, 0x10, 0x1B, 0x23, 0x28, 0x2B, 0x30, 0x38, 0x3B, 0x3C, 0xFFFC))
_BASES = st.sampled_from((0, 0x100000, 0x1000, 0xF0000000, 0xFFFFF000, 0xB8000))


@st.composite
def descriptors(draw):
    kind = draw(st.sampled_from((1, 2, 3, 4, 5, 9, 0xB, 0xC, 0x1A, 0x12, 0x1E, 0x0)))
    dpl, present = draw(st.integers(0, 3)), draw(st.booleans())
    access = (int(present) << 7) | (dpl << 5) | kind           # S is bit 4 of `kind`
    if kind in (4, 5, 0xC):                                     # gates: selector, offset, count
        sel, off = draw(_SELECTORS), draw(st.integers(0, 0xFFFFFFFF))
        lo = (sel << 16) | (off & 0xFFFF)
        hi = (off & 0xFFFF0000) | (access << 8) | draw(st.integers(0, 31))
    else:                                                       # segments: base, limit, flags
        base, limit = draw(_BASES), draw(st.integers(0, 0xFFFFF))
        lo = ((base & 0xFFFF) << 16) | (limit & 0xFFFF)
        hi = (base & 0xFF000000) | ((base >> 16) & 0xFF) | (limit & 0xF0000) | (access << 8) \
            | (draw(st.sampled_from((0, 0x4, 0xC))) << 20)
    return lo, hi


@pytest.fixture(scope="module")
def fuzz_image(test_guest):
    return test_guest("fuzz_desc").read_bytes()


@settings(max_examples=80, derandomize=True, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(desc=descriptors(), action=st.integers(0, 3), mode=st.sampled_from(MODES))
def test_any_descriptor_ends_in_a_documented_outcome(fuzz_image, tmp_path_factory, desc, action, mode):
    """A call gate, TSS, task gate, LDT or segment descriptor with any fields, reached by lcall/ljmp
    from ring 0 or ring 3: the run ends (guest exit, #exception reported by the guest, triple fault,
    budget), never as an internal error, an unsupported feature or an engine error; and under
    deprivileging nothing the guest then runs is at real CPL 0 (checked by the gates tests)."""
    import struct
    off = 0xBA8 if fuzz_image[0xBA8:0xBB0] == bytes.fromhex("5a5a5a5aa5a5a5a5") else \
        fuzz_image.find(bytes.fromhex("5a5a5a5aa5a5a5a5"))
    img = bytearray(fuzz_image)
    img[off:off + 12] = struct.pack("<III", desc[0], desc[1], action)
    path = tmp_path_factory.mktemp("fuzz") / "fuzz.bin"
    path.write_bytes(bytes(img))
    r = run_guest(str(path), mode, max_insns=3_000_000)
    allowed_stops = ("guest fetched code from unbacked memory", "MMIO access by")
    assert r.outcome in ("exit", "triple_fault", "budget", "halted") or \
        any(s in r.message for s in allowed_stops), (mode, hex(desc[0]), hex(desc[1]), action, r.outcome, r.message)


UNMAPPED_GDT = [(1, "mov ds, ax"), (2, "int 0x30"), (3, "div edx"), (4, "iretd"), (5, "ltr ax")]


@pytest.mark.parametrize("variant,what", UNMAPPED_GDT)
@pytest.mark.parametrize("mode", MODES + ("hw-noept",))
def test_an_unmapped_gdt_page_ends_in_a_triple_fault(tmp_path, mode, variant, what):
    """The GDT's page made not present, then an instruction that needs a descriptor from it (the engine's segment
    load, the hypervisor's delivery through the IDT, an iret, ltr): on hardware #PF, then #DF, then shutdown, each
    delivery needing the GDT again. Every mode must take that path at the instruction itself; the hypervisor's own
    reads of the table through a refused fill are the path found able to crash the host, so a subprocess."""
    import json

    from tests.hostile import build, run_cli, summary_line
    image = build("gdt_unmapped", tmp_path, VARIANT=variant)
    trace = tmp_path / "t.jsonl"
    args = ["--mode", "hw", "--no-ept"] if mode == "hw-noept" else ["--mode", mode]
    p = run_cli("run", image, *args, "--max-insns", 5_000_000, "--trace", trace)
    line = summary_line(p)
    assert p.returncode == 125 and "#PF while delivering #DF" in line, line
    assert p.stdout == b"PASS GDT page unmapped\n"
    events = [json.loads(x) for x in trace.read_text().splitlines()[1:]]
    # after the PASS line's last byte, the next event is at the variant's instruction (nothing before it faulted)
    last_out = max(i for i, e in enumerate(events) if e.get("detail", {}).get("port") == "0x3f8")
    assert events[last_out + 1]["insn"] == what, events[last_out + 1]


@requires_qemu
@pytest.mark.parametrize("variant,what", UNMAPPED_GDT)
def test_an_unmapped_gdt_page_shuts_qemu_down_too(tmp_path, variant, what):
    from tests.hostile import build
    from tests.qemu import run_under_qemu
    image = build("gdt_unmapped", tmp_path, VARIANT=variant)
    out, _ = run_under_qemu(image)
    assert out == b"PASS GDT page unmapped\n"


@pytest.mark.parametrize("variant,what", [(1, "mov ds"), (2, "int 0x30"), (3, "#DE"), (4, "mov ss")])
@pytest.mark.parametrize("mode", MODES + ("hw-noept",))
def test_gdt_outside_ram_ends_as_a_documented_outcome(tmp_path, mode, variant, what):
    """A GDT loaded outside RAM, then a segment load, an interrupt or a fault. Unbacked memory reads all-ones here (a
    present DPL-3 code segment): `mov ds` loads it and the guest goes on (its FAIL exit, status 1; QEMU 7.2
    reads unassigned memory as zeros, so there it faults and shuts down); an interrupt's CS does not qualify
    (#GP, #DF, a triple fault). hw with EPT stops the guest instead where a segment load would have to be
    emulated on unbacked memory. Run in a subprocess: a segment load the hypervisor performs on a refused fill
    was found to be able to crash the host process, which must never happen."""
    from tests.hostile import build, run_cli, summary_line
    image = build("gdt_outside", tmp_path, VARIANT=variant)
    args = ["--mode", "hw", "--no-ept"] if mode == "hw-noept" else ["--mode", mode]
    p = run_cli("run", image, *args, "--max-insns", 5_000_000)
    line = summary_line(p)
    if variant in (2, 3):
        assert p.returncode == 125 and "#GP while delivering #DF" in line, line
    elif mode == "hw" and variant in (1, 4):
        assert p.returncode == 123 and "MMIO access" in line, line
    elif variant == 1:
        assert p.returncode == 1 and "exit, status 1" in line, line
    else:
        assert p.returncode == 125, line
