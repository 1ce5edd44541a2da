"""Run every bench script in turn (compute, ckernel, events, hw, startup); each prints ratios, then raw figures."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ckernel  # noqa: E402
import compute  # noqa: E402
import events  # noqa: E402
import hw  # noqa: E402
import startup  # noqa: E402

if __name__ == "__main__":
    for mod in (compute, ckernel, events, hw, startup):
        mod.main([])
        print()
