"""Exit statuses of `cpuvirt run`, defined once (README "Exit status", docs/security.md).

A script must be able to tell the guest's own result from a stop the hypervisor made and from a
cpuvirt bug. Any other value is the guest's isa-debug-exit value (port 0xF4).

| status | outcome | meaning |
|---|---|---|
| the guest's value | exit | the guest wrote it to isa-debug-exit (para: SCHEDOP_shutdown) |
| 123 HYPERVISOR_STOP | error, entry_failure, ept_violation, ... | the hypervisor stopped the guest (see below) |
| 124 BUDGET | budget | the virtual-cycle budget (--max-insns) ran out; hypervisor work is charged to it too |
| 125 TRIPLE_FAULT | triple_fault, reset | the machine resets: shutdown after a fault while delivering #DF, |
|                  |                     | or a reset the guest asked for (port 0x92, 0xCF9, the 8042:       |
|                  |                     | machine/reset.py); QEMU with -no-reboot powers off at both        |
| 126 HALTED | halted | hlt (or SCHEDOP_block) with nothing able to wake the CPU |
| 2 BAD_INPUT | - | bad command line or input file: one line, no traceback |
| 130 INTERRUPTED | interrupted | Ctrl-C (SIGINT, 128 + 2): the run stops at once, the trace gets its footer |
| 1 INTERNAL_ERROR | error | cpuvirt itself failed (a bug): never caused by what a guest does |

HYPERVISOR_STOP: the guest did something the hypervisor refuses or does not implement (a privileged
instruction in a non-PV guest under para, an MMIO instruction hw cannot emulate, an unsupported
architectural feature, a failed VM entry); the summary says which, in one line.
"""

from __future__ import annotations

from enum import IntEnum


class Status(IntEnum):
    """The exit statuses cpuvirt itself gives (table above); any other is the guest's own value."""

    INTERNAL_ERROR = 1
    BAD_INPUT = 2
    HYPERVISOR_STOP = 123
    BUDGET = 124
    TRIPLE_FAULT = 125
    HALTED = 126
    INTERRUPTED = 130


INTERNAL_ERROR, BAD_INPUT, HYPERVISOR_STOP, BUDGET, TRIPLE_FAULT, HALTED, INTERRUPTED = Status

RESERVED = {
    INTERNAL_ERROR: "internal error",
    BAD_INPUT: "bad input",
    HYPERVISOR_STOP: "hypervisor stopped the guest",
    BUDGET: "budget exhausted",
    TRIPLE_FAULT: "triple fault",
    HALTED: "halted forever",
    INTERRUPTED: "interrupted",
}


class Unsupported(Exception):
    """The guest asked for something cpuvirt refuses or does not implement (named in the message): the
    run ends with HYPERVISOR_STOP. Raised from every floor (the x86 emulator, memory, the modes)."""
