"""CPUID: the one CPU model cpuvirt presents, in every mode (SDM Vol. 2A, CPUID).

It reports only what cpuvirt really implements; the engine (Unicorn's CPU) can do more, but a
feature counts only when cpuvirt handles it too. The model, documented in docs/platform.md:

- Vendor "GenuineIntel": the CPU follows Intel's rules (SDM event delivery, VT-x in hw mode).
- Leaf 0: maximum basic leaf 1. Leaf 1: family 6, model 0, stepping 0 (EAX = 0x00000600): the P6
  family, which has CMOV; no real processor has model 0, so no model-specific erratum workaround
  applies. EBX = 0: brand index 0, no CLFLUSH line size, one logical processor, initial APIC ID 0.
  ECX = 0: no SSE3, no VMX (bit 5; hw mode simulates VT-x for the hypervisor, it does not offer
  it to the guest), no x2APIC (bit 21), no TSC-deadline timer (bit 24), no hypervisor bit (31).
  EDX = FPU, PSE (4 MiB pages), TSC (virtual time), MSR, CX8, APIC (while IA32_APIC_BASE[11] is
  set, SDM 10.4.3), PGE, CMOV. Not reported: VME, DE, PAE, MCE, SEP, MTRR, MCA, PAT, PSE-36,
  CLFSH, MMX, FXSR, SSE, SSE2, HTT...
- Leaf 7 and above are not offered (the maximum basic leaf is 1): no UMIP, SMEP, SMAP...
- Extended leaves up to 0x80000004: 0x80000001 reports nothing (no NX, no long mode, no
  SYSCALL); 0x80000002-4 hold the brand string.
- A leaf above the maximum (basic or extended) returns the highest basic leaf's data, as Intel
  processors do (SDM: "If a value entered for CPUID.EAX is higher than the maximum input value
  ... the data for the highest basic information leaf is returned").
"""

from __future__ import annotations

import struct

VENDOR = b"GenuineIntel"
FAMILY, MODEL, STEPPING = 6, 0, 0
MAX_BASIC_LEAF = 1
MAX_EXTENDED_LEAF = 0x80000004
BRAND = b"cpuvirt virtual CPU"

# CPUID.01H:EDX feature bits (SDM Vol. 2A table 3-11).
FPU, PSE, TSC, MSR, CX8, APIC, PGE, CMOV = (1 << 0, 1 << 3, 1 << 4, 1 << 5, 1 << 8, 1 << 9, 1 << 13, 1 << 15)
LEAF1_EDX = FPU | PSE | TSC | MSR | CX8 | APIC | PGE | CMOV
LEAF1_EAX = (FAMILY << 8) | (MODEL << 4) | STEPPING
# CR4 bits this model refuses (#GP on mov to CR4): LA57 (12), VMXE (13) and everything above, none
# of which CPUID offers (no leaf 7, no VMX). Bits 0-11 are accepted as the engine implements them.
CR4_RESERVED = 0xFFFFF000

_BRAND_REGS = struct.unpack("<12I", BRAND.ljust(48, b"\0"))


def cpuid(leaf: int, subleaf: int = 0, apic_enabled: bool = True) -> tuple[int, int, int, int]:
    """(EAX, EBX, ECX, EDX) for CPUID with EAX = leaf, ECX = subleaf (no leaf here has subleaves)."""
    leaf &= 0xFFFFFFFF
    if leaf >= 0x80000000:
        if leaf == 0x80000000:
            return MAX_EXTENDED_LEAF, 0, 0, 0
        if leaf == 0x80000001:
            return 0, 0, 0, 0
        if leaf <= MAX_EXTENDED_LEAF:
            i = 4 * (leaf - 0x80000002)
            return _BRAND_REGS[i : i + 4]
        leaf = MAX_BASIC_LEAF
    elif leaf > MAX_BASIC_LEAF:
        leaf = MAX_BASIC_LEAF
    if leaf == 0:
        ebx, edx, ecx = struct.unpack("<3I", VENDOR)
        return MAX_BASIC_LEAF, ebx, ecx, edx
    return LEAF1_EAX, 0, 0, LEAF1_EDX if apic_enabled else LEAF1_EDX & ~APIC


def table(apic_enabled: bool = True) -> tuple[dict[int, tuple[int, int, int, int]], tuple[int, int, int, int]]:
    """The whole model as (leaf -> registers, the answer for every other leaf), for a CPUID answered
    from a table (engine/cpuid.py); `cpuid` stays the definition and tests check the two agree."""
    leaves = {
        leaf: cpuid(leaf, 0, apic_enabled)
        for leaf in [*range(MAX_BASIC_LEAF + 1), *range(0x80000000, MAX_EXTENDED_LEAF + 1)]
    }
    return leaves, cpuid(MAX_BASIC_LEAF + 1, 0, apic_enabled)
