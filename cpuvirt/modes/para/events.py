"""Event channels and the shared-info page (Xen's event_channel.h, xen.h): ports, VIRQs, pending bits.

The guest masks events with a plain write of vcpu_info.evtchn_upcall_mask; the hypervisor only sets
pending bits here and, when they are pending and unmasked, the vCPU delivers an upcall (vcpu.py).
"""

from __future__ import annotations

from cpuvirt.modes.para.startinfo import (
    CONSOLE_PORT,
    EVTCHN_MASK,
    EVTCHN_PENDING,
    VCPU_CR2,
    VCPU_PENDING_SEL,
    VCPU_UPCALL_MASK,
    VCPU_UPCALL_PENDING,
)

VIRQ_TIMER = 0
NR_PORTS = 1024  # 32 words of 32 bits (x86_32 shared_info)


class EventChannels:
    """Ports of one domain: 1 = console, then VIRQs as bound. State lives in the shared-info page."""

    __slots__ = ("buf", "off", "port_virq", "virq_port")

    def __init__(self, ram, shared_info_hpa: int):
        self.buf = ram.buf
        self.off = shared_info_hpa - ram.hpa
        self.virq_port: dict[int, int] = {}
        self.port_virq: dict[int, int] = {}

    # -- vcpu_info[0] --------------------------------------------------------------------------------
    @property
    def mask(self) -> int:
        return self.buf[self.off + VCPU_UPCALL_MASK]

    @mask.setter
    def mask(self, value: int) -> None:
        self.buf[self.off + VCPU_UPCALL_MASK] = value

    def deliverable(self) -> bool:
        b, o = self.buf, self.off
        return b[o + VCPU_UPCALL_PENDING] != 0 and b[o + VCPU_UPCALL_MASK] == 0

    def pending(self) -> bool:
        return self.buf[self.off + VCPU_UPCALL_PENDING] != 0

    def set_cr2(self, value: int) -> None:
        o = self.off + VCPU_CR2
        self.buf[o : o + 4] = value.to_bytes(4, "little")

    # -- ports -----------------------------------------------------------------------------------------
    def _word(self, base: int, i: int) -> int:
        o = self.off + base + 4 * i
        return int.from_bytes(self.buf[o : o + 4], "little")

    def _set_word(self, base: int, i: int, v: int) -> None:
        o = self.off + base + 4 * i
        self.buf[o : o + 4] = v.to_bytes(4, "little")

    def raise_port(self, port: int) -> bool:
        """evtchn_set_pending: True if this made an upcall pending."""
        w, bit = divmod(port, 32)
        pend = self._word(EVTCHN_PENDING, w)
        if pend & (1 << bit):
            return False
        self._set_word(EVTCHN_PENDING, w, pend | (1 << bit))
        return self._notify(w, bit)

    def _notify(self, w: int, bit: int) -> bool:
        if self._word(EVTCHN_MASK, w) & (1 << bit):
            return False
        o = self.off
        sel = int.from_bytes(self.buf[o + VCPU_PENDING_SEL : o + VCPU_PENDING_SEL + 4], "little")
        self.buf[o + VCPU_PENDING_SEL : o + VCPU_PENDING_SEL + 4] = (sel | (1 << w)).to_bytes(4, "little")
        if self.buf[o + VCPU_UPCALL_PENDING]:
            return False
        self.buf[o + VCPU_UPCALL_PENDING] = 1
        return True

    def unmask(self, port: int) -> None:
        """EVTCHNOP_unmask: clear the mask bit; a port pending meanwhile raises the upcall now."""
        w, bit = divmod(port, 32)
        self._set_word(EVTCHN_MASK, w, self._word(EVTCHN_MASK, w) & ~(1 << bit))
        if self._word(EVTCHN_PENDING, w) & (1 << bit):
            self._notify(w, bit)

    def port_masked(self, port: int) -> bool:
        """The port's evtchn_mask bit (the guest's to set)."""
        w, bit = divmod(port, 32)
        return bool(self._word(EVTCHN_MASK, w) & (1 << bit))

    def bind_virq(self, virq: int) -> int | None:
        """The lowest free port (Xen's get_free_port), or None when all NR_PORTS are in use."""
        port = next((p for p in range(CONSOLE_PORT + 1, NR_PORTS) if p not in self.port_virq), None)
        if port is None:
            return None
        self.virq_port[virq] = port
        self.port_virq[port] = virq
        return port

    def close(self, port: int) -> bool:
        virq = self.port_virq.pop(port, None)
        if virq is None:
            return False
        del self.virq_port[virq]
        w, bit = divmod(port, 32)
        self._set_word(EVTCHN_PENDING, w, self._word(EVTCHN_PENDING, w) & ~(1 << bit))
        return True

    def raise_virq(self, virq: int) -> bool:
        port = self.virq_port.get(virq)
        return False if port is None else self.raise_port(port)
