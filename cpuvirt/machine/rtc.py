"""The CMOS real-time clock and its RAM at ports 0x70 (index) / 0x71 (data): a Motorola MC146818.

Registers (MC146818A data sheet, "Address map"): 0x00 seconds, 0x02 minutes, 0x04 hours, 0x06 day of
week (1 = Sunday), 0x07 day of month, 0x08 month, 0x09 year (two digits); 0x01/0x03/0x05 the alarm;
0x0A status A (bit 7 UIP: an update is in progress), 0x0B status B (bit 2 binary instead of BCD,
bit 1 24-hour mode, bit 7 SET halts updates), 0x0C status C (interrupt flags, cleared by a read),
0x0D status D (bit 7: the battery is good), 0x0E-0x7F battery-backed RAM. Bit 7 of an index
written to 0x70 is the NMI mask on a PC, and is ignored here.

Time is the virtual clock, so that runs are deterministic: the RTC shows `base` (a fixed date,
2000-01-01 00:00:00 unless the user gives another) plus the virtual seconds since the machine
started, and UIP reads 1 during the last 244 us of each virtual second (the data sheet's update
cycle). A guest that writes a time or date register sets the clock from then on. Reset values are
QEMU's (status A 0x26, B 0x02: 24-hour BCD, D 0x80); the RAM holds what QEMU's `pc` machine puts
there for memory size (0x15-0x18, 0x30-0x31, 0x34-0x35), the century (0x32) and the CPU count
(0x5F). Not modelled: the periodic, alarm and update-ended interrupts (IRQ 8), and 12-hour mode
(the hours register is always 24-hour).
"""

from __future__ import annotations

import datetime as _dt
from typing import Callable

RTC_PORT = 0x70
DEFAULT_BASE = _dt.datetime(2000, 1, 1, 0, 0, 0)
UPDATE_CYCLE_NS = 244_000

SECONDS, MINUTES, HOURS, WEEKDAY, DAY, MONTH, YEAR = 0x00, 0x02, 0x04, 0x06, 0x07, 0x08, 0x09
STATUS_A, STATUS_B, STATUS_C, STATUS_D = 0x0A, 0x0B, 0x0C, 0x0D
CENTURY = 0x32
STATUS_A_UIP = 0x80
STATUS_B_SET, STATUS_B_BINARY, STATUS_B_24H = 0x80, 0x04, 0x02
_TIME_REGS = (SECONDS, MINUTES, HOURS, WEEKDAY, DAY, MONTH, YEAR, CENTURY)


def _bcd(v: int) -> int:
    return ((v // 10) << 4) | (v % 10)


def _from_bcd(v: int) -> int:
    return (v >> 4) * 10 + (v & 0xF)


class CmosRtc:
    def __init__(
        self, now: Callable[[], int], mem_bytes: int, base: _dt.datetime = DEFAULT_BASE, hz: int = 1_000_000_000
    ):
        self.now = now
        self.hz = hz
        self.base = base
        self.base_time = 0
        self.index = 0
        ram = self.ram = bytearray(128)
        ram[STATUS_A], ram[STATUS_B], ram[STATUS_D] = 0x26, STATUS_B_24H, 0x80
        # QEMU pc_cmos_init: base memory 640 KiB, memory above 1 MiB in KiB (at most 0xFFFF),
        # memory above 16 MiB in 64 KiB units, one CPU (0x5F holds the count less one).
        ram[0x15], ram[0x16] = 640 & 0xFF, 640 >> 8
        ext_kib = min(max(mem_bytes // 1024 - 1024, 0), 0xFFFF)
        ram[0x17], ram[0x18] = ext_kib & 0xFF, ext_kib >> 8
        ram[0x30], ram[0x31] = ext_kib & 0xFF, ext_kib >> 8
        above16 = min(max(mem_bytes - (16 << 20), 0) >> 16, 0xFFFF)
        ram[0x34], ram[0x35] = above16 & 0xFF, above16 >> 8
        ram[0x5F] = 0

    def clock(self) -> _dt.datetime:
        """The date and time the RTC shows now."""
        return self.base + _dt.timedelta(seconds=(self.now() - self.base_time) // self.hz)

    def _encode(self, value: int) -> int:
        return value if self.ram[STATUS_B] & STATUS_B_BINARY else _bcd(value)

    def _decode(self, value: int) -> int:
        return value if self.ram[STATUS_B] & STATUS_B_BINARY else _from_bcd(value)

    def read_register(self, reg: int) -> int:
        if reg in _TIME_REGS:
            t = self.clock()
            field = {
                SECONDS: t.second,
                MINUTES: t.minute,
                HOURS: t.hour,
                WEEKDAY: t.isoweekday() % 7 + 1,
                DAY: t.day,
                MONTH: t.month,
                YEAR: t.year % 100,
                CENTURY: t.year // 100,
            }[reg]
            return self._encode(field)
        if reg == STATUS_A:
            in_update = (self.now() - self.base_time) % self.hz >= self.hz - UPDATE_CYCLE_NS * self.hz // 10**9
            return self.ram[STATUS_A] | (STATUS_A_UIP if in_update and not self.ram[STATUS_B] & STATUS_B_SET else 0)
        if reg == STATUS_C:
            value, self.ram[STATUS_C] = self.ram[STATUS_C], 0
            return value
        return self.ram[reg]

    def write_register(self, reg: int, value: int) -> None:
        if reg in _TIME_REGS:
            t = self.clock()
            v = self._decode(value)
            try:
                if reg == SECONDS:
                    t = t.replace(second=v)
                elif reg == MINUTES:
                    t = t.replace(minute=v)
                elif reg == HOURS:
                    t = t.replace(hour=v)
                elif reg == DAY:
                    t = t.replace(day=v)
                elif reg == MONTH:
                    t = t.replace(month=v)
                elif reg == YEAR:
                    t = t.replace(year=t.year // 100 * 100 + v)
                elif reg == CENTURY:
                    t = t.replace(year=v * 100 + t.year % 100)
            except ValueError:
                return  # an impossible date: keep the clock as it is
            self.base, self.base_time = t, self.now() - (self.now() - self.base_time) % self.hz
        elif reg in (STATUS_C, STATUS_D):
            pass  # read-only
        elif reg == STATUS_A:
            self.ram[reg] = value & 0x7F
        else:
            self.ram[reg] = value

    # -- ports -----------------------------------------------------------------------------------------
    def read(self, port: int, size: int) -> int:
        if port == RTC_PORT:
            return 0xFF  # the index register is write-only (QEMU reads 0xFF)
        return self.read_register(self.index)

    def write(self, port: int, size: int, value: int) -> None:
        if port == RTC_PORT:
            self.index = value & 0x7F  # bit 7: the PC's NMI mask, not part of the index
        else:
            self.write_register(self.index, value & 0xFF)
