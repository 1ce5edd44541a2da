"""The clock's block stubs (engine/_vclock.c, "Counting without the call"): a block counted once jumps to
a stub of its own that counts it, instead of calling the clock hook, which looks its count up in the table.
Whole runs must leave the same console, counters, virtual time and trace with the stubs off
(CPUVIRT_CLOCK_STUBS=0), in every mode, on guests whose timer interrupts fall at exact instructions
(interrupts, apic), that rewrite their own code (smc: the engine translates blocks again), switch page
tables (paging, usermode) and remap a code page (remap_count.S: the counts of a page are dropped, and the
stubs of its blocks must look again)."""

from __future__ import annotations

import pytest

from cpuvirt.runner import run_guest
from tests.runs import run_record

MODES = ["native", "trap", "full", "para", "hw", "hw-noept"]


def _both_ways(guest, mode, tmp_path, monkeypatch, trace: bool):
    out = {}
    options = {"ept": False} if mode == "hw-noept" else None
    for env in ("1", "0"):
        monkeypatch.setenv("CPUVIRT_CLOCK_STUBS", env)
        cpus: list = []
        path = tmp_path / f"{env}.jsonl" if trace else None
        res = run_guest(
            guest,
            mode.split("-")[0],
            32,
            0,
            trace_path=str(path) if path else None,
            on_start=cpus.append,
            mode_options=options,
        )
        clock = cpus[-1].machine.clock
        out[env] = (run_record(res), path.read_bytes() if path else b"", clock.stubs, clock.now)
    return out["1"], out["0"]


@pytest.mark.parametrize(
    "guest,mode",
    [
        (g, m)
        for g in ("interrupts", "apic", "smc", "paging", "usermode")
        for m in MODES
        if m != "para" or g not in ("apic", "smc")  # (these two have no paravirtual build)
    ],
)
def test_runs_are_the_same_with_the_stubs_off(guest, mode, tmp_path, monkeypatch):
    (on, on_trace, (stubs, kept, _slow), on_now), (off, off_trace, off_stubs, off_now) = _both_ways(
        guest, mode, tmp_path, monkeypatch, trace=True
    )
    assert on["outcome"] == "exit", on["console"]  # (usermode under trap fails a check: ring compression)
    assert off_stubs == (0, 0, 0)
    assert stubs > 10 and stubs > 3 * kept, (stubs, kept)  # the blocks ran through their stubs
    assert on == off
    assert on_now == off_now
    assert on_trace == off_trace


@pytest.mark.parametrize("mode", ["native", "trap", "hw", "hw-noept"])
def test_a_remapped_code_page_is_counted_again_through_the_stubs(mode, tmp_path, monkeypatch, test_guest):
    """remap_count.S runs two codes of different instruction counts at one linear address; the blocks of
    the first have stubs by the time the second is mapped there. Each rdtsc delta the guest prints must be
    its own code's, as with the hook alone, and the stubs' slow paths must have run (the dropped counts)."""
    (on, _, (stubs, _kept, slow), _), (off, _, _, _) = _both_ways(
        str(test_guest("remap_count")), mode, tmp_path, monkeypatch, trace=False
    )
    assert on["status"] == 0
    assert stubs > 0 and slow > 0
    assert on["console"] == off["console"]
    assert on["icount"] == off["icount"] and on["vtime"] == off["vtime"]


@pytest.mark.parametrize("mode", ["native", "full"])
def test_a_full_stub_region_is_reused(mode, tmp_path, monkeypatch):
    """With room for 40 stubs, the region fills again and again (smc and full's translation cache make new
    blocks): the run loop drops the engine's translations and the region is reused, blocks get stubs again,
    and the run is still the one made without stubs."""
    from cpuvirt.engine.clock import VirtualClock

    monkeypatch.setattr(VirtualClock, "STUB_BYTES", 40 * VirtualClock.STUB_SIZE)
    resets: list = []
    real = VirtualClock.translations_dropped

    def dropped(self):
        resets.append(self._state.stub_used)
        real(self)

    monkeypatch.setattr(VirtualClock, "translations_dropped", dropped)
    (on, on_trace, (stubs, _kept, _slow), _), (off, off_trace, _, _) = _both_ways(
        "smc", mode, tmp_path, monkeypatch, trace=True
    )
    assert len(resets) >= 2 and stubs > 2 * 40, (resets, stubs)
    assert on == off
    assert on_trace == off_trace


def test_the_stub_region_goes_with_its_engine():
    """The region is unmapped once the engine is gone (its blocks are the only code that jumps to it), so
    that a process running guest after guest (the test suite, `cpuvirt bench`) does not keep one each."""
    import gc

    cpus: list = []
    run_guest("hello", "native", 32, 0, on_start=cpus.append)
    base = cpus[-1].machine.clock._state.stub_base
    assert base, "no stub region was made"

    def mapped() -> bool:
        with open("/proc/self/maps") as maps:
            return any(int(line.split("-")[0], 16) == base for line in maps)

    assert mapped()
    cpus.clear()
    gc.collect()
    assert not mapped()


GIB, MIB = 1 << 30, 1 << 20


def _free_range(maps: list[tuple[int, int]], near: int) -> tuple[int, int]:
    """_vclock.c's choice of the stub region's place (vclock_free_range_in) over these mappings."""
    import ctypes

    from cpuvirt.engine import clock

    lib = clock._lib()
    fn = lib.vclock_free_range_in
    fn.restype = ctypes.c_uint64
    fn.argtypes = (ctypes.c_char_p, ctypes.c_uint64, ctypes.c_uint64, ctypes.POINTER(ctypes.c_uint64))
    text = "".join(f"{lo:x}-{hi:x} rwxp 00000000 00:00 0\n" for lo, hi in sorted(maps)).encode()
    got = ctypes.c_uint64()
    at = fn(text, near, 16 * MIB, ctypes.byref(got))
    return at, got.value


def test_the_stub_region_finds_room_beside_other_engines():
    """Engines alive at once (a test run, `cpuvirt compare`) each map a gigabyte of code with a few tens of
    megabytes between two, and each puts its 16 MiB stub region beside its code. An engine whose neighbouring
    ranges hold the others' regions found no range of 16 MiB + 4 MiB within a jump's reach and ran without
    stubs (a test that ran after another engine's fell to the clock hook's call: test_interrupt_window's
    stubs assertion failed in that order). Now the nearest free range of 4 MiB or more within reach is taken,
    a megabyte from its neighbours."""
    base, stride = 0x7F0000000000, GIB + 34 * MIB
    buffers = [(base + k * stride, base + k * stride + GIB) for k in range(5)]
    regions = [(buffers[k][0] - 17 * MIB, buffers[k][0] - MIB) for k in (0, 1, 3, 4)]  # below their buffers
    regions.append((buffers[1][1] + MIB, buffers[1][1] + 17 * MIB))  # one above its buffer, below buffer 2
    maps = buffers + regions
    near = buffers[2][0] + 0x1000  # the new engine's first block
    at, size = _free_range(maps, near)
    assert at and size >= 4 * MIB
    assert abs(at - near) < 1 << 31 and abs(at + size - near) < 1 << 31
    for lo, hi in maps:
        assert at + size + MIB <= lo or hi + MIB <= at, "the region overlaps a mapping or its megabyte"
    # with a whole range free beside it, the full 16 MiB right below the buffer, a megabyte away
    at, size = _free_range(buffers[2:3], near)
    assert size == 16 * MIB and at == buffers[2][0] - MIB - 16 * MIB
    # nothing free within reach: no region (the blocks keep the hook's call)
    assert _free_range([(base, base + 8 * GIB)], base + 4 * GIB)[0] == 0


# The count is the engine's exit-request test (_vclock.c, "Counting in the block"): the blocks count down
# the low half of QEMU's icount_decr, whose high half Unicorn sets to ask for an exit. A bare engine and
# the clock alone, so that each block's count and each stop is this code's.
_LOOP = """
    mov eax, 0
top:
    inc eax
    out 0x80, al
    jmp second
second:
    cmp eax, {n}
    jne top
    hlt
"""


def _clock_alone(n: int, stop_at: int, monkeypatch, stubs: str):
    """Run _LOOP for n rounds on a bare engine with the clock alone; the `out` hook asks for a stop in
    round `stop_at` (0: never). Returns (eip at the stop, time, clock)."""
    from capstone import CS_ARCH_X86, CS_MODE_32, Cs
    from keystone import KS_ARCH_X86, KS_MODE_32, Ks
    from unicorn import UC_HOOK_INSN, UC_PROT_ALL
    from unicorn.x86_const import UC_X86_INS_OUT, UC_X86_REG_EAX, UC_X86_REG_EIP

    from cpuvirt.engine.clock import VirtualClock
    from cpuvirt.engine.internals import new_engine

    monkeypatch.setenv("CPUVIRT_CLOCK_STUBS", stubs)
    code = bytes(Ks(KS_ARCH_X86, KS_MODE_32).asm(_LOOP.format(n=n), 0x1000)[0])
    uc = new_engine()
    uc.mem_map(0x1000, 0x1000, UC_PROT_ALL)
    uc.mem_write(0x1000, code)
    cs = Cs(CS_ARCH_X86, CS_MODE_32)
    clock = VirtualClock(uc, lambda a, size: sum(1 for _ in cs.disasm(bytes(uc.mem_read(a, size)), a)))

    def out(uc_, port, size, value, user):
        if uc_.reg_read(UC_X86_REG_EAX) == stop_at:
            uc_.emu_stop()  # (no exit test follows `out` in its block: the next block's start has it)

    uc.hook_add(UC_HOOK_INSN, out, None, 1, 0, UC_X86_INS_OUT)
    clock.arm(1 << 40)
    uc.emu_start(0x1000, 0)
    return uc.reg_read(UC_X86_REG_EIP), clock.now, clock, code.index(b"\x3d" if n > 127 else b"\x83\xf8")


def test_a_stop_asked_for_in_one_block_leaves_the_next_unrun(monkeypatch):
    """An `out` hook stops the engine in round 4: its block runs on to its jump, and the next block, which
    counts itself by then, must not run (its count meets the exit request in the word), at the same time
    as with the hook's call and the engine's own test."""
    eip, now, clock, second = _clock_alone(5, 4, monkeypatch, "1")
    patched, _kept, slow = clock.stubs
    assert patched >= 2 and slow >= 1
    assert eip == 0x1000 + second
    off_eip, off_now, _, _ = _clock_alone(5, 4, monkeypatch, "0")
    assert (eip, now) == (off_eip, off_now)


def test_the_blocks_count_in_the_engine_word(monkeypatch):
    """100,000 rounds (500,002 cycles): the engine's word holds at most 0xFFFF of them, so the blocks run out
    and refill it through their stubs' slow path, and the time is exactly the hook's."""
    from cpuvirt.engine.clock import ENGINE_DISP
    from cpuvirt.engine.internals import engine_env

    eip, now, clock, _ = _clock_alone(100_000, 0, monkeypatch, "1")
    st = clock._state
    assert st.engine_disp == ENGINE_DISP and st.low == engine_env(clock._uc) + ENGINE_DISP
    assert now == 2 + 100_000 * 5  # (mov; five instructions a round; hlt)
    assert clock.stubs[2] >= now // 0xFFFF
    assert (eip, now) == _clock_alone(100_000, 0, monkeypatch, "0")[:2]


def test_eip_is_found_in_the_engine_state():
    """internals.register_offsets' EIP: the C paths that leave the engine's block themselves write EIP there
    (cpu/_evseg.h ev_set_eip, cpu/_delivery.c wr_eip), so it must be the word the engine reads EIP from,
    both ways, in an engine other than the probe's."""
    from unicorn.x86_const import UC_X86_REG_EIP

    from cpuvirt.engine.internals import engine_env, new_engine, read_process, register_offsets

    uc = new_engine()
    env = engine_env(uc)
    off = register_offsets().get(UC_X86_REG_EIP)
    assert off is not None
    uc.reg_write(UC_X86_REG_EIP, 0x80123456)
    assert read_process(env + off, 8) == (0x80123456).to_bytes(8, "little")
    import ctypes

    ctypes.c_uint64.from_address(env + off).value = 0x1234
    assert uc.reg_read(UC_X86_REG_EIP) == 0x1234
