import collections
from cpuvirt.modes.full.vcpu import FullVcpu
from cpuvirt.runner import run_guest
from cpuvirt.engine import regs as R
seen = collections.Counter()
orig = FullVcpu.on_engine_event
def oe(self, intno, ec, soft, eip):
    seen[(intno, soft, self.regs.read(R.CS) & 3)] += 1
    return orig(self, intno, ec, soft, eip)
FullVcpu.on_engine_event = oe
cpus = []
r = run_guest("/tmp/fd_full_deliver.bin", "full", 32, 50_000_000, on_start=cpus.append)
v = cpus[-1].vcpu
print(r.outcome, v.fdeliver.delivered, v.fdeliver.to_python, v.fdeliver.dl.misses, sorted(seen.items()))
print(v.tc.counters)
tc = v.tc
from cpuvirt.toolchain.build import include_dir
from cpuvirt.toolchain.image import build_image
from cpuvirt.toolchain.preprocess import preprocess
from pathlib import Path
pre = preprocess(Path("tests/guests") / "full_deliver.S", {}, [include_dir()])
image, info = build_image(pre.lines)
sy = info.symbols
for name in ("isr_stub_0", "isr_stub_13", "isr_stub_128", "isr_common", "h82", "hcol_a"):
    g = sy[name]
    b = tc.blocks.get(g)
    e = v.fdeliver.dl.entry[(g ^ (g >> 13)) & 8191]
    print(name, hex(g), b and hex(b.tc), hex(e.geip), hex(e.tc))
