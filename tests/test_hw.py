"""Mode hw: each VM exit happens when its control says so, carries the SDM's exit information, and
does not happen with the control off; VM entry checks; EPT. The guest (tests/guests/vmexits.S)
executes each interceptable instruction once and checks it behaved, whatever the controls."""
import json

import pytest

from cpuvirt.errors import CpuvirtError
from cpuvirt.machine.machine import Machine
from cpuvirt.modes.hw import HwMode
from cpuvirt.modes.hw.exits import ExitReason
from cpuvirt.modes.hw.vmcs import Field, Vmcs, kind, width
from cpuvirt.runner import run_guest
from cpuvirt.toolchain.build import list_guests


def run_hw(image, tmp_path, *vmx, name="t"):
    trace = tmp_path / f"{name}.jsonl"
    res = run_guest(str(image), "hw", trace_path=str(trace), mode_options={"vmx": list(vmx)})
    events = [json.loads(line) for line in trace.read_text().splitlines()]
    exits = [e for e in events if e["type"] == "event" and e["kind"] == "vmexit"]
    return res, exits


def reasons(exits):
    return [e["reason"] for e in exits]


@pytest.fixture(scope="module")
def vmexits(test_guest):
    return test_guest("vmexits")


def assert_passes(res):
    assert res.outcome == "exit" and res.status == 0, (res.outcome, res.message, res.console.decode()[-400:])
    assert b"FAIL" not in res.console


def test_default_preset_like_kvm_with_ept(vmexits, tmp_path):
    res, exits = run_hw(vmexits, tmp_path)
    assert_passes(res)
    r = reasons(exits)
    for always in ("CPUID", "VMCALL", "VMLAUNCH", "IO_INSTRUCTION", "HLT", "EXTERNAL_INTERRUPT", "DR_ACCESS"):
        assert always in r, always
    # EPT makes CR3 and INVLPG exiting unnecessary, and #PF goes straight to the guest.
    cr = [e for e in exits if e["reason"] == "CR_ACCESS"]
    assert cr and all(e["detail"]["cr"] != 3 for e in cr)
    assert "INVLPG" not in r and "RDTSC" not in r
    assert not any(e["reason"] == "EXCEPTION_NMI" and e["detail"]["vector"] == 14 for e in exits)
    assert all(e["code"] == ExitReason[e["reason"]].value for e in exits)


@pytest.mark.parametrize("control,reason,check", [
    ("hlt_exiting", "HLT", None),
    ("rdtsc_exiting", "RDTSC", None),
    ("invlpg_exiting", "INVLPG", lambda e: e["detail"]["linear_address"] in ("0x1000", "0x3ff000")),
    ("mov_dr_exiting", "DR_ACCESS", lambda e: e["detail"]["dr"] == 7 and e["detail"]["register"] == "eax"),
    ("external_interrupt_exiting", "EXTERNAL_INTERRUPT", None),
])
def test_control_turns_exit_on_and_off(vmexits, tmp_path, control, reason, check):
    on, on_exits = run_hw(vmexits, tmp_path, f"{control}=1", name="on")
    off, off_exits = run_hw(vmexits, tmp_path, f"{control}=0", name="off")
    assert_passes(on)
    assert_passes(off)
    hits = [e for e in on_exits if e["reason"] == reason]
    assert hits, f"{reason} did not happen with {control}=1"
    assert reason not in reasons(off_exits), f"{reason} happened with {control}=0"
    if check:
        assert all(check(e) for e in hits), hits


def test_cr3_load_and_store_exiting(vmexits, tmp_path):
    res, exits = run_hw(vmexits, tmp_path, "cr3_load_exiting=1", "cr3_store_exiting=1")
    assert_passes(res)
    cr3 = [e["detail"] for e in exits if e["reason"] == "CR_ACCESS" and e["detail"]["cr"] == 3]
    assert any(d["access"] == "MOV from CR" and d["register"] == "eax" and d["instruction_length"] == 3 for d in cr3)
    assert any(d["access"] == "MOV to CR" and d["register"] == "eax" for d in cr3)


def test_cr0_cr4_masks_and_read_shadows(vmexits, tmp_path):
    # Default masks: writing CR0.PG or CR4.PSE changes a host-owned bit against its shadow: exits.
    res, exits = run_hw(vmexits, tmp_path)
    cr = [e["detail"] for e in exits if e["reason"] == "CR_ACCESS"]
    assert any(d["cr"] == 4 and int(d["value"], 16) & 0x10 for d in cr)
    assert any(d["cr"] == 0 and int(d["value"], 16) & 0x80000000 for d in cr)
    # The guest owns everything: no CR0/CR4 write exits, and the guest still reads what it wrote.
    res, exits = run_hw(vmexits, tmp_path, "cr0_guest_host_mask=0", "cr4_guest_host_mask=0", name="own")
    assert_passes(res)
    assert not [e for e in exits if e["reason"] == "CR_ACCESS"]


def test_io_exits_unconditional_or_by_bitmap(vmexits, tmp_path):
    res, exits = run_hw(vmexits, tmp_path)
    out80 = [e for e in exits if e["reason"] == "IO_INSTRUCTION" and e["insn"] == "out 0x80, al"
             and e["detail"]["value"] == "0x55"]
    assert out80 and out80[0]["detail"] == {"port": "0x80", "size": 1, "direction": "out", "string": False,
                                             "rep": False, "operand": "immediate", "value": "0x55",
                                             "instruction_length": 2}
    in80 = [e for e in exits if e["reason"] == "IO_INSTRUCTION" and e["insn"] == "in al, dx"
            and e["detail"]["port"] == "0x80"]
    assert in80 and in80[0]["detail"]["operand"] == "dx" and in80[0]["detail"]["value"] == "0xff"
    res, exits = run_hw(vmexits, tmp_path, "unconditional_io_exiting=0", name="none")
    assert_passes(res)
    assert "IO_INSTRUCTION" not in reasons(exits)
    res, exits = run_hw(vmexits, tmp_path, "unconditional_io_exiting=0", "io_bitmap=0x3f8,0x80", name="bitmap")
    assert_passes(res)
    ports = {e["detail"]["port"] for e in exits if e["reason"] == "IO_INSTRUCTION"}
    assert ports == {"0x3f8", "0x80"}


def test_exception_bitmap(vmexits, tmp_path):
    res, exits = run_hw(vmexits, tmp_path, "exception_bitmap=0x4008")
    assert_passes(res)
    exc = [e["detail"] for e in exits if e["reason"] == "EXCEPTION_NMI"]
    pf = [d for d in exc if d["vector"] == 14]
    assert pf and pf[0]["type"] == "hardware exception" and pf[0]["linear_address"] == "0x3ff010"
    assert pf[0]["error_code"] == 0 and pf[0]["error_code_valid"]
    bp = [d for d in exc if d["vector"] == 3]
    assert bp and bp[0]["type"] == "software exception"
    res, exits = run_hw(vmexits, tmp_path, "exception_bitmap=0", name="none")
    assert_passes(res)
    assert "EXCEPTION_NMI" not in reasons(exits)


def test_pf_error_code_mask_match(vmexits, tmp_path):
    # Bit 14 set: #PF exits only when (error code & mask) == match. The test's #PF is a not-present read (0).
    res, exits = run_hw(vmexits, tmp_path, "exception_bitmap=0x4000", "pf_error_code_mask=1", "pf_error_code_match=1")
    assert_passes(res)
    assert not any(e["reason"] == "EXCEPTION_NMI" for e in exits)
    res, exits = run_hw(vmexits, tmp_path, "exception_bitmap=0", "pf_error_code_mask=1", "pf_error_code_match=1", name="b")
    assert any(e["reason"] == "EXCEPTION_NMI" and e["detail"]["vector"] == 14 for e in exits)


def test_msr_bitmaps(vmexits, tmp_path):
    res, exits = run_hw(vmexits, tmp_path)
    assert not {"MSR_READ", "MSR_WRITE"} & set(reasons(exits))     # bitmaps on, nothing marked
    res, exits = run_hw(vmexits, tmp_path, "msr_bitmap=0x174", name="marked")
    assert_passes(res)
    assert {"MSR_READ", "MSR_WRITE"} <= set(reasons(exits))
    assert all(e["detail"]["msr"] == "0x174" for e in exits if e["reason"].startswith("MSR"))
    res, exits = run_hw(vmexits, tmp_path, "use_msr_bitmaps=0", name="all")
    assert {"MSR_READ", "MSR_WRITE"} <= set(reasons(exits))


def test_descriptor_table_exiting(vmexits, tmp_path):
    res, exits = run_hw(vmexits, tmp_path, "descriptor_table_exiting=1")
    assert_passes(res)
    got = {(e["reason"], e["detail"]["instruction"]) for e in exits if e["reason"] in ("GDTR_IDTR", "LDTR_TR")}
    assert {("GDTR_IDTR", "sgdt"), ("GDTR_IDTR", "lgdt"), ("LDTR_TR", "str"), ("LDTR_TR", "sldt")} <= got
    res, exits = run_hw(vmexits, tmp_path, name="off")
    assert not {"GDTR_IDTR", "LDTR_TR"} & set(reasons(exits))


def test_vmcall_serves_the_kvm_hypercall_abi(vmexits, tmp_path):
    res, exits = run_hw(vmexits, tmp_path)
    calls = [e["detail"] for e in exits if e["reason"] == "VMCALL"]
    assert [(c["hypercall"], c["ret"]) for c in calls] == [("KVM_HC_SCHED_YIELD", 0), ("unknown (4660)", -1000)]
    assert [e["detail"]["instruction_length"] for e in exits if e["reason"] == "VMLAUNCH"] == [3]


def test_interrupt_window_when_guest_cannot_take_the_interrupt(test_guest, tmp_path):
    # IRQ 0 becomes pending while the guest runs with IF = 0: EXTERNAL_INTERRUPT finds the guest not
    # interruptible, the hypervisor asks for the window, and INTERRUPT_WINDOW injects it after sti.
    res, exits = run_hw(test_guest("window"), tmp_path)
    assert_passes(res)
    r = reasons(exits)
    first = r.index("EXTERNAL_INTERRUPT")
    assert exits[first]["action"] == "guest has IF=0: requested interrupt-window exiting"
    window = r.index("INTERRUPT_WINDOW")
    assert window > first and exits[window]["action"].startswith("window open: injected external interrupt")
    # Without external-interrupt exiting there is no exit at all: the processor delivers it.
    res, exits = run_hw(test_guest("window"), tmp_path, "external_interrupt_exiting=0", name="direct")
    assert_passes(res)
    assert not {"EXTERNAL_INTERRUPT", "INTERRUPT_WINDOW"} & set(reasons(exits))


def test_triple_fault_exits_and_shuts_down(test_guest, tmp_path):
    res, exits = run_hw(test_guest("triple"), tmp_path)
    assert res.outcome == "triple_fault" and res.status == 125
    assert exits[-1]["reason"] == "TRIPLE_FAULT" and exits[-1]["code"] == 2


def test_ept_misconfig_is_its_own_exit():
    from cpuvirt.memory.ept import EPT_W
    from cpuvirt.memory.p2m import RAM_HPA
    m = Machine(8)
    hw = HwMode(m)
    from cpuvirt.memory.mmu import NestedFault
    hw.boot()
    hw.vcpu.ept.write_entry(0x5000, RAM_HPA + 0x5000 | EPT_W)      # writable but not readable
    bad = hw.vcpu.ept.translate(0x5000, 1)
    assert bad.misconfig
    assert hw.vcpu.ept.translate(0x6000, 1) == RAM_HPA + 0x6000
    hw.vcpu.on_refused_fill(NestedFault(bad, 0x5000, final=True).with_linear(0x5000, 0), 0x100000)
    assert hw.vcpu.outcome.kind == "ept_misconfig" and hw.vcpu.outcome.status == 123
    assert hw.vcpu.stats[ExitReason.EPT_MISCONFIG] == 1


def test_two_dimensional_walk_makes_14_references():
    """A 2-level guest walk over 4-level EPT: (2+1) * (4+1) - 1 = 14 entry reads for one translation."""
    import struct
    from cpuvirt.engine import regs as R
    from cpuvirt.memory.p2m import RAM_HPA
    from cpuvirt.memory.types import Access
    m = Machine(8)
    hw = HwMode(m)
    hw.boot()
    pd, pt = 0x10000, 0x11000
    m.write_gpa(pd + 4 * (0x400000 >> 22), struct.pack("<I", pt | 0x63))
    m.write_gpa(pt + 4 * ((0x400000 >> 12) & 0x3FF), struct.pack("<I", 0x200000 | 0x63))
    m.regs.write(R.CR3, pd)
    m.regs.write(R.CR0, 0x80000031)
    m.mmu.crs = None
    ept, c = hw.vcpu.ept, m.mmu.counters
    before_ept, before_refs = ept.refs, c.walk_refs
    gpa, ok = m.mmu.strategy.gva_to_gpa(0x400123, Access.READ, False)
    hpa = m.mmu.strategy.gpa_to_hpa(gpa & ~0xFFF, Access.READ)
    assert gpa == 0x200123 and hpa == RAM_HPA + 0x200000
    assert ept.refs - before_ept == 12           # 4 for the PDE's GPA, 4 for the PTE's, 4 for the data page
    assert c.walk_refs - before_refs == 14       # plus the 2 guest entries themselves


def test_c_elf_kernel_under_hw(tmp_path):
    from tests.test_elf_kernel import SRC
    import shutil
    import subprocess
    if shutil.which("gcc") is None:
        pytest.skip("no gcc")
    out = tmp_path / "kernel.elf"
    p = subprocess.run(["gcc", "-m32", "-ffreestanding", "-fno-pie", "-no-pie", "-nostdlib", "-O2",
                        "-fno-stack-protector", "-T", str(SRC / "link.ld"), "-Wl,--build-id=none", "-o", str(out),
                        str(SRC / "boot.S"), str(SRC / "kernel.c")], capture_output=True, text=True)
    if p.returncode:
        pytest.skip("gcc -m32 cannot build here")
    hw = run_guest(str(out), "hw")
    assert hw.outcome == "exit" and hw.status == 0
    assert hw.console == run_guest(str(out)).console


def test_lazy_ept_allocates_on_violation(tmp_path):
    res, exits = run_hw("paging", tmp_path, "lazy_ept=1")
    assert_passes(res)
    ept = [e for e in exits if e["reason"] == "EPT_VIOLATION"]
    assert len(ept) >= 5
    first = ept[0]["detail"]
    assert first["access"] == "fetch" and first["ept_entry"] == "---" and first["linear_valid"]
    assert first["gpa"] == "0x100000" or int(first["gpa"], 16) >> 12 == 0x100
    kinds = {e["detail"].get("translation") for e in ept}
    assert "final guest-physical" in kinds
    assert any(e["detail"]["access"] == "write" for e in ept)


def test_access_outside_ram_is_an_ept_violation_emulated_as_unassigned_memory(test_guest, tmp_path):
    """pc-lite: memory that is neither RAM nor a device reads all-ones and drops writes, in every mode
    (the `hostile` guest sweeps all of it). Under EPT each such access is an EPT violation the root
    handler emulates, as KVM hands it to QEMU's unassigned region; the guest goes on."""
    res, exits = run_hw(test_guest("touch_unbacked"), tmp_path)
    assert res.outcome == "exit" and res.status == 0, res.message
    ept = [e for e in exits if e["reason"] == "EPT_VIOLATION"]
    assert len(ept) == 1 and ept[0]["detail"]["access"] == "read" and ept[0]["detail"]["gpa"] == "0x7000000"
    assert "reads all-ones" in ept[0]["action"] and "0xffffffff" in ept[0]["action"]


def test_vm_entry_failure_is_reported_not_a_crash():
    m = Machine(8)
    hw = HwMode(m)
    hw.boot()
    v = hw.vcpu.vmcs
    v.vmwrite(Field.VM_ENTRY_INTR_INFO_FIELD, (1 << 31) | (1 << 8) | 0x20)   # type 1 is reserved
    hw.vcpu.vm_entry(None)
    assert hw.vcpu.outcome.kind == "entry_failure" and hw.vcpu.outcome.status == 123
    assert v.vmread(Field.VM_EXIT_REASON) == (1 << 31) | 33
    m2 = Machine(8)
    hw2 = HwMode(m2)
    hw2.boot()
    hw2.vcpu.vmcs.vmwrite(Field.GUEST_CR0, 0x80000011 & ~1 | 0x20)       # PG without PE
    hw2.vcpu.vm_entry(None)
    assert hw2.vcpu.outcome.kind == "entry_failure" and "PG set without PE" in hw2.vcpu.outcome.message


def test_vmcs_encodings_carry_width_and_kind():
    assert (width(Field.GUEST_RIP), kind(Field.GUEST_RIP)) == (32, "guest state")
    assert (width(Field.EPT_POINTER), kind(Field.EPT_POINTER)) == (64, "control")
    assert (width(Field.VM_EXIT_REASON), kind(Field.VM_EXIT_REASON)) == (32, "exit information")
    assert (width(Field.HOST_CS_SELECTOR), kind(Field.HOST_CS_SELECTOR)) == (16, "host state")
    v = Vmcs()
    v.vmwrite(Field.GUEST_CS_SELECTOR, 0x12345)
    assert v.vmread(Field.GUEST_CS_SELECTOR) == 0x2345          # a 16-bit field keeps 16 bits


def test_no_ept_runs_on_shadow_paging(vmexits, tmp_path):
    """--no-ept: KVM's shadow-MMU controls; the exits guest still passes, with CR3 loads, INVLPG and
    #PF exiting (more exits than with EPT, none of them an EPT violation)."""
    trace = tmp_path / "noept.jsonl"
    res = run_guest(str(vmexits), "hw", trace_path=str(trace), mode_options={"ept": False})
    assert_passes(res)
    exits = [json.loads(line) for line in trace.read_text().splitlines()]
    header = exits[0]
    assert "enable_ept" not in header["options"]["vmx"] and header["options"]["vmx"]["invlpg_exiting"] == 1
    got = reasons([e for e in exits if e.get("kind") == "vmexit"])
    assert "INVLPG" in got and "EPT_VIOLATION" not in got
    assert any(e["detail"].get("fault") == "hidden" for e in exits if e.get("reason") == "EXCEPTION_NMI")
    with pytest.raises(CpuvirtError, match="contradict"):
        HwMode(Machine(8), vmx=["enable_ept=1"], ept=False)


@pytest.mark.parametrize("guest", [g.name for g in list_guests()])
def test_every_bundled_guest_passes_in_hw_with_native_output(guest):
    from tests.guest_args import RUN_ARGS, run_kwargs
    kwargs = run_kwargs(guest) if "devices" in RUN_ARGS.get(guest, {}) else {}   # netdemo needs its NIC
    hw = run_guest(guest, "hw", **kwargs)
    assert hw.outcome == "exit" and hw.status == 0, (hw.outcome, hw.message)
    assert hw.console == run_guest(guest, **kwargs).console


@pytest.mark.parametrize("guest", [g.name for g in list_guests() if g.name != "apic"])
def test_hw_retires_exactly_the_instructions_native_does(guest):
    """Exits do not run guest instructions, and instructions skipped or cut short by exits and faults
    are taken off the count: the same guest retires the same number of instructions in both modes.
    (apic is left out: its MMIO reads see block-granular time under native but exact time under hw,
    where each access is an exit, so its timer-polling loops legitimately run a different length.)"""
    from tests.guest_args import RUN_ARGS, run_kwargs
    kwargs = run_kwargs(guest) if "devices" in RUN_ARGS.get(guest, {}) else {}
    assert run_guest(guest, "hw", **kwargs).icount == run_guest(guest, **kwargs).icount
