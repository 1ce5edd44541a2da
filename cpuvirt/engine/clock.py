"""Deterministic virtual time, driven by guest execution only (DESIGN.md section 2).

The rate: one guest instruction retired is one cycle of a 1 GHz virtual CPU (TSC_HZ). Instructions
are counted per translated block by a C block hook (_vclock.c); `hlt` jumps time forward to the next
timer deadline, and a port access adds 1 us (IO_CYCLES in vcpu.py), as an ISA bus cycle takes. The
PIT derives its 1.193182 MHz from the same count, so every run of the same image and options sees
the same interrupts at the same instructions.
"""

from __future__ import annotations

import ctypes
import os
import weakref

from unicorn import UC_HOOK_BLOCK, UC_HOOK_CODE, UC_HOOK_EDGE_GENERATED, UC_HOOK_INSN
from unicorn.unicorn_py3 import unicorn as _ucmod
from unicorn.x86_const import (
    UC_X86_INS_IN,
    UC_X86_INS_OUT,
    UC_X86_INS_RDTSC,
    UC_X86_REG_EAX,
    UC_X86_REG_EDX,
    UC_X86_REG_EFLAGS,
)

from cpuvirt.engine.cext import add_c_hook, load
from cpuvirt.engine.internals import engine_env, read_process

TSC_HZ = 1_000_000_000
NEVER = (1 << 64) - 1
LIMIT_MAX = (1 << 63) - 1  # _vclock.h VCLOCK_LIMIT_MAX: a deadline further away counts down from here
ENGINE_DISP = -0x10  # the engine's exit-request word (QEMU's icount_decr) from its CPU state (env)

_COUNT_CB = ctypes.CFUNCTYPE(ctypes.c_uint32, ctypes.c_uint64, ctypes.c_uint32)


class _Entry(ctypes.Structure):
    _fields_ = [("address", ctypes.c_uint32), ("size", ctypes.c_uint16), ("count", ctypes.c_uint16)]


class _State(ctypes.Structure):
    """Mirror of vclock_t in _vclock.c (checked against vclock_sizeof at load)."""

    _fields_ = [
        ("left", ctypes.c_int64),  # the time is limit - (left + *low) (_vclock.h vclock_time_t)
        ("limit", ctypes.c_uint64),
        ("low", ctypes.c_void_p),
        ("check_if", ctypes.c_uint32),
        ("discard", ctypes.c_uint32),
        ("own_low", ctypes.c_uint16),
        ("own_high", ctypes.c_uint16),
        ("stop_next", ctypes.c_uint32),
        ("deadline", ctypes.c_uint64),
        ("last_block", ctypes.c_void_p),  # -> the address of the block that ran last (a uint32)
        ("own_last_block", ctypes.c_uint32),
        ("misses", ctypes.c_uint64),
        ("extra", ctypes.c_uint64),
        ("emu_stop", ctypes.c_void_p),
        ("count_cb", ctypes.c_void_p),
        ("reg_read", ctypes.c_void_p),
        ("eflags_reg", ctypes.c_int32),
        ("watch_if", ctypes.c_uint32),
        ("stopped", ctypes.c_uint32),
        ("patching", ctypes.c_uint32),
        ("window_checks", ctypes.c_uint64),
        ("window_stops", ctypes.c_uint64),
        ("reg_write", ctypes.c_void_p),
        ("eax_reg", ctypes.c_int32),
        ("edx_reg", ctypes.c_int32),
        ("rdtsc_reads", ctypes.c_uint64),
        ("retranslated", ctypes.c_uint64),
        ("table", _Entry * (1 << 14)),
        ("remapped", ctypes.c_uint64),
        ("patched", ctypes.c_uint64),
        ("unpatched", ctypes.c_uint64),
        ("stub_slow", ctypes.c_uint64),
        ("stub_base", ctypes.c_void_p),
        ("stub_used", ctypes.c_uint64),
        ("stub_limit", ctypes.c_uint64),
        ("stub_failed", ctypes.c_uint32),
        ("stubs_full", ctypes.c_uint32),
        ("stub_size", ctypes.c_uint64),
        ("engine_disp", ctypes.c_int32),
    ]


_PORT_IN = ctypes.CFUNCTYPE(ctypes.c_uint32, ctypes.c_uint32, ctypes.c_uint32)
_PORT_OUT = ctypes.CFUNCTYPE(None, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_uint32)


class _PortIo(ctypes.Structure):
    """Mirror of port_io_t."""

    _fields_ = [
        ("clock", ctypes.c_void_p),
        ("cycles", ctypes.c_uint64),
        ("port_in", ctypes.c_void_p),
        ("port_out", ctypes.c_void_p),
    ]


def _lib():
    lib = load("cpuvirt.engine._vclock", {"vclock_sizeof": _State, "vclock_port_io_sizeof": _PortIo})
    if lib is None:
        raise RuntimeError(
            "cpuvirt's C clock hook is not built or does not match clock.py: run `pip install -e .` again"
        )
    return lib


class VirtualClock:
    """The guest's clock; `count_block(address, size)` tells how many instructions a new block holds."""

    STUB_SIZE = 96  # bytes of one block's stub (_vclock.c STUB_SIZE)
    STUB_BYTES = 16 << 20  # the stubs' region (_vclock.c STUB_REGION: at most that)

    def __init__(self, uc, count_block):
        lib = _lib()
        self._state = _State()
        self._state.deadline = NEVER
        self._use_low(ctypes.addressof(self._state) + _State.own_low.offset)
        self._use_last_block(ctypes.addressof(self._state) + _State.own_last_block.offset)
        self._state.limit = LIMIT_MAX
        self._set_left(LIMIT_MAX)  # the time 0, counting down from the furthest limit
        self._state.emu_stop = ctypes.cast(_ucmod.uclib.uc_emu_stop, ctypes.c_void_p).value
        self._state.reg_read = ctypes.cast(_ucmod.uclib.uc_reg_read, ctypes.c_void_p).value
        self._state.eflags_reg = UC_X86_REG_EFLAGS
        self._state.reg_write = ctypes.cast(_ucmod.uclib.uc_reg_write, ctypes.c_void_p).value
        self._state.eax_reg, self._state.edx_reg = UC_X86_REG_EAX, UC_X86_REG_EDX
        # Each block counted once counts itself in place of the hook's call, with a stub of its own for the
        # slow path (_vclock.c, "Counting in the block"); CPUVIRT_CLOCK_STUBS=0 keeps the call, to compare.
        self._state.stub_limit = self.STUB_BYTES
        if lib.vclock_stub_size() != self.STUB_SIZE:
            raise RuntimeError("cpuvirt's C clock hook does not match clock.py: run `pip install -e .` again")
        self._state.patching = 0 if os.environ.get("CPUVIRT_CLOCK_STUBS", "1") == "0" else 1
        if self._state.patching:
            self._count_in_engine(uc)
        # the stubs' region goes with the engine, whose blocks are the only code that jumps to it
        weakref.finalize(uc, lib.vclock_stubs_free, ctypes.byref(self._state))
        self._uc = uc
        self._lib = lib
        self._drop_page = lib.vclock_drop_page
        self._drop_page.argtypes = (ctypes.c_void_p, ctypes.c_uint32)
        self._drop_page.restype = None
        self._watching = False
        self._if_hooks: dict[int, int] = {}  # address -> 1 (IF-setting) or 2 (sti) of each window hook
        self._count_cb = _COUNT_CB(count_block)  # kept alive as long as the clock
        self._state.count_cb = ctypes.cast(self._count_cb, ctypes.c_void_p).value
        self._hook = add_c_hook(
            uc._uch,
            UC_HOOK_BLOCK,
            lib.vclock_block_hook,
            ctypes.cast(ctypes.pointer(self._state), ctypes.c_void_p),
            what="install the clock hook",
        )
        # A block translated again (its code was rewritten) is counted again (_vclock.c).
        self._translated_hook = add_c_hook(
            uc._uch,
            UC_HOOK_EDGE_GENERATED,
            lib.vclock_translated_hook,
            ctypes.cast(ctypes.pointer(self._state), ctypes.c_void_p),
            what="install the clock's translation hook",
        )

    def _use_low(self, address: int) -> None:
        self._state.low = address
        self._low = ctypes.c_uint16.from_address(address)

    def _use_last_block(self, address: int) -> None:
        self._state.last_block = address
        self._last_block = ctypes.c_uint32.from_address(address)

    def _count_in_engine(self, uc) -> None:
        """The blocks count down the low half of the engine's exit-request word (QEMU's icount_decr at
        env - 0x10, which each translated block tests; _vclock.c, "Counting in the block"), so that the
        count is that test. Where the engine's state is not of the expected shape the blocks keep the
        hook's call (patch_block also checks each block's test against ENGINE_DISP). The blocks store
        their address in the struct padding after the word (QEMU's CPUNegativeOffsetState ends with it,
        and the CPU state after it is 16-byte aligned: twelve bytes nothing uses), without a register."""
        env = engine_env(uc)
        if env is None or read_process(env + ENGINE_DISP, 8) != bytes(8):
            return  # (the word: no exit asked for, no icount, both halves 0; the padding after it: unused)
        left = self._left()
        self._use_low(env + ENGINE_DISP)
        self._set_left(left)
        self._use_last_block(env + ENGINE_DISP + 4)
        self._state.engine_disp = ENGINE_DISP

    def _left(self) -> int:
        """The cycles until `limit` (_vclock.h vclock_left)."""
        return self._state.left + self._low.value

    def _set_left(self, left: int) -> None:
        """_vclock.h vclock_set_left: the engine's word holds up to 0xFFFF of them, `left` the rest."""
        low = 0 if left <= 0 else min(left, 0xFFFF)
        self._low.value = low
        self._state.left = left - low

    @property
    def now(self) -> int:
        st = self._state
        return st.limit - st.left - self._low.value

    @now.setter
    def now(self, value: int) -> None:
        self._set_left(self._state.limit - value)

    @property
    def time_address(self) -> int:
        """Where the time is in memory (_vclock.h vclock_time_t: read with vclock_now, moved with
        vclock_add): the C paths of the modes and devices (machine/apicmmio.py) that read or spend it."""
        return ctypes.addressof(self._state) + type(self._state).left.offset

    @property
    def instructions(self) -> int:
        """Instructions retired (per block: a block cut short by a fault counts whole)."""
        return self.now - self._state.extra

    @property
    def run_id(self) -> tuple[int, int]:
        """Tells one run of a block from the next (the block's address and the instructions retired when it
        began, which nothing changes while it runs: advance() moves `extra` too). Nothing counts blocks
        themselves: most count in place of the clock hook's call (_vclock.c, "Counting in the block")."""
        st = self._state  # (the I/O exits' hot path: instructions without the two properties)
        return st.limit - st.left - self._low.value - st.extra, self._last_block.value

    def advance(self, cycles: int) -> None:
        """Spend virtual time that is not instructions (an I/O bus cycle, an idle hlt)."""
        self._set_left(self._left() - cycles)
        self._state.extra += cycles

    def unretire(self, n: int) -> None:
        """Take back n instructions of the running block that did not retire (it was left early)."""
        self._set_left(self._left() + n)

    @property
    def retranslated(self) -> int:
        """Cached block counts dropped because the engine translated their block again."""
        return self._state.retranslated

    @property
    def stubs(self) -> tuple[int, int, int]:
        """(blocks that count themselves, blocks that keep the hook's call, slow paths taken from the former)."""
        return self._state.patched, self._state.unpatched, self._state.stub_slow

    def stubs_full(self) -> bool:
        """The stubs' region is full: blocks translated from now on keep the hook's call until the engine's
        translations are dropped (Vcpu.run then does so, and calls translations_dropped)."""
        return bool(self._state.stubs_full)

    def translations_dropped(self) -> None:
        """The engine dropped every translation (`ctl_flush_tb`): the stubs' region is reused, and every
        block counted may get a stub again."""
        self._lib.vclock_stubs_reset(ctypes.byref(self._state))

    @property
    def remapped(self) -> int:
        """Cached block counts dropped because their linear page came to map another frame."""
        return self._state.remapped

    def drop_page(self, page: int) -> None:
        """The linear code page `page` maps another frame than before (Mmu.on_code_remap): the counts of
        the blocks on it, or running into it, are dropped and asked of Python again."""
        self._drop_page(ctypes.byref(self._state), page & 0xFFFFF000)

    def forget_blocks(self) -> None:
        """Empty the block cache: every block is counted by Python again the next time it runs, so the
        block observer (Machine.block_observer) sees it again. For a change in what the observer looks
        for (the I/O gate armed): blocks it saw before were judged by the old rule."""
        self._lib.vclock_forget_blocks(ctypes.byref(self._state))  # and every block's stub goes the table's way

    def discard_current_block(self) -> None:
        """Called from count_block when it stops the engine itself: the block will run later."""
        self._state.discard = 1
        self._set_limit(0)

    @property
    def deadline(self) -> int:
        return self._state.deadline

    def arm(self, deadline: int) -> None:
        """Stop the engine at the last block boundary before `deadline` is crossed; a deadline
        already due means: run exactly one block, then stop (every entry makes progress)."""
        st = self._state
        st.stopped = 0
        if deadline <= self.now:
            st.deadline = NEVER
            st.stop_next = 2
        else:
            st.deadline = deadline
            st.stop_next = 0
        self._relimit()

    def _relimit(self) -> None:
        """The blocks count down to one word (_vclock.c, "Counting in the block"): the deadline, or 0 while
        a flag asks the hook to look; set it, the time kept, whenever either changes (_vclock.c relimit)."""
        st = self._state
        self._set_limit(0 if (st.discard or st.check_if or st.stop_next) else st.deadline)

    def _set_limit(self, limit: int) -> None:
        """_vclock.h vclock_set_limit."""
        st = self._state
        limit = min(limit, LIMIT_MAX)
        left = self._left() + limit - st.limit
        st.limit = limit
        self._set_left(left)

    def pull_in(self, deadline: int) -> None:
        """Stop no later than `deadline` (a device changed state while the guest runs: an APIC
        timer was armed, an interrupt became deliverable). Unlike arm() it never postpones the
        stop, and it leaves a stop already requested in place."""
        if deadline < self._state.deadline:
            self._state.deadline = deadline
            self._relimit()

    # -- the interrupt window (no polling: see _vclock.c, vclock_if_hook) --------------------------
    def watch_if(self, on: bool) -> None:
        """While on, the window hooks make the block hook look at IF after each instruction that may
        set it, and stop the engine at the boundary where IF became 1."""
        on = bool(on)
        if on is self._watching:
            return  # a look still requested is harmless: one EFLAGS read
        self._watching = on
        st = self._state
        st.watch_if = 1 if on else 0
        st.check_if = 0
        self._relimit()

    def if_may_have_changed(self) -> None:
        """The hypervisor may have set IF from a hook (an emulated sti/iret, a VM entry): look at it
        at the next block boundary, if something waits for it."""
        st = self._state
        if st.watch_if and not st.check_if:
            st.check_if = 1
            self._set_limit(0)  # (_vclock.h vclock_look_at_if)

    def hook_if_setter(self, address: int, sti: bool) -> bool:
        """Put a window hook on the instruction at `address` (sti, or popf/iret); False if it has
        one already. It applies to blocks translated from now on."""
        kind = 2 if sti else 1
        if self._if_hooks.get(address) == kind:
            return False
        self._if_hooks[address] = kind
        h = ctypes.c_size_t()
        fn = self._lib.vclock_sti_hook if sti else self._lib.vclock_if_hook
        err = _ucmod.uclib.uc_hook_add(
            self._uc._uch,
            ctypes.byref(h),
            UC_HOOK_CODE,
            ctypes.cast(fn, ctypes.c_void_p),
            ctypes.cast(ctypes.pointer(self._state), ctypes.c_void_p),
            ctypes.c_uint64(address),
            ctypes.c_uint64(address),
        )
        if err:
            raise RuntimeError(f"cannot hook {address:#x} for the interrupt window (uc error {err})")
        return True

    def hook_rdtsc(self) -> None:
        """Answer every rdtsc with the virtual clock, in C (_vclock.c, vclock_rdtsc_hook)."""
        self._rdtsc_hook = add_c_hook(
            self._uc._uch,
            UC_HOOK_INSN,
            self._lib.vclock_rdtsc_hook,
            ctypes.cast(ctypes.pointer(self._state), ctypes.c_void_p),
            insn=UC_X86_INS_RDTSC,
            what="hook rdtsc",
        )

    def hook_port_io(self, port_in, port_out, cycles: int) -> tuple[int, int]:
        """`in`/`out` hooks in C that spend `cycles` of virtual time, then call port_in(port, size) ->
        value or port_out(port, size, value) (guarded by the caller). Returns the two hook handles."""
        io = self._port_io = _PortIo()
        self._port_cbs = (_PORT_IN(port_in), _PORT_OUT(port_out))  # alive as long as the clock
        io.clock = ctypes.addressof(self._state)
        io.cycles = cycles
        io.port_in, io.port_out = (ctypes.cast(cb, ctypes.c_void_p).value for cb in self._port_cbs)
        handles = []
        for fn, insn in ((self._lib.vclock_in_hook, UC_X86_INS_IN), (self._lib.vclock_out_hook, UC_X86_INS_OUT)):
            h = add_c_hook(self._uc._uch, UC_HOOK_INSN, fn, ctypes.addressof(io), 1, 0, insn=insn, what="hook port I/O")
            handles.append(h)
            self._uc._callbacks[h] = self  # as the binding keeps its own: Uc.hook_del finds it
        return handles[0], handles[1]

    @property
    def window_stats(self) -> tuple[int, int]:
        """(times IF was looked at, times the window was found open)."""
        return self._state.window_checks, self._state.window_stops

    def expired(self) -> bool:
        return bool(self._state.stopped)

    @property
    def last_block(self) -> int:
        """Address of the block that is running (hooks called now belong to it)."""
        return self._last_block.value

    @property
    def last_block_address(self) -> int:
        """Where the running block's address is (a uint32): for the C paths that read it."""
        return self._state.last_block
