"""Only for the C virtual-clock hook; all metadata is in pyproject.toml."""
from setuptools import Extension, setup

setup(ext_modules=[Extension("cpuvirt.machine._vclock", ["cpuvirt/machine/_vclock.c"], extra_compile_args=["-O2"])])
