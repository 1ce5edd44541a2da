import shutil
from pathlib import Path

import pytest

from cpuvirt.toolchain.build import include_dir
from cpuvirt.toolchain.image import build_image
from cpuvirt.toolchain.preprocess import preprocess

TEST_GUESTS = Path(__file__).parent / "guests"


@pytest.fixture(scope="session")
def test_guest(tmp_path_factory):
    """Build tests/guests/NAME.S (on the bundled kernel.inc) into an image file; returns its path."""
    out = tmp_path_factory.mktemp("test-guests")

    def build(name: str) -> Path:
        pre = preprocess(TEST_GUESTS / f"{name}.S", {}, [include_dir()])
        image, _ = build_image(pre.lines)
        path = out / f"{name}.bin"
        path.write_bytes(image)
        return path

    return build


@pytest.fixture(scope="session")
def nanobench_image(tmp_path_factory):
    """guests/nanobench.S built with N iterations of each operation (its PV build with pv=True), once per
    (N, pv) in the session; returns its path."""
    out = tmp_path_factory.mktemp("nanobench")
    built: dict[tuple[int, bool], Path] = {}

    def image(n: int, pv: bool = False) -> Path:
        if (n, pv) not in built:
            from cpuvirt.nanobench import build

            path = out / f"nanobench-{n}{'-pv' if pv else ''}.bin"
            path.write_bytes(build(n, pv))
            built[n, pv] = path
        return built[n, pv]

    return image


requires_qemu = pytest.mark.skipif(shutil.which("qemu-system-i386") is None,
                                   reason="qemu-system-i386 is not installed (Debian: qemu-system-x86)")
