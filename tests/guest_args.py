"""Per-guest run options shared by the tests that run bundled guests (cpuvirt and QEMU alike).

A guest listed here is run with these Multiboot modules and kernel command line; the others with
none. Module paths are relative to the guest source directory: run with that as the working
directory (`in_guest_dir`), so that the module strings the guest sees, and so its trace, do not
depend on where the repository is checked out.
"""
from __future__ import annotations

import contextlib
import os

from cpuvirt.toolchain.build import guest_source_dir

RUN_ARGS = {
    "apic": {"cmdline": "apic.test=1 console=ttyS0",
             "modules": [("apic.module", "mod-arg-1 mod-arg-2")]},
}


def run_kwargs(guest: str) -> dict:
    """Keyword arguments for cpuvirt.runner.run_guest."""
    args = RUN_ARGS.get(guest, {})
    return {"cmdline": args.get("cmdline", ""), "modules": list(args.get("modules", ()))}


def qemu_args(guest: str) -> list[str]:
    """The same options for qemu-system-i386: -initrd 'file args,...' and -append."""
    args = RUN_ARGS.get(guest, {})
    out = []
    if args.get("modules"):
        out += ["-initrd", ",".join(f"{f} {a}" if a is not None else f for f, a in args["modules"])]
    if "cmdline" in args:
        out += ["-append", args["cmdline"]]
    return out


@contextlib.contextmanager
def in_guest_dir():
    old = os.getcwd()
    os.chdir(guest_source_dir())
    try:
        yield
    finally:
        os.chdir(old)
