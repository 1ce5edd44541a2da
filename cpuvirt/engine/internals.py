"""What cpuvirt reads of libunicorn's own structures (never hard-coded: found in its code or by probing
a live engine, and checked before use): the engine's CPUState and CPUX86State, where that state starts in
a saved context, and QEMU's functions libunicorn exports that its API does not offer (a one-page TLB
flush). The C fast paths (cpu/_delivery.c, modes/_trapfast.c, full's callouts, para's) reach the engine's
state through these. And the one thing cpuvirt changes in libunicorn: the clock it sizes its TLB by
(pin_tlb_clock), which is why every engine is made by new_engine.
"""

from __future__ import annotations

import ctypes
import os
from contextlib import contextmanager
from functools import lru_cache

from unicorn import UC_ARCH_X86, UC_MODE_32, Uc
from unicorn.unicorn_py3 import unicorn as _ucmod

from cpuvirt.engine import regs as R
from cpuvirt.engine.cext import load


def new_engine() -> Uc:
    """A 32-bit x86 engine, made once the engine's TLB clock is pinned (pin_tlb_clock): every engine cpuvirt
    makes comes from here."""
    pin_tlb_clock()
    return Uc(UC_ARCH_X86, UC_MODE_32)


@contextmanager
def probing():
    """Around the engines made only to probe libunicorn (cpu/quirks.py, cpu/segcache.py): the TLB clock is
    put back as they found it, so that a guest's run sizes its TLB alike whether or not the probes ran
    before it in the same process."""
    lib = _tlb_clock_lib()
    before = lib.vclock_tlb_clock()
    try:
        yield
    finally:
        lib.vclock_tlb_clock_set(before)


def tlb_clock() -> int:
    """The engine's TLB clock: the calls libunicorn made to it (once per engine made, once per flush)."""
    return _tlb_clock_lib().vclock_tlb_clock()


@lru_cache(maxsize=1)
def _tlb_clock_lib():
    """The clock's extension (engine/_vclock.c holds the TLB clock too), for its three plain functions."""
    lib = load("cpuvirt.engine._vclock", {})
    if lib is None:
        raise RuntimeError("cpuvirt's C clock hook is not built: run `pip install -e .` again")
    lib.vclock_pin_tlb_clock.argtypes, lib.vclock_pin_tlb_clock.restype = (ctypes.c_char_p,), ctypes.c_int
    lib.vclock_tlb_clock.argtypes, lib.vclock_tlb_clock.restype = (), ctypes.c_uint64
    lib.vclock_tlb_clock_set.argtypes, lib.vclock_tlb_clock_set.restype = (ctypes.c_uint64,), None
    return lib


@lru_cache(maxsize=1)
def pin_tlb_clock() -> str:
    """QEMU resizes the engine's software TLB at a flush from its use over the last 100 ms of host time, so
    the number of TLB misses (native's guest page walks, the shadow's hits, the walks' modelled cost) would
    follow the host's speed from run to run. Point libunicorn's gettimeofday, which it uses for nothing else,
    at a clock that advances a millisecond per call (_vclock.c tlb_clock): a window is then 100 flushes.
    Once per process, before the first engine is made. "pinned", or "host (...)" where it could not be done
    (another build of the library), or when CPUVIRT_TLB_CLOCK=host asks for the host's clock."""
    if os.environ.get("CPUVIRT_TLB_CLOCK") == "host":
        return "host (CPUVIRT_TLB_CLOCK=host)"
    rc = _tlb_clock_lib().vclock_pin_tlb_clock(b"libunicorn")
    if rc == 0:
        _closing_keeps_the_clock()
    return "pinned" if rc == 0 else f"host (vclock_pin_tlb_clock: {rc})"


def _closing_keeps_the_clock() -> None:
    """Closing an engine reads the clock too (uc_close flushes its TLB: one tick), and the binding closes an
    engine when the garbage collector gets to it, which may be in the middle of another engine's run (a
    cycle collected during a hook): that run's TLB windows would then end one flush earlier than in the
    same run elsewhere. Every engine made from now on leaves the clock as it found it when it is closed."""
    lib = _tlb_clock_lib()
    release = Uc.release_handle

    def release_handle(uch) -> None:
        before = lib.vclock_tlb_clock()
        try:
            release(uch)
        finally:
            lib.vclock_tlb_clock_set(before)

    Uc.release_handle = staticmethod(release_handle)  # type: ignore[method-assign]


def read_process(address: int, size: int) -> bytes | None:
    """`size` bytes of this process at `address`, or None where nothing is mapped (never a crash)."""
    try:
        fd = os.open("/proc/self/mem", os.O_RDONLY)
    except OSError:
        return None
    try:
        data = os.pread(fd, size, address)
    except (OSError, OverflowError):
        return None
    finally:
        os.close(fd)
    return data if len(data) == size else None


@lru_cache(maxsize=1)
def cpu_field() -> tuple[int, int] | None:
    """(offset of the CPUState pointer in libunicorn's uc_struct, offset of env_ptr in CPUState), read
    from libunicorn's own code: uc_context_save ends in memcpy(context->data, uc->cpu->env_ptr, size),
    i.e. `mov rax, [rbp + cpu]; ...; mov rsi, [rax + env_ptr]; call memcpy`. None when the code is not
    of that shape. The caller checks the result on its engine (_engine_cpu) before trusting it."""
    from capstone import CS_ARCH_X86, CS_MODE_64, Cs
    from capstone.x86 import X86_OP_MEM, X86_OP_REG

    fn = ctypes.cast(_ucmod.uclib.uc_context_save, ctypes.c_void_p).value
    code = read_process(fn, 0x200) if fn else None
    if code is None:
        return None
    cs = Cs(CS_ARCH_X86, CS_MODE_64)
    cs.detail = True
    insns = list(cs.disasm(code, fn))
    for k, insn in enumerate(insns[1:], 1):
        prev = insns[k - 1]
        if insn.mnemonic != "call" or prev.mnemonic != "mov" or prev.op_str.split(",")[0] != "rsi":
            continue
        src = prev.operands[1]
        if src.type != X86_OP_MEM or src.mem.index:
            continue
        for earlier in reversed(insns[: k - 1]):
            if earlier.mnemonic != "mov" or len(earlier.operands) != 2:
                continue
            dst, mem = earlier.operands
            if dst.type == X86_OP_REG and dst.reg == src.mem.base and mem.type == X86_OP_MEM and not mem.mem.index:
                return mem.mem.disp, src.mem.disp
    return None


def engine_cpu_state(uc) -> int | None:
    """The address of this engine's CPUState (QEMU's), checked: it leads to the CPU state whose first
    field is EAX as uc_reg_read reads it. None when libunicorn is not of the expected shape."""
    found = cpu_field()
    if found is None:
        return None
    cpu_off, env_off = found
    uc.reg_read(R.EAX)  # the engine makes its vCPU on first use: before that the pointer is not there
    cpu = read_process(uc._uch.value + cpu_off, 8)
    env = cpu and read_process(int.from_bytes(cpu, "little") + env_off, 8)
    if not cpu or not env:
        return None
    eax = uc.reg_read(R.EAX)
    try:
        for probe in (0x5A17C0DE, 0x0BADF00D):
            uc.reg_write(R.EAX, probe)
            seen = read_process(int.from_bytes(env, "little"), 4)
            if seen is None or int.from_bytes(seen, "little") != probe:
                return None
    finally:
        uc.reg_write(R.EAX, eax)
    return int.from_bytes(cpu, "little")


def engine_env(uc) -> int | None:
    """The address of this engine's CPUX86State (what uc_context_save copies), checked as
    engine_cpu_state checks it; None when libunicorn is not of the expected shape."""
    cpu = engine_cpu_state(uc)
    found = cpu_field()
    env = read_process(cpu + found[1], 8) if cpu is not None and found is not None else None
    return int.from_bytes(env, "little") if env else None


@lru_cache(maxsize=1)
def register_offsets() -> dict[int, int]:
    """Where registers are in the engine's CPUX86State, so that C paths read them there instead of through
    uc_reg_read, which returns that very field for each of them (memory/_tlbfill.c at every TLB fill,
    cpu/_delivery.c at every delivery), and write EIP there where a C path leaves the engine's block itself
    (cpu/_evseg.h ev_set_eip): the general registers, EIP, CR0, CR2, CR3, CR4 (64-bit words whose
    low half the API returns) and the selectors of CS and SS (32 bits). Found once, on a probe engine put in
    real-address mode (where loading a segment register reads no descriptor): each is the one place of the
    state that follows two values written through the API, and CR0 is where the state holds the value the
    API reads. Empty when any is not found (the C paths then keep the API)."""
    regs = {
        R.EAX: 8,
        R.ECX: 8,
        R.EDX: 8,
        R.EBX: 8,
        R.ESP: 8,
        R.EBP: 8,
        R.ESI: 8,
        R.EDI: 8,
        R.EIP: 8,
        R.CR2: 8,
        R.CR3: 8,
        R.CR4: 8,
        R.CS: 4,
        R.SS: 4,
    }
    probes = {R.CR3: (0x5A17C000, 0x0BADF000), R.CR4: (0x10, 0x200), R.CS: (0x1234, 0x4321), R.SS: (0x2345, 0x5432)}
    with probing():
        uc = new_engine()
        env = engine_env(uc)
        if env is None:
            return {}
        uc.reg_write(R.CR0, uc.reg_read(R.CR0) & ~1)  # real-address mode (the engine starts in protected mode)
        found: dict[int, int] = {}
        for reg, size in regs.items():
            places: set[int] | None = None
            for probe in probes.get(reg, (0x5A17C0DE, 0x0BADF00D)):
                uc.reg_write(reg, probe)
                state = read_process(env, 0x400)
                if state is None:
                    return {}
                want = probe.to_bytes(size, "little")
                here = {k for k in range(0, 0x400 - 8, size) if state[k : k + size] == want}
                places = here if places is None else places & here
            if not places or len(places) != 1:
                return {}
            found[reg] = places.pop()
        cr0 = found[R.CR3] - 24  # cr[0..4]: QEMU's `target_ulong cr[5]`, checked against the API here
        state = read_process(env, 0x400)
        if found[R.CR4] != found[R.CR3] + 8 or found[R.CR2] != found[R.CR3] - 8 or state is None:
            return {}
        if int.from_bytes(state[cr0 : cr0 + 8], "little") != uc.reg_read(R.CR0):
            return {}
        found[R.CR0] = cr0
        return found


def context_header(uc, env: int) -> int | None:
    """Where the copy of CPUX86State starts in a saved context (offsets found in a context count from
    the context itself): the offset at which the context's bytes equal the live state's, with EAX and
    ECX (its first fields) holding probe values so that the match is unique."""
    eax, ecx = uc.reg_read(R.EAX), uc.reg_read(R.ECX)
    try:
        uc.reg_write(R.EAX, 0x5A17C0DE)
        uc.reg_write(R.ECX, 0x0BADF00D)
        ctx = uc.context_save()
        base = ctypes.cast(ctx.context, ctypes.c_void_p).value
        live = read_process(env, 64)
        blob = read_process(base, 256 + 64) if base else None
    finally:
        uc.reg_write(R.EAX, eax)
        uc.reg_write(R.ECX, ecx)
    if live is None or blob is None or blob.count(live) != 1:
        return None
    at = blob.find(live)
    return at if at <= 256 else None


class PageFlush:
    """One page out of the engine's TLB (QEMU's tlb_flush_page, exported by libunicorn), where the
    guest asked for no more: an INVLPG made as a whole flush refills every page the guest then touches.
    `function, cpu`: the C pointers, for C callers; calling the object flushes from Python."""

    def __init__(self, function: int, cpu: int):
        self.function, self.cpu = function, cpu
        self._call = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint64)(function)

    def __call__(self, linear: int) -> None:
        self._call(self.cpu, linear & ~0xFFF)

    @classmethod
    def of(cls, uc) -> "PageFlush | None":
        fn = getattr(_ucmod.uclib, "tlb_flush_page_x86_64", None)
        cpu = engine_cpu_state(uc) if fn is not None else None
        address = ctypes.cast(fn, ctypes.c_void_p).value if fn is not None else None
        return None if cpu is None or address is None else cls(address, cpu)
