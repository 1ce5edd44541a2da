"""The blocks the engine runs in place under full (ring 3, 16-bit code), by the guest frames they are in.

The guest kernel's stores into its own code frames are write-traced (coherence.py) and done by the
hypervisor, through host memory: the engine notices only its own stores into code it translated, so a
block of user code it runs in place from such a frame would keep running the old bytes after the
kernel rewrote them. This index, a mirror of Machine.block_insns (machine/blocks.py), tells which
bytes of a frame in-place blocks came from, so that a hypervisor store drops the engine's translations
only when it overwrites such bytes (a store to data beside user code, common in small kernels, drops
nothing).
"""

from __future__ import annotations

PAGE = 0x1000


class InPlaceBlocks:
    """Host frame -> {block address: (first, end) byte offsets in that frame}, for blocks outside
    [tc_lo, tc_hi) (the translation cache's window). `page_frame`: the frame each linear code page
    last fetched from (the intercepts' table, cpu/intercept.py)."""

    def __init__(self, page_frame: dict[int, int], tc_lo: int, tc_hi: int, lines=None, ram_hpa: int = 0):
        """`lines`: a bt/fastcallout.py CodeLines told the guest-physical bytes of each block indexed here
        (RAM at host-physical `ram_hpa`)."""
        self.page_frame = page_frame
        self.tc_lo, self.tc_hi = tc_lo, tc_hi
        self.lines, self.ram_hpa = lines, ram_hpa
        self.by_frame: dict[int, dict[int, tuple[int, int]]] = {}
        self.frames_of: dict[int, tuple[int, ...]] = {}  # block address -> the frames it is indexed under

    def put(self, address: int, addrs: tuple[int, ...], end: int) -> None:
        self._forget(address)
        if self.tc_lo <= address < self.tc_hi:
            return
        frames = []
        page = address & ~(PAGE - 1)
        while page < end:
            hpa = self.page_frame.get(page)
            if hpa is not None:
                lo, hi = max(address, page) - page, min(end, page + PAGE) - page
                self.by_frame.setdefault(hpa, {})[address] = (lo, hi)
                frames.append(hpa)
                if self.lines is not None and hpa >= self.ram_hpa:
                    self.lines.mark_in_place(hpa - self.ram_hpa + lo, hi - lo)
            page += PAGE
        self.frames_of[address] = tuple(frames)  # bounded as block_insns is: its clear() clears this

    def drop(self, address: int) -> None:
        self._forget(address)

    def clear(self) -> None:
        self.by_frame.clear()
        self.frames_of.clear()
        if self.lines is not None:
            self.lines.clear_in_place()

    def _forget(self, address: int) -> None:
        for hpa in self.frames_of.pop(address, ()):
            blocks = self.by_frame.get(hpa)
            if blocks is not None:
                blocks.pop(address, None)
                if not blocks:
                    del self.by_frame[hpa]

    def overlaps(self, hpa: int, offset: int, size: int) -> bool:
        """Do bytes offset .. offset + size - 1 of the frame at hpa hold code a block ran in place?"""
        blocks = self.by_frame.get(hpa)
        if not blocks:
            return False
        end = offset + size
        return any(lo < end and offset < hi for lo, hi in blocks.values())
