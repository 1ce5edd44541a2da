"""The VMCS: fields with their SDM encodings and widths, read and written only by vmread/vmwrite.

Encodings are those of SDM Vol. 3D appendix B (the same numbers as Linux `asm/vmx.h`). An encoding
carries its own width and kind (SDM 25.11.2): bits 14:13 width (0 16-bit, 1 64-bit, 2 32-bit, 3 natural),
bits 11:10 type (0 control, 1 exit information, 2 guest state, 3 host state), bit 0 the high half of
a 64-bit field.

Guest-state fields that the simulated processor keeps in the engine's registers while the guest runs
(RIP, RSP, RFLAGS, CR0, CR3, CR4, selectors, descriptor tables) are *live*: vmread fetches them from the
engine only when a handler asks, and vmwrite marks them dirty so the next VM entry loads them. That is
the lazy register traffic an exit path needs (UNICORN-NOTES.md, "Costs").
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from enum import IntEnum


class Field(IntEnum):
    # 16-bit
    VIRTUAL_PROCESSOR_ID = 0x0000
    GUEST_ES_SELECTOR = 0x0800
    GUEST_CS_SELECTOR = 0x0802
    GUEST_SS_SELECTOR = 0x0804
    GUEST_DS_SELECTOR = 0x0806
    GUEST_FS_SELECTOR = 0x0808
    GUEST_GS_SELECTOR = 0x080A
    GUEST_LDTR_SELECTOR = 0x080C
    GUEST_TR_SELECTOR = 0x080E
    HOST_ES_SELECTOR = 0x0C00
    HOST_CS_SELECTOR = 0x0C02
    HOST_SS_SELECTOR = 0x0C04
    HOST_DS_SELECTOR = 0x0C06
    HOST_FS_SELECTOR = 0x0C08
    HOST_GS_SELECTOR = 0x0C0A
    HOST_TR_SELECTOR = 0x0C0C
    # 64-bit
    IO_BITMAP_A = 0x2000
    IO_BITMAP_B = 0x2002
    MSR_BITMAP = 0x2004
    TSC_OFFSET = 0x2010
    VIRTUAL_APIC_PAGE_ADDR = 0x2012
    APIC_ACCESS_ADDR = 0x2014
    EPT_POINTER = 0x201A
    GUEST_PHYSICAL_ADDRESS = 0x2400
    VMCS_LINK_POINTER = 0x2800
    GUEST_IA32_EFER = 0x2806
    # 32-bit
    PIN_BASED_VM_EXEC_CONTROL = 0x4000
    CPU_BASED_VM_EXEC_CONTROL = 0x4002
    EXCEPTION_BITMAP = 0x4004
    PAGE_FAULT_ERROR_CODE_MASK = 0x4006
    PAGE_FAULT_ERROR_CODE_MATCH = 0x4008
    CR3_TARGET_COUNT = 0x400A
    VM_EXIT_CONTROLS = 0x400C
    VM_ENTRY_CONTROLS = 0x4012
    VM_ENTRY_INTR_INFO_FIELD = 0x4016
    VM_ENTRY_EXCEPTION_ERROR_CODE = 0x4018
    VM_ENTRY_INSTRUCTION_LEN = 0x401A
    TPR_THRESHOLD = 0x401C
    SECONDARY_VM_EXEC_CONTROL = 0x401E
    VM_INSTRUCTION_ERROR = 0x4400
    VM_EXIT_REASON = 0x4402
    VM_EXIT_INTR_INFO = 0x4404
    VM_EXIT_INTR_ERROR_CODE = 0x4406
    IDT_VECTORING_INFO_FIELD = 0x4408
    IDT_VECTORING_ERROR_CODE = 0x440A
    VM_EXIT_INSTRUCTION_LEN = 0x440C
    VMX_INSTRUCTION_INFO = 0x440E
    GUEST_ES_LIMIT = 0x4800
    GUEST_CS_LIMIT = 0x4802
    GUEST_SS_LIMIT = 0x4804
    GUEST_DS_LIMIT = 0x4806
    GUEST_FS_LIMIT = 0x4808
    GUEST_GS_LIMIT = 0x480A
    GUEST_LDTR_LIMIT = 0x480C
    GUEST_TR_LIMIT = 0x480E
    GUEST_GDTR_LIMIT = 0x4810
    GUEST_IDTR_LIMIT = 0x4812
    GUEST_CS_AR_BYTES = 0x4816
    GUEST_SS_AR_BYTES = 0x4818
    GUEST_INTERRUPTIBILITY_INFO = 0x4824
    GUEST_ACTIVITY_STATE = 0x4826
    GUEST_SYSENTER_CS = 0x482A
    HOST_IA32_SYSENTER_CS = 0x4C00
    # natural width
    CR0_GUEST_HOST_MASK = 0x6000
    CR4_GUEST_HOST_MASK = 0x6002
    CR0_READ_SHADOW = 0x6004
    CR4_READ_SHADOW = 0x6006
    CR3_TARGET_VALUE0 = 0x6008
    CR3_TARGET_VALUE1 = 0x600A
    CR3_TARGET_VALUE2 = 0x600C
    CR3_TARGET_VALUE3 = 0x600E
    EXIT_QUALIFICATION = 0x6400
    GUEST_LINEAR_ADDRESS = 0x640A
    GUEST_CR0 = 0x6800
    GUEST_CR3 = 0x6802
    GUEST_CR4 = 0x6804
    GUEST_ES_BASE = 0x6806
    GUEST_CS_BASE = 0x6808
    GUEST_SS_BASE = 0x680A
    GUEST_DS_BASE = 0x680C
    GUEST_FS_BASE = 0x680E
    GUEST_GS_BASE = 0x6810
    GUEST_LDTR_BASE = 0x6812
    GUEST_TR_BASE = 0x6814
    GUEST_GDTR_BASE = 0x6816
    GUEST_IDTR_BASE = 0x6818
    GUEST_DR7 = 0x681A
    GUEST_RSP = 0x681C
    GUEST_RIP = 0x681E
    GUEST_RFLAGS = 0x6820
    GUEST_PENDING_DBG_EXCEPTIONS = 0x6822
    HOST_CR0 = 0x6C00
    HOST_CR3 = 0x6C02
    HOST_CR4 = 0x6C04
    HOST_TR_BASE = 0x6C0A
    HOST_GDTR_BASE = 0x6C0C
    HOST_IDTR_BASE = 0x6C0E
    HOST_RSP = 0x6C14
    HOST_RIP = 0x6C16


WIDTH_BITS = {0: 16, 1: 64, 2: 32, 3: 32}  # natural width is 32 bits on this 32-bit processor
KINDS = ("control", "exit information", "guest state", "host state")


def width(enc: int) -> int:
    return WIDTH_BITS[(enc >> 13) & 3]


def kind(enc: int) -> str:
    return KINDS[(enc >> 10) & 3]


# Fields the simulation does not maintain: the engine does not expose segment-descriptor caches, and
# host state would describe the root-mode hypervisor, which is cpuvirt's own Python code.
NOT_SIMULATED = frozenset(
    f.value
    for f in Field
    if (
        f.name.startswith("GUEST_")
        and (f.name.endswith(("_LIMIT", "_AR_BYTES")) or f.name.endswith("_BASE"))
        and f.name
        not in ("GUEST_GDTR_LIMIT", "GUEST_IDTR_LIMIT", "GUEST_GDTR_BASE", "GUEST_IDTR_BASE", "GUEST_TR_BASE")
    )
    or f.name.startswith("HOST_")
)


class VmcsError(Exception):
    """vmread/vmwrite of a field this VMCS does not support (VMfailValid, error 12 in the SDM)."""


class Vmcs:
    def __init__(self):
        self._values: dict[int, int] = {f.value: 0 for f in Field}
        self._live: dict[int, tuple] = {}  # encoding -> (read(), write(value))
        self.dirty: set[int] = set()  # live guest-state fields written since the last entry
        self._cache: dict[int, int] = {}  # live values already fetched during this exit
        self.on_write: Callable[[], None] | None = None  # told of every vmwrite (hw's C exit path)

    def bind_live(self, field: Field, read, write) -> None:
        self._live[field.value] = (read, write)

    def vmread(self, field: int) -> int:
        enc = int(field)
        if enc not in self._values:
            raise VmcsError(f"vmread of unsupported field {enc:#06x}")
        live = self._live.get(enc)
        if live is not None:
            if enc in self.dirty or enc in self._cache:
                return self._values[enc]
            v = live[0]()
            self._cache[enc] = v
            self._values[enc] = v
            return v
        return self._values[enc]

    def vmwrite(self, field: int, value: int) -> None:
        enc = int(field)
        if enc not in self._values:
            raise VmcsError(f"vmwrite of unsupported field {enc:#06x}")
        self._values[enc] = value & ((1 << width(enc)) - 1)
        if self.on_write is not None:
            self.on_write()
        if enc in self._live:
            self.dirty.add(enc)

    def on_exit(self) -> None:
        """A VM exit: live guest state is now in the engine, fetched on demand."""
        self._cache.clear()

    def load_dirty(self) -> list[int]:
        """VM entry: write the guest-state fields a handler changed into the engine."""
        written = sorted(self.dirty)
        for enc in written:
            self._live[enc][1](self._values[enc])
        self.dirty.clear()
        self._cache.clear()
        return written

    def dump(self, controls: Mapping[str, tuple[Field, int]] | None = None) -> str:
        """Every field, grouped as the SDM groups them, with its encoding; the execution-control fields
        name their set bits from `controls` (controls.CONTROLS: name -> (field, bit))."""
        lines = []
        for k in (2, 3, 0, 1):
            lines.append(f"{KINDS[k]}:")
            for f in Field:
                if (f.value >> 10) & 3 == k:
                    if f.value in NOT_SIMULATED:
                        lines.append(f"  {f.value:#06x}  {f.name:<32} (not simulated)")
                        continue
                    v = self.vmread(f)
                    w = width(f.value)
                    lines.append(f"  {f.value:#06x}  {f.name:<32} {v:#0{w // 4 + 2}x}{_set_bits(f, v, controls or {})}")
        return "\n".join(lines)


def _set_bits(f, value: int, controls: Mapping[str, tuple[Field, int]]) -> str:
    """For a VM-execution control field: the names of its set bits, others by number."""
    names = {bit: name for name, (field, bit) in controls.items() if field == f}
    if not names:
        return ""
    bits = [names.get(b, f"bit{b}") for b in range(32) if value >> b & 1]
    return "  " + (" ".join(bits) if bits else "(none)")
