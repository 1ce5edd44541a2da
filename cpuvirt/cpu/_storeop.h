/*
 * A read-modify-write store as x86/emulate.py's emulate_store (mov, or, and, xor) and arith_store (add,
 * sub, inc, dec) do it: the value written and the flags left, for the C paths that emulate such stores
 * (bt/_callout.c adaptive_store, modes/_trapfast.c trapfast_fill_hook).
 */
#ifndef CPUVIRT_STOREOP_H
#define CPUVIRT_STOREOP_H

#include <stdint.h>

enum { ST_MOV = 0, ST_OR = 1, ST_AND = 2, ST_XOR = 3, ST_ADD = 4, ST_SUB = 5, ST_INC = 6, ST_DEC = 7 };

#define ST_FLAGS (0x1u | 0x4u | 0x10u | 0x40u | 0x80u | 0x800u)   /* CF PF AF ZF SF OF */

/* The value `op` stores over `old` with operand `src` (both within the size's mask). */
static inline uint32_t st_value(int op, uint32_t old, uint32_t src, uint32_t mask) {
    switch (op) {
    case ST_MOV: return src;
    case ST_OR: return old | src;
    case ST_AND: return old & src;
    case ST_XOR: return old ^ src;
    case ST_ADD: case ST_INC: return (old + src) & mask;
    default: return (old - src) & mask;
    }
}

/* EFLAGS after the store (`fl` before it; a mov leaves it). or/and/xor: CF = OF = AF = 0 (the engine clears
 * AF too); add/sub/inc/dec: CF (kept by inc and dec), AF, OF as the CPU sets them; SF, ZF, PF from the
 * result. */
static inline uint64_t st_flags(int op, uint32_t old, uint32_t src, uint32_t value, uint32_t size, uint64_t fl) {
    uint32_t top = 8 * size - 1, mask = size == 4 ? 0xFFFFFFFFu : (1u << (8 * size)) - 1;
    int sub = op == ST_SUB || op == ST_DEC;
    if (op == ST_MOV) return fl;
    fl &= ~(uint64_t)(op >= ST_INC ? ST_FLAGS & ~0x1u : ST_FLAGS);
    if (op >= ST_ADD) {
        if (op < ST_INC && (sub ? old < src : (uint64_t)old + src > mask)) fl |= 0x1;
        if ((old ^ src ^ value) & 0x10) fl |= 0x10;
        if (sub ? (((old ^ src) & (old ^ value)) >> top) & 1 : ((~(old ^ src) & (old ^ value)) >> top) & 1)
            fl |= 0x800;
    }
    if (!(__builtin_popcount(value & 0xFF) & 1)) fl |= 0x4;
    if (!value) fl |= 0x40;
    if ((value >> top) & 1) fl |= 0x80;
    return fl;
}

#endif
