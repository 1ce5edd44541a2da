"""Mode `trap`: naive trap-and-emulate. Every bundled guest gives native's console, except the checks
the x86 holes predict (docs/deprivileging.md, "The holes teaching result"), and the trace shows that
nothing trapped at the hole sites."""
import itertools
import json

from capstone import CS_ARCH_X86, CS_MODE_32, Cs

from cpuvirt.runner import run_guest
from cpuvirt.toolchain.build import assemble_guest
from tests.guest_args import in_guest_dir, run_kwargs

# The exact lines `holes` prints under trap (docs/deprivileging.md). sgdt PASSes: the real GDTR holds
# the guest's own GDT under the deprivileging contract.
HOLES_TRAP = """\
FAIL popf sets IF: pushf then shows IF = 1: expected 0x00000200, got 0x00000000
FAIL popf clears IF: pushf then shows IF = 0: expected 0x00000000, got 0x00000200
PASS sgdt returns the base and limit loaded with lgdt
FAIL sidt returns the base and limit loaded with lidt: expected ff07{idt}, got ff070000c0ff
FAIL smsw equals the low 16 bits of CR0: expected 0x00000011, got 0x00000033
FAIL mov ax, cs gives the ring-0 code selector 0x08 (RPL 0): expected 0x00000008, got 0x00000009
FAIL push cs pushes the ring-0 code selector 0x08 (RPL 0): expected 0x00000008, got 0x00000009
FAIL str returns the selector loaded with ltr (0x28): expected 0x00000028, got 0x00000000
FAIL sldt returns the selector loaded with lldt (0x30): expected 0x00000030, got 0x00000000
"""
HOLE_INSNS = ("popfd", "pushfd", "sgdt", "sidt", "smsw", "str", "sldt")


def _run(guest, mode, **kw):
    with in_guest_dir():
        return run_guest(guest, mode, **run_kwargs(guest), **kw)


def _idt_bytes() -> str:
    """The guest's IDTR image (base, little-endian hex) as holes prints it."""
    _, asm = assemble_guest("holes")
    return asm.symbols["idt"].to_bytes(4, "little").hex()


def test_holes_fail_exactly_as_predicted():
    native = _run("holes", "native")
    trap = _run("holes", "trap")
    assert (native.outcome, native.status) == ("exit", 0)
    assert (trap.outcome, trap.status) == ("exit", 1)
    assert trap.console.decode() == HOLES_TRAP.format(idt=_idt_bytes())
    # The same checks, in the same order, as native: only the predicted ones changed.
    names = lambda c: [line.split(":")[0][5:] for line in c.decode().splitlines()]
    assert names(trap.console) == names(native.console)


def test_holes_trace_shows_nothing_trapped_at_the_hole_sites(tmp_path):
    trace = tmp_path / "holes.jsonl"
    _run("holes", "trap", trace_path=str(trace))
    events = [json.loads(line) for line in trace.read_text().splitlines()]
    _, asm = assemble_guest("holes")
    main = asm.symbols["main"]
    code = asm.code[main - asm.base:main - asm.base + 0x400]
    sites = {}
    for addr, _, mnem, ops in Cs(CS_ARCH_X86, CS_MODE_32).disasm_lite(code, main):
        if mnem in HOLE_INSNS or (mnem == "mov" and ops.endswith(", cs")) or (mnem == "push" and ops == "cs"):
            sites[addr] = f"{mnem} {ops}".strip()
        if mnem == "ret":
            break
    assert len(sites) >= 10, sites          # 2 popf, 4 pushf, sgdt, sidt, smsw, mov cs, push cs, str, sldt
    assert {s.split()[0] for s in sites.values()} >= set(HOLE_INSNS) | {"mov", "push"}
    at_sites = [e for e in events if e.get("type") == "event" and int(e["eip"], 16) in sites]
    assert at_sites == [], at_sites
    # ...while the privileged instructions around them did trap (cli, sti, mov edx, cr0, lldt).
    trapped = {(e["reason"], e["insn"]) for e in events if e.get("kind") == "trap"}
    assert {("cli", "cli"), ("sti", "sti"), ("mov", "mov edx, cr0"), ("lldt", "lldt ax")} <= trapped
    assert events[-1]["type"] == "footer" and events[-1]["status"] == 1


def test_trap_is_deterministic(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    _run("interrupts", "trap", trace_path=str(a))
    _run("interrupts", "trap", trace_path=str(b))
    assert a.read_bytes() == b.read_bytes()
    assert b'"kind": "trap"' in a.read_bytes() or b'"kind":"trap"' in a.read_bytes()


def test_trap_events_name_the_instruction(tmp_path):
    trace = tmp_path / "p.jsonl"
    _run("paging", "trap", trace_path=str(trace))
    events = [json.loads(line) for line in trace.read_text().splitlines() if '"event"' in line]
    cr = [e for e in events if e["kind"] == "trap" and "cr" in e["insn"]]
    assert any(e["insn"] == "mov cr3, eax" for e in cr) and any(e["insn"] == "mov cr0, eax" for e in cr)
    assert all(e["cpl"] == 1 and e["action"].startswith("emulated") for e in cr)
    pf = [e for e in events if e["kind"] == "page_fault" and e["detail"]["fault"] == "true"]
    assert len(pf) == 3 and [e["detail"]["cr2"] for e in pf[:2]] == ["0xd0000000", "0xd0001008"]


def test_port_io_traps_name_the_same_site_as_native(tmp_path):
    """Each ring-1 in/out is a `trap` event followed by its `io` event at the same instruction, and the
    io events are at the sites native records."""
    def io_events(mode):
        path = tmp_path / f"{mode}.jsonl"
        _run("holes", mode, trace_path=str(path))
        return [json.loads(line) for line in path.read_text().splitlines() if '"event"' in line]
    native = [(e["eip"], e["insn"], e["detail"]["port"]) for e in io_events("native") if e["kind"] == "io"]
    trap_events = io_events("trap")
    trap_io = [(e["eip"], e["insn"], e["detail"]["port"]) for e in trap_events if e["kind"] == "io"]
    assert sorted(set(trap_io)) == sorted(set(native))
    for before, after in itertools.pairwise(trap_events):
        if before["kind"] == "trap" and before["reason"] in ("in", "out"):
            assert after["kind"] == "io" and after["eip"] == before["eip"], (before, after)


def test_cli_runs_trap_with_trace_and_stats(tmp_path):
    import subprocess
    import sys
    trace = tmp_path / "h.jsonl"
    p = subprocess.run([sys.executable, "-m", "cpuvirt", "run", "holes", "--mode", "trap", "--trace", str(trace),
                        "--stats"], capture_output=True, timeout=120, check=False)
    assert p.returncode == 1                        # the holes FAIL under trap: the guest's own status
    assert p.stdout.decode() == HOLES_TRAP.format(idt=_idt_bytes())
    err = p.stderr.decode()
    assert "holes under trap: exit, status 1" in err and "trap:cli" in err.split("event (kind:reason)")[1]
    header = json.loads(trace.read_text().splitlines()[0])
    assert header["mode"] == "trap" and header["type"] == "header"


def test_emulated_instructions_retire_once():
    """Each trapped-and-emulated instruction counts as one retired instruction, as it does under
    native (lgdt/lidt fault before the engine has read their displacement: counted all the same).
    The runs differ by at most the block native counts whole at the final debug-exit."""
    for guest in ("hello", "exceptions", "paging", "interrupts"):
        native, trap = _run(guest, "native"), _run(guest, "trap")
        assert trap.counts["trap"] > 100
        assert abs(trap.icount - native.icount) <= 1, (guest, native.icount, trap.icount)
