"""The one guard every Unicorn hook callback runs under.

A Python exception must never unwind into libunicorn: the ctypes trampoline would print it and let
the guest run on, so a hypervisor bug would look like guest behaviour. The guard keeps the exception
on the hook's owner (`owner.error`), stops the engine, and returns the value the engine expects from
that kind of hook; the run loop (`Vcpu.run`) re-raises `error` once `emu_start` returns.

It costs one Python call per hook, nothing per guest instruction.
"""
from __future__ import annotations

import functools


def hook_guard(returns=None):
    """Decorate a hook method `method(owner, ...)`: an exception it raises becomes `owner.error`, the
    engine (`owner.uc`) stops, and the hook returns `returns` (0 for an IN hook's value, True where
    the engine must keep the registers the hook wrote)."""
    def decorate(method):
        @functools.wraps(method)
        def hook(owner, *args):
            try:
                return method(owner, *args)
            except BaseException as e:      # noqa: B036  (KeyboardInterrupt too: the run must end cleanly)
                owner.error = e
                owner.uc.emu_stop()
                return returns
        return hook
    return decorate


def guarded(owner, callback, returns=None):
    """`callback` (a closure, not a method) under the same guard, errors kept on `owner`."""
    def hook(*args):
        try:
            return callback(*args)
        except BaseException as e:          # noqa: B036
            owner.error = e
            owner.uc.emu_stop()
            return returns
    return hook
