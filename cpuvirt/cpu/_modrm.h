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

#endif
