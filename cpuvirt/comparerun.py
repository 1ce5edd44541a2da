"""Runs of one guest under several techniques, as `cpuvirt compare` and `cpuvirt report` line them up:
each run with a trace, the guest instructions the engine executed and (full) what the translator made of
them, as the Columns trace/compare.py aligns. Here rather than in trace/, so that the trace package
(whose format the runner writes) does not reach up to the runner."""

from __future__ import annotations

import os
import tempfile

from cpuvirt.errors import CpuvirtError
from cpuvirt.runner import resolve_guest, run_guest
from cpuvirt.trace.compare import Column
from cpuvirt.trace.format import read_trace
from cpuvirt.trace.symbols import for_guest


def run_columns(
    guest: str, specs, max_insns: int, mem_mib: int = 32, extra_vmx=(), cmdline: str = "", devices=(), inputs=None
) -> list[Column]:
    """Run `guest` under each ModeSpec, with a trace, the executed code and (full) the translations.
    `cmdline`, `devices` (PCI devices, as `run --device`) and `inputs` (COM1's scripted input:
    input_file, input_prompt) are the same for every run."""
    cols = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, spec in enumerate(specs):
            col = Column(spec.label, spec.mode, spec.vmx)
            cols.append(col)
            try:
                resolve_guest(guest, spec.mode)
            except CpuvirtError as e:
                col.why_not = str(e)
                continue
            path = os.path.join(tmp, f"{i}.jsonl")
            held: list = []
            opts = spec.options(extra_vmx) or {}
            if spec.mode == "full":
                opts = {"observer": held.append, "verbose": True}
            try:
                res = run_guest(
                    guest,
                    spec.mode,
                    mem_mib,
                    max_insns,
                    path,
                    None,
                    cmdline,
                    mode_options=opts or None,
                    on_start=held.append,
                    devices=devices,
                    **(inputs or {}),
                )
            except CpuvirtError as e:
                col.why_not = str(e)
                continue
            col.result, col.console = res, res.console
            col.trace = read_trace(path)
            col.symbols = for_guest(guest, spec.mode)
            hv = held[-1]
            col.executed = executed_insns(hv)
            if spec.mode == "full":
                col.translated = {
                    ins.geip: ins.kind for blk in hv.vcpu.tc.blocks.values() for ins in blk.insns if ins.size
                }
                for addr in hv.vcpu.rt.translator.adaptive:
                    col.translated[addr] = "callout (adaptive)"
            if hv.settings is not None:
                col.controls = dict(hv.settings.bits)
    return cols


def executed_insns(hv) -> dict:
    """Executed guest instructions (the engine translated a block there) -> text; the translation
    cache's own code (full) is not guest code and is left out."""
    m = hv.machine if hasattr(hv, "machine") else hv.vcpu.machine
    vcpu = hv.vcpu
    out = {}
    from capstone import CS_ARCH_X86, CS_MODE_32, Cs

    cs = Cs(CS_ARCH_X86, CS_MODE_32)
    tc = getattr(vcpu, "tc", None)
    for start, (addrs, end) in list(m.block_insns.items()):
        if tc is not None and tc.in_code(start):
            continue
        if start >= 0xF0000000:
            continue
        code = vcpu.mmu.fetch_bytes(start, min(end - start, 4096)) if hasattr(vcpu.mmu, "fetch_bytes") else None
        if not code:
            continue
        for addr, _size, mnem, ops in cs.disasm_lite(code, start):
            if addr in addrs:
                out[addr] = f"{mnem} {ops}".strip()
    return out
