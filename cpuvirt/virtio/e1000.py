"""The Intel 82540EM (QEMU's `-device e1000`): the classic NIC ring beside the virtqueue.

What is modelled is the subset a polling-or-interrupt driver needs, named as in Intel's "PCI/PCI-X
Family of Gigabit Ethernet Controllers Software Developer's Manual" (8254x SDM) and QEMU's
hw/net/e1000_regs.h, with QEMU 7.2's behaviour where the two differ (QEMU is the reference):

- PCI: 8086:100E revision 3, class 020000, subsystem 1af4:1100; BAR0 = 128 KiB of memory-mapped
  registers, BAR1 = 64 bytes of I/O (QEMU's is inert: reads 0, writes ignored; so is this one), an
  expansion ROM BAR of 256 KiB (sized, never decoded), INTA#. No capability list.
- registers (32-bit; narrower accesses act on the whole dword, as QEMU's impl.min_access_size = 4):
  CTRL (RST self-clearing; QEMU does not reset on it either), STATUS (full duplex, 1000 Mb/s, link up),
  EECD and EERD (the EEPROM: words 0-2 the MAC, 0x3F the checksum), ICR (read clears it),
  ICS, IMS (write sets), IMC (write clears), RCTL, TCTL, RDBAL/RDBAH/RDLEN/RDH/RDT and
  TDBAL/TDBAH/TDLEN/TDH/TDT, the receive address registers RAL0/RAH0 (the MAC, address valid, set
  at reset) .. RAL15/RAH15, MTA. Other registers read 0 and ignore writes.
- descriptor rings (SDM 3.2, 3.3): legacy 16-byte descriptors only. The driver fills descriptors and
  moves the tail; the device consumes strictly in order from the head and moves it; head == tail is an
  empty ring (so the driver keeps one descriptor unused); both start at 0. Transmit: a frame is the
  descriptors up to EOP; DD is written back to descriptors with RS (or RPS), then TXDW; TXQE when the
  ring is empty. Receive: RCTL.EN, buffers of RCTL.BSIZE/BSEX, frames shorter than 60 bytes padded to
  60 (QEMU), filtered by the receive addresses (RAH.AV), broadcast (BAM), unicast/multicast promiscuous
  (UPE/MPE); the length includes 4 CRC bytes unless RCTL.SECRC (they are not written, as in QEMU);
  status DD|EOP|IXSM; RXT0, and RXDMT0 when the free descriptors fall to RCTL.RDMTS.
- INTx is asserted while ICR & IMS is not 0 (SDM 13.4.17-21); reading ICR clears it and lowers INTx.

A broken ring (no descriptors, a head or tail past the ring, the ring or a buffer outside guest RAM or
on a frame the device may not write) is a device error, never a host access: that direction stops
(a RING_ERROR event, counted) until the driver writes its control register (TCTL or RCTL) again.
Frames the device cannot take are dropped and counted.
"""

from __future__ import annotations

import struct

from cpuvirt.machine.pci import PciFunction
from cpuvirt.virtio.virtqueue import GuestMemoryError, GuestRam

# PCI identity (QEMU hw/net/e1000.c, measured under QEMU 7.2 with tests/guests/pciprobe.S)
INTEL_VENDOR, E1000_DEV_ID_82540EM = 0x8086, 0x100E
REVISION = 3
MMIO_SIZE = 0x20000
IO_SIZE = 0x40
ROM_SIZE = 0x40000

# Register offsets (8254x SDM 13.4; QEMU e1000_regs.h)
CTRL, STATUS, EECD, EERD = 0x0000, 0x0008, 0x0010, 0x0014
ICR, ICS, IMS, IMC = 0x00C0, 0x00C8, 0x00D0, 0x00D8
RCTL, TCTL = 0x0100, 0x0400
RDBAL, RDBAH, RDLEN, RDH, RDT = 0x2800, 0x2804, 0x2808, 0x2810, 0x2818
TDBAL, TDBAH, TDLEN, TDH, TDT = 0x3800, 0x3804, 0x3808, 0x3810, 0x3818
MTA, MTA_SIZE = 0x5200, 128
RA, RA_ENTRIES = 0x5400, 16  # RALn at RA + 8n, RAHn at RA + 8n + 4

CTRL_SLU, CTRL_SPD_1000, CTRL_RST = 1 << 6, 1 << 9, 1 << 26
CTRL_SWDPIN0, CTRL_SWDPIN2 = 1 << 18, 1 << 20
STATUS_FD, STATUS_LU, STATUS_SPEED_1000 = 1 << 0, 1 << 1, 1 << 7
STATUS_ASDV, STATUS_MTXCKOK, STATUS_GIO_MASTER_ENABLE = 0x300, 1 << 10, 1 << 19
EECD_DO, EECD_GNT, EECD_PRES = 1 << 3, 1 << 7, 1 << 8
EERD_START, EERD_DONE, EERD_ADDR_SHIFT, EERD_DATA_SHIFT = 1 << 0, 1 << 4, 8, 16
EEPROM_CHECKSUM_REG, EEPROM_SUM = 0x3F, 0xBABA

ICR_TXDW, ICR_TXQE, ICR_LSC, ICR_RXDMT0, ICR_RXO, ICR_RXT0 = 1 << 0, 1 << 1, 1 << 2, 1 << 4, 1 << 6, 1 << 7
RCTL_EN, RCTL_UPE, RCTL_MPE, RCTL_LPE, RCTL_BAM = 1 << 1, 1 << 3, 1 << 4, 1 << 5, 1 << 15
RCTL_RDMTS_SHIFT, RCTL_BSIZE_SHIFT, RCTL_BSEX, RCTL_SECRC = 8, 16, 1 << 25, 1 << 26
TCTL_EN, TCTL_PSP = 1 << 1, 1 << 3
RAH_AV = 1 << 31

TXD_CMD_EOP, TXD_CMD_RS, TXD_CMD_RPS, TXD_CMD_DEXT = 0x01, 0x08, 0x10, 0x20
TXD_STAT_DD = 0x01
RXD_STAT_DD, RXD_STAT_EOP, RXD_STAT_IXSM = 0x01, 0x02, 0x04

DESC_SIZE = 16
MIN_FRAME = 60  # ETH_ZLEN: shorter received frames are padded (QEMU)
MAX_TX_FRAME = 0x10000  # QEMU's transmit buffer
MAX_STD_FRAME = 1522  # without RCTL.LPE longer frames are dropped (with a VLAN tag)
BACKLOG = 256  # frames waiting for receive descriptors, at most
ICR_NAMES = (
    (ICR_TXDW, "TXDW"),
    (ICR_TXQE, "TXQE"),
    (ICR_LSC, "LSC"),
    (ICR_RXDMT0, "RXDMT0"),
    (ICR_RXO, "RXO"),
    (ICR_RXT0, "RXT0"),
)

_TX_DESC = struct.Struct("<QHBBBBH")  # buffer, length, CSO, CMD, STA, CSS, special
_RX_DESC = struct.Struct("<QHHBBH")  # buffer, length, checksum, status, errors, special


def cause_text(bits: int) -> str:
    return "|".join(n for b, n in ICR_NAMES if bits & b) or "0"


def rx_buffer_size(rctl: int) -> int:
    """RCTL.BSIZE (bits 17:16) with BSEX (bit 25): 2048/1024/512/256, or x16 (SDM 13.4.22)."""
    size = (2048, 1024, 512, 256)[(rctl >> RCTL_BSIZE_SHIFT) & 3]
    return size * 16 if rctl & RCTL_BSEX and size != 2048 else size


class RingError(Exception):
    """The driver broke a ring: that direction of the device stops."""


class _Ring:
    """The device's view of one descriptor ring, from its registers: base, length, head, tail."""

    def __init__(self, name: str, regs: dict, bal: int, bah: int, dlen: int, head: int, tail: int):
        self.name, self.regs = name, regs
        self.bal, self.bah, self.dlen, self.head_reg, self.tail_reg = bal, bah, dlen, head, tail
        self.error: str | None = None  # set: the ring is stopped until its control register is written

    @property
    def base(self) -> int:
        return self.regs[self.bah] << 32 | self.regs[self.bal] & ~0xF

    @property
    def count(self) -> int:
        return self.regs[self.dlen] // DESC_SIZE

    @property
    def head(self) -> int:
        return self.regs[self.head_reg]

    @head.setter
    def head(self, value: int) -> None:
        self.regs[self.head_reg] = value

    @property
    def tail(self) -> int:
        return self.regs[self.tail_reg]

    def check(self, ram: GuestRam) -> None:
        """The ring as the registers describe it must fit guest RAM, head and tail inside it."""
        n = self.count
        if n == 0:
            raise RingError(f"{self.name}: the ring has no descriptors (length 0)")
        if self.head >= n or self.tail >= n:
            raise RingError(f"{self.name}: head {self.head} or tail {self.tail} is past the ring's {n} descriptors")
        try:
            ram.check(self.base, n * DESC_SIZE)
        except GuestMemoryError as e:
            raise RingError(f"{self.name}: descriptor ring {e}") from None

    def desc_address(self, index: int) -> int:
        return self.base + DESC_SIZE * index

    def pending(self) -> int:
        """Descriptors the driver has given the device (from head to tail)."""
        return (self.tail - self.head) % self.count


class _Mmio:
    def __init__(self, nic: E1000):
        self.nic = nic

    def read(self, offset: int, size: int) -> int:
        nic = self.nic
        nic.access = (nic.bars[0].mapped or 0) + offset, False
        try:
            return (nic.reg_read(offset & ~3) >> 8 * (offset & 3)) & ((1 << 8 * size) - 1)
        finally:
            nic.access = None

    def write(self, offset: int, size: int, value: int) -> None:
        nic = self.nic
        nic.access = (nic.bars[0].mapped or 0) + offset, True
        try:
            nic.reg_write(offset & ~3, (value << 8 * (offset & 3)) & 0xFFFFFFFF)
        finally:
            nic.access = None


class _InertIo:
    """BAR1: QEMU's e1000 I/O window (IOADDR/IODATA in the SDM) does nothing; neither does this one."""

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        pass


class E1000(PciFunction):
    """One 82540EM on the PCI bus, with its peer (backend.py) and optional pcap capture."""

    name = "e1000"

    def __init__(
        self, mac: bytes, ram: GuestRam, backend=None, capture=None, trace=None, completions=None, now=lambda: 0
    ):
        super().__init__("e1000", INTEL_VENDOR, E1000_DEV_ID_82540EM, 0x020000, revision=REVISION, int_pin=1)
        self.mac = mac
        self.ram = ram
        self.backend = backend
        self.capture = capture
        self._trace_to = trace or (lambda reason, detail, action, kind="e1000", mmio=None: None)
        self.access: tuple[int, bool] | None = None  # (gpa, is_write) of the register access being served
        self.completions = completions  # completion.TxCompletions with a slow destination, or None
        if completions is not None:
            completions.site = self._site
        self.now = now
        self.device = self  # the run summary reads transport.device
        self.add_bar(0, False, MMIO_SIZE, _Mmio(self))
        self.add_bar(1, True, IO_SIZE, _InertIo())
        self.add_rom_bar(ROM_SIZE)
        words = [int.from_bytes(mac[i : i + 2], "little") for i in (0, 2, 4)] + [0] * 61
        words.append((EEPROM_SUM - sum(words)) & 0xFFFF)
        self.eeprom = words
        self.counters = {
            "tx_frames": 0,
            "tx_bytes": 0,
            "rx_frames": 0,
            "rx_bytes": 0,
            "tx_dropped": 0,
            "rx_dropped": 0,
            "notifications": 0,
            "interrupts": 0,
            "needs_reset": 0,
        }
        self.reset_name = "ring errors"
        self.backlog: list[bytes] = []
        self._reset()
        if backend is not None:
            backend.attach(self.receive)

    def _site(self) -> dict:
        if self.access is not None:
            return {"mmio": self.access}
        if self.completions is not None and self.completions.timer.firing:
            return {"timer": True}
        return {}

    def trace(self, reason: str, detail: dict, action: str, kind: str = "e1000") -> None:
        """A device event; during a register access it names the guest instruction that made it."""
        self._trace_to(reason, detail, action, kind=kind, **self._site())

    # -- state ---------------------------------------------------------------------------------------
    def _reset(self) -> None:
        """Power-on state (QEMU's e1000_reset_hold): the MAC in RAL0/RAH0, link up, rings empty."""
        r = self.regs = dict.fromkeys(
            (
                CTRL,
                STATUS,
                EECD,
                EERD,
                ICR,
                IMS,
                RCTL,
                TCTL,
                RDBAL,
                RDBAH,
                RDLEN,
                RDH,
                RDT,
                TDBAL,
                TDBAH,
                TDLEN,
                TDH,
                TDT,
            ),
            0,
        )
        r[CTRL] = CTRL_SWDPIN2 | CTRL_SWDPIN0 | CTRL_SPD_1000 | CTRL_SLU
        r[STATUS] = (
            0x80000000
            | STATUS_GIO_MASTER_ENABLE
            | STATUS_ASDV
            | STATUS_MTXCKOK
            | STATUS_SPEED_1000
            | STATUS_FD
            | STATUS_LU
        )
        self.ra = [0] * (2 * RA_ENTRIES)
        self.ra[0] = int.from_bytes(self.mac[:4], "little")
        self.ra[1] = int.from_bytes(self.mac[4:6], "little") | RAH_AV
        self.mta = [0] * MTA_SIZE
        self.tx = _Ring("transmit", r, TDBAL, TDBAH, TDLEN, TDH, TDT)
        self.rx = _Ring("receive", r, RDBAL, RDBAH, RDLEN, RDH, RDT)
        self.tx_stalled: tuple[int, int] | None = None  # (frame number, time taken) while a slow frame holds the head
        self.posted_at: dict[int, int] = {}  # TX descriptor -> virtual time its TDT write made it the device's

    # -- registers -----------------------------------------------------------------------------------
    def reg_read(self, reg: int) -> int:
        r = self.regs
        if reg == ICR:
            value = r[ICR]
            r[ICR] = 0  # read to clear (SDM 13.4.17); the line falls
            self._update_intx()
            self.trace(
                "ICR_READ",
                {"icr": cause_text(value)},
                "ICR cleared, INTx deasserted" if value else "nothing pending",
                kind="e1000",
            )
            return value
        if reg == ICS:
            return r[ICR]  # QEMU: ICS reads as ICR, without clearing it
        if reg == EECD:
            return EECD_PRES | EECD_GNT | EECD_DO | (r[EECD] & 0x3F7)
        if reg == EERD:
            return self._eerd()
        if RA <= reg < RA + 8 * RA_ENTRIES:
            return self.ra[(reg - RA) // 4]
        if MTA <= reg < MTA + 4 * MTA_SIZE:
            return self.mta[(reg - MTA) // 4]
        if reg in (IMC,):
            return 0
        return r.get(reg, 0)

    def _eerd(self) -> int:
        value = self.regs[EERD]
        if not value & EERD_START:
            return value
        index = value >> EERD_ADDR_SHIFT & 0xFF
        rest = value & ~EERD_START & 0xFFFF
        if index > EEPROM_CHECKSUM_REG:
            return EERD_DONE | rest
        return self.eeprom[index] << EERD_DATA_SHIFT | EERD_DONE | rest

    def reg_write(self, reg: int, value: int) -> None:
        r = self.regs
        if reg == CTRL:
            r[CTRL] = value & ~CTRL_RST  # self-clearing; QEMU resets nothing on it
        elif reg == EECD:
            r[EECD] = value
        elif reg == EERD:
            r[EERD] = value
        elif reg == ICR:
            self._set_icr(r[ICR] & ~value)  # write 1 to clear
        elif reg == ICS:
            self._cause(value, "ICS written")
        elif reg == IMS:
            r[IMS] |= value
            self._update_intx()
        elif reg == IMC:
            r[IMS] &= ~value
            self._update_intx()
        elif reg == RCTL:
            self._write_rctl(value)
        elif reg == TCTL:
            self._write_tctl(value)
        elif reg in (RDLEN, TDLEN):
            r[reg] = value & 0xFFF80  # a multiple of 128 bytes (8 descriptors), up to 1 MiB
        elif reg in (RDH, TDH):
            r[reg] = value & 0xFFFF
        elif reg == RDT:
            r[RDT] = value & 0xFFFF
            self._flush_backlog()
        elif reg == TDT:
            self._write_tdt(value & 0xFFFF)
        elif reg in (RDBAL, RDBAH, TDBAL, TDBAH):
            r[reg] = value
        elif RA <= reg < RA + 8 * RA_ENTRIES:
            self.ra[(reg - RA) // 4] = value
        elif MTA <= reg < MTA + 4 * MTA_SIZE:
            self.mta[(reg - MTA) // 4] = value
        # STATUS and unmodelled registers: writes ignored

    def _write_rctl(self, value: int) -> None:
        was = self.regs[RCTL]
        self.regs[RCTL] = value
        if self.rx.error is not None:
            self.rx.error = None
            self.trace("RCTL", {"rctl": f"{value:#x}"}, "receive ring error cleared", kind="e1000")
        if (value ^ was) & RCTL_EN:
            self.trace(
                "RCTL",
                {
                    "rctl": f"{value:#x}",
                    "buffer": rx_buffer_size(value),
                    "strip_crc": bool(value & RCTL_SECRC),
                    "broadcast": bool(value & RCTL_BAM),
                },
                "receiver enabled" if value & RCTL_EN else "receiver disabled",
                kind="e1000",
            )
        self._flush_backlog()

    def _write_tctl(self, value: int) -> None:
        was = self.regs[TCTL]
        self.regs[TCTL] = value
        if self.tx.error is not None:
            self.tx.error = None
            self.trace("TCTL", {"tctl": f"{value:#x}"}, "transmit ring error cleared", kind="e1000")
        if (value ^ was) & TCTL_EN:
            self.trace(
                "TCTL",
                {"tctl": f"{value:#x}"},
                "transmitter enabled" if value & TCTL_EN else "transmitter disabled",
                kind="e1000",
            )
        self._transmit()  # QEMU's set_tctl starts transmission too

    # -- interrupts ----------------------------------------------------------------------------------
    def _set_icr(self, value: int) -> None:
        self.regs[ICR] = value
        self._update_intx()

    def _cause(self, bits: int, why: str) -> None:
        """Set interrupt causes; INTx follows ICR & IMS (level)."""
        r = self.regs
        before = bool(r[ICR] & r[IMS])
        r[ICR] |= bits
        self._update_intx()
        if not before and r[ICR] & r[IMS]:
            self.counters["interrupts"] += 1
            self.trace(
                "INTERRUPT",
                {
                    "cause": cause_text(bits),
                    "icr": cause_text(r[ICR]),
                    "ims": cause_text(r[IMS]),
                    "irq": self.config[0x3C],
                    "why": why,
                },
                "INTx asserted (level) until the driver reads ICR",
                kind="e1000",
            )

    def _update_intx(self) -> None:
        level = bool(self.regs[ICR] & self.regs[IMS])
        if level != self.intx_level:
            self.set_intx(level)

    def _ring_error(self, ring: _Ring, why: str) -> None:
        ring.error = why
        self.counters["needs_reset"] += 1
        self.trace(
            "RING_ERROR",
            {"ring": ring.name, "why": why},
            f"the {ring.name} ring is stopped until the driver writes {'TCTL' if ring is self.tx else 'RCTL'} again",
            kind="e1000",
        )

    def _drop(self, counter: str, why: str, detail: dict) -> None:
        self.counters[counter] += 1
        self.trace(
            "DROP", {**detail, "why": why, counter: self.counters[counter]}, "frame dropped and counted", kind="e1000"
        )

    # -- transmit (SDM 3.3) ----------------------------------------------------------------------------
    def _write_tdt(self, tail: int) -> None:
        old = self.regs[TDT]
        self.regs[TDT] = tail
        self.counters["notifications"] += 1
        n = self.tx.count
        if n and tail < n and old < n:
            now = self.now()
            i = old
            while i != tail:  # the descriptors this write gave the device
                self.posted_at.setdefault(i, now)
                i = (i + 1) % n
        self.trace(
            "TDT",
            {"tdt": tail, "tdh": self.regs[TDH], "tdlen": self.regs[TDLEN]},
            "the device walks the descriptors from TDH to TDT",
            kind="e1000",
        )
        self._transmit()

    def _tx_ready(self) -> str | None:
        if not self.regs[TCTL] & TCTL_EN:
            return "transmitter disabled (TCTL.EN clear)"
        if self.tx.error is not None:
            return "the transmit ring is stopped after an error"
        if not self.bus_master:
            return "bus mastering is off in the PCI command register: the device may not touch memory"
        return None

    def _transmit(self) -> None:
        """Walk TDH -> TDT in order. A frame ends at an EOP descriptor; its descriptors are given
        back (DD, head moved) when it completes, which for a slow destination is later: until then the
        head stays on it and nothing behind it completes."""
        if self.tx_stalled is not None or self.tx.head == self.tx.tail:
            if self.regs[TCTL] & TCTL_EN and self.tx_stalled is None and self.tx.error is None:
                self._cause(ICR_TXQE, "transmit queue empty")
            return
        why = self._tx_ready()
        if why is not None:
            self.trace("TDT", {"tdt": self.tx.tail}, f"ignored: {why}", kind="e1000")
            return
        ring = self.tx
        try:
            ring.check(self.ram)
            while ring.head != ring.tail:
                if not self._tx_frame(ring):
                    return  # stalled behind a slow frame, or waiting for EOP
        except RingError as e:
            self._ring_error(ring, str(e))
            return
        self._cause(ICR_TXQE, "transmit queue empty")

    def _tx_frame(self, ring: _Ring) -> bool:
        """Gather one frame from the head (descriptors up to EOP, all of which must have been given
        to the device) and send it; False if it waits for a slow destination."""
        n, head = ring.count, ring.head
        data = bytearray()
        indices = []
        i = head
        while True:
            if i == ring.tail:
                return False  # the tail cuts the frame: wait for the rest (SDM 3.3.3)
            addr, length, _cso, cmd, _sta, _css, _special = _TX_DESC.unpack(self._read(ring, ring.desc_address(i), 16))
            if cmd & TXD_CMD_DEXT:
                raise RingError(
                    f"transmit descriptor {i} is an extended (context or data) descriptor: "
                    "only legacy descriptors are modelled"
                )
            if length:
                try:
                    chunk = self.ram.read(addr, length)
                except GuestMemoryError as e:
                    raise RingError(f"transmit descriptor {i}: buffer {e}") from None
                if len(data) < MAX_TX_FRAME:
                    data += chunk[: MAX_TX_FRAME - len(data)]
            indices.append((i, cmd))
            i = (i + 1) % n
            if cmd & TXD_CMD_EOP:
                break
        frame = bytes(data)
        taken_at = self.posted_at.get(head, self.now())
        if self.completions is not None:
            number, delay = self.completions.take()
            if delay:
                self.tx_stalled = (number, taken_at)
                self.trace(
                    "TX_STALL",
                    {"frame": number, "tdh": head, "behind": ring.pending() - len(indices), "delay_ns": delay},
                    "slow destination: the head stays here, nothing behind it can complete",
                    kind="e1000",
                )
                self.completions.timer.at(
                    self.now() + delay, lambda: self._tx_late(ring, head, indices, frame, number, taken_at)
                )
                return False
            self._tx_done(ring, head, indices, frame, number, taken_at)
        else:
            self._tx_done(ring, head, indices, frame, None, taken_at)
        return True

    def _tx_late(self, ring, head, indices, frame, number, taken_at) -> None:
        if ring is not self.tx or self.tx_stalled is None or self.tx_stalled[0] != number:
            return  # the driver reset the ring meanwhile
        self.tx_stalled = None
        try:
            self._tx_done(ring, head, indices, frame, number, taken_at)
        except RingError as e:
            self._ring_error(ring, str(e))
            return
        self._transmit()  # the frames queued behind it go now

    def _tx_done(self, ring, head, indices, frame, number, taken_at) -> None:
        """Write DD back where RS asks, move the head past the frame, hand the frame to the peer."""
        wrote = False
        for i, cmd in indices:
            self.posted_at.pop(i, None)
            if cmd & (TXD_CMD_RS | TXD_CMD_RPS):
                at = ring.desc_address(i) + 12
                sta = self._read(ring, at, 1)[0]
                self._write(ring, at, bytes(((sta | TXD_STAT_DD) & ~0x0E,)))
                wrote = True
        ring.head = (head + len(indices)) % ring.count
        detail = {"tdh": head, "descriptors": len(indices), "frame": len(frame), "next_tdh": ring.head}
        if number is not None:
            self.completions.complete(number, head, taken_at, f"DD written back, TDH {head} -> {ring.head}")
        if len(frame) < 14:
            self._drop("tx_dropped", "shorter than an Ethernet header", detail)
        else:
            self.counters["tx_frames"] += 1
            self.counters["tx_bytes"] += len(frame)
            self.trace("TX", detail, "frame copied out to the peer; DD written back where RS asked", kind="e1000")
            if self.capture is not None:
                self.capture("out", frame)
            if self.backend is not None:
                self.backend.transmit(frame)
        if wrote:
            self._cause(ICR_TXDW, "transmit descriptor written back")

    # -- receive (SDM 3.2) -------------------------------------------------------------------------------
    def receive(self, frame: bytes) -> None:
        """A frame from the peer for the guest."""
        if len(frame) < MIN_FRAME:
            frame = bytes(frame) + bytes(MIN_FRAME - len(frame))
        if len(self.backlog) >= BACKLOG:
            self._drop(
                "rx_dropped", f"no receive descriptor and the backlog is full ({BACKLOG} frames)", {"frame": len(frame)}
            )
            self._cause(ICR_RXO, "receiver overrun")
            return
        self.backlog.append(bytes(frame))
        self._flush_backlog()

    def _refused(self, frame: bytes) -> str | None:
        """Why the receiver, as RCTL and the receive addresses are now, does not take the frame."""
        if not self._accepts(frame):
            return "not for this station (receive address filter)"
        if len(frame) > MAX_STD_FRAME and not self.regs[RCTL] & RCTL_LPE:
            return f"longer than {MAX_STD_FRAME} bytes without RCTL.LPE"
        return None

    def _accepts(self, frame: bytes) -> bool:
        """Receive filtering (SDM 3.2.1 simplified): broadcast with BAM, our receive addresses, promiscuous."""
        rctl, dst = self.regs[RCTL], frame[:6]
        if dst == b"\xff" * 6:
            return bool(rctl & RCTL_BAM)
        if dst[0] & 1:
            return bool(rctl & RCTL_MPE)
        if rctl & RCTL_UPE:
            return True
        for n in range(RA_ENTRIES):
            low, high = self.ra[2 * n], self.ra[2 * n + 1]
            if high & RAH_AV and dst == low.to_bytes(4, "little") + (high & 0xFFFF).to_bytes(2, "little"):
                return True
        return False

    def _flush_backlog(self) -> None:
        ring = self.rx
        if not self.backlog or not self.regs[RCTL] & RCTL_EN or ring.error is not None or not self.bus_master:
            return
        if ring.head == ring.tail:
            return  # no descriptors given yet: the frames wait
        delivered = False
        try:
            ring.check(self.ram)
            while self.backlog and ring.head != ring.tail:
                frame = self.backlog[0]
                why = self._refused(frame)  # filtered as the receiver is set up when it takes the frame
                if why is None:
                    done = self._rx_frame(ring, frame)
                    if done is None:
                        break  # not enough descriptors given yet: it waits
                    delivered |= done
                else:
                    self._drop("rx_dropped", why, {"frame": len(frame)})
                self.backlog.pop(0)
        except RingError as e:
            self._ring_error(ring, str(e))
        if delivered:
            bits = ICR_RXT0
            threshold = ring.count * DESC_SIZE >> (((self.regs[RCTL] >> RCTL_RDMTS_SHIFT) & 3) + 1)
            if ring.pending() * DESC_SIZE <= threshold:
                bits |= ICR_RXDMT0
            self._cause(bits, "frame received")

    def _rx_frame(self, ring: _Ring, frame: bytes) -> bool | None:
        """Write one frame over as many descriptors as it needs: True; None if they are not all given
        yet; False if the ring can never hold it (dropped, RXO)."""
        bufsize = rx_buffer_size(self.regs[RCTL])
        total = len(frame) + (0 if self.regs[RCTL] & RCTL_SECRC else 4)
        needed = -(-total // bufsize)
        if needed > ring.pending():
            if needed >= ring.count:
                self._drop(
                    "rx_dropped",
                    f"a {len(frame)}-byte frame needs {needed} descriptors of {bufsize} bytes, "
                    f"more than the ring's {ring.count}",
                    {"frame": len(frame)},
                )
                self._cause(ICR_RXO, "receiver overrun")
                return False
            return None
        head, offset, i = ring.head, 0, ring.head
        for k in range(needed):
            at = ring.desc_address(i)
            addr, _length, csum, status, errors, _special = _RX_DESC.unpack(self._read(ring, at, 16))
            piece = min(bufsize, total - offset)
            data = frame[offset : offset + piece]  # the CRC bytes are counted, not written (QEMU)
            try:
                self.ram.write(addr, data)
            except GuestMemoryError as e:
                raise RingError(f"receive descriptor {i}: buffer {e}") from None
            offset += piece
            last = k == needed - 1
            status = (status & ~(RXD_STAT_DD | RXD_STAT_EOP)) | (RXD_STAT_EOP | RXD_STAT_IXSM if last else 0)
            # the last 0: the special field (no VLAN)
            self._write(ring, at + 8, struct.pack("<HHBBH", piece, csum, status | RXD_STAT_DD, errors, 0))
            i = (i + 1) % ring.count
        ring.head = i
        self.counters["rx_frames"] += 1
        self.counters["rx_bytes"] += len(frame)
        self.trace(
            "RX",
            {"rdh": head, "descriptors": needed, "frame": len(frame), "length": total, "next_rdh": i},
            "frame written into the descriptors' buffers; DD|EOP written back",
            kind="e1000",
        )
        if self.capture is not None:
            self.capture("in", frame)
        return True

    # -- guest memory --------------------------------------------------------------------------------
    def _read(self, ring: _Ring, gpa: int, n: int) -> bytes:
        try:
            return self.ram.read(gpa, n)
        except GuestMemoryError as e:
            raise RingError(f"{ring.name} descriptor at {gpa:#x}: {e}") from None

    def _write(self, ring: _Ring, gpa: int, data: bytes) -> None:
        try:
            self.ram.write(gpa, data)
        except GuestMemoryError as e:
            raise RingError(f"{ring.name} descriptor write-back at {gpa:#x}: {e}") from None

    def close(self) -> None:
        pass
