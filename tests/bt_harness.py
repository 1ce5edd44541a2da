"""A bare Unicorn (no cpuvirt machine) to test the translator on its own: the same code run natively
and translated must leave the same registers, flags and memory."""
from __future__ import annotations

import struct

from unicorn import UC_ARCH_X86, UC_HOOK_INTR, UC_MODE_32, Uc, UcError

from cpuvirt.bt.runtime import BtRuntime
from cpuvirt.bt.tcache import TCache
from cpuvirt.bt.translate import GuestCode
from cpuvirt.engine import regs as R
from cpuvirt.engine.hooks import EngineHooks
from cpuvirt.toolchain.assemble import new_keystone
from cpuvirt.x86.flags import EFLAGS_DF

CODE = 0x10000
SCRATCH = 0x20000          # 64 KiB of data; the stack grows down from STACK
STACK = 0x2C000
TC_BASE = 0x100000
MEM = 0x400000
GPRS = (R.EAX, R.ECX, R.EDX, R.EBX, R.ESP, R.EBP, R.ESI, R.EDI)
FLAGS = 0x8D5 | EFLAGS_DF      # CF PF AF ZF SF OF DF

_ks = new_keystone()


def asm(text: str, address: int = CODE) -> bytes:
    enc, _ = _ks.asm(text, address)
    return bytes(enc)


def make_uc(code: bytes, regs_init: dict | None = None, scratch: bytes = b"") -> Uc:
    uc = Uc(UC_ARCH_X86, UC_MODE_32)
    uc.mem_map(0, MEM)
    gdt = b"\0" * 8 + struct.pack("<QQ", 0x00CF9A000000FFFF, 0x00CF92000000FFFF)
    uc.mem_write(0x1000, gdt)
    uc.reg_write(R.GDTR, (0, 0x1000, len(gdt) - 1, 0))
    uc.reg_write(R.CS, 0x08)
    for s in (R.SS, R.DS, R.ES):
        uc.reg_write(s, 0x10)
    uc.mem_write(CODE, code)
    uc.mem_write(SCRATCH, scratch)
    for reg, v in (regs_init or {}).items():
        uc.reg_write(reg, v)
    uc.reg_write(R.ESP, (regs_init or {}).get(R.ESP, STACK))
    return uc


class BareCode(GuestCode):
    def __init__(self, uc, virt=None):
        self.uc = uc
        self.virt = virt or {}

    def fetch(self, gva, size):
        return bytes(self.uc.mem_read(gva, size)), [gva & ~0xFFF]

    def virtual(self, field):
        return self.virt.get(field, 0)


class Translated:
    """The same Uc set-up, running `code` through the translator; guest `hlt` ends the run."""

    def __init__(self, code: bytes, regs_init=None, scratch=b"", virt=None, on_callout=None, tc_size=None):
        self.uc = uc = make_uc(code, regs_init, scratch)
        self.regs = R.Regs(uc)
        self.tc = TCache(lambda a, d: uc.mem_write(a, bytes(d)), TC_BASE, **({"size": tc_size} if tc_size else {}),
                         remove_cache=lambda lo, hi: uc.ctl_remove_cache(lo, hi))
        self.code = BareCode(uc, virt)
        self.error = None
        self.rt = BtRuntime(EngineHooks(self), self.regs, self.tc, self.code,
                            lambda a: struct.unpack("<I", uc.mem_read(a, 4))[0],
                            lambda a, v: uc.mem_write(a, struct.pack("<I", v)))
        self.callouts = []
        self.faults = []
        self.halted_at = None

        def callout(site):
            self.callouts.append((site.insn.geip, site.insn.text))
            if site.insn.text == "hlt":
                self.halted_at = site.insn.geip
                uc.emu_stop()
                return
            if on_callout is not None:
                on_callout(self, site)
        self.rt.on_callout = callout

        def intr(u, intno, _):
            eip = self.regs.read(R.EIP)
            self.faults.append((intno, eip, self.tc.guest_eip(eip)))
            u.emu_stop()
        uc.hook_add(UC_HOOK_INTR, intr)

    def run(self, entry=CODE, count=0):
        self.rt.enter(entry)
        try:
            self.uc.emu_start(self.regs.read(R.EIP), 0, count=count)
        except UcError as e:
            self.error = e
        if self.error is not None and not isinstance(self.error, UcError):
            raise self.error            # raised in a callout, kept by the hook guard
        return self


def run_native(code: bytes, regs_init=None, scratch=b""):
    uc = make_uc(code, regs_init, scratch)
    faults = []

    def intr(u, intno, _):
        faults.append((intno, u.reg_read(R.EIP)))
        u.emu_stop()
    uc.hook_add(UC_HOOK_INTR, intr)
    uc.emu_start(CODE, 0)
    uc.faults = faults
    return uc


def state(uc) -> dict:
    """Registers, flags, the data area and the live stack (translated code may leave saved flags
    below the guest's ESP, where the guest keeps nothing)."""
    esp = uc.reg_read(R.ESP)
    return {"gprs": [uc.reg_read(r) for r in GPRS], "flags": uc.reg_read(R.EFLAGS) & FLAGS,
            "data": bytes(uc.mem_read(SCRATCH, 0x1000)),
            "stack": bytes(uc.mem_read(esp, max(0, STACK + 0x100 - esp)))}
