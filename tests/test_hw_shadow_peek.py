"""hw without EPT: the guest's code read in C over the guest's own tables (cpu/_delivery.c delivery_peek with
its shadow guard, FastDelivery.install_shadow, VmxCpu._mirror_shadow) gives what the Python read through the
shadow (Mmu.read_linear) gives, and changes nothing.

Each guest runs with the C reader and without it (VmxCpu.shadow_peek_c, the CPUVIRT_HW_SHADOW_PEEK switch), and
everything a reader can see must be the same byte for byte: the console, instructions, virtual time, the event,
exit, MMU and shadow counters, the VMCS exit-information fields and counters after every VM entry Python makes,
and the trace; the same for the common iret left to the engine by delivery_iret_hook on that reader's peeks
(tests/guests/iret_rf.S: the irets whose image sets RF stay Python's). tests/guests/hw_shadow_peek.S runs its
exits from code whose mapping changes between them (PTEs remapped with and without invlpg, an instruction
across a page boundary, code ending where the next page is not present or maps a frame outside RAM, CR0.WP
clear, a 4 MiB page, a page table outside RAM). Each #PF exit's exact address is decoded in C through the
same reader (delivery_fault_linear) and compared with Vcpu.exact_linear's.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from cpuvirt.cpu.fastdelivery import FastDelivery
from cpuvirt.engine import regs as R
from cpuvirt.memory.mmu import Mmu
from cpuvirt.modes.hw import vmx
from cpuvirt.modes.hw.vmcs import Field as F
from cpuvirt.runner import run_guest
from cpuvirt.x86.flags import CR0_PG

EXIT_FIELDS = (
    F.VM_EXIT_REASON,
    F.EXIT_QUALIFICATION,
    F.VM_EXIT_INSTRUCTION_LEN,
    F.VM_EXIT_INTR_INFO,
    F.VM_EXIT_INTR_ERROR_CODE,
    F.VMX_INSTRUCTION_INFO,
    F.GUEST_RIP,
    F.GUEST_LINEAR_ADDRESS,
)
NO_EPT = ("enable_ept=0",)


def _run(image, monkeypatch, in_c: bool, trace_path=None, controls=NO_EPT):
    """The run, the state after every VM entry Python made, the vCPU, and how many reads C answered."""
    seen = []
    cpus = []
    answered = [0]
    arm, peek = vmx.VmxCpu._arm_fast_exits, FastDelivery.peek

    def armed(self):
        arm(self)
        self.fold_fast_exits()
        v = self.vmcs._values
        seen.append((
            tuple(v.get(f) for f in EXIT_FIELDS),
            self.exits, self.counts["vmexit"],
            self.clock.now, self.clock.instructions,
            tuple(self.shadow.counters.as_dict().items()) if self.shadow is not None else (),
        ))

    def counted(self, gva, size):
        data = peek(self, gva, size)
        answered[0] += data is not None
        return data

    monkeypatch.setattr(vmx.VmxCpu, "_arm_fast_exits", armed)
    monkeypatch.setattr(FastDelivery, "peek", counted)
    monkeypatch.setattr(vmx.VmxCpu, "shadow_peek_c", in_c)
    # CR3 reloads made whole in C (needing the C reader) leave no VM entry of Python's to compare here:
    # tests/test_cr3_reload.py compares them
    monkeypatch.setattr(vmx.VmxCpu, "shadow_cr3_c", False)
    res = run_guest(str(image), "hw", trace_path=trace_path, on_start=lambda hv: cpus.append(hv.vcpu),
                    mode_options={"vmx": list(controls)})
    monkeypatch.undo()
    assert res.outcome == "exit" and res.status == 0, (res.message, res.console[-300:])
    return res, seen, cpus[0], answered[0]


def _same(a, b) -> None:
    (ra, sa, ca, _), (rb, sb, cb, _) = a, b
    for field in ("outcome", "status", "message", "console", "icount", "vtime", "counts", "mmu", "tally"):
        assert getattr(ra, field) == getattr(rb, field), field
    assert [row[:4] for row in ra.exit_stats] == [row[:4] for row in rb.exit_stats]  # not the handler's wall time
    assert len(sa) == len(sb)
    for n, (x, y) in enumerate(zip(sa, sb)):
        assert x == y, f"VM entry {n}: {x} != {y}"
    ca.fold_fast_exits()
    cb.fold_fast_exits()
    assert dict(ca.stats) == dict(cb.stats) and ca.exits == cb.exits
    assert list(ca.counts.items()) == list(cb.counts.items())
    assert list(ca.reasons.items()) == list(cb.reasons.items())
    assert {f: ca.vmcs._values.get(f) for f in EXIT_FIELDS} == {f: cb.vmcs._values.get(f) for f in EXIT_FIELDS}
    assert ca.shadow.counters.as_dict() == cb.shadow.counters.as_dict()
    assert ca.fast_exits.counts()[0] == cb.fast_exits.counts()[0]  # CPUID exits answered in C


@pytest.fixture(scope="module")
def nanobench(nanobench_image):
    return nanobench_image(200)


@pytest.fixture(scope="module")
def hostile(test_guest):
    return test_guest("hw_shadow_peek")


@pytest.mark.parametrize("guest", ["nanobench", "hostile", "hw_fastexit", "iret_rf"])
def test_the_c_reader_leaves_what_the_python_read_leaves(guest, nanobench, hostile, test_guest, monkeypatch):
    image = {"nanobench": nanobench, "hostile": hostile}.get(guest) or test_guest(guest)
    fast = _run(image, monkeypatch, True)
    slow = _run(image, monkeypatch, False)
    _same(fast, slow)
    assert b"PASS" in fast[0].console or guest == "nanobench"
    # C answered reads of guest code, and the sites that check their bytes with it (CR reads and guest-owned
    # CR writes, the I/O gate's CPL-0 pass) were C's; none of it without the reader.
    assert fast[3] > 0 and slow[3] == 0
    fx, fx_slow = fast[2].fast_exits, slow[2].fast_exits
    assert fx.counts()[1] + fx.reads_passed + fx.io_gate_passed > 0
    assert fx_slow.counts()[1] + fx_slow.reads_passed + fx_slow.io_gate_passed == 0
    if guest == "nanobench":
        assert fx.io_gate_passed > 0  # ring-3 code armed the I/O gate: its kernel in/out passed in C
        assert fast[2]._shadow_peek.irets > 0  # the common iret (delivery_iret_hook) too
    assert slow[2]._shadow_peek is None


@pytest.mark.parametrize("guest", ["nanobench", "hostile"])
def test_a_trace_is_the_same(guest, nanobench, hostile, monkeypatch, tmp_path):
    image = nanobench if guest == "nanobench" else hostile
    a, b = tmp_path / "c.jsonl", tmp_path / "python.jsonl"
    fast = _run(image, monkeypatch, True, trace_path=str(a))
    slow = _run(image, monkeypatch, False, trace_path=str(b))
    _same(fast, slow)
    assert a.read_bytes() == b.read_bytes() and b"IO_INSTRUCTION" in a.read_bytes()
    assert fast[3] > 0  # the trace's reads of guest code (disassembly, decoding) were C's


def test_every_c_answer_is_the_python_read(hostile, monkeypatch):
    """At every read of guest code, the C answer (when it gives one) against Mmu.read_linear's on the same state;
    and the guard: a shadow mirrored with another root or mode, or dirtied, makes C refuse."""
    compared = [0, 0]
    fetch = Mmu.fetch_bytes

    def checked(self, gva, size):
        c = self.peek(gva, size) if self.peek is not None else None
        if c is not None:
            peek, self.peek = self.peek, None
            try:
                assert fetch(self, gva, size) == c, hex(gva)
            finally:
                self.peek = peek
            compared[0] += 1
            if not self.regs.read(R.CR0) & CR0_PG:
                return c  # paging off: the shadow has nothing to say (identity), the guard does not apply
            compared[1] += 1
            fast = peek.__self__
            st = fast._state
            saved = st.shadow_ok, st.shadow_mode, st.shadow_key
            for ok, mode, key in ((0, st.shadow_mode, st.shadow_key), (1, st.shadow_mode ^ 0x10, st.shadow_key),
                                  (1, st.shadow_mode, st.shadow_key ^ 0x1000)):
                fast.mirror_shadow(bool(ok), mode, key)
                assert peek(gva, size) is None
            fast.shadow_dirtied()
            st.shadow_mode, st.shadow_key = saved[1], saved[2]
            assert peek(gva, size) is None
            fast.mirror_shadow(bool(saved[0]), saved[1], saved[2])
        return fetch(self, gva, size)

    monkeypatch.setattr(Mmu, "fetch_bytes", checked)
    res, _, cpu, _ = _run(hostile, monkeypatch, True)
    assert b"PASS" in res.console
    assert compared[0] > compared[1] > 50


def test_with_ept_nothing_changes(nanobench, monkeypatch):
    """Under EPT the reader is EPT's (FastDelivery.prepare_ept): the switch changes nothing there."""
    fast = _run(nanobench, monkeypatch, True, controls=())
    slow = _run(nanobench, monkeypatch, False, controls=())
    (ra, _, ca, _), (rb, _, cb, _) = fast, slow
    for field in ("console", "icount", "vtime", "counts", "mmu", "tally"):
        assert getattr(ra, field) == getattr(rb, field), field
    assert ca._shadow_peek is None and cb._shadow_peek is None


def test_the_environment_switch_turns_it_off():
    code = "from cpuvirt.modes.hw.vmx import VmxCpu; print(VmxCpu.shadow_peek_c)"
    env = dict(os.environ)
    env.pop("CPUVIRT_HW_SHADOW_PEEK", None)
    on = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    env["CPUVIRT_HW_SHADOW_PEEK"] = "0"
    off = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert on.stdout.split() == ["True"] and off.stdout.split() == ["False"]


@pytest.mark.parametrize("guest", ["nanobench", "hostile", "string_faults"])
def test_every_c_fault_address_is_the_python_one(guest, nanobench, hostile, test_guest, monkeypatch):
    """Each #PF exit's exact linear address (its qualification, the guest's CR2), decoded in C
    (delivery_fault_linear through the guarded reader), against Vcpu.exact_linear's on the same state.
    string_faults.S faults with rep stosd, rep stosb, lodsd and repne scasb on fresh pages (xv6's memset is rep
    stosd: half the #PF exits of its usertests under --no-ept)."""
    from cpuvirt.cpu.vcpu import Vcpu

    decoded = [0]
    strings = [0]
    exact = vmx.VmxCpu.exact_linear

    def checked(self, pending, eip):
        gla = exact(self, pending, eip)
        fast = self._shadow_peek
        if fast is not None and fast.fault_linear(eip, pending.gva, pending.access) is not None:
            decoded[0] += 1
            code = self.mmu.fetch_bytes(eip, 2) or b""
            strings[0] += code[:1] in (b"\xaa", b"\xab") or code[:2] in (b"\xf3\xaa", b"\xf3\xab")
        assert gla == Vcpu.exact_linear(self, pending, eip), (hex(eip), hex(pending.gva))
        return gla

    monkeypatch.setattr(vmx.VmxCpu, "exact_linear", checked)
    image = {"nanobench": nanobench, "hostile": hostile}.get(guest) or test_guest(guest)
    res, _, _, _ = _run(image, monkeypatch, True)
    if guest == "string_faults":
        assert b"FAIL" not in res.console and res.console.count(b"PASS") == 5
        assert strings[0] >= 18  # the stos forms' faults, decoded in C (19 of 24 decoded, 2026-12-05)
    else:
        assert decoded[0] > 100
