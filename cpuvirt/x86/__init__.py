"""Stateless x86 facts and decoders, each stated once: exception vectors and which push an error code,
the CPUID model, fault-address decoding, the store and MMIO instruction emulator. Imports only the
engine floor (register ids) and the ground floor."""
