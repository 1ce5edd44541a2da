"""hw's events that cause no VM exit, delivered in C (cpu/_delivery.c under `vmx`; VmxCpu.install_fast_events).

Under VT-x `int n` never exits, and an exception exits only when its bit of the exception bitmap is set
(#PF: with PAGE_FAULT_ERROR_CODE_MASK/MATCH, SDM Vol. 3C 25.2). The C hooks deliver the others through the
guest IDT and must leave exactly what the Python path (VmxCpu.hook_intr, on_refused_fill) leaves: the same
console, instructions, virtual time, event and MMU counters, exits by reason. Each run below is made with
the C path and without it (VmxCpu.events_in_c), on nanobench's guest: int 0x80 from ring 3, #PF on a page
made not-present, #DE, with I/O and CPUID exits between them.
"""

import pytest

from cpuvirt.cpu.fastdelivery import _lib
from cpuvirt.modes.hw.exits import ExitReason
from cpuvirt.modes.hw.vmcs import Field as F
from cpuvirt.modes.hw.vmx import VmxCpu
from cpuvirt.nanobench import build

pytestmark = pytest.mark.skipif(_lib() is None,
                                reason="the C delivery is not built (python setup.py build_ext --inplace)")

N = 300  # iterations of each nanobench operation: N int 0x80, N #PF (error code 0: a ring-0 read), N #DE


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("hwdeliv") / "nanobench.bin"
    path.write_bytes(build(N, False))
    return str(path)


def _run(image, monkeypatch, in_c: bool, vmx=(), on_start=None):
    from cpuvirt.runner import run_guest

    monkeypatch.setattr(VmxCpu, "events_in_c", in_c)
    vcpus = []

    def start(hv):
        vcpus.append(hv.vcpu)
        if on_start is not None:
            on_start(hv.vcpu)

    r = run_guest(image, "hw", mode_options={"vmx": list(vmx)}, on_start=start)
    assert r.outcome == "exit" and r.status == 0, (r.outcome, r.message, r.console[-200:])
    return r, vcpus[0]


def _same(a, b) -> None:
    (ra, va), (rb, vb) = a, b
    for field in ("outcome", "status", "console", "icount", "vtime", "counts", "mmu", "tally"):
        assert getattr(ra, field) == getattr(rb, field), field
    assert dict(va.stats) == dict(vb.stats)
    assert list(va.counts.items()) == list(vb.counts.items())
    assert list(va.reasons.items()) == list(vb.reasons.items())


# (--vmx settings, EXCEPTION_NMI exits expected, #PFs delivered in C expected, #DEs delivered in C expected)
CASES = {
    "KVM preset (#UD, #AC, #MC only)": ((), 0, N, N),
    "#DE and #PF exit": (("exception_bitmap=0x4001",), 2 * N, 0, 0),
    "every exception exits": (("exception_bitmap=0xffffffff",), 2 * N, 0, 0),
    # bit 14 set: a #PF exits when (ec & mask) == match; ec = 0 here, so none does
    "#PF bit set, PFEC mismatch": (("exception_bitmap=0x4000", "pf_error_code_mask=1", "pf_error_code_match=1"), 0, N, N),
    # bit 14 clear: a #PF exits when (ec & mask) != match: every one does
    "#PF bit clear, PFEC mismatch": (("pf_error_code_mask=1", "pf_error_code_match=1"), N, 0, N),
}


@pytest.mark.parametrize("case", list(CASES))
def test_events_that_do_not_exit_are_delivered_in_c_as_python_does(case, image, monkeypatch):
    vmx, exits, pf_in_c, de_in_c = CASES[case]
    c = _run(image, monkeypatch, True, vmx)
    py = _run(image, monkeypatch, False, vmx)
    _same(c, py)
    vcpu = c[1]
    assert vcpu.stats[ExitReason.EXCEPTION_NMI] == exits
    fast = vcpu.delivery.fast
    assert fast.soft_delivered >= N          # every int 0x80, whatever the bitmap says: none exits
    assert fast.faults == pf_in_c            # guest #PFs found and delivered by the C #PF hook
    assert fast.faults_delivered == de_in_c  # #DE through the C INTR hook (an exit re-injects it in Python)
    assert fast.irets >= 2 * N               # the handlers' iret, left to the engine from C
    assert py[1].delivery.fast.soft_delivered == 0 and py[1].delivery.fast.faults == 0


def test_a_change_of_the_exception_bitmap_reaches_the_c_hooks(image, monkeypatch):
    """The hypervisor sets the #DE bit in its handler of the first I/O exit (before the divzero loop):
    from the next VM entry on every #DE exits, in C as in Python."""

    def on_start(vcpu):
        handlers = vcpu.hypervisor.handlers
        io = handlers[ExitReason.IO_INSTRUCTION]

        def handle_io(x):
            io(x)
            vcpu.vmcs.vmwrite(F.EXCEPTION_BITMAP, 1 << 0)

        handlers[ExitReason.IO_INSTRUCTION] = handle_io

    c = _run(image, monkeypatch, True, on_start=on_start)
    py = _run(image, monkeypatch, False, on_start=on_start)
    _same(c, py)
    assert c[1].stats[ExitReason.EXCEPTION_NMI] == N
    assert c[1].delivery.fast.soft_delivered >= N


def test_no_c_hooks_while_tracing(image, monkeypatch, tmp_path):
    """A trace needs each event's line from Python: the C hooks stay out of the way."""
    from cpuvirt.runner import run_guest

    vcpus = []
    r = run_guest(image, "hw", trace_path=str(tmp_path / "t.jsonl"), on_start=lambda hv: vcpus.append(hv.vcpu))
    assert r.outcome == "exit"
    fast = vcpus[0].delivery.fast
    assert fast.soft_delivered == 0 and fast.faults == 0 and fast.faults_delivered == 0


@pytest.mark.parametrize("guest, in_c", [("fault_storm", 400), ("iret_rf", 1000), ("gates", 1), ("ioperm", 1)])
def test_hostile_guests_run_the_same_with_the_c_events(guest, in_c, test_guest, monkeypatch):
    """200 #DE and 200 #GP back to back (the engine's fault escalation), irets whose image sets RF, task
    gates and call gates, I/O-permission faults from ring 3: the same run either way, most events in C."""
    image = str(test_guest(guest))
    c = _run(image, monkeypatch, True)
    _same(c, _run(image, monkeypatch, False))
    fast = c[1].delivery.fast
    assert fast.soft_delivered + fast.faults_delivered + fast.faults >= in_c
