"""When a NIC gives a transmitted frame back: the completion-order experiment (docs/virtio.md 11).

A virtqueue lets a device return buffers in any order: the used ring says which chain completed, so a
frame to a slow destination does not hold up the frames behind it. A classic NIC ring (the e1000's)
cannot: the driver learns of completions only through the head pointer and the DD bits, which move
strictly in ring order, so one slow frame stalls every frame queued after it.

`--device NIC,slow=N:K` makes every N-th transmitted frame go to a slow destination: the device
completes it K microseconds of virtual time after it took it (the others at once). Each completion is
a trace event of kind `completion` (TX_COMPLETE: the frame's number in the order the device took
frames, its descriptor or chain head, its latency, how many later frames completed before it), so the
order is visible in the trace; bench/nic_order.py turns the events into latency distributions.

`DeviceTimer` is the device's own clock work: completions due at a virtual time, which the machine
runs when the clock reaches them (Machine.add_device_timer), even while the guest halts.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass


class DeviceTimer:
    """Callbacks due at virtual times (ns), run in deadline order, then in the order they were set."""

    def __init__(self, now):
        self.now = now  # () -> virtual ns
        self.on_change = None  # set by Machine.add_device_timer: stop the engine in time
        self._heap: list = []
        self._seq = 0
        self.firing = False  # True while due callbacks run (their trace events say so)

    def at(self, when: int, callback) -> None:
        heapq.heappush(self._heap, (when, self._seq, callback))
        self._seq += 1
        if self.on_change is not None:
            self.on_change()

    def deadline(self) -> int | None:
        return self._heap[0][0] if self._heap else None

    def update(self) -> None:
        now = self.now()
        while self._heap and self._heap[0][0] <= now:
            _, _, callback = heapq.heappop(self._heap)
            self.firing = True
            try:
                callback()
            finally:
                self.firing = False

    def cancel_all(self) -> None:
        self._heap.clear()


@dataclass(frozen=True)
class SlowDestination:
    """Every `every`-th frame (the every-th, 2*every-th, ... the device takes) is delayed by `delay_us`."""

    every: int
    delay_us: int

    @classmethod
    def parse(cls, text: str) -> SlowDestination:
        """'N:K' -> every N-th frame K virtual microseconds late (N >= 1, 0 <= K <= 1e6)."""
        n, colon, k = text.partition(":")
        try:
            every, delay = int(n), int(k)
        except ValueError:
            raise ValueError(f"slow={text}: want N:K (every N-th frame K virtual microseconds late)") from None
        if not colon or every < 1 or not 0 <= delay <= 1_000_000:
            raise ValueError(f"slow={text}: want N:K with N >= 1 and 0 <= K <= 1000000")
        return cls(every, delay)

    def delay_ns(self, frame: int) -> int:
        """Frames are numbered from 1 in the order the device takes them."""
        return self.delay_us * 1000 if frame % self.every == 0 else 0

    def text(self) -> str:
        return f"{self.every}:{self.delay_us}"


class TxCompletions:
    """One NIC's transmit completions: numbers frames as the device takes them and reports each
    completion (a `completion` trace event) with its latency and how far out of order it came."""

    def __init__(self, device: str, slow: SlowDestination, timer: DeviceTimer, trace):
        self.device, self.slow, self.timer, self.trace = device, slow, timer, trace
        self.taken = 0  # frames taken so far (the last one's number)
        self.completed = 0  # completions so far
        self.outstanding: set[int] = set()
        self.site = self._timer_site  # () -> extra trace arguments naming the access being served

    def _timer_site(self) -> dict:
        return {"timer": True} if self.timer.firing else {}

    def take(self) -> tuple[int, int]:
        """A frame is taken: (its number, the delay its destination adds in ns)."""
        self.taken += 1
        self.outstanding.add(self.taken)
        return self.taken, self.slow.delay_ns(self.taken)

    def complete(self, frame: int, slot: int, taken_at: int, how: str) -> None:
        """Frame `frame` (taken at virtual time `taken_at`, in descriptor/chain `slot`) is given back now."""
        self.outstanding.discard(frame)
        self.completed += 1
        overtaken = sum(1 for f in self.outstanding if f < frame)  # earlier frames still in flight
        latency = self.timer.now() - taken_at
        detail = {
            "device": self.device,
            "frame": frame,
            "slot": slot,
            "order": self.completed,
            "latency_ns": latency,
            "slow": bool(self.slow.delay_ns(frame)),
            "overtook": overtaken,
        }
        if overtaken:
            action = f"{how}, ahead of {overtaken} earlier frame(s) still in flight"
        else:
            action = how
        self.trace("TX_COMPLETE", detail, action, kind="completion", **self.site())

    def forget(self) -> None:
        """The device was reset: its frames in flight will never complete."""
        self.outstanding.clear()
