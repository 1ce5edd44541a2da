"""APIC virtualization (SDM Vol. 3C chapter 29, "APIC Virtualization and Virtual Interrupts"; chapter 30
in editions from 2023): the APIC-access page, the virtual-APIC page, and which guest accesses to the
local APIC cost no VM exit.

With "virtualize APIC accesses" the hypervisor maps the guest's APIC page (guest-physical 0xFEE00000)
in EPT to a host page, the APIC-access page, whose address it writes into APIC_ACCESS_ADDR; the
processor treats every access that lands there specially (29.4). With "use TPR shadow" it also has a
virtual-APIC page (VIRTUAL_APIC_PAGE_ADDR) holding the guest's TPR, and with "APIC-register
virtualization" most register reads are served from that page with no exit at all (29.4.2), which is
what makes a kernel that reads its APIC ID on every spinlock (xv6's `mycpu()`) cheap under VT-x.
The decisions are made per access in C (`_apicv.c`, the engine's MMIO callbacks for the APIC-access
page); what is not virtualized calls `on_exit`, and the simulated processor performs the VM exit.

The hypervisor's side, as KVM with APICv keeps it: the virtual-APIC page holds the emulated APIC's
registers. Here the emulated APIC is `machine/apic.py`'s model, so `sync` copies its registers into
the page at every VM entry (only when they changed), and the registers the guest writes with no exit
(the TPR, ICR high) live in the page and are read back from it.
"""

from __future__ import annotations

import ctypes
import struct

from unicorn.unicorn_py3.unicorn import MMIO_READ_CFUNC, MMIO_WRITE_CFUNC, uclib

from cpuvirt.engine.cext import load
from cpuvirt.machine.apic import ICR_HI, MIRRORED, TPR

PAGE = 0x1000
# What the MMIO callbacks ask of the simulated processor (the `kind` of on_exit).
ACCESS_READ, ACCESS_WRITE, APIC_WRITE, TPR_BELOW_THRESHOLD = 0, 1, 2, 3

EXIT_CFUNC = ctypes.CFUNCTYPE(ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_uint64)

# Registers (offset >> 4) served from the virtual-APIC page, SDM 29.4.2 and 29.4.3.1 (the same lists
# as _apicv.c, for the Python path used when the extension is not built).
READ_VIRTUALIZED = frozenset(
    (0x02, 0x03, 0x08, 0x0B, 0x0D, 0x0E, 0x0F, 0x28, 0x30, 0x31, 0x38, 0x3E, *range(0x10, 0x28), *range(0x32, 0x38))
)
WRITE_VIRTUALIZED = frozenset((0x02, 0x08, 0x0B, 0x0D, 0x0E, 0x0F, 0x28, 0x30, 0x31, 0x38, 0x3E, *range(0x32, 0x38)))

_U32 = struct.Struct("<I")


def _layout(offsets) -> struct.Struct:
    """One struct for registers at these ascending offsets (from the first), zero bytes in between."""
    fmt, at = "<", offsets[0]
    for off in offsets:
        fmt += f"{off - at}xI" if off > at else "I"
        at = off + 4
    return struct.Struct(fmt)


# The mirrored registers in two runs that leave the TPR (0x80, the guest's own in the page) alone.
_LOW = [o for o in MIRRORED if o < TPR]
_HIGH = [o for o in MIRRORED if o > TPR]
_LOW_S, _HIGH_S = _layout(_LOW), _layout(_HIGH)
assert list(MIRRORED) == _LOW + _HIGH


class _State(ctypes.Structure):
    """Mirror of apicv_t (checked against apicv_sizeof at load)."""

    _fields_ = [
        ("vapic", ctypes.c_void_p),
        ("on_exit", ctypes.c_void_p),
        ("tpr_shadow", ctypes.c_uint32),
        ("register_virt", ctypes.c_uint32),
        ("tpr_threshold", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
        ("reads", ctypes.c_uint64),
        ("writes", ctypes.c_uint64),
    ]


def _lib():
    return load("cpuvirt.modes.hw._apicv", {"apicv_sizeof": _State})


def read_virtualized(offset: int, size: int, tpr_shadow: bool, register_virt: bool) -> bool:
    """SDM 29.4.2: is this read served from the virtual-APIC page (no VM exit)?"""
    if not tpr_shadow or size > 4 or (offset & 0xF) + size > 4:
        return False
    reg = offset >> 4
    return reg == TPR >> 4 or (register_virt and reg in READ_VIRTUALIZED)


def write_virtualized(offset: int, size: int, tpr_shadow: bool, register_virt: bool) -> bool:
    """SDM 29.4.3.1: is this write virtualized (into the virtual-APIC page, then APIC-write emulation)?"""
    if not tpr_shadow or size > 4:
        return False
    if register_virt:
        return (offset & 0xF) + size <= 4 and offset >> 4 in WRITE_VIRTUALIZED
    return offset == TPR


class VirtualApic:
    """The APIC-access page (an engine MMIO region at `access_hpa`) and the virtual-APIC page (4 KiB
    of the hypervisor's memory, `page`: a writable view), for one vCPU."""

    def __init__(
        self,
        uc,
        apic,
        page: memoryview,
        page_address: int,
        access_hpa: int,
        tpr_shadow: bool,
        register_virt: bool,
        on_exit,
    ):
        """`page_address`: where the virtual-APIC page is in this process (the C callbacks read it)."""
        self.apic = apic
        self.page = page
        self.access_hpa = access_hpa
        self.tpr_shadow, self.register_virt = tpr_shadow, register_virt
        self.tpr_threshold = 0
        self._last = None
        self._exit = EXIT_CFUNC(on_exit)  # kept alive as long as the engine may call it
        self._py_on_exit = on_exit
        self._py_reads = self._py_writes = 0
        lib = _lib()
        self.in_c = lib is not None
        st = self._state = _State()
        if lib is not None:
            st.vapic = page_address
            st.on_exit = ctypes.cast(self._exit, ctypes.c_void_p).value
            st.tpr_shadow, st.register_virt = int(tpr_shadow), int(register_virt)
            read = ctypes.cast(lib.apicv_read, MMIO_READ_CFUNC)
            write = ctypes.cast(lib.apicv_write, MMIO_WRITE_CFUNC)
            ud = ctypes.cast(ctypes.pointer(st), ctypes.c_void_p)
        else:
            read = MMIO_READ_CFUNC(lambda _uc, off, size, _ud: self._read(off, size))
            write = MMIO_WRITE_CFUNC(lambda _uc, off, size, value, _ud: self._write(off, size, value))
            ud = None
        self._callbacks = (read, write)
        err = uclib.uc_mmio_map(uc._uch, ctypes.c_uint64(access_hpa), ctypes.c_size_t(PAGE), read, ud, write, ud)
        if err:
            raise RuntimeError(f"cannot map the APIC-access page (uc error {err})")
        if tpr_shadow:
            apic.attach_vtpr(page[TPR : TPR + 4])
        self.sync()

    # -- the hypervisor keeps the page consistent with its emulated APIC --------------------------------
    def pull(self) -> None:
        """Registers the guest writes into the page with no exit and nothing to emulate (ICR high,
        29.4.3.2) go to the model before it is used. (The TPR is read from the page directly.)"""
        if self.register_virt:
            self.apic.icr_hi = _U32.unpack_from(self.page, ICR_HI)[0] & 0xFF000000

    def sync(self, force: bool = False) -> None:
        """At VM entry: the model's registers into the page where they changed, and the TPR threshold
        (KVM's vmx_update_cr8_intercept: an exit when the guest lowers its TPR below the class of the
        highest interrupt it is holding off)."""
        self.pull()
        key = self.apic.mirror_key()
        if force or key != self._last:
            values = self.apic.mirrored_values()
            _LOW_S.pack_into(self.page, _LOW[0], *values[: len(_LOW)])
            _HIGH_S.pack_into(self.page, _HIGH[0], *values[len(_LOW) :])
            self._last = key
        if self.tpr_shadow:
            irr = self.apic.irr
            max_irr = (irr.bit_length() - 1) >> 4 if irr else -1
            tpr = self.page[TPR] >> 4
            self.tpr_threshold = self._state.tpr_threshold = 0 if max_irr == -1 or tpr < max_irr else max_irr

    def read32(self, offset: int) -> int:
        return _U32.unpack_from(self.page, offset & 0xFFC)[0]

    def write32(self, offset: int, value: int) -> None:
        _U32.pack_into(self.page, offset & 0xFFC, value)

    def counts(self) -> tuple[int, int]:
        """(reads, writes) virtualized with no VM exit."""
        st = self._state
        return st.reads + self._py_reads, st.writes + self._py_writes

    # -- the Python path (the extension is not built): the same rules as _apicv.c -------------------------
    def _read(self, offset: int, size: int) -> int:
        if read_virtualized(offset, size, self.tpr_shadow, self.register_virt):
            self._py_reads += 1
            return int.from_bytes(self.page[offset : offset + size], "little")
        return self._py_on_exit(ACCESS_READ, offset, size, 0)

    def _write(self, offset: int, size: int, value: int) -> None:
        if not write_virtualized(offset, size, self.tpr_shadow, self.register_virt):
            self._py_on_exit(ACCESS_WRITE, offset, size, value)
            return
        self.page[offset : offset + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
        self._py_writes += 1
        reg = offset >> 4
        if reg == TPR >> 4:
            self.page[TPR + 1 : TPR + 4] = b"\0\0\0"
            if self.page[TPR] >> 4 < self.tpr_threshold & 0xF:
                self._py_on_exit(TPR_BELOW_THRESHOLD, TPR, size, 0)
        elif reg == ICR_HI >> 4:
            self.page[ICR_HI : ICR_HI + 3] = b"\0\0\0"
        else:
            self._py_on_exit(APIC_WRITE, offset, size, value)
