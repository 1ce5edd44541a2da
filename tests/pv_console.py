"""What a bundled guest's PV build must print under `--mode para`, given what its native build
prints under `native`.

The rule (guests/README.md, "Paravirtualized builds"): the same console, byte for byte. The only
exceptions are listed here, line by line, with the reason: a check whose native form is about
hardware a PV kernel does not own (the 8259A and the 8254) is performed on its paravirtual
counterpart instead (docs/pv-abi.md 5.2, 6), and its line names what was really checked. Every other
line of such a guest must still be the native one, in the same place.
"""
from __future__ import annotations

# interrupts: a PV kernel has no PIC or PIT (pv-abi.md 7: device interrupts are not delivered to it);
# its timer is set_timer_op + VIRQ_TIMER on an event channel, delivered by an upcall.
# (native line, the PV build's lines in its place, why)
INTERRUPTS = [
    ("PASS IMR (OCW1) reads back: only IRQ 0 unmasked",
     ["PASS EVTCHNOP_bind_virq gives VIRQ_TIMER a port, unmasked in evtchn_mask"],
     "no 8259 IMR: the timer's line is a bound event-channel port, open in evtchn_mask"),
    ("PASS ISR is empty after ICW1 re-initialisation",
     ["PASS no event is pending before the timer is set"],
     "no ISR: nothing in evtchn_pending for the port, evtchn_upcall_pending clear"),
    ("PASS IRQ 0 from the PIT reaches the CPU: 5 ticks counted",
     ["PASS VIRQ_TIMER from set_timer_op reaches the kernel: 5 upcalls counted",
      "PASS the 5th upcall comes 50 ms of system time after the timer was first set"],
     "no PIT: a one-shot set_timer_op deadline re-armed every 10 ms by the handler; the PV build also "
     "checks the virtual time those 100 Hz ticks took, as it programs the rate itself"),
    ("PASS IRQ 0 arrives on the remapped vector 0x20",
     ["PASS the upcall finds VIRQ_TIMER's port in evtchn_pending_sel and evtchn_pending"],
     "no vector: every event arrives through the one callback, which finds the port in the bitmaps"),
    ("PASS the interrupt gate cleared IF in the handler",
     ["PASS the upcall masked events in the handler (evtchn_upcall_mask = 1: IF = 0)"],
     "no interrupt gate: the upcall sets evtchn_upcall_mask, the virtual IF"),
    ("PASS the saved EFLAGS has IF = 1 (interrupts were enabled)",
     ["PASS the saved state has events enabled (EFLAGS.IF = 1, saved upcall mask 0)"],
     "the upcall frame also carries the saved upcall mask (CS slot bits 16-23), checked too"),
    ("PASS an interrupt in hlt returns to the instruction after hlt",
     ["PASS an upcall in sched_op(SCHEDOP_block) returns to the instruction after its int 0x82"],
     "no hlt: the PV idle is the block hypercall, and the upcall returns into its hypercall slot"),
    ("PASS ISR (OCW3) shows IRQ 0 in service inside the handler",
     ["PASS the port's evtchn_pending bit is set inside the handler"],
     "no ISR: the port's pending bit is what is 'in service'"),
    ("PASS EOI (OCW2) clears IRQ 0 from the ISR",
     ["PASS the handler clears it from evtchn_pending (the PV EOI)"],
     "no OCW2: the handler's clear of the pending bit is the acknowledgement"),
    ("PASS IRR (OCW3) latches IRQ 0 while it is masked",
     ["PASS evtchn_pending latches VIRQ_TIMER while its port is masked (evtchn_mask)"],
     "no IRR: a masked port's pending bit latches"),
    ("PASS a masked IRQ is not delivered",
     ["PASS a masked port raises no upcall",
      "PASS EVTCHNOP_unmask delivers the latched event at once"],
     "no IMR: the port's evtchn_mask bit holds the upcall back (with the vCPU's events enabled); the "
     "PV build also unmasks it, which the native one cannot usefully do with its PIT still running"),
]

# netdemo (the virtio-net guest, on its own branch until merged: this entry is inert without it): its
# PV build polls the used ring, since para delivers no device interrupts (pv-abi.md 7), and says so.
NETDEMO = [
    ("interrupts: INTx through the 8259, IRQ 10",
     ["interrupts: none (para delivers no device interrupts): the driver polls the used ring"],
     "no device interrupts under para"),
    ("PASS receive interrupts were delivered",
     ["PASS receive completions were seen by polling the used ring (para: no device interrupts)"],
     "no device interrupts under para: completions are polled"),
]

DIFFERENCES = {"interrupts": INTERRUPTS, "netdemo": NETDEMO}


def expected_pv_console(guest: str, native_console: bytes) -> bytes:
    """The console the PV build of `guest` must print under para, from its native console."""
    table = DIFFERENCES.get(guest)
    if table is None:
        return native_console
    lines = native_console.decode().split("\n")
    for native, pv, _why in table:
        assert lines.count(native) == 1, f"{guest}: the native build no longer prints {native!r} once"
        i = lines.index(native)
        lines[i:i + 1] = pv
    return "\n".join(lines).encode()
