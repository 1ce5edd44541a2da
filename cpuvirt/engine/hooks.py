"""Every Unicorn hook callback of cpuvirt is added here, under one guard.

A Python exception must never unwind into libunicorn: the ctypes trampoline would print it and let
the guest run on, so a hypervisor bug would look like guest behaviour. The guard keeps the exception
on the hook's owner (`owner.error`), stops the engine, and returns what the engine expects from that
kind of hook; the run loop (`Vcpu.run`) re-raises `error` once `emu_start` returns.

The hooks are added straight to libunicorn with ctypes, each with a fixed-arity trampoline that is the
guard: one Python frame before the callback, where the wrapper's own dispatch costs two (an I/O exit
is a handful of microseconds, so a frame shows). The callback is called as the wrapper would call it,
`callback(uc, ..., None)` with the Uc object.
"""

from __future__ import annotations

import ctypes

from unicorn import UC_HOOK_CODE, UC_HOOK_INSN, UC_HOOK_INSN_INVALID, UC_HOOK_INTR
from unicorn import x86_const as X
from unicorn.unicorn_py3.arch.intel import (
    HOOK_INSN_CPUID_CFUNC,
    HOOK_INSN_IN_CFUNC,
    HOOK_INSN_OUT_CFUNC,
    HOOK_INSN_SYSCALL_CFUNC,
)
from unicorn.unicorn_py3.unicorn import HOOK_CODE_CFUNC, HOOK_INSN_INVALID_CFUNC, HOOK_INTR_CFUNC, uclib


def _stop(owner, e: BaseException) -> None:
    owner.error = e
    owner.uc.emu_stop()


class EngineHooks:
    """The hooks one owner (a vCPU: it has `uc` and `error`) adds to its engine, each under the guard.
    Each ctypes callback is kept where the wrapper keeps its own (`Uc._callbacks`, by handle), so it
    lives as long as the engine that may call it, and `Uc.hook_del` removes it too."""

    def __init__(self, owner):
        self.owner = owner

    def _add(self, htype: int, cfunc, begin: int = 1, end: int = 0, *extra) -> int:
        handle = ctypes.c_size_t()
        err = uclib.uc_hook_add(
            self.owner.uc._uch,
            ctypes.byref(handle),
            htype,
            ctypes.cast(cfunc, ctypes.c_void_p),
            None,
            ctypes.c_uint64(begin),
            ctypes.c_uint64(end),
            *extra,
        )
        if err:
            raise RuntimeError(f"cannot add a hook of type {htype:#x} (uc error {err})")
        self.owner.uc._callbacks[handle.value] = cfunc
        return handle.value

    def remove(self, handle: int) -> None:
        self.owner.uc.hook_del(handle)

    def intr(self, callback) -> int:
        """UC_HOOK_INTR: callback(uc, intno, None), every exception and `int n`."""
        return self._add(UC_HOOK_INTR, self.intr_function(callback))

    def intr_function(self, callback):
        """The guarded ctypes function of an INTR hook, not added: a C hook that hands some events on
        to Python calls it (cpu/fastdelivery.py); the caller keeps it alive."""
        owner, uc = self.owner, self.owner.uc

        def hook(_h, intno, _d):
            try:
                callback(uc, intno, None)
            except BaseException as e:  # noqa: B036  (KeyboardInterrupt too: the run must end cleanly)
                _stop(owner, e)

        return HOOK_INTR_CFUNC(hook)

    def invalid(self, callback) -> int:
        """UC_HOOK_INSN_INVALID: callback(uc, None) -> True (the hook handled #UD)."""
        owner, uc = self.owner, self.owner.uc

        def hook(_h, _d):
            try:
                return callback(uc, None)
            except BaseException as e:  # noqa: B036
                _stop(owner, e)
                return True

        return self._add(UC_HOOK_INSN_INVALID, HOOK_INSN_INVALID_CFUNC(hook))

    def port_in(self, callback) -> int:
        """`in`: callback(uc, port, size, None) -> the value read."""
        owner, uc = self.owner, self.owner.uc

        def hook(_h, port, size, _d):
            try:
                return callback(uc, port, size, None)
            except BaseException as e:  # noqa: B036
                _stop(owner, e)
                return 0

        return self._add(UC_HOOK_INSN, HOOK_INSN_IN_CFUNC(hook), 1, 0, ctypes.c_int(X.UC_X86_INS_IN))

    def port_out(self, callback) -> int:
        """`out`: callback(uc, port, size, value, None)."""
        owner, uc = self.owner, self.owner.uc

        def hook(_h, port, size, value, _d):
            try:
                callback(uc, port, size, value, None)
            except BaseException as e:  # noqa: B036
                _stop(owner, e)

        return self._add(UC_HOOK_INSN, HOOK_INSN_OUT_CFUNC(hook), 1, 0, ctypes.c_int(X.UC_X86_INS_OUT))

    def cpuid(self, callback) -> int:
        """`cpuid`: callback(uc, None) -> true when it wrote the result registers itself."""
        return self._add(UC_HOOK_INSN, self.cpuid_function(callback), 1, 0, ctypes.c_int(X.UC_X86_INS_CPUID))

    def cpuid_function(self, callback):
        """The guarded ctypes function of a cpuid hook, not added (hw's C exit path calls it:
        modes/hw/fastexit.py); the caller keeps it alive."""
        owner, uc = self.owner, self.owner.uc

        def hook(_h, _d):
            try:
                return 1 if callback(uc, None) else 0
            except BaseException as e:  # noqa: B036
                _stop(owner, e)
                return 1

        return HOOK_INSN_CPUID_CFUNC(hook)

    def system_call(self, insn: int, callback) -> int:
        """`syscall` or `sysenter` (insn = UC_X86_INS_SYSCALL / _SYSENTER): callback(uc, None)."""
        owner, uc = self.owner, self.owner.uc

        def hook(_h, _d):
            try:
                callback(uc, None)
            except BaseException as e:  # noqa: B036
                _stop(owner, e)

        return self._add(UC_HOOK_INSN, HOOK_INSN_SYSCALL_CFUNC(hook), 1, 0, ctypes.c_int(insn))

    def code(self, callback, begin: int, end: int) -> int:
        """UC_HOOK_CODE on [begin, end]: callback(uc, address, size, None) before each instruction there."""
        return self._add(UC_HOOK_CODE, self.code_function(callback), begin, end)

    def code_function(self, callback):
        """The guarded ctypes function of a code hook, not added (see intr_function)."""
        owner, uc = self.owner, self.owner.uc

        def hook(_h, address, size, _d):
            try:
                callback(uc, address, size, None)
            except BaseException as e:  # noqa: B036
                _stop(owner, e)

        return HOOK_CODE_CFUNC(hook)

    def code_function_with_data(self, callback):
        """As code_function, for a C hook that hands Python a word of its own (`data`, an int, or
        None for 0): callback(address, data)."""
        owner = self.owner

        def hook(_h, address, _size, data):
            try:
                callback(address, data)
            except BaseException as e:  # noqa: B036
                _stop(owner, e)

        return HOOK_CODE_CFUNC(hook)


def hook_guard(returns=None):
    """The same guard as a decorator, for a hook method that is added with ctypes elsewhere (the
    rdtsc hook): an exception becomes `owner.error`, the engine stops, the hook returns `returns`."""

    def decorate(method):
        def hook(owner, *args):
            try:
                return method(owner, *args)
            except BaseException as e:  # noqa: B036
                _stop(owner, e)
                return returns

        hook.__name__, hook.__doc__, hook.__wrapped__ = method.__name__, method.__doc__, method
        return hook

    return decorate
