"""Only for the C hooks (virtual clock, native TLB fill); all metadata is in pyproject.toml."""
from setuptools import Extension, setup

setup(ext_modules=[Extension("cpuvirt.machine._vclock", ["cpuvirt/machine/_vclock.c"], extra_compile_args=["-O2"]),
                   Extension("cpuvirt.memory._tlbfill", ["cpuvirt/memory/_tlbfill.c"], extra_compile_args=["-O2"])])
