"""kvm-unit-tests (i386) under cpuvirt, through bench/kvm_unit_tests.py (docs/kvm-unit-tests.md).

Runs only when KUT_DIR points at a kvm-unit-tests tree built with `./configure --arch=i386 && make`
(never part of this repository). Each target must PASS as it does under QEMU, except where another
piece of work or a documented hole predicts the failure (marked xfail with the reason).
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

KUT = os.environ.get("KUT_DIR")
pytestmark = pytest.mark.skipif(not KUT or not (Path(KUT) / "x86").is_dir(),
                                reason="KUT_DIR does not point at a kvm-unit-tests i386 build")
TARGETS = ("taskswitch", "eventinj", "umip", "cmpxchg8b", "setjmp", "smptest", "dummy")
PREDICTED = {
    ("umip", "trap"): "the `mov r, cs` hole: the kernel sees RPL 1 and expects #GP from mov cr0 "
                      "(docs/deprivileging.md)",
}


def _runner():
    path = Path(__file__).resolve().parent.parent / "bench" / "kvm_unit_tests.py"
    spec = importlib.util.spec_from_file_location("kvm_unit_tests", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("mode", ("native", "hw", "full", "trap"))
@pytest.mark.parametrize("name", TARGETS)
def test_kvm_unit_test_passes(name, mode, request):
    if (name, mode) in PREDICTED:
        request.node.add_marker(pytest.mark.xfail(reason=PREDICTED[(name, mode)], strict=False))
    k = _runner()
    build = Path(KUT)
    flat = build / "x86" / f"{name}.flat"
    if not flat.exists():
        pytest.skip(f"{flat} is not built")
    append, mem = k.test_options(build, name)
    verdict, _, why = k.run_cpuvirt(flat, mode, append, mem)
    assert verdict == "PASS", why
