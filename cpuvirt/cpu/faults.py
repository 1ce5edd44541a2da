"""What goes wrong while the processor acts for the guest: a fault raised by event delivery or by a
task switch (SDM Vol. 3A table 6-5 decides what follows it), and the shutdown after a fault while
delivering #DF. Event delivery (events.py) and task switches (tasks.py) both raise them."""

from __future__ import annotations

from cpuvirt.x86.vectors import MNEMONIC


class DeliveryFault(Exception):
    """Delivering an event raised another exception (SDM table 6-5 decides what follows)."""

    def __init__(self, vector: int, error_code: int = 0, cr2: int | None = None):
        super().__init__(f"{MNEMONIC.get(vector, vector)} during delivery")
        self.vector, self.error_code, self.cr2 = vector, error_code, cr2
        self.eip: int | None = None  # set when it arose in a new task (after a task switch's commit)


class TripleFault(Exception):
    """A fault while delivering #DF: the processor shuts down (the run ends `triple_fault`)."""
