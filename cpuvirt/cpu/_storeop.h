/*
 * A read-modify-write store as x86/emulate.py's emulate_store (mov, or, and, xor) and arith_store (add,
 * sub, inc, dec) do it: the value written and the flags left, for the C paths that emulate such stores
 * (bt/_callout.c adaptive_store, modes/_trapfast.c trapfast_fill_hook, modes/hw/_fastexit.c
 * fastexit_pf_hook); and the store forms of a ptemod decoded (st_decode).
 */
#ifndef CPUVIRT_STOREOP_H
#define CPUVIRT_STOREOP_H

#include <stdint.h>
#include <string.h>
#include "_modrm.h"

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

/* The store made at `at` (size 1 or 4): the value written; *old, what was there. */
static inline uint32_t st_apply(uint8_t *at, int op, uint32_t size, uint32_t src, uint32_t *old) {
    uint32_t mask = size == 4 ? 0xFFFFFFFFu : 0xFFu, value;
    *old = 0;
    memcpy(old, at, size);
    value = st_value(op, *old, src & mask, mask);
    memcpy(at, &value, size);
    return value;
}

/* The store forms emulate_store does that are decoded here (a ptemod's: `mov`, `or`, `and`, `xor` of a
 * register or an immediate into a dword or a byte, no prefix, 32-bit addressing): its length, or 0. */
static inline int st_decode(const uint8_t *c, modrm_reg_fn reg_of, void *ctx, int *op, uint32_t *size, uint32_t *src,
                            uint32_t *addr) {
    uint8_t b = c[0];
    uint32_t v = 0;
    int n, reg;
    switch (b) {
    case 0x88: case 0x89: case 0x08: case 0x09: case 0x20: case 0x21: case 0x30: case 0x31:
        *op = b >= 0x88 ? ST_MOV : (b >> 3) == 1 ? ST_OR : (b >> 3) == 4 ? ST_AND : ST_XOR;
        *size = (b & 1) ? 4 : 1;
        n = modrm_address(c + 1, reg_of, ctx, addr);
        if (!n) return 0;
        reg = (c[1] >> 3) & 7;
        if (*size == 4) {
            if (!reg_of(ctx, reg, &v)) return 0;
            *src = v;
        } else {                       /* al, cl, dl, bl, ah, ch, dh, bh */
            if (!reg_of(ctx, reg & 3, &v)) return 0;
            *src = (v >> (reg >= 4 ? 8 : 0)) & 0xFF;
        }
        return 1 + n;
    case 0xC6: case 0xC7:
        if ((c[1] >> 3) & 7) return 0;
        *op = ST_MOV;
        *size = b == 0xC7 ? 4 : 1;
        n = modrm_address(c + 1, reg_of, ctx, addr);
        if (!n) return 0;
        if (*size == 4)
            memcpy(src, c + 1 + n, 4);
        else
            *src = c[1 + n];
        return 1 + n + (int)*size;
    case 0x80: case 0x81: case 0x83: {
        int r = (c[1] >> 3) & 7;
        if (r != 1 && r != 4 && r != 6) return 0;   /* or, and, xor (add, adc, sbb, sub, cmp: not emulated) */
        *op = r == 1 ? ST_OR : r == 4 ? ST_AND : ST_XOR;
        *size = b == 0x80 ? 1 : 4;
        n = modrm_address(c + 1, reg_of, ctx, addr);
        if (!n) return 0;
        if (b == 0x81) {
            memcpy(src, c + 1 + n, 4);
            return 1 + n + 4;
        }
        *src = b == 0x83 ? (uint32_t)(int32_t)(int8_t)c[1 + n] : c[1 + n];
        return 1 + n + 1;
    }
    default:
        return 0;
    }
}

#endif
