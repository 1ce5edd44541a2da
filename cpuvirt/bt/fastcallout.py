"""Callouts answered in C (_callout.c): `cpuid` and `rdtsc` in translated guest-kernel code, the CR0.WP /
CR4.PGE toggles (modes/full/crfast.py), and the kernel's `in`/`out` (their time and operands in C, the
device and the counters through one guarded Python call: `ports`; off with CPUVIRT_IO_GATE_C=0).

Each needs only the CPU model or the virtual clock, which the engine's own C hooks already answer for
code that runs in place (engine/cpuid.py, engine/clock.py). A callout served in Python costs a hook
call, register traffic and the runtime's bookkeeping (about 15x a bare hook call); kvm-unit-tests'
`vmexit` runs its cpuid loop some 90 million times. The slot stays where it is: translated code still
jumps to it, the engine still runs it as a block of its own, so virtual time and every block boundary
are those of the Python path. What changes is who answers: once Python has served a site and looked up
the translation that follows it, `link` records both in the C table; from then on the C hook answers.

A linked slot is unlinked when its destination block goes (bt/coherence.invalidate calls `unlink`)
and every slot when the cache is flushed (`clear`), so the C hook never jumps to a dead translation:
the next execution goes through Python again, which looks the translation up (or makes it) and links
again. What the C hook served is added to the vCPU's counters by `take` (the run's events, the cost
model's tally and the translation cache's `callouts`/`lookups` count exactly what the Python path
counted).
"""

from __future__ import annotations

import ctypes
import os

from unicorn import UC_CTL_IO_WRITE, UC_CTL_TLB_FLUSH, UC_HOOK_CODE
from unicorn.unicorn_py3 import unicorn as _ucmod
from unicorn.x86_const import UC_X86_REG_CS, UC_X86_REG_EIP

from cpuvirt.bt.tcache import CALLOUT_SLOTS, Block
from cpuvirt.cpu.evdeliver import BLOCK_SLOTS, BlockCopy
from cpuvirt.cpu.evseg import EvSeg
from cpuvirt.engine import regs as R
from cpuvirt.engine.cext import add_c_hook, load

PYTHON, CPUID, RDTSC, MOV_CR0, MOV_CR4, PORT_IN, PORT_OUT = 0, 1, 2, 3, 4, 5, 6
# the guest kernel's events (modes/full/evfast.py); IRETD_OUTER only counts an IRETD slot's returns to ring 3
MOV_SREG, POP_SREG, MOV_CR2, IRETD, IRETD_OUTER = 7, 8, 9, 10, 11
MOV_CR3 = 12  # a mov to CR3 reloading the CR3 it holds (a TLB flush)
ADAPTIVE = 13  # an adaptive store into a traced frame (modes/full/adaptive.py; its form in store_t)
INVLPG = 14  # invlpg m (its address's form in store_t)
LTR = 15  # ltr r16, of the TSS selector the translations' snapshot holds
KINDS = 16
KIND_NAMES = {
    CPUID: "cpuid",
    RDTSC: "rdtsc",
    MOV_CR0: "mov cr0",
    MOV_CR4: "mov cr4",
    PORT_IN: "in",
    PORT_OUT: "out",
    MOV_SREG: "mov sreg",
    POP_SREG: "pop",
    MOV_CR2: "mov cr2",
    IRETD: "iretd",
    IRETD_OUTER: "iretd",
    MOV_CR3: "mov cr3",
    ADAPTIVE: "store",
    INVLPG: "invlpg",
    LTR: "ltr",
}
PORT_KINDS = (PORT_IN, PORT_OUT)  # counted by their Python device calls, not by take()
NO_LOOKUP = (IRETD_OUTER,)  # served without looking a translation up (the Python path looks up none)
IO_DX = 8  # io[slot]: the access size in bytes (1, 2, 4), | IO_DX when the port is DX

_PORT_IN = ctypes.CFUNCTYPE(ctypes.c_uint32, ctypes.c_uint32, ctypes.c_uint32)
_PORT_OUT = ctypes.CFUNCTYPE(ctypes.c_uint32, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_uint32)
MAX_MAP_FRAMES = 16
NO_MAPS = NO_RING = 0xFFFFFFFF


TC_ENTRY_SLOTS, TC_START_SLOTS = 8192, 65536


class _TcMap(ctypes.Structure):
    """Mirror of tc_map_t."""

    _fields_ = [("geip", ctypes.c_uint32), ("tc", ctypes.c_uint32)]


class StoreSite(ctypes.Structure):
    """Mirror of store_t: an adaptive store site's form (x86/emulate.py store_site)."""

    _fields_ = [
        ("disp", ctypes.c_int32),
        ("imm", ctypes.c_uint32),
        ("op", ctypes.c_uint8),
        ("size", ctypes.c_uint8),
        ("src", ctypes.c_uint8),
        ("shift", ctypes.c_uint8),
        ("base", ctypes.c_uint8),
        ("index", ctypes.c_uint8),
        ("scale", ctypes.c_uint8),
        ("pad", ctypes.c_uint8),
        ("run", ctypes.c_uint32),
        ("limit", ctypes.c_uint32),
    ]


class DeliveryTable(ctypes.Structure):
    """Mirror of fulldeliver_t: the event delivery of mode full in C (modes/full/deliverfast.py)."""

    _fields_ = [
        ("on", ctypes.c_uint32),
        ("off_old_exception", ctypes.c_uint32),
        ("off_is_int", ctypes.c_uint32),
        ("off_error_code", ctypes.c_uint32),
        ("python_intr", ctypes.c_void_p),
        ("idt_base", ctypes.c_uint32),
        ("idt_limit", ctypes.c_uint32),
        ("tr_base", ctypes.c_uint32),
        ("tr_limit", ctypes.c_uint32),
        ("mirror", ctypes.c_void_p),
        ("clock_now", ctypes.c_void_p),
        ("clock_last_block", ctypes.c_void_p),
        ("tc_lo", ctypes.c_uint32),
        ("tc_hi", ctypes.c_uint32),
        ("delivered", ctypes.c_uint64),
        ("pending", ctypes.c_uint64),
        ("to_python", ctypes.c_uint64),
        ("misses", ctypes.c_uint64),
        ("soft_count", ctypes.c_uint64 * 256),
        ("fault_count", ctypes.c_uint64 * 32),
        ("soft_seen", ctypes.c_uint8 * 256),
        ("fault_seen", ctypes.c_uint8 * 32),
        ("entry", _TcMap * TC_ENTRY_SLOTS),
        ("start", _TcMap * TC_START_SLOTS),
        ("block", BlockCopy * BLOCK_SLOTS),
    ]


class _Table(ctypes.Structure):
    """Mirror of callouts_t in _callout.c (checked against callouts_sizeof at load)."""

    _fields_ = [
        ("reg_read", ctypes.c_void_p),
        ("reg_write", ctypes.c_void_p),
        ("python", ctypes.c_void_p),
        ("answer", ctypes.c_void_p * KINDS),
        ("answer_data", ctypes.c_void_p * KINDS),
        ("watch_if", ctypes.c_void_p),
        ("check_if", ctypes.c_void_p),
        ("base", ctypes.c_uint64),
        ("eip_reg", ctypes.c_int32),
        ("cs_reg", ctypes.c_int32),
        ("kernel_ring", ctypes.c_uint32),
        ("enabled", ctypes.c_uint32),
        ("served", ctypes.c_uint64 * KINDS),
        ("gpr_reg", ctypes.c_int32 * 8),
        ("cr", ctypes.c_uint32 * 2),
        ("snap", ctypes.c_uint32 * 2),
        ("deps", ctypes.c_uint32 * 2),
        ("shadow_ok", ctypes.c_uint32),
        ("wp_granted", ctypes.c_uint32),
        ("events_on", ctypes.c_uint32),
        ("maps_n", ctypes.c_uint32),
        ("maps_cr0", ctypes.c_uint32),
        ("maps_cr4", ctypes.c_uint32),
        ("cr3", ctypes.c_uint32),
        ("maps_live", ctypes.c_void_p * MAX_MAP_FRAMES),
        ("maps_copy", ctypes.c_void_p * MAX_MAP_FRAMES),
        ("clock_now", ctypes.c_void_p),
        ("clock_extra", ctypes.c_void_p),
        ("io_cycles", ctypes.c_uint64),
        ("port_in", ctypes.c_void_p),
        ("port_out", ctypes.c_void_p),
        ("eax_reg", ctypes.c_int32),
        ("edx_reg", ctypes.c_int32),
        ("esp_reg", ctypes.c_int32),
        ("eflags_reg", ctypes.c_int32),
        ("seg_reg", ctypes.c_int32 * 6),
        ("ss_reg", ctypes.c_int32),
        ("snap_ok", ctypes.c_uint32),
        ("snap_cs", ctypes.c_uint32),
        ("snap_ss", ctypes.c_uint32),
        ("snap_iopl", ctypes.c_uint32),
        ("snap_tr", ctypes.c_uint32),
        ("tr_sel", ctypes.c_uint32),
        ("ev", EvSeg),
        ("geip", ctypes.c_uint32 * CALLOUT_SLOTS),
        ("kind", ctypes.c_uint8 * CALLOUT_SLOTS),
        ("arg", ctypes.c_uint8 * CALLOUT_SLOTS),
        ("dest", ctypes.c_uint32 * CALLOUT_SLOTS),
        ("io", ctypes.c_uint8 * CALLOUT_SLOTS),
        ("dl", DeliveryTable),
        ("uc_ctl", ctypes.c_void_p),
        ("tlb_flush_ctl", ctypes.c_int32),
        ("pad_cr3", ctypes.c_uint32),
        ("code_pages", ctypes.c_void_p),
        ("tc_lines", ctypes.c_void_p),
        ("inplace_lines", ctypes.c_void_p),
        ("lines", ctypes.c_uint64),
        ("zaps", ctypes.c_uint64),
        ("store", StoreSite * CALLOUT_SLOTS),
    ]


def _lib():
    return load("cpuvirt.bt._callout", {"callouts_sizeof": _Table})


class CodePages(dict):
    """FullVcpu._page_frame (linear code page -> the guest frame it was translated from) with a bit per linear
    page in the callout table (`code_pages`): an invlpg of such a page is Python's (its check walks)."""

    __slots__ = ("_bits",)

    def __init__(self, table):
        super().__init__()
        self._bits = (ctypes.c_uint8 * (1 << 17))()
        table.code_pages = ctypes.addressof(self._bits)

    def __setitem__(self, page, frame) -> None:
        dict.__setitem__(self, page, frame)
        p = (page >> 12) & 0xFFFFF
        self._bits[p >> 3] |= 1 << (p & 7)

    def __delitem__(self, page) -> None:
        dict.__delitem__(self, page)
        p = (page >> 12) & 0xFFFFF
        self._bits[p >> 3] &= ~(1 << (p & 7)) & 0xFF

    def clear(self) -> None:
        dict.clear(self)
        ctypes.memset(self._bits, 0, ctypes.sizeof(self._bits))


class CodeLines:
    """The 64-byte lines of RAM that hold code, for the C hook's stores into code frames (bt/_callout.c
    code_untouched): a bit per line a translation's source bytes came from (`mark_tc`, set as blocks are
    translated, cleared at a TC flush) and one per line of code the engine ran in place (`mark_in_place`,
    modes/full/inplace.py). Bits are never cleared one by one: a line whose code went stays "code", and a
    store there is Python's, which finds nothing to drop."""

    def __init__(self, table, ram_bytes: int):
        self._table = table
        self._n = (ram_bytes + 63) >> 6
        self._tc = (ctypes.c_uint8 * ((self._n + 7) // 8 or 1))()
        self._in_place: ctypes.Array | None = None
        table.tc_lines, table.lines = ctypes.addressof(self._tc), self._n

    def _mark(self, bits, gpa: int, size: int) -> None:
        for k in range(gpa >> 6, min(((gpa + max(size, 1) - 1) >> 6) + 1, self._n)):
            bits[k >> 3] |= 1 << (k & 7)

    def mark_tc(self, gpa: int, size: int) -> None:
        self._mark(self._tc, gpa, size)

    def clear_tc(self) -> None:
        ctypes.memset(self._tc, 0, ctypes.sizeof(self._tc))

    def mark_in_place(self, gpa: int, size: int) -> None:
        if self._in_place is None:
            self._in_place = (ctypes.c_uint8 * ((self._n + 7) // 8 or 1))()
            self._table.inplace_lines = ctypes.addressof(self._in_place)
        self._mark(self._in_place, gpa, size)

    def clear_in_place(self) -> None:
        if self._in_place is not None:
            ctypes.memset(self._in_place, 0, ctypes.sizeof(self._in_place))


class FastCallouts:
    """The C callout hook of one translation cache, and its slot table. `install` gives None when the
    extension is not built (the Python hook then serves every slot, as before)."""

    @classmethod
    def install(cls, uc, base: int, python_hook, kernel_ring: int | None) -> "FastCallouts | None":
        """`python_hook`: the guarded ctypes code hook that serves every slot the C hook does not;
        `kernel_ring`: the real ring of translated code (None: unknown, C serves no slot itself)."""
        lib = _lib()
        return None if lib is None else cls(uc, lib, base, python_hook, kernel_ring)

    def __init__(self, uc, lib, base: int, python_hook, kernel_ring: int | None):
        t = self._table = _Table()
        t.reg_read = ctypes.cast(_ucmod.uclib.uc_reg_read, ctypes.c_void_p).value
        t.reg_write = ctypes.cast(_ucmod.uclib.uc_reg_write, ctypes.c_void_p).value
        if os.environ.get("CPUVIRT_FULL_CR3_C", "1") != "0":  # MOV_CR3: a CR3 reload in C
            t.uc_ctl = ctypes.cast(_ucmod.uclib.uc_ctl, ctypes.c_void_p).value
            t.tlb_flush_ctl = (UC_CTL_IO_WRITE << 30) | UC_CTL_TLB_FLUSH  # no argument
        t.python = ctypes.cast(python_hook, ctypes.c_void_p).value
        t.base = base
        t.eip_reg, t.cs_reg = UC_X86_REG_EIP, UC_X86_REG_CS
        t.kernel_ring = NO_RING if kernel_ring is None else kernel_ring
        t.esp_reg, t.eflags_reg = R.ESP, R.EFLAGS
        t.seg_reg[:] = (R.ES, R.CS, R.SS, R.DS, R.FS, R.GS)
        t.ss_reg = R.SS
        t.enabled = 1
        for i, reg in enumerate(R.GPR_ORDER):
            t.gpr_reg[i] = reg
        t.maps_n = NO_MAPS
        self._maps_copies: list = []  # kept alive: C compares with them
        self._python_hook = python_hook  # kept alive: C calls it
        self._taken = [0] * KINDS
        self._kinds: set[int] = set()  # kinds the C hook can answer (answer())
        self.linked: dict[int, Block] = {}  # slot -> the block its dest is the translation of
        self._handle = add_c_hook(
            uc._uch,
            UC_HOOK_CODE,
            lib.callout_hook,
            ctypes.cast(ctypes.pointer(t), ctypes.c_void_p),
            base,
            base + CALLOUT_SLOTS - 1,
            what="hook the callout slots",
        )

    def answer(self, kind: int, fn, data) -> None:
        """Let the C hook answer `kind` with fn(uc, data) (a C function and its table)."""
        self._table.answer[kind] = ctypes.cast(fn, ctypes.c_void_p).value
        self._table.answer_data[kind] = data
        self._kinds.add(kind)

    def ports(self, clock, cycles: int, port_in, port_out) -> None:
        """Let the C hook serve the guest kernel's in/out: `cycles` of virtual time on `clock` (a
        VirtualClock), then port_in(port, size) -> value / port_out(port, size, value) -> 0 when the
        run ended, else 1 (guarded Python functions: the counters, then the device)."""
        t, st = self._table, clock._state
        t.clock_now = ctypes.addressof(st) + type(st).left.offset
        t.clock_extra = ctypes.addressof(st) + type(st).extra.offset
        t.io_cycles = cycles
        self._port_cbs = (_PORT_IN(port_in), _PORT_OUT(port_out))  # kept alive: C calls them
        t.port_in, t.port_out = (ctypes.cast(cb, ctypes.c_void_p).value for cb in self._port_cbs)
        t.eax_reg, t.edx_reg = R.EAX, R.EDX
        self._kinds |= {PORT_IN, PORT_OUT}

    def can(self, kind: int) -> bool:
        return kind in self._kinds

    def window(self, state, watch_offset: int, check_offset: int) -> None:
        """The clock's interrupt-window flags (a ctypes structure and the fields' offsets)."""
        addr = ctypes.addressof(state)
        self._table.watch_if = addr + watch_offset
        self._table.check_if = addr + check_offset

    @property
    def enabled(self) -> bool:
        return bool(self._table.enabled)

    @enabled.setter
    def enabled(self, on: bool) -> None:
        self._table.enabled = 1 if on else 0

    # -- linking ----------------------------------------------------------------------------------------
    @property
    def table(self) -> _Table:
        """The C table itself (the mov-to-CR state is kept by modes/full/crfast.py)."""
        return self._table

    def publish_maps(self, snap, host_address) -> None:
        """The code-mapping snapshot of modes/full/coherence.py, for the C hook's own check: None, or
        ((cr0 bits, cr3, cr4 bits), [(hpa, bytes)]); host_address(hpa) is where the frame is."""
        t = self._table
        t.maps_n = NO_MAPS
        self._maps_copies = []
        if snap is None or len(snap[1]) > MAX_MAP_FRAMES:
            return
        (cr0, _, cr4), frames = snap
        for k, (hpa, data) in enumerate(frames):
            copy = ctypes.create_string_buffer(data, len(data))
            self._maps_copies.append(copy)
            t.maps_copy[k] = ctypes.addressof(copy)
            t.maps_live[k] = host_address(hpa)
        t.maps_cr0, t.maps_cr4 = cr0, cr4
        t.maps_n = len(frames)

    def link_store(self, slot: int, form: tuple, run: int = 0, limit: int = 0) -> None:
        """`slot` is (about to be) linked as ADAPTIVE or INVLPG: the form of its store or memory operand
        (x86/emulate.py store_site, memory_site); for a store site, its untraced run, which the C hook keeps
        from then on (store_run), and the run at which the site is made native again (limit: C leaves that
        store to Python)."""
        st = self._table.store[slot - self._table.base]
        st.op, st.size, st.src, st.shift, st.imm, st.base, st.index, st.scale, st.disp = form
        st.run, st.limit = run, limit

    def store_run(self, slot: int) -> int | None:
        """The untraced run C keeps for a store site linked as ADAPTIVE (None: not linked so)."""
        if self.linked_as(slot) != ADAPTIVE:
            return None
        return self._table.store[slot - self._table.base].run

    def link(self, slot: int, kind: int, dest: int, block: Block, arg: int = 0, io: int = 0, geip: int = 0) -> None:
        """From now on the C hook serves `slot` as `kind` and goes on at `dest`, the TC address of
        `block` (the live translation of the guest instruction after the site); `arg`: the
        instruction's ModRM byte (mov to CR) or imm8 port (in/out), or what _callout.c says for the
        event kinds; `io`: an in/out's size | IO_DX; `geip`: the guest EIP `block` translates (IRETD)."""
        i = slot - self._table.base
        self._table.arg[i] = arg
        self._table.io[i] = io
        self._table.geip[i] = geip & 0xFFFFFFFF
        old = self.linked.get(i)
        if old is not None and old is not block and old.linked_slots is not None:
            old.linked_slots.discard(i)
        self._table.dest[i] = dest
        self._table.kind[i] = kind
        self.linked[i] = block
        if block.linked_slots is None:
            block.linked_slots = set()
        block.linked_slots.add(i)

    def unlink(self, block: Block) -> None:
        """`block` is no longer the live translation: its linked slots go back to Python."""
        slots = block.linked_slots
        if not slots:
            return
        t = self._table
        for i in slots:
            t.kind[i] = PYTHON
            self.linked.pop(i, None)
        block.linked_slots = None

    def clear(self) -> None:
        """The cache was flushed: every slot goes back to Python (slot numbers are reused)."""
        t = self._table
        for i, block in self.linked.items():
            t.kind[i] = PYTHON
            block.linked_slots = None
        self.linked.clear()

    # -- what C served --------------------------------------------------------------------------------
    @property
    def ports_served(self) -> int:
        """Guest-kernel in/out served by the C hook."""
        return self._table.served[PORT_IN] + self._table.served[PORT_OUT]

    def linked_as(self, slot: int) -> int:
        """The kind `slot` is linked as (PYTHON: not linked)."""
        return self._table.kind[slot - self._table.base]

    def take(self) -> dict[int, int]:
        """Callouts the C hook served since the last call, by kind."""
        served = self._table.served
        out = {}
        for k in range(1, KINDS):
            if k in PORT_KINDS:
                continue  # their Python device call counted them (Callouts._c_port_in)
            n = served[k] - self._taken[k]
            if n:
                out[k] = n
                self._taken[k] = served[k]
        return out
