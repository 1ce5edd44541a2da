"""Host cost is bounded and paid by the guest's budget (issue 10, item 5; docs/security.md "Bounds").

Measured through counters (virtual time, hypercall counts, bytes kept), never wall-clock time.
"""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cpuvirt import runner, status
from cpuvirt.modes.para import hypercalls as H
from cpuvirt.runner import run_guest
from tests.hostile import build


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cost")


@pytest.mark.parametrize("case,hypercall", [(1, "mmu_update"), (2, "mmuext_op")])
def test_huge_page_table_batch_ends_by_budget_in_bounded_hypercalls(out_dir, case, hypercall):
    """65,536 requests, each validating or releasing a whole L1 (67 M entries, about 25 s of host
    time if done at once): the batch is continued every PREEMPT_WORK entries and each part is
    charged, so a 50 M-cycle budget ends it after a handful of continuations."""
    budget = 50_000_000
    res = run_guest(str(build("pv_cost", out_dir, CASE=case)), "para", max_insns=budget)
    assert (res.outcome, res.status) == ("budget", status.BUDGET), (res.message, res.console)
    per_part = H.PREEMPT_WORK * H.ENTRY_CYCLES               # what one part is charged at least
    assert res.counts["hypercall"] <= 4 + budget // per_part + 1, res.counts
    assert res.vtime >= budget
    # the overshoot is at most one part (PREEMPT_WORK entries plus one request's table: 2048)
    most = (H.PREEMPT_WORK + 2048) * H.ENTRY_CYCLES + 64 * H.REQUEST_CYCLES + H.HYPERCALL_CYCLES
    assert res.vtime - budget <= most + 100_000


def test_continued_batch_completes_with_every_request_done(out_dir):
    """The continuation is Xen's: with budget enough, the same batch completes and reports all of
    its requests done (success_count accumulated across the parts)."""
    n = 1024
    res = run_guest(str(build("pv_cost", out_dir, CASE=2, NREQ=n)), "para", max_insns=0)
    assert (res.outcome, res.status) == ("exit", 0), (res.message, res.console)
    assert b"PASS every request done" in res.console and b"FAIL" not in res.console
    # each pin/unpin pair validates and releases 1024 entries: all of it charged
    assert res.vtime >= n * 1024 * H.ENTRY_CYCLES
    assert res.counts["hypercall"] >= n * 1024 // H.PREEMPT_WORK


def test_console_flood_is_streamed_and_the_run_record_bounded(out_dir):
    """3 MiB through console_io: every byte reaches the console callback, RunResult.console keeps
    the first CONSOLE_HEAD and the last CONSOLE_TAIL bytes, and each byte is charged."""
    streamed = bytearray(b"")
    count = [0]

    def console(byte):
        count[0] += 1
        if len(streamed) < 16:
            streamed.append(byte)

    res = run_guest(str(build("pv_cost", out_dir, CASE=3, COUNT=3)), "para", max_insns=0, console=console)
    assert (res.outcome, res.status) == ("exit", 0), res.message
    total = count[0]
    assert total > 3 << 20
    assert len(res.console) == runner.CONSOLE_HEAD + runner.CONSOLE_TAIL
    assert res.console_dropped == total - len(res.console)
    assert res.console.endswith(b"PASS 1 MiB written\n")            # the tail is the newest output
    assert res.console[:len(streamed)] == bytes(streamed)
    assert res.vtime >= 3 * (1 << 20) * H.CONSOLE_BYTE_CYCLES


def test_console_record_keeps_head_and_tail():
    rec = runner.ConsoleRecord()
    n = runner.CONSOLE_HEAD + 3 * runner.CONSOLE_TAIL + 12345
    most = 0
    for i in range(n):
        rec.append(i & 0xFF)
        if i & 0xFFF == 0:
            most = max(most, len(rec.buf))
    assert most <= runner.CONSOLE_HEAD + 2 * runner.CONSOLE_TAIL
    kept = rec.kept()
    assert kept[:runner.CONSOLE_HEAD] == bytes(i & 0xFF for i in range(runner.CONSOLE_HEAD))
    assert kept[runner.CONSOLE_HEAD:] == bytes(i & 0xFF for i in range(n - runner.CONSOLE_TAIL, n))
    assert rec.dropped == n - len(kept)


def test_full_translator_bookkeeping_shrinks_when_the_cache_is_flushed(out_dir):
    """Under full, 4000 distinct blocks through a translation cache shrunk to 64 KiB of code (so it
    is flushed many times): after the run, what the hypervisor keeps per translation must describe
    live translations only (it used to keep every translation ever made: 1.4 GB after 221,288)."""
    from cpuvirt.bt.tcache import CALLOUT_SLOTS
    seen = []

    def observer(mode):
        tc = mode.vcpu.tc
        tc.end = tc.base + CALLOUT_SLOTS + 0x10000
        seen.append(mode)

    res = run_guest(str(build("many_blocks", out_dir, N=4000)), "full", mode_options={"observer": observer})
    assert (res.outcome, res.status) == ("exit", 0), (res.message, res.console)
    v = seen[0].vcpu
    tc = v.tc
    assert tc.counters.flushes >= 3 and tc.counters.translations >= 4000, tc.counters.as_dict()
    alive = sum(1 for b in tc.order if b.alive)
    kept = {id(b) for bs in v._frame_blocks.values() for b in bs}
    kept |= {id(e[1]) for index in v._frame_index.values() for lst in index.values() for e in lst}
    assert len(kept) <= len(tc.order) and len(tc.order) < 4000 // 3, (len(kept), len(tc.order))
    assert alive <= len(tc.order)
    # The engine blocks counted in the TC describe live translations only (a translation may be several
    # engine blocks: its exits and lookups end blocks; the clock counts every new translation of one).
    tc_blocks = [a for a in v.machine.block_insns if tc.base <= a < tc.base + 0x200000]
    stale = [a for a in tc_blocks if a >= tc.base + CALLOUT_SLOTS and not any(b.tc <= a < b.tc_end for b in tc.order)]
    assert tc_blocks and not stale, [hex(a) for a in stale[:8]]


@pytest.mark.parametrize("what", ["module", "image"])
def test_input_larger_than_ram_is_refused_without_being_read(tmp_path, what):
    """A 2.5 GiB (sparse) file as a module or as the kernel image: exit 2, one line, and nothing
    close to its size allocated (it used to be read whole first: 2.6 GB RSS)."""
    import tracemalloc

    from cpuvirt.errors import CpuvirtError
    big = tmp_path / "big.img"
    with open(big, "wb") as f:
        f.truncate(2600 << 20)
    tracemalloc.start()
    try:
        with pytest.raises(CpuvirtError) as e:
            if what == "module":
                run_guest("hello", modules=[(str(big), None)])
            else:
                run_guest(str(big))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "larger than the guest's 32 MiB of RAM" in str(e.value) and "\n" not in str(e.value)
    assert peak < 64 << 20, peak


def test_input_too_large_on_the_command_line_is_one_line(tmp_path):
    from tests.hostile import run_cli
    big = tmp_path / "big.img"
    with open(big, "wb") as f:
        f.truncate(40 << 20)
    for args in (("run", "hello", "--module", big), ("run", big)):
        p = run_cli(*args, timeout=60)
        err = p.stderr.decode().strip()
        assert p.returncode == status.BAD_INPUT and "\n" not in err and "larger than" in err, err


@pytest.mark.parametrize("mode", ["trap", "full"])
def test_shadow_entries_per_address_space_are_capped(monkeypatch, mode):
    """Shadow paging keeps at most MAX_ROOT_ENTRIES entries per address space (a guest mapping all
    4 GiB would otherwise cost about a million entries per space, times 8 spaces): here the cap is
    lowered to 8 and the bundled `paging` guest must still pass every check."""
    from cpuvirt.memory import shadow
    monkeypatch.setattr(shadow, "MAX_ROOT_ENTRIES", 8)
    seen = []
    real = shadow.ShadowPaging._resolve

    def spy(self, *a):
        out = real(self, *a)
        seen.append(max((len(r.entries) for r in self.roots.values()), default=0))
        return out
    monkeypatch.setattr(shadow.ShadowPaging, "_resolve", spy)
    res = run_guest("paging", mode)
    assert (res.outcome, res.status) == ("exit", 0), (res.message, res.console.decode()[-500:])
    assert b"FAIL" not in res.console
    assert res.mmu["shadow"]["root_trims"] > 0
    assert max(seen) <= 8


def test_decoded_block_caches_are_capped(out_dir, monkeypatch):
    """Tables keyed by guest code addresses are caches with a cap (cpuvirt/limits.py): 4000 distinct
    blocks with the cap lowered to 256 keep at most 256 entries, and the guest still passes."""
    from cpuvirt import limits
    monkeypatch.setattr(limits, "CACHE_ENTRIES", 256)
    seen = []
    res = run_guest(str(build("many_blocks", out_dir, N=4000)), "full",
                    mode_options={"observer": seen.append})
    assert (res.outcome, res.status) == ("exit", 0), (res.message, res.console)
    m = seen[0].machine
    assert res.icount > 4000 and 0 < len(m.block_insns) <= 256
    assert len(seen[0].vcpu._io_sites) <= 256


def test_module_decode_caches_are_capped(monkeypatch):
    """The per-site decode caches shared by every run in the process (the MMIO instruction emulator's
    forms, traced-store forms, fault-address forms, full's arithmetic forms) keep at most CACHE_ENTRIES
    entries, whatever number of distinct sites a guest makes."""
    from cpuvirt import limits
    from cpuvirt.cpu import emulator
    monkeypatch.setattr(limits, "CACHE_ENTRIES", 64)
    monkeypatch.setattr(emulator, "_forms", {})
    code = bytes.fromhex("8b03")                  # mov eax, [ebx]
    for eip in range(0x1000, 0x1000 + 500 * 2, 2):
        emulator.decode(code, eip)
    assert 0 < len(emulator._forms) <= 64


def test_input_file_of_any_size_is_typed_a_chunk_at_a_time(tmp_path):
    """`run --input FILE` streams the file as the guest takes its bytes: a 3 GiB (sparse) script costs the
    host a chunk, not 3 GiB (it used to be read whole before the run: RSS of the file's size)."""
    import subprocess
    import sys
    big = tmp_path / "script.txt"
    with open(big, "wb") as f:
        f.truncate(3 << 30)
    probe = ("import resource, subprocess, sys; "
             "p = subprocess.run([sys.executable, '-m', 'cpuvirt', 'run', 'hello', '-q', '--input', sys.argv[1]], "
             "capture_output=True); "
             "print(p.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    p = subprocess.run([sys.executable, "-c", probe, str(big)], capture_output=True, text=True, timeout=120)
    status_, maxrss_kib = map(int, p.stdout.split())
    assert status_ == 0, p.stderr
    assert maxrss_kib < 400 << 10, f"{maxrss_kib} KiB resident for a 3 GiB script"


def _typed(src, uart, clk, prompt: bytes | None, steps: int = 400):
    """Drive a ScriptedInput as a guest would (read each byte when it arrives, print the prompt after
    each line): what was typed, at which virtual times, and when the script finished."""
    seen, done = [], []
    src.on_finished = lambda: done.append(clk.t)
    if prompt:
        for b in prompt:
            src.console_output(b)
    for _ in range(steps):
        due = src.deadline()
        if due is None:
            break
        clk.t = max(clk.t, due)
        if src.update():
            byte = uart.read(0x3F8, 1)
            seen.append((clk.t, byte))
            if prompt and byte == 0x0A:
                for b in prompt:
                    src.console_output(b)
    return seen, done


@settings(max_examples=60, deadline=None)
@given(script=st.binary(max_size=80).map(lambda b: b.replace(b"\r", b"")), chunk=st.integers(1, 9),
       prompt=st.sampled_from([None, b"$ "]))
def test_a_streamed_file_is_typed_exactly_as_the_whole_script(script, chunk, prompt):
    """ScriptedInput fed a chunk at a time from a file (more_blocks=False, as `--input FILE`) types the
    same bytes at the same virtual times, and finishes at the same time, as when given the whole script."""
    import io

    from cpuvirt.machine.serial_input import ScriptedInput
    from cpuvirt.machine.uart import IER_RDI, Uart16550
    runs = []
    for streamed in (False, True):
        clk = type("Clock", (), {"t": 0, "__call__": lambda self: self.t})()
        uart = Uart16550(on_output=lambda b: None)
        uart.write(0x3F9, 1, IER_RDI)
        if streamed:
            f = io.BytesIO(script)
            src = ScriptedInput(b"", uart, clk, prompt=prompt, gap=10, more=lambda f=f: f.read(chunk),
                                more_blocks=False)
        else:
            src = ScriptedInput(script, uart, clk, prompt=prompt, gap=10)
        runs.append(_typed(src, uart, clk, prompt))
    assert runs[0] == runs[1]
    assert [b for _, b in runs[0][0]] == list(script[:len(runs[0][0])])
