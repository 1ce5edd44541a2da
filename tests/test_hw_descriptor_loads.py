"""hw without EPT: a segment register the hypervisor writes (an event's CS and SS, a VM entry's guest
segments) makes the engine read the descriptor through its TLB from inside that write. Shadow paging
under hw refuses a fill it has no entry for, so that the guest exits (a hidden #PF); refused there, the
engine raised the fault by longjmp out through the Python frames that made the write, and the host
process died (SIGSEGV, or "SystemError: unknown opcode"). tests/guests/trap_events.S (its GDT remapped
between loads) did it on every run. The shadow now serves the hypervisor's own descriptor loads
(Regs.loading_descriptor)."""
import subprocess
import sys

from cpuvirt.engine import regs as R
from cpuvirt.runner import run_guest


def test_a_guest_whose_gdt_leaves_the_shadow_runs_to_its_end_under_hw_without_ept():
    """In a process of its own: the crash this guards against kills the process that runs it."""
    native = run_guest("tests/guests/trap_events.S", "native", max_insns=50_000_000)
    p = subprocess.run([sys.executable, "-m", "cpuvirt", "run", "tests/guests/trap_events.S", "--mode", "hw",
                        "--vmx", "enable_ept=0"], capture_output=True, timeout=120)
    assert p.returncode == 0, p.stderr.decode()[-2000:]
    assert b"SystemError" not in p.stderr and b"Traceback" not in p.stderr
    assert p.stdout == native.console and b"FAIL" not in p.stdout


def test_the_flag_is_up_only_during_a_segment_register_write():
    from unicorn import UC_ARCH_X86, UC_MODE_32, Uc

    uc = Uc(UC_ARCH_X86, UC_MODE_32)
    regs = R.Regs(uc)
    seen = []
    real = regs._rw
    regs._rw = lambda *a: (seen.append(regs.loading_descriptor.value), real(*a))[1]
    regs.write(R.EAX, 1)
    regs.write(R.DS, 0)
    # (a C word: hw's #PF exits in C read it too)
    assert seen == [0, 1] and regs.loading_descriptor.value == 0
