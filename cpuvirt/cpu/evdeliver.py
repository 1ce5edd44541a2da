"""The Python side of cpu/_evdeliver.h: event delivery through the guest's IDT in C, shared by mode `trap`
(modes/trapfast.py) and mode `full` (modes/full/deliverfast.py), and the copy of Machine.block_insns
both keep for Vcpu.left_block_at (`BlockCopy`, one entry of it)."""

from __future__ import annotations

import ctypes

BLOCK_SLOTS, BLOCK_MAX_INSNS = 4096, 58


class BlockCopy(ctypes.Structure):
    """Mirror of block_t."""

    _fields_ = [
        ("end", ctypes.c_uint64),
        ("address", ctypes.c_uint32),
        ("first", ctypes.c_uint32),
        ("n", ctypes.c_uint16),
        ("offset", ctypes.c_uint16 * BLOCK_MAX_INSNS),
        ("ambiguous", ctypes.c_uint16),
        ("pad", ctypes.c_uint16 * 2),
    ]
