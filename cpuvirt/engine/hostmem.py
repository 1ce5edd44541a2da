"""Host-physical memory: the buffers behind Unicorn's physical address space, owned by cpuvirt.

Guest RAM is an anonymous mmap mapped into the engine with mem_map_ptr, so the hypervisor reads and
writes it (page-table walks, event frames, A/D bits) through a memoryview, with no engine call and no
allocation per access. Writes made this way are not seen by code the engine has already translated,
exactly like uc.mem_write from a hook; the hypervisor never writes guest code through it.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import struct

from unicorn import UC_PROT_ALL

_U32 = struct.Struct("<I")


class HostRegion:
    """One buffer at one host-physical base."""

    __slots__ = ("hpa", "size", "buf", "view", "end", "fd", "host_address")

    def __init__(self, uc, hpa: int, size: int, shared: bool = False):
        """`shared`: back the buffer with a memfd mapped MAP_SHARED, so that another process (a
        vhost-user backend) can map the same pages from the file descriptor `fd`."""
        self.hpa, self.size, self.end = hpa, size, hpa + size
        self.fd = None
        if shared:
            self.fd = os.memfd_create("cpuvirt-guest-ram", os.MFD_CLOEXEC)
            os.ftruncate(self.fd, size)
            self.buf = mmap.mmap(self.fd, size, flags=mmap.MAP_SHARED)
        else:
            self.buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.view = memoryview(self.buf)
        addr = self.host_address = ctypes.addressof(ctypes.c_char.from_buffer(self.buf))
        uc.mem_map_ptr(hpa, size, UC_PROT_ALL, addr)

    def contains(self, hpa: int, size: int = 1) -> bool:
        return self.hpa <= hpa and hpa + size <= self.end

    def read32(self, hpa: int) -> int:
        return _U32.unpack_from(self.buf, hpa - self.hpa)[0]

    def write32(self, hpa: int, value: int) -> None:
        _U32.pack_into(self.buf, hpa - self.hpa, value)

    def read(self, hpa: int, size: int) -> bytes:
        off = hpa - self.hpa
        return self.buf[off : off + size]

    def write(self, hpa: int, data: bytes) -> None:
        off = hpa - self.hpa
        self.view[off : off + len(data)] = data


class HvAllocator:
    """Bump allocator of zeroed 4 KiB pages in a hypervisor region (EPT tables, the TC, the shadow
    GDT): pages are never freed, the region's size bounds what a guest can make the hypervisor use."""

    def __init__(self, region: HostRegion):
        self.region = region
        self.next = region.hpa

    def page(self) -> int:
        if self.next + 0x1000 > self.region.end:
            raise MemoryError("hypervisor memory exhausted")
        hpa = self.next
        self.next += 0x1000
        return hpa
