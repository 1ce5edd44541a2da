"""COM1: a 16550A UART, as QEMU's `serial` device presents it to a guest.

Registers (offset from the base, 16550 data sheet "Register summary"):
0 RBR (read) / THR (write), DLL when LCR.DLAB; 1 IER, DLM when DLAB; 2 IIR (read) / FCR (write);
3 LCR; 4 MCR; 5 LSR; 6 MSR; 7 SCR. Transmission is instantaneous: THR and the transmitter are
always empty (LSR = 0x60), which is all a polling driver needs. Reset values are QEMU's
(MCR = OUT2, MSR = DCD|DSR|CTS, divisor 12), matching what a guest reads under QEMU + SeaBIOS.
"""

from __future__ import annotations

from collections import deque
from typing import Callable

COM1_BASE = 0x3F8
COM1_IRQ = 4

IER_RDI = 0x01  # received data available
IER_THRI = 0x02  # transmitter holding register empty
IIR_NO_INT = 0x01
IIR_THRI = 0x02
IIR_RDI = 0x04
IIR_FIFO = 0xC0  # both FIFO-enabled bits of a 16550A with FCR bit 0 set
FCR_FE = 0x01
FCR_RFR = 0x02
FCR_XFR = 0x04
LCR_DLAB = 0x80
MCR_LOOP = 0x10
LSR_DR = 0x01
LSR_THRE_TEMT = 0x60
MSR_IDLE = 0xB0  # DCD | DSR | CTS: a terminal is attached (QEMU's reset value)


def _ignore_irq(irq: int) -> None:
    pass


class Uart16550:
    """The eight UART registers at `base`; THR bytes go to `on_output(byte)`.

    Input fed with `feed()` is queued (unbounded, never overrun) and read through RBR with
    LSR.DR set while any is left. Interrupts follow QEMU's serial_update_irq: received data
    (IER bit 0) before THR empty (IER bit 1); the line is driven through `raise_irq(irq)` /
    `lower_irq(irq)` on level changes. Simplifications: the receive-FIFO trigger level and
    character timeout are not modelled (data raises RDI at once), line-status and modem-status
    interrupts never occur. Loopback (MCR bit 4) returns THR bytes to RBR, as driver probes expect.
    MCR's OUT2 does not gate the interrupt line (QEMU does not model that gate, and xv6 relies on it).
    `on_drained()` is called when the guest reads the last byte waiting (serial_input.py paces
    scripted input by it).
    """

    def __init__(
        self,
        on_output: Callable[[int], None],
        base: int = COM1_BASE,
        raise_irq: Callable[[int], None] = _ignore_irq,
        lower_irq: Callable[[int], None] = _ignore_irq,
        irq: int = COM1_IRQ,
    ):
        self.on_output = on_output
        self.base = base
        self.irq = irq
        self._raise = raise_irq
        self._lower = lower_irq
        self.rx: deque[int] = deque()
        self.on_drained: Callable[[], None] | None = None  # the guest read the last received byte
        self.ier = 0
        self.lcr = 0
        self.mcr = 0x08
        self.scr = 0
        self.fcr = 0
        self.divisor = 12
        self.thr_ipending = False
        self.irq_level = False

    def feed(self, data: bytes) -> None:
        """Queue bytes for the guest to read from RBR."""
        self.rx.extend(data)
        if self.ier:
            self._update_irq()

    def read(self, port: int, size: int) -> int:
        off = port - self.base
        if off == 5:
            return LSR_THRE_TEMT | LSR_DR if self.rx else LSR_THRE_TEMT
        if off == 0:
            if self.lcr & LCR_DLAB:
                return self.divisor & 0xFF
            if not self.rx:
                return 0
            value = self.rx.popleft()
            if self.ier:
                self._update_irq()
            if not self.rx and self.on_drained is not None:
                self.on_drained()
            return value
        if off == 1:
            return self.divisor >> 8 if self.lcr & LCR_DLAB else self.ier
        if off == 2:
            iir = self._iir()
            if iir == IIR_THRI:
                self.thr_ipending = False
                self._update_irq()
            return iir | IIR_FIFO if self.fcr & FCR_FE else iir
        if off == 3:
            return self.lcr
        if off == 4:
            return self.mcr
        if off == 6:
            if self.mcr & MCR_LOOP:
                # Loopback: RTS->CTS, DTR->DSR, OUT1->RI, OUT2->DCD (16550 data sheet, MCR bit 4).
                mcr = self.mcr
                return ((mcr & 0x02) << 3) | ((mcr & 0x01) << 5) | ((mcr & 0x0C) << 4)
            return MSR_IDLE
        return self.scr

    def write(self, port: int, size: int, value: int) -> None:
        off = port - self.base
        value &= 0xFF
        if off == 0:
            if self.lcr & LCR_DLAB:
                self.divisor = (self.divisor & 0xFF00) | value
            elif self.mcr & MCR_LOOP:
                self.rx.append(value)
                if self.ier:
                    self._update_irq()
            elif self.ier & IER_THRI:
                # Writing THR clears the THRE interrupt; the byte leaves at once and sets it
                # again, so each byte is a new edge on the IRQ line (QEMU serial_xmit).
                self.thr_ipending = False
                self._update_irq()
                self.on_output(value)
                self.thr_ipending = True
                self._update_irq()
            else:
                self.on_output(value)
        elif off == 1:
            if self.lcr & LCR_DLAB:
                self.divisor = (self.divisor & 0xFF) | (value << 8)
            else:
                changed = self.ier ^ (value & 0x0F)
                self.ier = value & 0x0F
                if changed & IER_THRI:
                    self.thr_ipending = bool(self.ier & IER_THRI)
                if changed:
                    self._update_irq()
        elif off == 2:
            if (value ^ self.fcr) & FCR_FE:
                value |= FCR_RFR | FCR_XFR
            if value & FCR_RFR:
                self.rx.clear()
            if value & FCR_XFR:
                self.thr_ipending = True
            self.fcr = value & 0xC9
            self._update_irq()
        elif off == 3:
            self.lcr = value
        elif off == 4:
            self.mcr = value & 0x1F
        elif off == 7:
            self.scr = value
        # LSR and MSR writes are ignored, as by QEMU.

    def _iir(self) -> int:
        ier = self.ier
        if ier & IER_RDI and self.rx:
            return IIR_RDI
        if ier & IER_THRI and self.thr_ipending:
            return IIR_THRI
        return IIR_NO_INT

    def _update_irq(self) -> None:
        level = self._iir() != IIR_NO_INT
        if level != self.irq_level:
            self.irq_level = level
            (self._raise if level else self._lower)(self.irq)
