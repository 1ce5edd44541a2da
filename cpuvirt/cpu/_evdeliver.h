/*
 * Event delivery through the guest's IDT in C, shared by mode `trap` (modes/_trapfast.c) and mode
 * `full` (bt/_callout.c full_intr_hook): the common case of RingCompressedDelivery (cpu/ringdelivery.py,
 * EventDelivery._deliver); the copy of Machine.block_insns it leaves a block with is cpu/_blockcopy.h's.
 *
 * What differs between the two modes is passed in an `evdeliver_t` of values and pointers: where the
 * virtual CR0/CR3/CR4, IDTR and TR are, the real IOPL of the guest kernel (trap 0, full 1), and where
 * the handler's code really runs (`enter`: trap in place, full its translation in the translation
 * cache, when one exists). Everything else is one piece of code.
 *
 * A header of static functions (as cpu/_evseg.h): each extension compiles its own copy of the same code.
 */
#ifndef CPUVIRT_EVDELIVER_H
#define CPUVIRT_EVDELIVER_H

#include <stdint.h>
#include <string.h>

#include "_blockcopy.h"
#include "_evseg.h"
#include "../memory/_shadowmirror.h"

#define ED_EFLAGS_IF 0x200u
#define ED_EFLAGS_TF 0x100u
#define ED_CR0_PG 0x80000000u

typedef int (*ed_reg_read_fn)(void *uc, int regid, void *value);
typedef int (*ed_reg_write_fn)(void *uc, int regid, const void *value);

/* -- the delivery -------------------------------------------------------------------------------------- */

/* Where the handler runs: called once every check has passed and before anything is written, with
 * the handler's guest EIP and the real CS and SS it will run with; 1 and *eip the engine's EIP, or 0
 * (nothing changed: Python's). */
typedef int (*ed_enter_fn)(void *ctx, void *uc, uint32_t offset, uint32_t cs_after, uint32_t ss_after, uint32_t *eip);

typedef struct {
    evseg_t *ev;                   /* GDTR, the hypervisor-TLB copy, IOPL, `_loaded`, env, RAM */
    ed_reg_read_fn reg_read;
    ed_reg_write_fn reg_write;
    int32_t r_eip, r_eflags, r_esp, r_ss;
    uint32_t cr0, cr3, cr4;        /* the VirtualCpu's */
    uint32_t wp_granted;           /* ShadowPaging: a supervisor write was let through while WP was 0 */
    uint32_t idt_base, idt_limit;  /* the VirtualCpu's IDTR and TR */
    uint32_t tr_base, tr_limit;
    const shadowmirror_t *mirror;  /* the current shadow root, the traced frames */
    uint32_t kernel_iopl;          /* the real IOPL of the guest kernel (DeprivilegedVcpu.real_iopl(0)) */
    ed_enter_fn enter;
    void *enter_ctx;
    int leaves_block;              /* the caller leaves the engine's block itself (_evseg.h ev_set_eip) */
} evdeliver_t;

static inline int ed_rd(const evdeliver_t *d, void *uc, int reg, uint64_t *v) {
    *v = 0;
    return d->reg_read(uc, reg, v) == 0;
}

/* -- the hypervisor's own linear accesses of event delivery (Mmu.read_linear / write_linear with
 * user=False under ShadowPaging): the guest-physical address of `n` bytes at `gva` in one page when
 * ShadowPaging.gva_to_gpa answers it from an entry of the current root with no side effect at all
 * (no walk, no root selection, no mode change, no WP grant) and it is RAM; for a write, also the
 * entry's D bit set, writable, and a frame no one traces (Mmu.write_linear would call hv_wrote).
 * 0 for anything else: Python's. */
static inline int ed_shadow_gpa(const evdeliver_t *d, uint32_t gva, uint32_t n, int write, uint64_t *out) {
    uint64_t gpa;
    if ((gva & 0xFFFu) + n > 0x1000u) return 0;
    if (!(d->cr0 & ED_CR0_PG)) {
        gpa = gva;
    } else {
        int64_t g = sm_hv_gpa(d->mirror, d->cr0, d->cr3, d->cr4, gva, write, (int)d->wp_granted);
        if (g < 0) return 0;
        gpa = (uint64_t)g;
    }
    if (gpa + n > d->ev->ram_bytes) return 0;
    if (write && sm_traced(d->mirror, gpa)) return 0;
    *out = gpa;
    return 1;
}

/* read_hv with the guest-physical address of what it read */
static inline int ed_read_hv_at(const evdeliver_t *d, uint32_t gva, void *out, uint32_t n, uint64_t *gpa) {
    uint32_t page = gva >> 12;
    const ev_rtlb_t *e = &d->ev->rtlb[page & (EV_RTLB_SLOTS - 1)];
    if (!ev_read_hv(d->ev, gva, out, n)) return 0;
    *gpa = e->gpa + (gva & 0xFFFu);
    return 1;
}

/* SegmentLoadingVcpu.descriptor(selector) for a GDT selector, read through the hypervisor's TLB */
static inline int ed_gdt_descriptor(const evdeliver_t *d, uint32_t selector, uint32_t desc[2], uint64_t *gpa) {
    uint32_t index = selector & ~7u;
    if ((selector & 4) || !index || index + 7 > d->ev->gdt_limit) return 0;
    if ((uint64_t)d->ev->gdt_base + index + 8 > 0x100000000ull) return 0;
    return ed_read_hv_at(d, d->ev->gdt_base + index, desc, 8, gpa);
}

static inline int ed_overlaps(uint64_t a, uint32_t an, uint64_t b, uint32_t bn) { return a < b + bn && b < a + an; }

/* -- an event through the guest's IDT: RingCompressedDelivery (EventDelivery._deliver) -------------
 * Only its common case: a present 32-bit interrupt or trap gate (DPL >= CPL for `int n`) to a
 * present, accessed, non-conforming, 32-bit DPL-0 code segment of the GDT, from the guest kernel
 * (virtual CPL 0, real ring 1, the gate's CS being the one it runs in: no CS load) or from ring 3
 * (the TSS's SS0:ESP0 with a present, accessed, writable DPL-0 data segment of the GDT: SS and CS
 * loaded ring-compressed as _load_direct does); the IDT entry, the TSS slot and the frame each in
 * one page shadow paging maps with no side effect (ed_shadow_gpa), the descriptors in pages the
 * hypervisor's TLB holds (read_hv), the frame in none of the bytes read after it, and `enter`
 * knowing where the handler runs. The registers are written in Python's order: (SS, CS,) ESP,
 * EFLAGS, EIP. Returns 0 with nothing changed for anything else: a fault of the delivery, a task
 * gate, V86, a ring Python must load... */
static inline int ed_deliver_event(const evdeliver_t *d, void *uc, uint32_t vector, int soft, uint32_t ret_eip,
                                   int has_ec, uint32_t ec, uint32_t cs_real, uint64_t eflags_real) {
    evseg_t *ev = d->ev;
    uint32_t gate[2], cdesc[2], sdesc[2] = {0, 0}, tss[2], frame[6], selector, offset, gtype, cpl, old_cs;
    uint32_t new_ss = 0, esp, n = 0, k, guest_eflags, new_flags, cs_after, ss_after, eip_after;
    uint64_t gpa, cgpa, sgpa = 0, fgpa, v, esp_now, ss_now;
    uint8_t tssb[6];
    if (!ev->segs_ok || (eflags_real & EV_EFLAGS_VM)) return 0;
    if ((cs_real & 3) == 3)
        cpl = 3;
    else if ((cs_real & 3) == 1)
        cpl = 0;
    else
        return 0;
    if (vector * 8 + 7 > d->idt_limit) return 0;
    if ((uint64_t)d->idt_base + vector * 8 + 8 > 0x100000000ull) return 0;
    if (!ed_shadow_gpa(d, d->idt_base + vector * 8, 8, 0, &gpa)) return 0;
    memcpy(gate, ev->ram + gpa, 8);
    gtype = (gate[1] >> 8) & 0x1F;
    if (gtype != 0xE && gtype != 0xF) return 0;
    if (soft && ((gate[1] >> 13) & 3) < cpl) return 0;
    if (!(gate[1] & EV_DESC_P)) return 0;
    selector = gate[0] >> 16;
    offset = (gate[0] & 0xFFFFu) | (gate[1] & 0xFFFF0000u);
    if (!ed_gdt_descriptor(d, selector, cdesc, &cgpa)) return 0;
    if (!(cdesc[1] & EV_DESC_CODE) || !(cdesc[1] & EV_DESC_S) || (cdesc[1] & EV_DESC_C)) return 0;
    if (((cdesc[1] >> 13) & 3) != 0 || !(cdesc[1] & EV_DESC_P)) return 0;
    if (!(cdesc[1] & EV_DESC_A) || !(cdesc[1] & EV_DESC_DB)) return 0;   /* _set_accessed, CODE16 */
    guest_eflags = ((uint32_t)eflags_real & ~EV_EFLAGS_IOPL) | (ev->iopl << 12);
    old_cs = (cs_real & 3) == 1 ? cs_real & ~3u : cs_real;              /* guest_selector */
    if (has_ec) frame[n++] = ec;
    frame[n++] = ret_eip;
    frame[n++] = old_cs;
    frame[n++] = guest_eflags;
    if (!ed_rd(d, uc, d->r_esp, &esp_now) || !ed_rd(d, uc, d->r_ss, &ss_now)) return 0;
    if (cpl == 3) {                                                     /* _stack_from_tss(0) */
        if (4 + 5 > d->tr_limit) return 0;
        if ((uint64_t)d->tr_base + 4 + 6 > 0x100000000ull) return 0;
        if (!ed_shadow_gpa(d, d->tr_base + 4, 6, 0, &gpa)) return 0;
        memcpy(tssb, ev->ram + gpa, 6);
        memcpy(&tss[0], tssb, 4);
        new_ss = (uint32_t)tssb[4] | ((uint32_t)tssb[5] << 8);
        if (!(new_ss & ~3u) || (new_ss & 3)) return 0;
        if (!ed_gdt_descriptor(d, new_ss, sdesc, &sgpa)) return 0;
        if (((sdesc[1] >> 13) & 3) != 0 || !(sdesc[1] & EV_DESC_S) || (sdesc[1] & EV_DESC_CODE) ||
            !(sdesc[1] & EV_DESC_R))
            return 0;
        if (!(sdesc[1] & EV_DESC_P) || !(sdesc[1] & EV_DESC_A)) return 0;
        frame[n++] = (uint32_t)esp_now;
        frame[n++] = (uint32_t)ss_now;                                  /* ring 3: its own view */
        esp = tss[0];
        cs_after = (selector & ~3u) | 1u;
        ss_after = (new_ss & ~3u) | 1u;
    } else {
        if ((cs_real & ~3u) != (selector & ~3u)) return 0;              /* a CS load: Python's */
        esp = (uint32_t)esp_now;
        cs_after = cs_real;
        ss_after = (uint32_t)ss_now;
    }
    esp -= 4 * n;
    if (!ed_shadow_gpa(d, esp, 4 * n, 1, &fgpa)) return 0;
    /* Python reads the descriptors again after the frame is written (load_cs_ss, hv_load) */
    if (cpl == 3 && (ed_overlaps(fgpa, 4 * n, cgpa, 8) || ed_overlaps(fgpa, 4 * n, sgpa, 8))) return 0;
    /* _load_direct's checks of the shadow descriptors (a RuntimeError there) */
    if (cpl == 3 && !(cdesc[1] & EV_DESC_R)) return 0;                      /* execute-only CS */
    if (!d->enter(d->enter_ctx, uc, offset, cs_after, ss_after, &eip_after)) return 0;
    /* From here on the delivery is ours. */
    for (k = 0; k < n; k++) memcpy((uint8_t *)ev->ram + fgpa + 4 * k, &frame[k], 4);
    new_flags = guest_eflags & ~(ED_EFLAGS_TF | EV_EFLAGS_NT | EV_EFLAGS_RF | EV_EFLAGS_VM);
    if (gtype == 0xE) new_flags &= ~ED_EFLAGS_IF;
    if (cpl == 3) {                                                     /* load_cs_ss -> _load_direct */
        ev_segcache_t *segs = (ev_segcache_t *)(ev->env + ev->off_segs);
        uint32_t hf, shi, lim, sel;
        int which;
        memcpy(&hf, ev->env + ev->off_hflags, 4);
        hf = (hf & ~3u) | 1u;
        for (which = 0; which < 2; which++) {                           /* SS, then CS */
            const uint32_t *dd = which ? cdesc : sdesc;
            int seg = which ? EV_CS : EV_SS;
            sel = which ? cs_after : ss_after;
            shi = dd[1] | (1u << 13);                                   /* ShadowGdt.compress: DPL 1 */
            segs[seg].selector = sel;
            segs[seg].base = (dd[0] >> 16) | ((shi & 0xFFu) << 16) | (shi & 0xFF000000u);
            lim = (dd[0] & 0xFFFFu) | (shi & 0xF0000u);
            segs[seg].limit = (shi & EV_DESC_G) ? (lim << 12) | 0xFFFu : lim;
            segs[seg].flags = shi | EV_DESC_A;
            if (which)
                hf = (hf & ~EV_HF_CS32) | (((shi >> 22) & 1u) << 4);
            else
                hf = (hf & ~3u) | 1u;
            ev->loaded[seg][0] = sel;
            ev->loaded[seg][1] = dd[0];
            ev->loaded[seg][2] = dd[1] | EV_DESC_A;
            ev->loaded_new |= 1u << seg;
            ev->loaded_known |= 1u << seg;
        }
        hf = (hf & ~(EV_HF_SS32 | EV_HF_ADDSEG)) | (((segs[EV_SS].flags >> 22) & 1u) << 5);
        if (!(hf & EV_HF_CS32) || (segs[EV_ES].base | segs[EV_SS].base | segs[EV_DS].base)) hf |= EV_HF_ADDSEG;
        memcpy(ev->env + ev->off_hflags, &hf, 4);
    }
    v = esp;
    d->reg_write(uc, d->r_esp, &v);
    ev->iopl = (new_flags >> 12) & 3;                                   /* set_guest_eflags */
    v = (new_flags & ~EV_EFLAGS_IOPL) | (d->kernel_iopl << 12) | 2u;
    d->reg_write(uc, d->r_eflags, &v);
    v = eip_after;
    if (!d->leaves_block || !ev_set_eip(ev, eip_after)) d->reg_write(uc, d->r_eip, &v);
    return 1;
}

#endif
