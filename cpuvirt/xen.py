"""The Xen PV ABI numbers that cpuvirt's para mode shares with its guests, stated once.

Both the memory layer (direct paging, memory/direct.py, which refuses page-table updates with an errno
and serves the hypervisor's part of the address space) and mode para (modes/para/, the hypercalls) use
them, so they sit on a floor below both. Values as in Xen's public headers: xen/include/public/errno.h
(hypercalls return -errno), and arch-x86/xen-x86_32.h for the 32-bit non-PAE layout.
"""

from __future__ import annotations

# Error numbers (public/errno.h; the same values as Linux's).
EPERM, ENOENT, EFAULT, EBUSY, EEXIST, EINVAL, ENOSYS = 1, 2, 14, 16, 17, 22, 38

# The hypervisor's part of every address space: linear addresses from here up belong to Xen (the top
# 64 MiB for 32-bit non-PAE guests). cpuvirt shows the guest's GDT frames there, then its LDT frames.
HYPERVISOR_VIRT_START = 0xFC000000
GDT_WINDOW_FRAMES = 16  # GDT frames at HYPERVISOR_VIRT_START (8192 descriptors)
LDT_VIRT_START = HYPERVISOR_VIRT_START + (GDT_WINDOW_FRAMES << 12)  # then the LDT frames (16)
