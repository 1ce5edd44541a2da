"""The intercepted in/out sites of the deprivileging modes, their common case answered in C (_iogate.c).

Trap and para hook every in/out/ins/outs the guest runs (the engine checks no I/O permission: cpu/iogate.py,
modes/para/vcpu.py). Where the CPU would allow the access without the TSS bitmap (real CPL <= `max_cpl`,
outside virtual-8086 mode: trap's deprivileged kernel at ring 1 or 2, para's kernel within the IOPL its
hypercall granted) the Python gate does nothing; `IoSites` puts a C hook in front of each site that
answers that case alone and hands every other one (CPL 3, V86, bytes changed since decoded) to the Python
hook. The bytes are compared in the frame the site was decoded from: a linear page that has held code
from several frames sends its sites to Python (`python_only`). Off switch: CPUVIRT_IO_GATE_C=0.
"""

from __future__ import annotations

import ctypes
import os

from unicorn import UC_HOOK_CODE, UC_HOOK_INSN
from unicorn.unicorn_py3 import unicorn as _ucmod
from unicorn.x86_const import UC_X86_INS_IN, UC_X86_INS_OUT, UC_X86_REG_CS, UC_X86_REG_EFLAGS

from cpuvirt.engine.cext import add_c_hook, load


class _Gate(ctypes.Structure):
    """Mirror of iogate_t."""

    _fields_ = [
        ("clock_watch_if", ctypes.c_void_p),
        ("clock_check_if", ctypes.c_void_p),
        ("reg_read", ctypes.c_void_p),
        ("cs_reg", ctypes.c_int32),
        ("eflags_reg", ctypes.c_int32),
        ("site_cpls", ctypes.c_uint32),
        ("port_cpls", ctypes.c_uint32),
    ]


class _Site(ctypes.Structure):
    """Mirror of iosite_t."""

    _fields_ = [
        ("gate", ctypes.c_void_p),
        ("python", ctypes.c_void_p),
        ("code", ctypes.c_void_p),
        ("size", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
        ("passed", ctypes.c_uint64),
        ("bytes", ctypes.c_uint8 * 16),
    ]


class _Port(ctypes.Structure):
    """Mirror of ioport_t."""

    _fields_ = [
        ("gate", ctypes.c_void_p),
        ("clock_now", ctypes.c_void_p),
        ("clock_extra", ctypes.c_void_p),
        ("cycles", ctypes.c_uint64),
        ("fast_in", ctypes.c_void_p),
        ("slow_in", ctypes.c_void_p),
        ("fast_out", ctypes.c_void_p),
        ("slow_out", ctypes.c_void_p),
        ("fast", ctypes.c_uint64),
    ]


_PORT_IN = ctypes.CFUNCTYPE(ctypes.c_uint32, ctypes.c_uint32, ctypes.c_uint32)
_PORT_OUT = ctypes.CFUNCTYPE(None, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_uint32)


def cpls_up_to(cpl: int) -> int:
    """The mask of real CPLs 0..cpl (bit n: CPL n); -1 gives none."""
    return (1 << (cpl + 1)) - 1


def enabled() -> bool:
    """CPUVIRT_IO_GATE_C=0 keeps every I/O site on the Python hook."""
    return os.environ.get("CPUVIRT_IO_GATE_C", "1") != "0"


class IoSites:
    """C hooks in front of a vCPU's intercepted I/O sites (module docstring)."""

    def __init__(self, lib, uc, clock, intercepts, io_mnemonics: frozenset[str], site_cpls: int, port_cpls: int):
        self._lib = lib
        self._uc = uc
        self._ic = intercepts
        self._clock = clock
        self._io = io_mnemonics
        gate = self._gate = _Gate()
        st = clock._state
        gate.clock_watch_if = ctypes.addressof(st) + type(st).watch_if.offset
        gate.clock_check_if = ctypes.addressof(st) + type(st).check_if.offset
        gate.reg_read = ctypes.cast(_ucmod.uclib.uc_reg_read, ctypes.c_void_p).value
        gate.cs_reg, gate.eflags_reg = UC_X86_REG_CS, UC_X86_REG_EFLAGS
        gate.site_cpls, gate.port_cpls = site_cpls, port_cpls
        self.sites: dict[int, _Site] = {}
        self._port: _Port | None = None

    @classmethod
    def install(cls, vcpu, io_mnemonics: frozenset[str], site_cpls: int, port_cpls: int) -> IoSites | None:
        """Put the C hook in front of every I/O site `vcpu.intercepts` hooks from now on; None when
        switched off or the extension is not built (every site keeps its Python hook). `site_cpls`,
        `port_cpls`: masks of real CPLs (bit n: CPL n), see _iogate.c."""
        ic = vcpu.intercepts
        if not enabled() or ic is None or ic.fast_site is not None:
            return None
        layouts: dict[str, type] = {"iogate_sizeof": _Gate, "iogate_site_sizeof": _Site, "iogate_port_sizeof": _Port}
        lib = load("cpuvirt.cpu._iogate", layouts)
        if lib is None:
            return None
        self = cls(lib, vcpu.uc, vcpu.clock, ic, io_mnemonics, site_cpls, port_cpls)
        ic.fast_site = self.site
        note_frame = ic.note_frame

        def noted(page: int, hpa: int) -> None:
            note_frame(page, hpa)
            if page in ic.shared_pages:
                self.python_only(page, page + 0x1000)

        ic.note_frame = noted
        if vcpu.mmu.on_code_frame == note_frame:
            vcpu.mmu.on_code_frame = noted
        return self

    @property
    def cpls(self) -> tuple[int, int]:
        """(site_cpls, port_cpls)."""
        return self._gate.site_cpls, self._gate.port_cpls

    @cpls.setter
    def cpls(self, value: tuple[int, int]) -> None:
        """para's physdev_op(set_iopl): the hooks decide by the new masks from their next call on
        (nothing is cached)."""
        self._gate.site_cpls, self._gate.port_cpls = value

    def hook_port_io(self, fast_in, fast_out, slow_in, slow_out, cycles: int) -> tuple[int, int]:
        """IN/OUT hooks in C (iogate_in_hook, iogate_out_hook): at a real CPL of `port_cpls` outside
        V86 mode they spend `cycles` of virtual time and call fast_in(port, size) -> value or
        fast_out(port, size, value); otherwise slow_in / slow_out (the mode's own Python hooks). All
        four are guarded by the caller. Returns the two hook handles."""
        port = self._port = _Port()
        st = self._clock._state
        port.gate = ctypes.addressof(self._gate)
        port.clock_now = ctypes.addressof(st) + type(st).left.offset
        port.clock_extra = ctypes.addressof(st) + type(st).extra.offset
        port.cycles = cycles
        self._port_cbs = (_PORT_IN(fast_in), _PORT_IN(slow_in), _PORT_OUT(fast_out), _PORT_OUT(slow_out))
        port.fast_in, port.slow_in, port.fast_out, port.slow_out = (
            ctypes.cast(cb, ctypes.c_void_p).value for cb in self._port_cbs
        )
        handles = []
        data = ctypes.addressof(port)
        for fn, insn in ((self._lib.iogate_in_hook, UC_X86_INS_IN), (self._lib.iogate_out_hook, UC_X86_INS_OUT)):
            h = add_c_hook(self._uc._uch, UC_HOOK_INSN, fn, data, 1, 0, insn=insn, what="hook port I/O")
            handles.append(h)
            self._uc._callbacks[h] = self  # as the binding keeps its own: Uc.hook_del finds it
        return handles[0], handles[1]

    @property
    def fast_accesses(self) -> int:
        """Port accesses whose time was spent in C (the fast path of hook_port_io)."""
        return 0 if self._port is None else self._port.fast

    def site(self, address: int, size: int, mnem: str, ops: str, code: bytes, python_hook) -> bool:
        """Intercepts.fast_site: hook an I/O instruction in C; False for any other (Python hooks it)."""
        if mnem not in self._io:
            return False
        site = _Site()
        site.gate = ctypes.addressof(self._gate)
        site.python = ctypes.cast(python_hook, ctypes.c_void_p).value
        pointer = self._ic._code_pointer(address, size) if address & ~0xFFF not in self._ic.shared_pages else 0
        if len(code) == size <= 16 and pointer:
            site.size, site.code = size, pointer
            site.bytes[:size] = code
        handle = add_c_hook(
            self._uc._uch,
            UC_HOOK_CODE,
            self._lib.iogate_site_hook,
            ctypes.addressof(site),
            address,
            address,
            what=f"hook the I/O instruction at {address:#x}",
        )
        self.sites[address] = site  # alive as long as the engine may call it
        self._uc._callbacks[handle] = self
        return True

    def python_only(self, lo: int, hi: int) -> None:
        """The sites in [lo, hi) go to Python at every execution (their page held several frames' code)."""
        for address, site in self.sites.items():
            if lo <= address < hi:
                site.size = 0

    @property
    def passed(self) -> int:
        """I/O instructions whose check was answered in C."""
        return sum(site.passed for site in self.sites.values())
