"""The one hook guard (engine/hooks.py): an exception raised inside any engine hook stops the engine and
comes out of the run as itself, in every mode, instead of unwinding through libunicorn (where ctypes
would print it and let the guest run on)."""
from __future__ import annotations

import pytest

from cpuvirt.cpu.vcpu import Vcpu
from cpuvirt.machine.bus import PortBus
from cpuvirt.modes.hw.vmx import VmxCpu
from cpuvirt.modes.para.vcpu import ParaVcpu
from cpuvirt.runner import run_guest


class Boom(Exception):
    pass


def _boom(*_args, **_kwargs):
    raise Boom("raised inside a hook")


# (mode, class, method): what the guest's first port write or hypercall reaches from its hook.
CASES = [("native", PortBus, "write"),          # the C OUT hook's Python call (Vcpu.timed_out)
         ("trap", PortBus, "write"),            # the C OUT hook's Python call (IoGateVcpu.timed_out)
         ("para", ParaVcpu, "hypercall"),       # the interrupt hook (int 0x82)
         ("hw", VmxCpu, "_exit_for_io")]        # the C OUT hook, then an IO_INSTRUCTION exit (io_exit_hook)


@pytest.mark.parametrize("mode,cls,method", CASES, ids=[c[0] for c in CASES])
def test_an_exception_in_a_hook_ends_the_run_as_itself(monkeypatch, mode, cls, method):
    monkeypatch.setattr(cls, method, _boom)
    with pytest.raises(Boom):
        run_guest("hello", mode=mode)


def test_trap_python_io_path_ends_the_run_as_itself(monkeypatch):
    """trap with CPUVIRT_IO_GATE_C=0: the I/O gate's intercept (code) hook, then the Python OUT hook."""
    monkeypatch.setenv("CPUVIRT_IO_GATE_C", "0")
    monkeypatch.setattr(Vcpu, "port_io", _boom)
    with pytest.raises(Boom):
        run_guest("hello", mode="trap")
