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
from cpuvirt.virtio.setup import DeviceSpec

# netdemo meets the same peer on both: cpuvirt's peer=user answers as QEMU's user network does.
QEMU_VIRTIO_NET = ["-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0,disable-modern=on"]

RUN_ARGS = {
    "apic": {"cmdline": "apic.test=1 console=ttyS0",
             "modules": [("apic.module", "mod-arg-1 mod-arg-2")]},
    "netdemo": {"cmdline": "quiet", "devices": [DeviceSpec("virtio-net", peer="user")],
                "qemu": QEMU_VIRTIO_NET},
}


def run_kwargs(guest: str) -> dict:
    """Keyword arguments for cpuvirt.runner.run_guest."""
    args = RUN_ARGS.get(guest, {})
    kwargs = {"cmdline": args.get("cmdline", ""), "modules": list(args.get("modules", ()))}
    if args.get("devices"):
        kwargs["devices"] = list(args["devices"])
    return kwargs


def qemu_args(guest: str) -> list[str]:
    """The same options for qemu-system-i386: -initrd 'file args,...' and -append."""
    args = RUN_ARGS.get(guest, {})
    out = []
    if args.get("modules"):
        out += ["-initrd", ",".join(f"{f} {a}" if a is not None else f for f, a in args["modules"])]
    if "cmdline" in args:
        out += ["-append", args["cmdline"]]
    return out + list(args.get("qemu", ()))


@contextlib.contextmanager
def in_guest_dir():
    old = os.getcwd()
    os.chdir(guest_source_dir())
    try:
        yield
    finally:
        os.chdir(old)
