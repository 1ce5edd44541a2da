"""hw mode's APIC virtualization (SDM Vol. 3C chapter 29): which local APIC accesses exit, with which
reason and qualification, under each setting of "use TPR shadow", "virtualize APIC accesses" and
"APIC-register virtualization"; reads served from the virtual-APIC page with no exit; the timer's
current count always exiting; the controls off giving EPT violations as before. The guest
(tests/guests/apicv.S) checks the values it reads, so every setting must also keep native's console."""
import json

import pytest

from cpuvirt.errors import CpuvirtError
from cpuvirt.modes.hw import apicv
from cpuvirt.modes.hw.controls import VmxSettings
from cpuvirt.runner import run_guest


def run(image, tmp_path, mode="hw", *vmx, name="t"):
    trace = tmp_path / f"{name}.jsonl"
    res = run_guest(str(image), mode, trace_path=str(trace),
                    mode_options={"vmx": list(vmx)} if mode == "hw" else None)
    assert res.outcome == "exit" and res.status == 0, (res.outcome, res.message, res.console.decode()[-600:])
    assert b"FAIL" not in res.console
    events = [json.loads(line) for line in trace.read_text().splitlines()]
    exits = [e for e in events if e["type"] == "event" and e["kind"] == "vmexit"]
    return res, exits, trace.read_bytes()


def apic_exits(exits):
    """(reason, qualification-derived offset, access) of every exit about the APIC page."""
    out = []
    for e in exits:
        if e["reason"] == "APIC_ACCESS":
            out.append(("APIC_ACCESS", e["detail"]["offset"], e["detail"]["access"].split()[5]))
        elif e["reason"] == "APIC_WRITE":
            out.append(("APIC_WRITE", e["detail"]["offset"], "write"))
        elif e["reason"] == "EPT_VIOLATION" and int(e["detail"]["gpa"], 16) >> 12 == 0xFEE00:
            out.append(("EPT_VIOLATION", hex(int(e["detail"]["gpa"], 16) & 0xFFF), e["detail"]["access"]))
    return out


@pytest.fixture(scope="module")
def guest(test_guest):
    return test_guest("apicv")


@pytest.fixture(scope="module")
def native_console(guest, tmp_path_factory):
    res, _, _ = run(guest, tmp_path_factory.mktemp("native"), "native")
    return res.console


def test_default_preset_register_virtualization(guest, tmp_path, native_console):
    """KVM with APICv: the 1000 ID reads, the version, TPR, LDR, initial-count, EOI and ICR-high
    reads cost no exit; PPR and the current count (not virtualized, 29.4.2) are APIC_ACCESS exits;
    writes outside TPR and ICR high are trap-like APIC_WRITE exits with the offset as qualification."""
    res, exits, _ = run(guest, tmp_path)
    assert res.console == native_console
    assert apic_exits(exits) == [
        ("APIC_ACCESS", "0xa0", "read"),            # PPR
        ("APIC_WRITE", "0xd0", "write"),            # LDR
        ("APIC_WRITE", "0x320", "write"),           # LVT timer
        ("APIC_WRITE", "0x3e0", "write"),           # divide configuration
        ("APIC_WRITE", "0x380", "write"),           # initial count
        ("APIC_ACCESS", "0x390", "read"),           # current count: never virtualized
        ("APIC_WRITE", "0x380", "write"),
        ("APIC_WRITE", "0xb0", "write"),            # EOI (no virtual-interrupt delivery)
    ]
    for e in exits:
        assert e["code"] == {"APIC_ACCESS": 44, "APIC_WRITE": 56}.get(e["reason"], e["code"])
    tmcct = next(e for e in exits if e["reason"] == "APIC_ACCESS" and e["detail"]["offset"] == "0x390")
    # Fault-like: RIP is the instruction, which the handler emulates.
    assert tmcct["insn"] == "mov eax, dword ptr [0xfee00390]" and tmcct["detail"]["register"] == "TMCCT"
    assert tmcct["action"].startswith("emulated read of TMCCT -> 0x")
    # Trap-like: RIP is past the instruction that wrote.
    ldr = next(e for e in exits if e["reason"] == "APIC_WRITE" and e["detail"]["offset"] == "0xd0")
    written_by = int(ldr["detail"]["written_by"], 16)
    assert int(ldr["eip"], 16) == written_by + 10     # mov dword ptr [imm32], imm32
    assert ldr["action"] == "completed the write of 0x1abcdef to LDR in the local APIC"
    assert not any(e["reason"] == "EPT_VIOLATION" for e in exits)


def test_no_exit_read_path_counts_in_the_virtual_apic_page(guest):
    """The 1000 ID reads reached the virtual-APIC page and nothing else: the page's own counter."""
    seen = []
    res = run_guest(str(guest), "hw", on_start=seen.append)
    assert res.status == 0
    reads, writes = seen[0].vcpu.vapic.counts()
    # reads: ID x1000, version, TPR, LDR, initial count, EOI, ICR high; writes: TPR x2, ICR high x2,
    # and the 6 that then made APIC_WRITE exits
    assert (reads, writes) == (1006, 10)


def test_tpr_shadow_without_register_virtualization(guest, tmp_path, native_console):
    """Only the TPR is virtualized (29.4.2, 29.4.3.1): every other access is an APIC_ACCESS exit,
    a write with access type 1; the ID loop makes 1000 exits."""
    res, exits, _ = run(guest, tmp_path, "hw", "apic_register_virtualization=0")
    assert res.console == native_console
    got = apic_exits(exits)
    assert got.count(("APIC_ACCESS", "0x20", "read")) == 1000
    assert ("APIC_ACCESS", "0x80", "read") not in got and ("APIC_ACCESS", "0x80", "write") not in got
    assert ("APIC_ACCESS", "0xb0", "write") in got and ("APIC_ACCESS", "0x310", "write") in got
    assert not any(r == "APIC_WRITE" for r, _, _ in got)
    eoi = next(e for e in exits if e["reason"] == "APIC_ACCESS" and e["detail"]["offset"] == "0xb0")
    assert eoi["detail"]["access"] == "linear access for a data write during instruction execution"


def test_controls_off_give_ept_violations_as_before(guest, tmp_path, native_console):
    res, exits, _ = run(guest, tmp_path, "hw", "virtualize_apic_accesses=0")
    assert res.console == native_console
    got = apic_exits(exits)
    assert not any(r.startswith("APIC") for r, _, _ in got)
    assert got.count(("EPT_VIOLATION", "0x20", "read")) == 1000
    assert ("EPT_VIOLATION", "0x80", "write") in got and ("EPT_VIOLATION", "0x390", "read") in got


def test_c_and_python_paths_give_the_same_trace(guest, tmp_path, monkeypatch):
    _, _, with_c = run(guest, tmp_path, name="c")
    monkeypatch.setattr(apicv, "_lib", lambda: None)
    _, _, with_py = run(guest, tmp_path, name="py")
    assert with_c == with_py


@pytest.mark.parametrize("offset,size,tpr_shadow,regvirt,virtualized", [
    (0x20, 4, True, True, True), (0x390, 4, True, True, False), (0xA0, 4, True, True, False),
    (0x90, 4, True, True, False), (0x24, 4, True, True, False), (0x22, 4, True, True, False),
    (0x20, 8, True, True, False), (0x80, 4, True, False, True), (0x20, 4, True, False, False),
    (0x80, 4, False, False, False), (0x3E0, 4, True, True, True), (0x100, 4, True, True, True),
])
def test_read_rules(offset, size, tpr_shadow, regvirt, virtualized):
    assert apicv.read_virtualized(offset, size, tpr_shadow, regvirt) is virtualized


@pytest.mark.parametrize("offset,regvirt,virtualized", [
    (0x80, False, True), (0xB0, False, False), (0xB0, True, True), (0x30, True, False),
    (0x390, True, False), (0x100, True, False), (0x310, True, True), (0x3E0, True, True),
])
def test_write_rules(offset, regvirt, virtualized):
    assert apicv.write_virtualized(offset, 4, True, regvirt) is virtualized


@pytest.mark.parametrize("vmx,ept,why", [
    (["use_tpr_shadow=0"], True, "needs use_tpr_shadow=1"),
    (["virtualize_apic_accesses=1"], False, "EPT only"),
])
def test_invalid_control_combinations_are_input_errors(vmx, ept, why):
    with pytest.raises(CpuvirtError, match=why):
        VmxSettings(vmx, ept=ept)


def test_shadow_paging_preset_leaves_apic_virtualization_off():
    s = VmxSettings([], ept=False)
    assert not any(s.bits[c] for c in ("use_tpr_shadow", "virtualize_apic_accesses", "apic_register_virtualization"))


def test_tpr_lowered_below_a_held_interrupt_exits(tmp_path):
    """The bundled apic guest raises its TPR above a pending self-IPI, then lowers it: the write is
    virtualized, and TPR virtualization finds VTPR[7:4] below TPR_THRESHOLD (29.1.2)."""
    from tests.guest_args import in_guest_dir, run_kwargs
    trace = tmp_path / "apic.jsonl"
    with in_guest_dir():            # the guest's Multiboot module is named relative to guests/
        res = run_guest("apic", "hw", trace_path=str(trace), **run_kwargs("apic"))
    assert res.status == 0, res.message
    exits = [json.loads(line) for line in trace.read_text().splitlines() if '"TPR_BELOW_THRESHOLD"' in line]
    assert len(exits) == 1 and exits[0]["code"] == 43
    assert int(exits[0]["detail"]["vtpr"], 16) >> 4 < exits[0]["detail"]["tpr_threshold"]
