import sys, time
from pathlib import Path
from cpuvirt.toolchain.build import include_dir
from cpuvirt.toolchain.image import build_image
from cpuvirt.toolchain.preprocess import preprocess
from cpuvirt.runner import run_guest
t = time.time()
pre = preprocess(Path("tests/guests") / "full_deliver.S", {}, [include_dir()])
image, info = build_image(pre.lines)
print("built", len(image), time.time() - t)
open("/tmp/fd_full_deliver.bin", "wb").write(image)
r = run_guest("/tmp/fd_full_deliver.bin", sys.argv[1], 32, 5_000_000)
print(r.outcome, r.status, r.console[-300:], time.time() - t)
