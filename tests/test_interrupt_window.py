"""The interrupt window is an event, not a poll: an interrupt that arrives while IF = 0 waits, at no
cost, and is taken at the exact instruction boundary where hardware takes it once IF becomes 1:
after the instruction that follows `sti` (the interrupt shadow, SDM 6.8.3), right after a `popfd`
or an `iretd` that sets IF. The handler stores the EIP saved on its frame; it must be that
boundary in every mode, whatever the number of instructions run with IF = 0 before (PAD: a poll
every N instructions would land there for at most one of them). Para's IF is the upcall mask:
tests/guests/pv_window.S checks the same for the store that clears it.
"""
import struct
from pathlib import Path

import pytest

from cpuvirt.engine import regs as R
from cpuvirt.machine.machine import Machine
from cpuvirt.modes import get_mode
from cpuvirt.runner import run_guest
from cpuvirt.toolchain.assemble import new_keystone
from cpuvirt.toolchain.build import include_dir
from cpuvirt.toolchain.image import build_image
from cpuvirt.toolchain.preprocess import preprocess

CODE, IDT, HANDLER, SEEN, STACK = 0x100000, 0x8000, 0x9000, 0x5004, 0x7000
MODES = ["native", "trap", "full", "hw"]
PADS = [1000, 1001, 1777]

# What opens the window, and the label where the interrupt must be taken.
OPENERS = {
    "sti": "sti; nop; target: mov dword ptr [0x5008], 1",                       # after the shadowed nop
    "popfd": "push 0x202; popfd; target: nop",
    "iretd": "pushfd; or dword ptr [esp], 0x200; .byte 0x0e; push 0x12345678; iretd; target: nop",  # push cs
    # kvm-unit-tests eventinj: a self-IPI pending with IF = 0, then `sti; nop; cli`
    "self_ipi": "sti; nop; target: cli",
}


def assemble(src: str, base: int) -> tuple[bytes, int]:
    ks = new_keystone()
    enc, _ = ks.asm(src, base)
    code = bytes(enc)
    # the label's address: assemble again up to it (0x12345678 stands for it: keystone cannot push a label)
    head = src.split("target:")[0]
    target = base + len(bytes(ks.asm(head, base)[0]))
    return code.replace(struct.pack("<I", 0x12345678), struct.pack("<I", target)), target


def _guest(mode: str, src: str, irq: bool):
    """Run `src` (at CODE) under `mode`, every vector's gate at a handler that records the EIP it returns
    to (SEEN) and ends the run; IRQ 1 pending from the start if `irq`."""
    m = Machine(4)
    hv = get_mode(mode)(m, max_insns=2_000_000)
    m.debug_exit.on_exit = lambda value: hv.vcpu.finish("exit", value)
    idt = bytearray(256 * 8)
    for v in range(256):
        struct.pack_into("<HHBBH", idt, v * 8, HANDLER & 0xFFFF, 0x08, 0, 0x8E, HANDLER >> 16)
    m.write_gpa(IDT, bytes(idt))
    handler, _ = assemble("mov eax, dword ptr [esp]; mov dword ptr [0x5004], eax; mov al, 0; out 0xf4, al; hlt",
                          HANDLER)
    m.write_gpa(HANDLER, handler)
    code, target = assemble(src, CODE)
    m.write_gpa(CODE, code)
    m.set_flat_protected_mode(0x500)
    m.uc.reg_write(R.IDTR, (0, IDT, 256 * 8 - 1, 0))
    m.regs.write(R.ESP, STACK)
    hv.boot()
    if irq:
        m.pic.raise_irq(1)                    # IRQ 1 (unmasked by SeaBIOS's IMR): pending from the start
    out = hv.run(CODE)
    return out, struct.unpack("<I", m.read_gpa(SEEN, 4))[0], target, hv.vcpu


def run(mode: str, opener: str, pad: int):
    prologue = ""
    if opener == "self_ipi":   # local APIC ICR: fixed, self, vector 0x61 (waits in the IRR while IF = 0)
        prologue = "mov dword ptr [0xfee00310], 0; mov dword ptr [0xfee00300], 0x40061; "
    src = prologue + f"mov ecx, {pad}; spin: dec ecx; jnz spin; " + OPENERS[opener] + "; here: jmp here"
    return _guest(mode, src, irq=opener != "self_ipi")


@pytest.mark.parametrize("pad", PADS)
@pytest.mark.parametrize("opener", list(OPENERS))
@pytest.mark.parametrize("mode", MODES)
def test_interrupt_taken_exactly_where_if_becomes_1(mode, opener, pad):
    out, seen, target, _ = run(mode, opener, pad)
    if mode == "trap" and opener == "popfd":
        # trap's Popek-Goldberg hole, kept on purpose: popf at ring 1 silently keeps IF = 0
        assert out.kind == "budget" and seen == 0
        return
    assert out.kind == "exit", out.message
    assert seen == target, f"interrupt taken at {seen:#x}, hardware takes it at {target:#x}"


def run_twice(mode: str, opener: str, pad: int):
    """The opener in a function called twice: the first call (nothing waits) makes the blocks after it,
    which then count themselves in the clock's stubs (engine/_vclock.c); a self-IPI made while IF = 0
    waits for the second call, whose window must stop those stubs at the same boundary."""
    src = (
        "call opener; cli; mov dword ptr [0xfee00310], 0; mov dword ptr [0xfee00300], 0x40061; "
        f"mov ecx, {pad}; spin: dec ecx; jnz spin; call opener; here: jmp here; "
        "opener: " + OPENERS[opener] + "; mov dword ptr [0x500c], 1; ret"
    )
    return _guest(mode, src, irq=False)


@pytest.mark.parametrize("opener", ["sti", "popfd", "iretd"])
@pytest.mark.parametrize("mode", MODES)
def test_the_window_stops_blocks_that_count_in_stubs(mode, opener):
    out, seen, target, vcpu = run_twice(mode, opener, 1000)
    if mode == "trap" and opener == "popfd":
        assert out.kind == "budget" and seen == 0  # (the hole, as above)
        return
    assert out.kind == "exit", out.message
    assert vcpu.clock.stubs[0] > 0  # blocks counted in stubs ran (the opener's after it among them)
    assert seen == target, f"interrupt taken at {seen:#x}, hardware takes it at {target:#x}"


@pytest.mark.parametrize("mode", MODES)
def test_a_waiting_interrupt_costs_no_stop(mode):
    """With IF = 0 for 100 000 loop iterations and an interrupt pending, the engine is not stopped
    to look for the window: the window hooks are not looked at while no IF-setter runs."""
    out, seen, target, vcpu = run(mode, "sti", 100_000)
    assert out.kind == "exit" and seen == target
    checks, stops = vcpu.clock.window_stats
    assert stops == 1 and checks <= 2, (checks, stops)


@pytest.mark.parametrize("pad", PADS)
def test_para_upcall_right_after_the_unmasking_store(pad, tmp_path):
    pre = preprocess(Path(__file__).parent / "guests" / "pv_window.S", {"PAD": pad}, [include_dir()])
    image = tmp_path / "pv_window.bin"
    image.write_bytes(build_image(pre.lines)[0])
    res = run_guest(str(image), "para", max_insns=10_000_000)
    text = res.console.decode()
    assert res.outcome == "exit" and res.status == 0, text
    assert text.count("PASS ") == 2 and "FAIL" not in text, text
