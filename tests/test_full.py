"""Mode `full` (binary translation) on whole guests: the console of native, isolation, coherence,
callouts, precise exceptions, adaptive translation."""
from __future__ import annotations

import json

import pytest

from cpuvirt.engine.hostmem import HostRegion
from cpuvirt.memory.p2m import HV_HPA
from cpuvirt.modes.full import ADAPTIVE_THRESHOLD, TC_WINDOW
from cpuvirt.bt.tcache import CALLOUT_SLOTS, TC_SIZE
from cpuvirt.runner import run_guest
from tests.guest_args import in_guest_dir, run_kwargs

GUESTS = ["hello", "exceptions", "interrupts", "apic", "paging", "usermode", "holes", "smc", "hostile"]
_native: dict = {}


def native(guest):
    if guest not in _native:
        with in_guest_dir():
            _native[guest] = run_guest(guest, **run_kwargs(guest))
    return _native[guest]


def run_full(guest, **kw):
    modes = []
    with in_guest_dir():
        args = run_kwargs(guest)
        args.update(kw)
        res = run_guest(guest, mode="full", mode_options={"observer": modes.append}, **args)
    return res, modes[0]


@pytest.mark.parametrize("guest", GUESTS)
def test_console_equals_native(guest):
    res, mode = run_full(guest)
    nat = native(guest)
    assert (res.outcome, res.status) == ("exit", 0), res.message
    assert res.console == nat.console
    c = mode.vcpu.tc.counters
    assert c.translations > 0 and c.callouts > 0


def test_kernel_code_runs_translated_with_chaining_and_inline_caches():
    res, mode = run_full("hello")
    c = mode.vcpu.tc.counters
    assert c.chain_patches > 0 and c.ic_misses > 0
    # far more guest instructions ran than were translated or called out
    assert res.icount > 10 * (c.callouts + c.translations)


@pytest.mark.parametrize("guest", ["usermode", "apic"])
def test_trace_events_carry_guest_eips(guest, tmp_path):
    path = tmp_path / f"{guest}.jsonl"
    res, mode = run_full(guest, trace_path=str(path))
    events = [json.loads(line) for line in path.read_text().splitlines()[1:-1]]
    callouts = [e for e in events if e["kind"] == "callout"]
    assert {"iretd", "hlt", "lidt", "ltr"} & {e["reason"] for e in callouts}
    if guest == "apic":        # MMIO sites are found in the running (translated) block
        assert any(e["kind"] == "mmio" and e["insn"].startswith("mov") for e in events)
    for e in events:
        eip = int(e["eip"], 16)
        assert not TC_WINDOW <= eip < TC_WINDOW + TC_SIZE, e      # never a TC address
        assert e["insn"] != "(bad)"


def test_precise_exceptions_match_native(tmp_path):
    """Exceptions raised inside translated code reach the guest at native's EIPs."""
    def exceptions(mode, path):
        with in_guest_dir():
            run_guest("exceptions", mode=mode, trace_path=str(path), **run_kwargs("exceptions"))
        return [(e["reason"], e["eip"]) for e in map(json.loads, path.read_text().splitlines()[1:-1])
                if e.get("kind") in ("exception", "page_fault") and e.get("reason") != "ptemod"]
    nat = exceptions("native", tmp_path / "n.jsonl")
    full = exceptions("full", tmp_path / "f.jsonl")
    assert nat and full == nat


def test_self_modifying_code_invalidates_translations():
    res, mode = run_full("smc")
    assert res.console == native("smc").console and res.status == 0
    assert mode.vcpu.tc.counters.invalidations > 0


@pytest.fixture
def hv_writes(monkeypatch):
    """Every write the hypervisor makes into its own host memory, as a shadow copy."""
    copies = {}
    orig = HostRegion.write

    def write(self, hpa, data):
        if self.hpa == HV_HPA:
            buf = copies.setdefault(id(self), bytearray(self.size))
            buf[hpa - self.hpa:hpa - self.hpa + len(data)] = data
        return orig(self, hpa, data)
    monkeypatch.setattr(HostRegion, "write", write)
    return copies


def test_hostile_guest_never_reaches_the_hypervisor(hv_writes):
    # dense: every page of the translation-cache window is read, written and executed by the guest
    hi = TC_WINDOW + TC_SIZE
    res, mode = run_full("hostile", cmdline=f"dense={TC_WINDOW:#x}-{hi:#x} strict")
    assert (res.outcome, res.status) == ("exit", 0), res.message
    assert b"FAIL" not in res.console and b"PASS aliased onto RAM: code written" in res.console
    vcpu = mode.vcpu
    hv = vcpu.hv_mem
    shadow = hv_writes[id(hv)]
    # hypervisor memory holds exactly what the hypervisor wrote there: the TC, the shadow GDT
    assert bytes(hv.read(hv.hpa, hv.size)) == bytes(shadow)
    tc = vcpu.tc
    assert vcpu.tc_bytes(TC_WINDOW + len(tc.sites), CALLOUT_SLOTS - len(tc.sites)) == b"\xcc" * (CALLOUT_SLOTS - len(tc.sites))
    assert tc.counters.translations > 0


def _nanobench(n):
    from cpuvirt.toolchain.build import guest_source_dir, include_dir
    from cpuvirt.toolchain.image import build_image
    from cpuvirt.toolchain.preprocess import preprocess
    pre = preprocess(guest_source_dir() / "nanobench.S", {"PV": 0, "N_ITER": n}, [include_dir()])
    return build_image(pre.lines)[0]


def test_adaptive_translation_stops_the_page_table_faults(tmp_path):
    n = 120
    image = tmp_path / "nanobench.bin"
    image.write_bytes(_nanobench(n))
    res, mode = run_full(str(image))
    assert (res.outcome, res.status) == ("exit", 0), res.message
    vcpu = mode.vcpu
    # the ptemod store into the guest page table faulted a few times, then became a callout
    worst = max(vcpu.traced_stores.values())
    assert worst <= ADAPTIVE_THRESHOLD + 1
    assert vcpu.tc.counters.adaptive >= 1
    assert vcpu.adaptive_stores >= n - ADAPTIVE_THRESHOLD - 1


STORE_SITE = """
#include "kernel.inc"
#include "paging.inc"
#define PAGE 0x00380000
.text
main:
    mov edi, page_dir
    mov esi, page_table_low
    mov eax, PTE_P | PTE_W | PTE_U
    call paging_identity_4m
    mov eax, page_dir
    call paging_enable
    call into_page_table
    mov ecx, 300                  # the same store into an ordinary page: nobody traces it
untraced:
    mov edi, scratch
    mov eax, ecx
    call store
    dec ecx
    jnz untraced
    call into_page_table
    ret
into_page_table:                  # 20 stores of the PTE's own value into the live page table
    mov ecx, 20
traced:
    mov edi, page_table_low
    add edi, 4 * 0x380
    mov eax, dword ptr [edi]
    call store
    mov eax, dword ptr [PAGE]     # the page is used through the PTE: its frame stays traced
    dec ecx
    jnz traced
    ret
store:
    mov dword ptr [edi], eax
    ret
.bss
scratch: .zero 4
"""


def test_adaptive_store_site_becomes_native_again(tmp_path, monkeypatch):
    """A store site made a callout by the page-table stores it made, which then stores to an untraced
    page NATIVE_AGAIN_AFTER times in a row, is translated as a plain store again (xv6's mappages
    filling a new process's page tables); back at the page table, it is made a callout again. (The
    kernel's IDT set-up, storing gates beside its code, makes two sites of its own adaptive.)"""
    from collections import Counter

    from cpuvirt.modes.full.adaptive import NATIVE_AGAIN_AFTER
    from cpuvirt.modes.full.vcpu import FullVcpu
    from cpuvirt.toolchain.build import include_dir
    from cpuvirt.toolchain.image import build_image
    from cpuvirt.toolchain.preprocess import preprocess
    src = tmp_path / "storesite.S"
    src.write_text(STORE_SITE)
    image = tmp_path / "storesite.bin"
    data, info = build_image(preprocess(src, {}, [include_dir()]).lines)
    image.write_bytes(data)
    site = info.symbols["store"]
    stores: Counter = Counter()
    original = FullVcpu._adaptive_store

    def counted(self, geip):
        stores[geip] += 1
        return original(self, geip)

    monkeypatch.setattr(FullVcpu, "_adaptive_store", counted)
    monkeypatch.setenv("CPUVIRT_ADAPTIVE_C", "0")  # every callout's store is Python's, and counted here
    res, mode = run_full(str(image))
    assert (res.outcome, res.status) == ("exit", 0), res.message
    vcpu = mode.vcpu
    c = vcpu.tc.counters
    assert c.unadapted == 1 and site in vcpu.rt.translator.adaptive
    # callouts: 20 - 4 + NATIVE_AGAIN_AFTER untraced ones, then 20 - 4 again; the rest ran natively
    assert stores[site] == 2 * (20 - ADAPTIVE_THRESHOLD) + NATIVE_AGAIN_AFTER
    assert vcpu.adaptive_stores == sum(stores.values())
    assert vcpu._native_after[site] == 2 * NATIVE_AGAIN_AFTER


def test_bt_verb_shows_each_kind(capsys, tmp_path):
    from cpuvirt.cli import main
    trace = tmp_path / "bt.jsonl"
    assert main(["bt", "usermode", "--blocks", "40", "--trace", str(trace)]) == 0
    assert any(json.loads(line).get("kind") == "translate" for line in trace.read_text().splitlines())
    out = capsys.readouterr().out
    for kind in ("IDENT", "inline", "callout", "chain"):
        assert f" {kind} " in out
    assert "-> chained to the translation of guest" in out
    assert main(["bt", "hello", "--at", "0x1"]) in (0, 2)
    assert main(["bt", "nosuchguest"]) == 2
