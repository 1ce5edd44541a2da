from cpuvirt.runner import run_guest
import sys
cpus = []
r = run_guest(sys.argv[1], "full", 32, 50_000_000 if len(sys.argv) < 3 else 0, on_start=cpus.append)
v = cpus[-1].vcpu
bl = v.fdeliver.dl.block
amb = sum(1 for b in bl if b.ambiguous)
used = sum(1 for b in bl if b.n)
print("block_insns", len(v.machine.block_insns), "slots used", used, "ambiguous", amb, "delivered", v.fdeliver.delivered, "misses", v.fdeliver.dl.misses)
keys = list(v.machine.block_insns.keys())
print(sorted(hex(k) for k in keys)[:10], sorted(hex(k) for k in keys)[-10:])
