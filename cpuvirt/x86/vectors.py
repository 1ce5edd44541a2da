"""Exception vectors (SDM Vol. 3A 6.3.1, table 6-1): their names, which push an error code, and which
are contributory for the double-fault rules (table 6-4)."""

from __future__ import annotations

from enum import IntEnum


class Vector(IntEnum):
    DE = 0
    DB = 1
    NMI = 2
    BP = 3
    OF = 4
    BR = 5
    UD = 6
    NM = 7
    DF = 8  # noqa: E702
    TS = 10
    NP = 11
    SS = 12
    GP = 13
    PF = 14
    MF = 16
    AC = 17
    MC = 18
    XM = 19  # noqa: E702


MNEMONIC = {v.value: "#" + v.name for v in Vector}
HAS_ERROR_CODE = frozenset((Vector.DF, Vector.TS, Vector.NP, Vector.SS, Vector.GP, Vector.PF, Vector.AC))
CONTRIBUTORY = frozenset((Vector.DE, Vector.TS, Vector.NP, Vector.SS, Vector.GP))
