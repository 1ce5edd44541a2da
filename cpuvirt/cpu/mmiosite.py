"""Which guest instruction made an MMIO access (for the `mmio` trace event's eip and insn).

Unicorn calls an MMIO region's callbacks in the middle of a translated block with EIP still at the
block's start (measured with Unicorn 2.1.3: a load three instructions into a block reports the
block's first address). The engine does sync the general registers before a memory access, so the
instruction is found in the running block (the clock hook saw it start). Each instruction is a
list of the memory accesses it makes, its reads before its writes (a read-modify-write operand
makes one of each); an access is matched to the first of these, from where the previous MMIO access
of the same block execution stopped, that has the same direction and whose operand, evaluated with
the registers now, covers the accessed byte's page offset (a `rep` string instruction may match
again). Decoding is done once per block; only traced runs pay for it.
"""

from __future__ import annotations

from capstone import CS_AC_READ, CS_AC_WRITE, CS_ARCH_X86, CS_MODE_32, Cs
from capstone import x86_const as C
from capstone.x86 import X86_OP_MEM, X86_REG_INVALID

from cpuvirt import limits
from cpuvirt.engine import regs as R
from cpuvirt.x86.faultaddr import capstone_gprs

_REG = capstone_gprs()
_BLOCK_LOOKAHEAD = 256  # bytes decoded from a block's start
_ENDS_BLOCK = frozenset((C.X86_GRP_JUMP, C.X86_GRP_CALL, C.X86_GRP_RET, C.X86_GRP_INT, C.X86_GRP_IRET))


class MmioSites:
    def __init__(self, mmu, regs: R.Regs, clock):
        self.mmu, self.regs, self.clock = mmu, regs, clock
        self._cs = Cs(CS_ARCH_X86, CS_MODE_32)
        self._cs.detail = True
        self._blocks: dict[tuple[int, bytes], list] = {}
        self._run: tuple[int, int] = (-1, -1)
        self._index, self._pos = 0, 0

    def site(self, gpa: int, is_write: bool, advance: bool = True) -> int:
        """Address of the instruction in the running block that accessed guest-physical `gpa`
        (the block's start when none matches). `advance=False` looks without moving past it: a
        device naming the access it is serving, before the access's own `mmio` event."""
        clock = self.clock
        block = clock.last_block
        run = clock.run_id
        if run != self._run:
            self._run, self._index, self._pos = run, 0, 0
        insns = self._decode(block)
        offset = gpa & 0xFFF
        read = self.regs.read
        for i in range(self._index, len(insns)):
            addr, accesses, rep = insns[i]
            for j in range(self._pos if i == self._index else 0, len(accesses)):
                write, base, index, scale, disp, size = accesses[j]
                if write != is_write:
                    continue
                ea = disp
                if base is not None:
                    ea += read(base)
                if index is not None:
                    ea += read(index) * scale
                if (offset - ea) & 0xFFF < size:
                    if advance:
                        self._index, self._pos = i, j if rep else j + 1
                    return addr
        return block

    def _decode(self, block: int) -> list:
        code = self.mmu.fetch_bytes(block, _BLOCK_LOOKAHEAD) or b""
        key = (block, code)
        insns = self._blocks.get(key)
        if insns is None:
            insns = []
            for insn in self._cs.disasm(code, block):
                mems = [op for op in insn.operands if op.type == X86_OP_MEM]
                accesses = [
                    (
                        write,
                        _REG.get(op.mem.base) if op.mem.base != X86_REG_INVALID else None,
                        _REG.get(op.mem.index) if op.mem.index != X86_REG_INVALID else None,
                        op.mem.scale,
                        op.mem.disp,
                        op.size or 4,
                    )
                    for write, flag in ((False, CS_AC_READ), (True, CS_AC_WRITE))
                    for op in mems
                    if op.access & flag
                ]
                if accesses:
                    insns.append((insn.address, accesses, insn.prefix[0] in (0xF2, 0xF3)))
                if any(g in _ENDS_BLOCK for g in insn.groups):
                    break
            if len(self._blocks) > 4096:
                self._blocks.clear()
            limits.put(self._blocks, key, insns)
        return insns
