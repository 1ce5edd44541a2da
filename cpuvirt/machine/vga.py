"""VGA text mode memory (0xB8000): 80 x 25 cells of (character, attribute) bytes.

Characters are code page 437, the VGA ROM font (IBM PC Technical Reference, character set):
0x01-0x1F and 0x7F are glyphs there (smileys, card suits, arrows), not control codes.
"""

from __future__ import annotations

VGA_TEXT_BASE = 0xB8000
COLUMNS = 80
ROWS = 25
VGA_TEXT_SIZE = COLUMNS * ROWS * 2

_CP437_LOW = (
    "\u263a\u263b\u2665\u2666\u2663\u2660\u2022\u25d8\u25cb\u25d9\u2642\u2640\u266a"
    "\u266b\u263c\u25ba\u25c4\u2195\u203c\u00b6\u00a7\u25ac\u21a8\u2191\u2193\u2192"
    "\u2190\u221f\u2194\u25b2\u25bc"
)
_TABLE = {0: " ", 0x7F: "\u2302", 0xFF: " "}
_TABLE.update({i + 1: ch for i, ch in enumerate(_CP437_LOW)})
_TABLE.update({b: bytes([b]).decode("cp437") for b in range(0x80, 0xFF)})
_TABLE = str.maketrans(_TABLE)
"""Latin-1 decoding gives one code point per byte; this maps each to its CP437 glyph.
NUL and 0xFF (a blank glyph) become spaces, so empty cells strip away."""


def render_text(buffer: bytes) -> str:
    """The screen as text: rows from the first to the last non-blank one, trailing spaces
    stripped, joined by newlines (blank rows between them are kept, to keep the layout);
    "" when every cell is blank. Attributes (colours) are dropped."""
    chars = bytes(buffer[0::2]).decode("latin-1").translate(_TABLE)
    rows = [chars[i : i + COLUMNS].rstrip(" ") for i in range(0, len(chars), COLUMNS)]
    while rows and not rows[-1]:
        rows.pop()
    first = 0
    while first < len(rows) and not rows[first]:
        first += 1
    return "\n".join(rows[first:])


CRTC_PORT = 0x3D4
CRTC_CURSOR_HIGH, CRTC_CURSOR_LOW = 0x0E, 0x0F


class VgaCrtc:
    """The VGA CRT controller's index/data pair at 0x3D4/0x3D5 (colour text mode): a register file.

    Text-mode kernels keep their cursor there (registers 0x0E/0x0F, the cursor location) and read it
    back to know where to write next (xv6's cgaputc panics when it reads an impossible position, which
    is what all-ones from an absent port gives). Only storage is modelled: nothing is drawn, the
    registers 0x00-0x18 read back what was written (all 0 at reset), other indexes read 0.
    """

    def __init__(self):
        self.index = 0
        self.regs = bytearray(0x19)

    def read(self, port: int, size: int) -> int:
        if port == CRTC_PORT:
            return self.index
        return self.regs[self.index] if self.index < len(self.regs) else 0

    def write(self, port: int, size: int, value: int) -> None:
        if port == CRTC_PORT:
            self.index = value & 0xFF
        elif self.index < len(self.regs):
            self.regs[self.index] = value & 0xFF
