/*
 * A true guest #PF found in a TLB fill under shadow paging, as the Python path finds it (trap's
 * modes/_trapfast.c true_fault and full's bt/_callout.c full_pf_hook deliver it there): the walk of the
 * guest's 32-bit tables (memory/walk.py) and CR2 (x86/faultaddr.py) for the instructions whose one memory
 * operand is its first candidate.
 */
#ifndef CPUVIRT_TRUEFAULT_H
#define CPUVIRT_TRUEFAULT_H

#include <stdint.h>
#include <string.h>
#include "_modrm.h"

#define TF_PTE_P 0x1u
#define TF_PTE_RW 0x2u
#define TF_PTE_US 0x4u
#define TF_PTE_A 0x20u
#define TF_PTE_PS 0x80u
#define TF_CR0_WP 0x10000u
#define TF_CR4_PSE 0x10u
#define TF_PFEC_P 0x1u
#define TF_PFEC_W 0x2u
#define TF_PFEC_U 0x4u

static inline int tf_ram32(const uint8_t *ram, uint64_t ram_bytes, uint64_t gpa, uint32_t *out) {
    if (gpa + 4 > ram_bytes) return 0;
    memcpy(out, ram + gpa, 4);
    return 1;
}

/* memory/walk.py's walk of a load or store: 1 = a fault (*ec; *refs, the references walk counts; *pde_a
 * >= 0: the PDE whose A bit the walk sets, used although the PTE then faults), 0 = no fault, or a case
 * left to Python (a table outside RAM, where Python's reader answers all-ones; a 4 MiB page with reserved
 * or PSE-36 bits). Not for fetches (SMEP) or PAE. */
static inline int tf_walk(const uint8_t *ram, uint64_t ram_bytes, uint32_t cr0, uint32_t cr3, uint32_t cr4, uint32_t gva,
                          int write, int user, uint32_t *ec, uint32_t *refs, int64_t *pde_a) {
    uint32_t pde, leaf, rights;
    uint64_t pde_addr = (cr3 & 0xFFFFF000u) | ((gva >> 20) & 0xFFCu), leaf_addr;
    int writable;
    *pde_a = -1;
    *ec = 0;
    if (!tf_ram32(ram, ram_bytes, pde_addr, &pde)) return 0;
    *refs = 1;
    if (!(pde & TF_PTE_P)) goto fault;
    if ((pde & TF_PTE_PS) && (cr4 & TF_CR4_PSE)) {
        if (pde & 0x003FE000u) return 0;
        rights = pde;
    } else {
        *refs = 2;
        if (!(pde & TF_PTE_A)) {
            *pde_a = (int64_t)pde_addr;
            *refs = 3;
        }
        leaf_addr = (pde & 0xFFFFF000u) | ((gva >> 10) & 0xFFCu);
        if (!tf_ram32(ram, ram_bytes, leaf_addr, &leaf)) return 0;
        if (!(leaf & TF_PTE_P)) goto fault;
        rights = pde & leaf;
    }
    if (user) {
        if (!(rights & TF_PTE_US)) goto protection;
        writable = (rights & TF_PTE_RW) != 0;
    } else {
        writable = (rights & TF_PTE_RW) || !(cr0 & TF_CR0_WP);
    }
    if (write && !writable) goto protection;
    *pde_a = -1;
    return 0;
protection:
    *ec = TF_PFEC_P;
fault:
    if (user) *ec |= TF_PFEC_U;
    if (write) *ec |= TF_PFEC_W;
    return 1;
}

/* The linear address of the one memory operand of an instruction that x86/faultaddr.py decodes to that
 * operand alone (its first candidate; no implicit stack or string access, no prefix), reading only the
 * base and index registers it names: mov (ModRM, immediate, byte, and to or from moffs32: a kernel's
 * globals), the ALU forms with a register, test, xchg, the immediate groups, inc/dec, not/neg/test,
 * movzx/movsx. 0: not one of them (or a register unread). */
static inline int tf_operand(const uint8_t *c, modrm_reg_fn reg_of, void *ctx, uint32_t *ea) {
    uint8_t b = c[0];
    int r = (c[1] >> 3) & 7, at = 1;
    if (b >= 0xA0 && b <= 0xA3) {
        memcpy(ea, c + 1, 4);
        return 1;
    }
    if ((b < 0x40 && (b & 7) < 4) || (b >= 0x84 && b <= 0x8B) || b == 0x80 || b == 0x81 || b == 0x83
        || ((b == 0xC6 || b == 0xC7) && r == 0) || ((b == 0xFE || b == 0xFF) && r <= 1)
        || ((b == 0xF6 || b == 0xF7) && (r == 0 || r == 2 || r == 3))) {
        at = 1;
    } else if (b == 0x0F && (c[1] == 0xB6 || c[1] == 0xB7 || c[1] == 0xBE || c[1] == 0xBF)) {
        at = 2;
    } else {
        return 0;
    }
    return modrm_address(c + at, reg_of, ctx, ea) != 0;   /* (0 for a register operand) */
}

/* What a true #PF found and delivered in C counts (Python adds them: cpu/truefault.py TrueFaultHook, as
MmuCounters.walkers and ShadowCounters.walkers): Mmu.fill's refused fill, the walk of the guest's tables and its
references (ShadowPaging._resolve's), the fault. The states that hold it mirror it as pf_fills .. pf_faults. */
typedef struct {
    uint64_t fills, walks, refs, faults;
} tf_counts_t;

static inline void tf_count(tf_counts_t *c, uint32_t refs) {
    c->fills++;
    c->walks++;
    c->refs += refs;
    c->faults++;
}

/* What a true #PF leaves before its delivery, in the Python path's order (the walk's PDE.A, then the virtual
 * CR2), and how it is put back when the delivery declines. */
typedef struct {
    int64_t pde_a;
    uint32_t old_pde, old_cr2;
} tf_made_t;

static inline void tf_make(uint8_t *ram, int64_t pde_a, uint32_t *cr2, uint32_t ea, tf_made_t *u) {
    u->pde_a = pde_a;
    u->old_cr2 = *cr2;
    if (pde_a >= 0) {
        uint32_t pde;
        memcpy(&u->old_pde, ram + pde_a, 4);
        pde = u->old_pde | TF_PTE_A;
        memcpy(ram + pde_a, &pde, 4);
    }
    *cr2 = ea;
}

static inline void tf_unmake(uint8_t *ram, uint32_t *cr2, const tf_made_t *u) {
    if (u->pde_a >= 0) memcpy(ram + u->pde_a, &u->old_pde, 4);
    *cr2 = u->old_cr2;
}

#endif
