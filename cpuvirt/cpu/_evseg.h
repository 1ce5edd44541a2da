/*
 * The guest kernel's segment loads and iretd done in C, shared by mode `trap` (modes/_trapfast.c: the
 * #GP of the deprivileged instruction) and mode `full` (bt/_callout.c: the translator's callout slot).
 * Python's side: cpu/evseg.py (the mirror of evseg_t, the hypervisor-TLB copy, the `_loaded` cache).
 *
 * Everything here does what the Python path (cpu/segments.py SegmentLoadingVcpu.load_segment,
 * hv_load/_load_direct; cpu/emulating.py EmulatingVcpu.iret) does in its common case, and answers 0
 * with nothing changed for anything else: a fault for the guest, an accessed bit to set, a null or
 * LDT selector, a descriptor not in the copy of the hypervisor's TLB (Python would walk the guest's
 * page tables, with side effects), a GDT that wraps past 4 GiB.
 *
 * A header of static functions: each extension compiles its own copy of the same code.
 */
#ifndef CPUVIRT_EVSEG_H
#define CPUVIRT_EVSEG_H

#include <stdint.h>
#include <string.h>

#define EV_RTLB_SLOTS 256u
#define EV_POPS 16u

#define EV_HF_CPL 3u
#define EV_HF_CS32 (1u << 4)
#define EV_HF_SS32 (1u << 5)
#define EV_HF_ADDSEG (1u << 6)
#define EV_DESC_A (1u << 8)
#define EV_DESC_R (1u << 9)      /* readable code / writable data */
#define EV_DESC_C (1u << 10)     /* conforming code */
#define EV_DESC_CODE (1u << 11)
#define EV_DESC_S (1u << 12)
#define EV_DESC_P (1u << 15)
#define EV_DESC_DB (1u << 22)
#define EV_DESC_G (1u << 23)
#define EV_EFLAGS_VM 0x20000u
#define EV_EFLAGS_NT 0x4000u
#define EV_EFLAGS_RF 0x10000u
#define EV_EFLAGS_IOPL 0x3000u

/* QEMU's segment indexes in env->segs[] */
enum { EV_ES = 0, EV_CS = 1, EV_SS = 2, EV_DS = 3, EV_FS = 4, EV_GS = 5 };

/* QEMU's SegmentCache, as env->segs[] holds it (cpu/segcache.py _SegmentCache). */
typedef struct {
    uint32_t selector;
    uint32_t pad;
    uint64_t base;
    uint32_t limit;
    uint32_t flags;
} ev_segcache_t;

/* One entry of the copy of the hypervisor's own TLB (GuestViewVcpu._rtlb, evseg.py EvHvTlb):
 * linear page -> guest-physical frame in RAM, valid while `gen` is the table's rtlb_gen. */
typedef struct {
    uint32_t page;
    uint32_t gen;
    uint32_t valid;
    uint32_t pad;
    uint64_t gpa;
} ev_rtlb_t;

/* The state both modes keep in C (evseg.py EvSeg mirrors it). */
typedef struct {
    uint8_t *env;              /* QEMU's CPUX86State of this engine */
    const uint8_t *ram;        /* guest RAM, guest-physical 0 */
    uint64_t ram_bytes;
    uint32_t off_hflags;       /* fields inside env (quirks.ContextLayout, segcache.segs_offset) */
    uint32_t off_segs;
    uint32_t segs_ok;          /* 1: env->segs[] found (segments.py `_direct` is not None) */
    uint32_t rtlb_gen;         /* the hypervisor TLB's generation (cpu/hvtlb.py): bumped on a flush */
    uint32_t gdt_base, gdt_limit;   /* the VirtualCpu's GDTR */
    uint32_t loaded_new;       /* bit i: loaded[i] written here since Python last took it */
    uint32_t loaded_known;     /* bit i: loaded[i] is what _loaded holds for segment i */
    uint32_t loaded[6][3];     /* SegmentLoadingVcpu._loaded by QEMU segment index: (real, lo, hi) */
    uint32_t cr2;              /* the VirtualCpu's CR2 and IOPL */
    uint32_t iopl;
    uint32_t nmi_blocked;      /* Vcpu.nmi_blocked (an iret that ends it is Python's) */
    uint32_t off_eip;          /* EIP inside env (internals.register_offsets; 0: not found, uc_reg_write it) */
    /* pages an invlpg served in C took out of the hypervisor's TLB, for Python's dict (EvHvTlb) to drop when
     * it is next used: the one page, as privileged.py _invlpg pops it, not the whole TLB */
    uint32_t popped_n;
    uint32_t popped[EV_POPS];
    /* pages C put into the copy (ev_rtlb_fill), for Python's dict to take when it is next used, in order;
     * and what C knows of that dict: its size (with them), whether the copy holds every page it does (a
     * miss here is a miss there) and its bound (limits.CACHE_ENTRIES). All of it holds for generation
     * fill_gen only: a flush in C since (rtlb_gen moved) empties the dict when Python next looks. */
    uint32_t fill_gen;
    uint32_t rtlb_n;
    uint32_t rtlb_whole;
    uint32_t rtlb_cap;
    uint32_t filled_n;
    uint32_t filled[EV_POPS];
    uint32_t filled_frame[EV_POPS];   /* their guest-physical frames (gpa >> 12) */
    ev_rtlb_t rtlb[EV_RTLB_SLOTS];
} evseg_t;

/* EIP for where the engine goes on, from a hook that leaves the engine's block itself (an interrupt hook,
 * which runs between blocks, or a path that ends in cpu_loop_exit): written in env, because uc_reg_write's
 * EIP also makes the engine leave its loop and enter it again (Unicorn's quit_request: as much again as
 * the rest of a trap's emulation in C). Elsewhere, inside a block (a code hook), the block must be left:
 * uc_reg_write. 0: not written (no offset found). */
static inline int ev_set_eip(const evseg_t *s, uint32_t eip) {
    uint64_t v = eip;
    if (!s->off_eip) return 0;
    memcpy(s->env + s->off_eip, &v, 8);
    return 1;
}

/* GuestViewVcpu._rtlb.pop(page): C's copy now, Python's dict when it next looks. 0: the log is full. */
static inline int ev_rtlb_pop(evseg_t *s, uint32_t page) {
    ev_rtlb_t *e = &s->rtlb[page & (EV_RTLB_SLOTS - 1)];
    uint32_t k;
    for (k = 0; k < s->popped_n && s->popped[k] != page; k++)
        ;                              /* popped already? (Python drains the log before it adds a page) */
    if (k == s->popped_n) {
        if (s->popped_n >= EV_POPS || (s->filled_n && s->fill_gen == s->rtlb_gen)) return 0;  /* one log at a time */
        s->popped[s->popped_n++] = page;
    }
    if (e->page == page) e->valid = 0;
    return 1;
}

/* GuestViewVcpu.read_guest's fill of its TLB (limits.put) made here, for the RAM frame `gpa` of a linear
 * page that neither the copy nor Python's dict holds: only while the copy holds every page the dict does
 * (rtlb_whole), the dict is under its bound (no limits.put clear), the page's slot holds no other live
 * page (which the dict would keep) and no page popped here waits for Python (so that the dict takes the
 * two logs in the order they were made, only one of them is ever non-empty). The page is in the copy at
 * once and in the dict when Python next uses it (EvHvTlb._fresh). 0: not put (Python's walk will). */
static inline int ev_rtlb_fill(evseg_t *s, uint32_t page, uint64_t gpa) {
    ev_rtlb_t *e = &s->rtlb[page & (EV_RTLB_SLOTS - 1)];
    if (s->fill_gen != s->rtlb_gen) {          /* flushed here since Python last looked: its dict goes empty, */
        s->fill_gen = s->rtlb_gen;              /* and the pages popped since were in it, or in none */
        s->filled_n = 0, s->popped_n = 0, s->rtlb_n = 0, s->rtlb_whole = 1;
    }
    if (!s->rtlb_whole || s->popped_n || s->filled_n >= EV_POPS || s->rtlb_n >= s->rtlb_cap) return 0;
    if ((gpa & 0xFFFu) || gpa + 0x1000 > s->ram_bytes) return 0;
    if (e->valid && e->gen == s->rtlb_gen) return e->page == page;
    e->page = page, e->gen = s->rtlb_gen, e->gpa = gpa, e->valid = 1;
    s->filled[s->filled_n] = page;
    s->filled_frame[s->filled_n++] = (uint32_t)(gpa >> 12);
    s->rtlb_n++;
    return 1;
}

/* -- the hypervisor's own reads (GuestViewVcpu.read_guest) when its TLB holds the page ---------------
 * read_guest on a hit reads RAM and nothing else; on a miss it walks with side effects (accessed bits,
 * the walk counters) and fills the TLB: that is Python's to do, so a miss here answers 0. */
static inline int ev_read_hv(const evseg_t *s, uint32_t gva, void *out, uint32_t n) {
    uint32_t page = gva >> 12;
    const ev_rtlb_t *e = &s->rtlb[page & (EV_RTLB_SLOTS - 1)];
    if ((gva & 0xFFFu) + n > 0x1000u) return 0;
    if (!e->valid || e->page != page || e->gen != s->rtlb_gen) return 0;
    if (e->gpa + 0x1000 > s->ram_bytes) return 0;
    memcpy(out, s->ram + e->gpa + (gva & 0xFFFu), n);
    return 1;
}

/* SegmentLoadingVcpu.descriptor for a non-null GDT selector within the limit, read through the
 * hypervisor's TLB. 0: null, LDT, past the limit, wrapping, or not in the copy. */
static inline int ev_descriptor(const evseg_t *s, uint32_t selector, uint32_t desc[2]) {
    if (!(selector & ~3u) || (selector & 4)) return 0;
    if ((selector & ~7u) + 7 > s->gdt_limit) return 0;
    if ((uint64_t)s->gdt_base + (selector & ~7u) + 8 > 0x100000000ull) return 0;  /* wraps: Python's */
    return ev_read_hv(s, s->gdt_base + (selector & ~7u), desc, 8);
}

static inline ev_segcache_t *ev_segs(evseg_t *s) { return (ev_segcache_t *)(s->env + s->off_segs); }

/* segments.py _load_direct for one register: the ring-compressed descriptor (ShadowGdt.compress) written
 * into the engine's segment cache, hflags kept as QEMU's cpu_x86_load_seg_cache keeps them, `_loaded`
 * updated. `hi` as the guest's descriptor holds it (accessed or not: the cache gets it set). */
static inline void ev_write_seg(evseg_t *s, int seg, uint32_t real, uint32_t lo, uint32_t hi) {
    ev_segcache_t *segs = ev_segs(s);
    uint32_t shi = hi, lim, hf;
    if ((hi & EV_DESC_S) && ((hi >> 13) & 3) == 0) shi |= 1u << 13;
    segs[seg].selector = real;
    segs[seg].base = (lo >> 16) | ((shi & 0xFFu) << 16) | (shi & 0xFF000000u);
    lim = (lo & 0xFFFFu) | (shi & 0xF0000u);
    segs[seg].limit = (shi & EV_DESC_G) ? (lim << 12) | 0xFFFu : lim;
    segs[seg].flags = shi | EV_DESC_A;
    memcpy(&hf, s->env + s->off_hflags, 4);
    if (seg == EV_CS) hf = (hf & ~EV_HF_CS32) | (((shi >> 22) & 1u) << 4);
    else if (seg == EV_SS) hf = (hf & ~EV_HF_CPL) | ((shi >> 13) & 3u);
    hf = (hf & ~(EV_HF_SS32 | EV_HF_ADDSEG)) | (((segs[EV_SS].flags >> 22) & 1u) << 5);
    if (!(hf & EV_HF_CS32) || (segs[EV_ES].base | segs[EV_SS].base | segs[EV_DS].base)) hf |= EV_HF_ADDSEG;
    memcpy(s->env + s->off_hflags, &hf, 4);
    s->loaded[seg][0] = real;
    s->loaded[seg][1] = lo;
    s->loaded[seg][2] = hi | EV_DESC_A;
    s->loaded_new |= 1u << seg;
    s->loaded_known |= 1u << seg;
}

/* -- mov sreg / pop sreg of DS ES FS GS by the guest kernel (virtual CPL 0): load_segment ---------
 * Only its common case: a non-null GDT selector within the limit whose descriptor is a present,
 * accessed data or readable code segment that the guest may load at CPL 0. DPL 0: hv_load, nothing
 * when `_loaded` already holds that descriptor for that selector and the register holds it (its
 * skip), else _load_direct's write; answers 1. A null selector, or DPL 1-3: Python writes the register
 * itself (the engine loads it from the real GDT): answers 2 with *plain the value to write, nothing
 * done (the caller may do that write, or hand the event to Python). */
static inline int ev_load_data_segment(evseg_t *s, int seg, uint32_t selector, uint32_t *plain) {
    uint32_t desc[2], hi, dpl, rpl;
    if (!s->segs_ok || seg == EV_CS || seg == EV_SS || seg > EV_GS || seg < 0) return 0;
    selector &= 0xFFFFu;
    if ((selector & 3) == 1) selector &= ~3u;    /* guest_selector: RPL 1 is the compressed ring 0 */
    if (!(selector & ~3u)) {
        *plain = selector;                       /* a null data selector loads anywhere */
        return 2;
    }
    if (!ev_descriptor(s, selector, desc)) return 0;
    hi = desc[1];
    dpl = (hi >> 13) & 3, rpl = selector & 3;
    if (!(hi & EV_DESC_S) || !(hi & EV_DESC_P) || !(hi & EV_DESC_A)) return 0;
    if ((hi & EV_DESC_CODE) && !(hi & EV_DESC_R)) return 0;                          /* execute-only: #GP */
    if ((!(hi & EV_DESC_CODE) || !(hi & EV_DESC_C)) && dpl < rpl) return 0;          /* #GP */
    if (dpl != 0) {
        *plain = selector;
        return 2;
    }
    if ((s->loaded_known >> seg & 1u) && s->loaded[seg][0] == selector && s->loaded[seg][1] == desc[0] &&
        s->loaded[seg][2] == hi && ev_segs(s)[seg].selector == selector)
        return 1;                                                                     /* hv_load's skip */
    ev_write_seg(s, seg, selector, desc[0], hi);
    return 1;
}

/* -- iretd by the guest kernel (virtual CPL 0), EmulatingVcpu.iret ---------------------------------
 * The frame at `esp` (EIP, CS, EFLAGS, and ESP, SS for a return to ring 3) read through the
 * hypervisor's TLB; nothing that needs more than the registers and the segment caches: no NT (a task
 * return), no NMI blocking to end, no VM in the image. `kernel_ring` is the real ring of the guest's
 * ring 0. Answers:
 *   0 Python's (nothing changed);
 *   1 a return to the kernel's own ring with CS's descriptor already loaded (hv_load's skip): the
 *     caller writes ESP (+12), EFLAGS and EIP (frame[0]);
 *   3 a return to ring 3, done here as load_cs_ss(cs, ss, 3) does it (SS, then CS, the engine's CPL
 *     3), every data segment register left as it is (each holds null or a segment ring 3 may use):
 *     the caller writes ESP (frame[3]), EFLAGS and EIP (frame[0]); only when `outer_ok`.
 * frame[2] is the EFLAGS image (RF is the caller's to clear). */
static inline int ev_iret(evseg_t *s, uint32_t esp, uint32_t cur_cs, uint32_t eflags, uint32_t kernel_ring,
                          int outer_ok, uint32_t frame[5]) {
    uint32_t cs, ss, desc[2], sdesc[2];
    ev_segcache_t *segs;
    int k;
    if ((eflags & EV_EFLAGS_NT) || s->nmi_blocked || !s->segs_ok) return 0;
    if (!ev_read_hv(s, esp, frame, 12)) return 0;
    if (frame[2] & EV_EFLAGS_VM) return 0;
    cs = frame[1] & 0xFFFFu;
    if ((cs & 3) == kernel_ring) cs &= ~3u;                                   /* guest_selector */
    if (!ev_descriptor(s, cs, desc)) return 0;
    if (!(desc[1] & EV_DESC_CODE) || !(desc[1] & EV_DESC_S) || !(desc[1] & EV_DESC_P) || !(desc[1] & EV_DESC_A))
        return 0;
    if (!(desc[1] & EV_DESC_DB)) return 0;                                      /* 16-bit: Python's */
    if ((cs & 3) == 0) {
        uint32_t real = cs | kernel_ring;
        if (!(s->loaded_known & (1u << EV_CS)) || s->loaded[EV_CS][0] != real || s->loaded[EV_CS][1] != desc[0] ||
            s->loaded[EV_CS][2] != desc[1])
            return 0;
        if (cur_cs != real) return 0;
        return 1;
    }
    if ((cs & 3) != 3 || !outer_ok) return 0;                                  /* RPL 1, 2: #GP */
    if (!(desc[1] & EV_DESC_R)) return 0;                          /* execute-only: _load_direct refuses */
    if (((desc[1] >> 13) & 3) != 3 && !(desc[1] & EV_DESC_C)) return 0;   /* a DPL < 3 CS for ring 3 */
    if (!ev_read_hv(s, esp + 12, frame + 3, 8)) return 0;
    if (((esp & 0xFFFu) + 20) > 0x1000u) return 0;
    ss = frame[4] & 0xFFFFu;
    if ((ss & 3) != 3 || !ev_descriptor(s, ss, sdesc)) return 0;
    if (((sdesc[1] >> 13) & 3) != 3 || (sdesc[1] & EV_DESC_CODE) || !(sdesc[1] & EV_DESC_R)) return 0;
    if (!(sdesc[1] & EV_DESC_S) || !(sdesc[1] & EV_DESC_P) || !(sdesc[1] & EV_DESC_A)) return 0;
    /* the data segments iret would null: any that ring 3 may not use is Python's */
    segs = ev_segs(s);
    for (k = 0; k < 6; k++) {
        uint32_t sel, d[2];
        if (k == EV_CS || k == EV_SS) continue;
        sel = segs[k].selector & 0xFFFFu;
        if (!(sel & ~3u)) continue;
        if (!ev_descriptor(s, sel, d)) return 0;
        if (!((d[1] & EV_DESC_CODE) && (d[1] & EV_DESC_C)) && ((d[1] >> 13) & 3) < 3) return 0;
    }
    ev_write_seg(s, EV_SS, ss, sdesc[0], sdesc[1]);
    ev_write_seg(s, EV_CS, cs, desc[0], desc[1]);
    return 3;
}

#endif
