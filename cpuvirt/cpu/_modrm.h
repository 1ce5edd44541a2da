/*
 * The memory operand of a ModRM byte with 32-bit addressing (SDM Vol. 2A 2.1.5, tables 2-2 and 2-3): what
 * cpu/_delivery.c decodes for a fault's CR2 and modes/_trapfast.c for invlpg and the ptemods it emulates.
 * Registers are given as their numbers in ModRM order (EAX, ECX, EDX, EBX, ESP, EBP, ESI, EDI); segments
 * are taken as flat, as everywhere in cpuvirt.
 */
#ifndef CPUVIRT_MODRM_H
#define CPUVIRT_MODRM_H

#include <stdint.h>
#include <string.h>

typedef struct {
    int base, index;   /* register numbers, -1: none */
    uint32_t scale;    /* 1, 2, 4, 8 */
    int32_t disp;
} modrm_mem_t;

/* Decode the operand whose ModRM byte is at `m`: the bytes ModRM, SIB and displacement take (1 to 6), or 0
 * for a register operand (mod = 3). */
static inline int modrm_mem(const uint8_t *m, modrm_mem_t *out) {
    uint32_t mod = m[0] >> 6, rm = m[0] & 7, n = 1;
    if (mod == 3) return 0;
    out->base = out->index = -1;
    out->scale = 1;
    out->disp = 0;
    if (rm == 4) {                     /* SIB */
        uint32_t x = (m[1] >> 3) & 7, b = m[1] & 7;
        n = 2;
        out->scale = 1u << (m[1] >> 6);
        if (x != 4) out->index = (int)x;
        if (b == 5 && mod == 0) {      /* disp32, no base */
            memcpy(&out->disp, m + 2, 4);
            return 6;
        }
        out->base = (int)b;
    } else if (rm == 5 && mod == 0) {  /* disp32 alone */
        memcpy(&out->disp, m + 1, 4);
        return 5;
    } else {
        out->base = (int)rm;
    }
    if (mod == 1) {
        out->disp = (int8_t)m[n];
        n += 1;
    } else if (mod == 2) {
        memcpy(&out->disp, m + n, 4);
        n += 4;
    }
    return (int)n;
}

/* A general register by its ModRM number: 1 and *out, or 0 (the caller's engine would not read it). */
typedef int (*modrm_reg_fn)(void *ctx, int reg, uint32_t *out);

/* modrm_reg_fn over the engine's registers (the C hooks of trap, full and hw): uc_reg_read with each
 * register's Unicorn id, in ModRM order. */
typedef struct {
    int (*reg_read)(void *uc, int regid, void *value);
    const int32_t *ids;
    void *uc;
} modrm_uc_regs_t;

static inline int modrm_uc_reg(void *ctx, int reg, uint32_t *out) {
    const modrm_uc_regs_t *r = (const modrm_uc_regs_t *)ctx;
    uint64_t v = 0;
    if (r->reg_read(r->uc, r->ids[reg], &v)) return 0;
    *out = (uint32_t)v;
    return 1;
}

/* The linear address of the memory operand whose ModRM byte is at `m` (flat segments), reading only the base
 * and index registers it names: the bytes ModRM, SIB and displacement take, or 0 for a register operand or
 * a register the reader cannot give. */
static inline int modrm_address(const uint8_t *m, modrm_reg_fn reg_of, void *ctx, uint32_t *out) {
    modrm_mem_t mem;
    uint32_t addr, v;
    int n = modrm_mem(m, &mem);
    if (!n) return 0;
    addr = (uint32_t)mem.disp;
    if (mem.base >= 0) {
        if (!reg_of(ctx, mem.base, &v)) return 0;
        addr += v;
    }
    if (mem.index >= 0) {
        if (!reg_of(ctx, mem.index, &v)) return 0;
        addr += v * mem.scale;
    }
    *out = addr;
    return n;
}

#endif
