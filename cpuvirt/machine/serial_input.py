"""What is typed into COM1: the host side of the UART's receiver (QEMU's chardev backends).

Two sources, both asked by the machine on its timer path (`deadline()` / `update()`), never per
instruction:

- `ScriptedInput`: bytes from a file (`--input FILE`, a chunk at a time) or from a pipe on stdin (read as
  the guest asks for them), released one at a time on the virtual clock, so that the same script gives the
  same run byte for byte. A byte is put in the receiver only when the guest has read the previous one (the
  receiver is empty) and `gap` virtual cycles have passed since then: a typist who waits for each key to be
  taken. With a `prompt` (`--input-prompt TEXT`), each line waits, in addition, until the guest's console
  output ends with TEXT, as `expect` would wait; the run then ends (status 0, outcome `input_end`) when the
  prompt comes back after the last line. That makes a scripted session's console independent of how fast the
  guest runs, so it is the same under every mode, and under QEMU driven the same way.
- `TerminalInput`: an interactive terminal (stdin is a TTY). The terminal is put in cbreak mode
  (no line editing or echo on the host side: the guest echoes; Ctrl-C still interrupts), and it is
  polled without blocking every `poll` virtual cycles while the receiver is empty and the guest has
  receive interrupts enabled. Interactive runs
  are not reproducible, by nature.
"""

from __future__ import annotations

import os
import select
from typing import Callable

from cpuvirt.machine.uart import IER_RDI

GAP_CYCLES = 100_000  # 0.1 ms of virtual time between a byte taken and the next one
POLL_CYCLES = 2_000_000  # a terminal is looked at every 2 ms of virtual time


class ScriptedInput:
    """`data` is the whole script, or, with `more`, what has been read of it so far: `more()` reads
    the next chunk (blocking; b"" at the end). A pipe is read that way, only when the guest wants a
    byte (it has enabled receive interrupts) and the script so far is used up, so that a guest that
    never reads its console never waits on a pipe that stays open."""

    def __init__(
        self,
        data: bytes,
        uart,
        now: Callable[[], int],
        prompt: bytes | None = None,
        gap: int = GAP_CYCLES,
        more: Callable[[], bytes] | None = None,
        more_blocks: bool = True,
    ):
        self.data = bytes(data)
        self.more = more
        # A file's reads never block (`more_blocks=False`): it is read whenever the bytes so far are used
        # up, so it is typed exactly as if it had been given whole as `data`, a chunk in memory at a time.
        self.more_blocks = more_blocks
        self.at_end = more is None  # no more bytes will come than self.data holds
        self.uart = uart
        self.now = now
        self.prompt = prompt or None
        self.gap = gap
        self.pos = 0
        self.ready_at = gap
        self.waiting_for_prompt = self.prompt is not None
        self.finished = False  # the last line was answered by the prompt
        self._tail = b""
        self.on_finished: Callable[[], None] | None = None
        uart.on_drained = self._drained

    def deadline(self) -> int | None:
        """Virtual time the next byte is due, or None while none can go (the receiver still holds
        one, the guest has not prompted yet, or the script is over)."""
        if self.waiting_for_prompt or self.uart.rx:
            return None
        if self.pos >= len(self.data) and not self.at_end and not self.more_blocks:
            self._read_more()
        if self.pos >= len(self.data) and (self.at_end or not self.uart.ier & IER_RDI):
            return None
        return self.ready_at

    def _read_more(self) -> None:
        chunk = self.more() if self.more is not None else b""
        if chunk:
            self.data = self.data[self.pos :] + chunk  # keep only what is still to be typed
            self.pos = 0
        else:
            self.at_end = True

    def update(self) -> bool:
        """Feed the next byte if it is due; True when one went into the receiver."""
        due = self.deadline()
        if due is None or self.now() < due:
            return False
        if self.pos >= len(self.data):
            self._read_more()
            if self.pos >= len(self.data):
                return False
        byte = self.data[self.pos]
        self.pos += 1
        if self.prompt is not None and byte == 0x0A:
            self.waiting_for_prompt = True
            self._tail = b""
        self.uart.feed(bytes((byte,)))
        return True

    def _drained(self) -> None:
        self.ready_at = self.now() + self.gap

    def console_output(self, byte: int) -> None:
        """The guest wrote `byte` to its console: is it now prompting for the next line?"""
        if self.prompt is None or not self.waiting_for_prompt:
            return
        self._tail = (self._tail + bytes((byte,)))[-len(self.prompt) :]
        if self._tail == self.prompt:
            self.waiting_for_prompt = False
            self.ready_at = max(self.ready_at, self.now() + self.gap)
            if self.pos >= len(self.data) and not self.at_end:
                self._read_more()  # the guest waits for a line: is there one?
            if self.pos >= len(self.data) and self.at_end and not self.finished:
                self.finished = True
                if self.on_finished is not None:
                    self.on_finished()


class TerminalInput:
    def __init__(self, fd: int, uart, now: Callable[[], int], poll: int = POLL_CYCLES):
        self.fd = fd
        self.uart = uart
        self.now = now
        self.poll = poll
        self.next_poll = poll
        self.finished = False
        self.on_finished: Callable[[], None] | None = None

    def deadline(self) -> int | None:
        """The next look at the terminal, while the guest listens (receive interrupts enabled) and
        has taken what it was given; a guest that never listens is never kept waiting for a key."""
        if self.uart.rx or self.finished or not self.uart.ier & IER_RDI:
            return None
        return self.next_poll

    def update(self) -> bool:
        now = self.now()
        if self.uart.rx or now < self.next_poll:
            return False
        self.next_poll = now + self.poll
        if not select.select([self.fd], [], [], 0)[0]:
            return False
        data = os.read(self.fd, 256)
        if not data:
            self.finished = True  # end of file on the terminal: nothing more will come
            return False
        self.uart.feed(data)
        return True

    def console_output(self, byte: int) -> None:
        pass
