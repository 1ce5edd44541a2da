"""Machine._count_block decodes a block once per (address, mode, bytes): the engine translates the same
code again and again (xv6's forks run their parent's code from new frames: 1,562,132 counts of 2,633
distinct blocks in one `usertests`), and each translation asks the clock for the block's count again."""
from cpuvirt.machine.machine import Machine
from cpuvirt.memory.types import GVA
from cpuvirt.modes import get_mode


def _machine(code: bytes, at: int = 0x2000):
    m = Machine(4)
    get_mode("native")(m)
    m.set_flat_protected_mode(0x500)
    m.write_gpa(at, code)
    return m


def _calls(m):
    m._count_block(0x2000, 1)  # makes the decoders
    calls = []
    for attr in ("_insn_counter", "_insn_counter16"):
        counter = getattr(m, attr)
        real = counter.disasm_lite

        def counted(code, address, *rest, real=real):
            calls.append(address)
            return real(code, address, *rest)

        counter.disasm_lite = counted
    return calls


# 66 B8 34 12 90 90: 32-bit code reads `mov ax, 0x1234; nop; nop` (3 instructions); 16-bit code reads
# `mov eax, 0x90901234` (1)
CODE = bytes.fromhex("66b834129090")


def test_the_same_bytes_are_decoded_once_and_counted_the_same():
    m = _machine(CODE)
    calls = _calls(m)
    m.code32 = lambda: True
    counts = [m._count_block(0x2000, len(CODE)) for _ in range(5)]
    assert counts == [3] * 5 and calls == [0x2000]
    assert m.block_insns[0x2000] == ((0x2000, 0x2004, 0x2005), 0x2006)


def test_the_mode_and_the_bytes_are_part_of_the_key():
    m = _machine(CODE)
    calls = _calls(m)
    m.code32 = lambda: True
    assert m._count_block(0x2000, len(CODE)) == 3
    m.code32 = lambda: False  # the same bytes in a 16-bit code segment
    assert m._count_block(0x2000, len(CODE)) == 1
    assert m.block_insns[0x2000] == ((0x2000,), 0x2006)
    m.code32 = lambda: True
    m.write_gpa(0x2000, bytes.fromhex("909090909090"))  # rewritten in place
    assert m._count_block(0x2000, 6) == 6
    assert m.block_insns[0x2000][0] == tuple(range(0x2000, 0x2006))
    assert len(calls) == 3
    assert m.mmu.fetch_bytes(GVA(0x2000), 6) == bytes.fromhex("909090909090")


def test_the_decodes_kept_are_bounded_in_number_and_size(monkeypatch):
    """A guest can make any number of distinct blocks: the cache keeps at most DECODED_BLOCKS, and none
    longer than DECODED_BLOCK_INSNS instructions (those are decoded each time, and counted right)."""
    from cpuvirt import limits

    monkeypatch.setattr(limits, "DECODED_BLOCKS", 8)
    m = _machine(bytes.fromhex("90") * 64)
    m.code32 = lambda: True
    for address in range(0x2000, 0x2000 + 20):
        assert m._count_block(address, 4) == 4
        assert 0 < len(m._decoded) <= 8
    m._decoded.clear()
    long_block = limits.DECODED_BLOCK_INSNS + 1
    assert m._count_block(0x2000, long_block) == long_block
    assert not m._decoded


def test_full_decodes_a_retranslated_tc_block_once_and_counts_it_the_same():
    """Under full the engine translates TC blocks again after every patch of their TC range (inline-cache
    misses, chain patches): xv6's usertests recounted two TC blocks 40,000 times each in 600 M
    instructions. Their decodes are Machine._decoded's too, keyed by the bytes: the same bytes are decoded
    once and counted the same; other bytes at the same address are decoded again."""
    import cpuvirt.modes.full.vcpu as fv
    from cpuvirt.bt.tcache import CALLOUT_SLOTS
    from cpuvirt.engine import regs as R

    m = Machine(8)
    hv = get_mode("full")(m)
    vcpu = hv.vcpu
    real_read = vcpu.regs.read

    class Ring1:  # the kernel ring's CS: a count of translated kernel code
        def __getattr__(self, name):
            return getattr(vcpu.regs, name)

        def read(self, reg):
            return 0x09 if reg == R.CS else real_read(reg)

    vcpu.regs = Ring1()
    decodes = []
    disasm = vcpu._tc_disasm()
    real = disasm.disasm_lite
    disasm.disasm_lite = lambda code, a, *rest: decodes.append(a) or real(code, a, *rest)
    at = fv.TC_WINDOW + CALLOUT_SLOTS + 0x100
    from cpuvirt.bt.tcache import Block

    blk = Block(0x100000)  # the TC code lies in a translation (only an out-of-line compare tree does not)
    blk.tc, blk.tc_end = at, at + 0x100
    vcpu.tc.add(blk)

    def put(code: bytes) -> None:
        vcpu.hv_mem.write(vcpu.tc_hpa + (at - fv.TC_WINDOW), code)

    put(CODE)  # 32-bit: 3 instructions
    assert [vcpu._count_block(at, len(CODE)) for _ in range(5)] == [3] * 5
    assert decodes == [at] and m.block_insns.get(at) == ((at, at + 4, at + 5), at + 6)
    put(bytes.fromhex("90909090c3"))  # other bytes, the same length: 5 instructions
    assert vcpu._count_block(at, 5) == 5 and decodes == [at, at]
