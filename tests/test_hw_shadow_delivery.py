"""hw without EPT delivers the events that cause no VM exit (`int n`, faults outside the exception bitmap)
through the guest IDT in C (cpu/_delivery.c over the C copy of the shadow root, memory/shadowmirror.py):
its accesses are what ShadowPaging.gva_to_gpa answers with no side effect, anything else stays Python's.
With it off (VmxCpu.shadow_delivery_c = False, CPUVIRT_HW_SHADOW_DELIVERY_C=0) every run must leave the
same console, counters (events, VM exits, TLB fills, walks, shadow paging), virtual time and trace. The
guests: nanobench (system calls and #DE from ring 3), trap_deliver.S (gates not present, DPL, limits,
frames across pages, on pages without a shadow entry, over traced page tables...) and trap_events.S
(descriptors whose accessed bit the engine's own segment load would set: a store that may miss the shadow,
so C must leave them to Python)."""

from __future__ import annotations

import pytest

from cpuvirt.memory.shadowmirror import _lib
from cpuvirt.modes.hw.vmx import VmxCpu
from cpuvirt.nanobench import build
from cpuvirt.runner import run_guest
from tests.runs import run_record

pytestmark = pytest.mark.skipif(
    _lib() is None, reason="the C extensions are not built (python setup.py build_ext --inplace)"
)


def _both(path, monkeypatch, tmp_path, trace: bool):
    out = {}
    for on in (True, False):
        monkeypatch.setattr(VmxCpu, "shadow_delivery_c", on)
        cpus: list = []
        trace_path = tmp_path / f"{on}.jsonl" if trace else None
        res = run_guest(
            str(path),
            "hw",
            32,
            50_000_000,
            trace_path=None if trace_path is None else str(trace_path),
            mode_options={"ept": False},
            on_start=cpus.append,
        )
        fast = cpus[-1].vcpu._fast_delivery
        delivered = None if fast is None else fast._state.soft_delivered + fast._state.faults_delivered
        out[on] = (run_record(res), trace_path.read_bytes() if trace_path else b"", delivered)
    return out[True], out[False]


@pytest.mark.parametrize("guest, at_least", [("nanobench", 390), ("trap_deliver", 2500), ("trap_events", 3000)])
def test_c_deliveries_through_the_shadow_leave_what_python_leaves(guest, at_least, test_guest, monkeypatch, tmp_path):
    if guest == "nanobench":
        path = tmp_path / "nanobench.bin"
        path.write_bytes(build(200, False))
    else:
        path = test_guest(guest)
    (c, _, c_n), (py, _, py_n) = _both(path, monkeypatch, tmp_path, trace=False)
    assert c["outcome"] == "exit" and c["status"] == 0, c["message"]
    assert py_n is None and c_n >= at_least, (c_n, at_least)
    assert c == py


def test_the_trace_is_the_same_both_ways(monkeypatch, tmp_path):
    """With a trace the INTR hook stays Python's, but EventDelivery still delivers in C where it can."""
    path = tmp_path / "nanobench.bin"
    path.write_bytes(build(100, False))
    (c, c_trace, _), (py, py_trace, _) = _both(path, monkeypatch, tmp_path, trace=True)
    assert c == py and c_trace == py_trace and len(c_trace) > 1000


def test_c_linear_access_through_the_shadow_is_pythons_without_side_effects():
    """delivery_linear over the shadow's C copy (what a delivery's reads and its frame write use) against
    Mmu.read_linear / write_linear over ShadowPaging on random states (entries, CR0.WP, CR4.PSE, CR3,
    traced frames): where C answers, Python gives the same bytes or leaves the same memory, with no walk,
    no hidden fault and no write let through by WP = 0 to record (ShadowPaging._granted); where C declines
    nothing changed. And C must answer a good share."""
    import ctypes
    import random

    from cpuvirt.cpu.fastdelivery import FastDelivery
    from cpuvirt.cpu.fastdelivery import _lib as dlib
    from cpuvirt.engine import regs as R
    from cpuvirt.machine.machine import Machine
    from cpuvirt.memory.mmu import GuestPageFault
    from cpuvirt.memory.shadow import ShadowPaging
    from cpuvirt.memory.shadowmirror import ShadowMirror
    from cpuvirt.modes import get_mode

    PD, PD2, PT, A, B = 0x10000, 0x12000, 0x11000, 0x200000, 0x207000
    m = Machine(8)
    hv = get_mode("native")(m)
    m.set_flat_protected_mode(0x500)
    shadow = ShadowPaging(m.mmu)  # keyed by the engine's CRs, as under hw --no-ept
    mirror = ShadowMirror.of(shadow)
    fast = FastDelivery.install_shadow(hv.vcpu)
    assert mirror is not None and fast is not None
    fast.deliver_through_shadow(hv.vcpu.delivery, mirror)
    fn = dlib().delivery_linear
    fn.restype, fn.argtypes = (
        ctypes.c_int,
        (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_int, ctypes.c_char_p),
    )
    mmu, rng = m.mmu, random.Random(3)
    answered = declined = 0
    traced = False

    class Entry(ctypes.Structure):
        _fields_ = [("paddr", ctypes.c_uint64), ("perms", ctypes.c_uint32)]

    m.regs.write(R.CR3, PD)
    m.regs.write(R.CR0, 0x80010011)
    for i in range(3000):
        page = rng.randrange(4)
        r = rng.random()
        if r < 0.2:
            bits = (
                rng.choice((0, 1, 1, 1)) | rng.getrandbits(1) << 1 | rng.getrandbits(1) << 5 | rng.getrandbits(1) << 6
            )
            m.write_gpa(PT + 4 * page, (rng.choice((A, B)) | bits | 4).to_bytes(4, "little"))
            shadow.invlpg(page << 12)
        elif r < 0.25:
            pde = PT | rng.choice((0x27, 0x25, 0x23)) if rng.random() < 0.8 else (0x400000 | 0xE7)
            m.write_gpa(rng.choice((PD, PD2)), pde.to_bytes(4, "little"))
        elif r < 0.32:
            m.regs.write(R.CR0, m.regs.read(R.CR0) ^ 0x10000)
        elif r < 0.35:
            m.regs.write(R.CR4, m.regs.read(R.CR4) ^ 0x10)
        elif r < 0.4:
            cr3 = rng.choice((PD, PD2))
            m.regs.write(R.CR3, cr3)
            shadow.on_cr3_write(cr3)
        elif r < 0.43:
            if traced:
                mmu.traces.untrace_frame(A, "test")
            else:
                mmu.traces.trace_frame(A, "test", lambda tw: False)
            traced = not traced
        mmu.crs = None
        mmu.fill(m.uc, (page << 12) | 0x10, rng.choice((16, 17)), Entry(), None)  # the guest's own access
        mmu.take_pending()
        mmu.crs = None
        shadow._wp_granted = False
        gva, n = (rng.randrange(4) << 12) | rng.choice((0x100, 0xFFC, 0xFF8)), rng.choice((4, 8, 12))
        write = rng.random() < 0.5
        data = bytes(rng.randrange(256) for _ in range(n))
        before = (m.read_gpa(A, 0x1000), m.read_gpa(B, 0x1000), shadow.counters.as_dict(), dict(mmu.counters.as_dict()))
        buf = ctypes.create_string_buffer(data, n)
        why = (i, hex(gva), n, write, hex(m.regs.read(R.CR0)), m.regs.read(R.CR4), traced)
        if not fn(fast._pstate, m.uc._uch, gva, n, int(write), buf):
            assert (m.read_gpa(A, 0x1000), m.read_gpa(B, 0x1000)) == before[:2], why
            declined += 1
            continue
        answered += 1
        after_c = (m.read_gpa(A, 0x1000), m.read_gpa(B, 0x1000))
        m.write_gpa(A, before[0])
        m.write_gpa(B, before[1])
        try:
            if write:
                mmu.write_linear(gva, data)
            else:
                assert mmu.read_linear(gva, n) == buf.raw[:n], why
        except GuestPageFault:
            raise AssertionError(("C answered what faults in Python", why)) from None
        assert (m.read_gpa(A, 0x1000), m.read_gpa(B, 0x1000)) == after_c, why
        assert shadow.counters.as_dict() == before[2] and mmu.counters.as_dict() == before[3], why
        assert not shadow._wp_granted, ("Python recorded a WP grant C skipped", why)
    assert answered > 300 and declined > 300, (answered, declined)


def test_descriptors_the_engine_would_mark_accessed_end_in_bounded_time(test_guest):
    """trap_events.S has code and stack descriptors without the accessed bit: were C to deliver through
    them, the engine's own segment load would store that bit through a fill that misses the shadow, a #PF
    exit refused again and again with no Python in the loop (the host hung). A subprocess with a timeout,
    so that such a regression fails instead of hanging the suite."""
    import subprocess
    import sys

    p = subprocess.run(
        [sys.executable, "-m", "cpuvirt", "run", str(test_guest("trap_events")), "--mode", "hw", "--no-ept",
         "--max-insns", "50000000", "-q"],
        capture_output=True, timeout=120, check=False,
    )  # fmt: skip
    assert p.returncode == 0 and b"FAIL" not in p.stdout, (p.returncode, p.stderr[-300:])
