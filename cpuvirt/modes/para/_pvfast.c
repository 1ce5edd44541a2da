/*
 * para's common events in C (modes/para/pvfast.py): the INTR hook in front of ParaVcpu._intr for
 *
 *  - an `int n`, int3 or a fault the engine raised, bounced to the guest kernel through its virtual
 *    trap table (ParaVcpu._deliver_engine_event -> trap -> bounce): a hardware-like frame at ring 1,
 *    on the stack_switch stack when it comes from ring 3, with Xen's virtual IF (the event mask) in the
 *    saved EFLAGS and the mask in the saved CS's upper half, CS:EIP from the trap table, the mask set
 *    when the entry's flag asks for it (docs/pv-abi.md);
 *  - HYPERVISOR_iret (hypercall 23, hypercalls.py `iret`): the event mask from the frame's EFLAGS.IF,
 *    EAX popped, EIP at the hypercall page's iretd stub (whose iret site is answered in C as well,
 *    cpu/_delivery.c delivery_iret_hook);
 *  - update_va_mapping, mmu_update and mmuext_op of one request that needs no page table validated or
 *    released (memory/direct.py's frame types and counts, shared with Python);
 *  - the #PF that cpu/_delivery.c's delivery_pf_hook finds in the TLB fill (pv_page_fault).
 *
 * It answers only what the Python path would do without a trace line, a crash, a #GP of its own or an
 * upcall: anything else (no trap-table entry, an `int n` above the entry's DPL, from virtual-8086 mode,
 * a frame that would fault, a write-traced frame, an event that becomes deliverable, the first event of
 * each kind so that Python puts the counters' keys in its order) goes to the Python hook having changed
 * nothing. Guest memory goes through cpu/_delivery.c's walker over direct paging (machine addresses),
 * with the side effects and counters of Mmu.read_linear / write_linear; the bookkeeping (the event
 * counters, the block's unretired instructions, the interrupt-window check) through its EventBooks.
 * tests/test_pv_fast.py compares both paths byte for byte. Python calls it through ctypes.
 */
#include <Python.h>
#include <stdint.h>
#include <string.h>
#include "../../engine/_vclock.h"   /* the clock's time */

typedef int (*reg_read_fn)(void *uc, int regid, void *value);
typedef int (*reg_write_fn)(void *uc, int regid, const void *value);
typedef int (*context_fn)(void *uc, void *context);
typedef void (*intr_fn)(void *uc, uint32_t intno, void *user_data);
typedef int (*peek_fn)(void *d, void *uc, uint32_t gva, uint32_t n, uint8_t *out);
typedef int (*linear_fn)(void *d, void *uc, uint32_t gva, uint32_t n, int write, uint8_t *buf);
typedef void (*soft_books_fn)(void *d, uint32_t vector, uint32_t start, uint32_t eip);
typedef void (*fault_books_fn)(void *d, uint32_t vector, uint32_t eip);
typedef void (*refused_fn)(uint32_t vector);
typedef void (*flush_page_fn)(void *cpu, uint64_t linear);   /* QEMU's tlb_flush_page */

enum { R_EAX, R_ESP, R_EIP, R_EFLAGS, R_CS, R_SS, R_EBX, R_ECX, R_EDX, R_ESI, R_CR3, R_COUNT };

/* One entry of the virtual trap table (set_trap_table's trap_info, as ParaVcpu.trap_table holds it). */
typedef struct {
    uint8_t present, flags;   /* flags: DPL in bits 0-1, bit 2: mask events on entry */
    uint16_t cs;              /* (cs & ~3) | 1 */
    uint32_t address;
} trap_t;

typedef struct {
    void *d;                  /* cpu/_delivery.c's delivery_t of the vCPU's FastDelivery */
    peek_fn peek;             /* delivery_peek: no side effect */
    linear_fn linear;         /* delivery_linear: Mmu.read_linear / write_linear's side effects */
    soft_books_fn books_soft; /* delivery_books_soft / _fault: the bookkeeping of a delivered event */
    fault_books_fn books_fault;
    reg_read_fn reg_read;
    reg_write_fn reg_write;
    context_fn context_save, context_restore;
    void *context;            /* a uc_context of this engine (the FastDelivery's) */
    uint8_t *context_hflags, *context_is_int, *context_old_exception, *context_error_code;
    int32_t reg[R_COUNT];
    intr_fn python_intr;      /* ParaVcpu._intr, guarded */
    refused_fn refused;       /* the engine refused a register write after the frame was written */
    uint32_t enabled;         /* 0: every event is Python's (a trace, the off switch) */
    uint32_t trap_table_set;  /* ParaVcpu.trap_table_set */
    uint32_t kstack_set, kstack_ss, kstack_esp;   /* ParaVcpu.kernel_stack (stack_switch) */
    uint32_t traced;          /* the shared-info frame is write-traced (ParaVcpu._mask_traced) */
    uint8_t *shared;          /* vcpu_info[0] in RAM: [0] evtchn_upcall_pending, [1] evtchn_upcall_mask */
    uint32_t *in_upcall;      /* ParaVcpu._in_upcall */
    uint32_t has_error_code[8];
    uint32_t iret_seen;       /* Python handled a HYPERVISOR_iret (its counters' keys exist) */
    uint32_t iret_eip;        /* hypercall_va + IRET_STUB */
    vclock_time_t *clock_now;   /* the clock's time (engine/_vclock.h), and its extra */
    uint64_t *clock_extra;
    uint64_t hypercall_cycles;   /* HYPERCALL_CYCLES */
    uint64_t irets;           /* HYPERVISOR_iret done here, not yet in Vcpu.counts (pvfast.py folds) */
    uint64_t irets_total, bounced;
    /* update_va_mapping (hypercall 14) over direct paging's frame types (memory/direct.py) */
    uint8_t *ram;             /* guest RAM, at machine address ram_hpa */
    uint64_t ram_hpa;
    uint8_t *frame_type;      /* DirectPaging.type, by pfn */
    uint32_t *frame_count;    /* DirectPaging.count, by pfn */
    uint32_t nr_pages;
    uint32_t hv_start;        /* HYPERVISOR_VIRT_START */
    uint32_t uva_seen;        /* Python handled one (its counters' keys exist) */
    uint32_t mmu_seen;        /* the same for mmu_update */
    uint64_t uvas, uvas_total;
    uint64_t mmus, mmus_total;
    uint64_t request_cycles;  /* REQUEST_CYCLES */
    uint64_t *walks, *walk_refs;  /* the walk counters of delivery_t (what `linear` adds to) */
    uint32_t *base;           /* DirectPaging.base: the current L2's machine address */
    uint32_t mmuext_seen, pad2;
    uint64_t mmuexts, mmuexts_total;
    flush_page_fn flush_page; /* DirectPaging.on_flush_page's (PageFlush): NULL, INVLPG flushes it all */
    void *cpu;                /* its CPUState */
    trap_t trap[256];
} pv_t;

size_t pv_sizeof(void) { return sizeof(pv_t); }

#define EFLAGS_TF 0x100u
#define EFLAGS_IF 0x200u
#define EFLAGS_NT 0x4000u
#define EFLAGS_RF 0x10000u
#define EFLAGS_VM 0x20000u
#define HYPERCALL_VECTOR 0x82u
#define HYPERCALL_IRET 23u
#define HYPERCALL_UVA 14u
#define HYPERCALL_MMU_UPDATE 1u
#define HYPERCALL_MMUEXT 26u
#define MMUEXT_NEW_BASEPTR 5u
#define MMUEXT_TLB_FLUSH_LOCAL 6u
#define MMUEXT_INVLPG_LOCAL 7u
#define UVMF_INVLPG 2u                    /* update_va_mapping's flags (xen.h) */
#define UVMF_FLUSHTYPE_MASK 3u
#define FT_L2 3
#define DOMID_SELF 0x7FF0u
#define PTE_P 1u
#define PTE_RW 2u
#define PTE_PS 0x80u
#define FT_NONE 0
#define FT_WRITABLE 1
#define FT_L1 2
#define VCPU_CR2 8           /* vcpu_info.arch.cr2 (startinfo.py) */

static uint32_t rd(pv_t *s, void *uc, int r, int *err) {
    uint64_t v = 0;
    if (s->reg_read(uc, s->reg[r], &v)) *err = 1;
    return (uint32_t)v;
}

static int wr(pv_t *s, void *uc, int r, uint32_t value) {
    uint64_t v = value;       /* a buffer per write: a segment load re-reads it (regs.py) */
    return s->reg_write(uc, s->reg[r], &v);
}

/* The frame (pfn) of a machine frame number, or -1 when it is not the guest's (DirectPaging.pfn). */
static int64_t pfn_of(const pv_t *s, uint32_t mfn) {
    uint64_t base = s->ram_hpa >> 12;
    return mfn >= base && mfn - base < s->nr_pages ? (int64_t)(mfn - base) : -1;
}

/* One page-table write as DirectPaging.update_entry makes it, decided first (nothing changed) and made
 * later: on an L1 table, an entry that needs no table validated (not present, read-only, or writable onto
 * a frame of no type or of writable type: get_l1e), the old entry's writable reference put back
 * (put_l1e); on a frame of no type or writable type, a plain write. Anything else (an L2 table, a
 * refusal) is Python's. */
typedef struct {
    int64_t p, p2, p3;        /* the frame written; the new entry's writable frame; the old entry's */
    uint32_t off, val;
    int get_w, put_w;
} update_t;

static int update_decide(const pv_t *s, uint32_t ptr, uint32_t val, int l1_only, update_t *u) {
    uint32_t old;
    u->p = pfn_of(s, ptr >> 12);
    u->p2 = u->p3 = -1;
    u->off = ptr & 0xFFC;
    u->val = val;
    u->get_w = u->put_w = 0;
    if (u->p < 0) return 0;
    if (!s->frame_count[u->p] || s->frame_type[u->p] == FT_WRITABLE) return !l1_only;   /* a plain write */
    if (s->frame_type[u->p] != FT_L1) return 0;
    memcpy(&old, s->ram + (uint64_t)u->p * 4096 + u->off, 4);
    if (val & PTE_P) {                                 /* get_l1e */
        u->p2 = pfn_of(s, val >> 12);
        if (u->p2 < 0) return 0;
        if (val & PTE_RW) {
            if (s->frame_count[u->p2] && s->frame_type[u->p2] != FT_WRITABLE) return 0;
            u->get_w = 1;
        }
    }
    if ((old & PTE_P) && (old & PTE_RW)) {             /* put_l1e */
        u->p3 = pfn_of(s, old >> 12);
        if (u->p3 < 0 || s->frame_type[u->p3] != FT_WRITABLE
            || s->frame_count[u->p3] + (u->get_w && u->p2 == u->p3) == 0) return 0;
        u->put_w = 1;
    }
    return 1;
}

/* Make it; 1 when the engine's TLB must be flushed (put_type: a writable reference went). */
static int update_make(pv_t *s, const update_t *u) {
    uint32_t n;
    if (u->get_w) {
        if (s->frame_count[u->p2]) s->frame_count[u->p2]++;
        else {
            s->frame_type[u->p2] = FT_WRITABLE;
            s->frame_count[u->p2] = 1;
        }
    }
    memcpy(s->ram + (uint64_t)u->p * 4096 + u->off, &u->val, 4);
    if (!u->put_w) return 0;
    n = s->frame_count[u->p3] - 1;
    s->frame_count[u->p3] = n;
    if (n == 0) s->frame_type[u->p3] = FT_NONE;
    return 1;
}

/* The end of a page-table hypercall made here (ParaVcpu.hypercall): EAX = 0, the TLB flush
 * (flush_tlb: CR3 = DirectPaging.base). */
static void hypercall_done(pv_t *s, void *uc, int dirty, uint32_t cr3) {
    *s->in_upcall = 0;
    if (wr(s, uc, R_EAX, 0) || (dirty && wr(s, uc, R_CR3, cr3))) s->refused(HYPERCALL_VECTOR);
}

/* DirectPaging.flush_page: the guest asked for one page to go and nothing else in the hypercall needs
 * more. 0: the whole TLB must go (no page flush to call). */
static int flush_one(pv_t *s, uint32_t linear) {
    if (!s->flush_page) return 0;
    s->flush_page(s->cpu, linear & 0xFFFFF000u);
    return 1;
}

/* A hypercall from the kernel: 0 when Python must take it (ring 3, V86, an upcall due after it:
 * evtchn_upcall_pending with the mask clear). *base: DirectPaging.base, the directory the tables are
 * walked from and the CR3 a flush writes (flush_tlb). */
static int kernel_hypercall(pv_t *s, void *uc, uint32_t *base) {
    int err = 0;
    uint32_t cs = rd(s, uc, R_CS, &err), eflags = rd(s, uc, R_EFLAGS, &err);
    if (err || (cs & 3) != 1 || (eflags & EFLAGS_VM) || !s->frame_count || !s->base) return 0;
    *base = *s->base;
    return !(s->shared[0] && !s->shared[1]);
}

/* update_va_mapping (hypercalls.py, DirectPaging.l1_entry_for and update_entry), within
 * ParaVcpu.hypercall, when update_decide takes it; UVMF_TLB_FLUSH flushes the engine's TLB, UVMF_INVLPG
 * and a writable mapping gone through a table linked once page va (as flush_tlb). 1: done. */
static int pv_uva(pv_t *s, void *uc) {
    int err = 0, dirty;
    uint32_t va, lo, hi, flags, cr3, pde;
    int64_t p;
    update_t u;
    if (!s->uva_seen || !kernel_hypercall(s, uc, &cr3)) return 0;
    va = rd(s, uc, R_EBX, &err);
    lo = rd(s, uc, R_ECX, &err);
    hi = rd(s, uc, R_EDX, &err);
    flags = rd(s, uc, R_ESI, &err);
    if (err || hi || va >= s->hv_start) return 0;
    p = pfn_of(s, cr3 >> 12);
    if (p < 0) return 0;
    memcpy(&pde, s->ram + (uint64_t)p * 4096 + ((va >> 22) << 2), 4);
    if (!(pde & PTE_P) || (pde & PTE_PS)) return 0;
    if (!update_decide(s, (pde & 0xFFFFF000u) | ((va >> 10) & 0xFFC), lo, 1, &u)) return 0;
    vclock_advance(s->clock_now, s->clock_extra, s->hypercall_cycles);
    dirty = update_make(s, &u);
    /* The old writable mapping reaches the engine's TLB only at va when the table is linked once
     * (DirectPaging.update_entry with `linear`): that page goes, not the whole TLB. */
    if (dirty && s->frame_count[u.p] == 1 && flush_one(s, va)) dirty = 0;
    if (!dirty && (flags & UVMF_FLUSHTYPE_MASK) == UVMF_INVLPG) {
        if (!flush_one(s, va)) dirty = 1;
    } else if (flags & UVMF_FLUSHTYPE_MASK) {
        dirty = 1;                        /* UVMF_TLB_FLUSH, and 3 (undefined in Xen) */
    }
    hypercall_done(s, uc, dirty, cr3);
    s->uvas++;
    s->uvas_total++;
    return 1;
}

/* mmu_update (hypercalls.py) of one MMU_NORMAL_PT_UPDATE request, DOMID_SELF, no `done` pointer and no
 * continuation, when update_decide takes it: the request is read as Mmu.read_linear reads it (A bit,
 * counters), REQUEST_CYCLES charged. 1: done. */
static int pv_mmu_update(pv_t *s, void *uc) {
    int err = 0, dirty;
    uint32_t req, count, done_ptr, dom, cr3, r[4];
    uint64_t walks, refs;
    update_t u;
    if (!s->mmu_seen || !kernel_hypercall(s, uc, &cr3)) return 0;
    req = rd(s, uc, R_EBX, &err);
    count = rd(s, uc, R_ECX, &err);
    done_ptr = rd(s, uc, R_EDX, &err);
    dom = rd(s, uc, R_ESI, &err);
    if (err || count != 1 || done_ptr || dom != DOMID_SELF) return 0;
    walks = *s->walks;
    refs = *s->walk_refs;
    if (!s->linear(s->d, uc, req, 16, 0, (uint8_t *)r)) return 0;
    if ((r[0] & 3) || r[1] || r[3] || !update_decide(s, r[0] & ~3u, r[2], 0, &u)) {
        /* Python's: it reads the request again, in the same tables (the A bits this read set are
         * set), so only the walk's counters are put back */
        *s->walks = walks;
        *s->walk_refs = refs;
        return 0;
    }
    vclock_advance(s->clock_now, s->clock_extra, s->hypercall_cycles + s->request_cycles);
    dirty = update_make(s, &u);
    hypercall_done(s, uc, dirty, cr3);
    s->mmus++;
    s->mmus_total++;
    return 1;
}

/* mmuext_op (hypercalls.py) of one op, DOMID_SELF, no `done` pointer and no continuation:
 * MMUEXT_TLB_FLUSH_LOCAL and MMUEXT_INVLPG_LOCAL (a full flush of the engine's TLB, as flush_tlb), and
 * MMUEXT_NEW_BASEPTR to a directory already of type L2 (pinned, or the current one) when the old
 * directory keeps a reference (no table is validated or released: DirectPaging.new_baseptr's common
 * case). The op is read as Mmu.read_linear reads it, REQUEST_CYCLES charged. 1: done. */
static int pv_mmuext(pv_t *s, void *uc) {
    int err = 0;
    uint32_t ops, count, done_ptr, dom, cr3, op[3], base;
    uint64_t walks, refs;
    int64_t p = -1, p_old = -1;
    if (!s->mmuext_seen || !kernel_hypercall(s, uc, &cr3)) return 0;
    ops = rd(s, uc, R_EBX, &err);
    count = rd(s, uc, R_ECX, &err);
    done_ptr = rd(s, uc, R_EDX, &err);
    dom = rd(s, uc, R_ESI, &err);
    if (err || count != 1 || done_ptr || dom != DOMID_SELF) return 0;
    walks = *s->walks;
    refs = *s->walk_refs;
    if (!s->linear(s->d, uc, ops, 12, 0, (uint8_t *)op)) return 0;
    base = *s->base;
    if (op[0] == MMUEXT_NEW_BASEPTR) {
        p = pfn_of(s, op[1]);
        if (base) p_old = pfn_of(s, base >> 12);
        if (p < 0 || !s->frame_count[p] || s->frame_type[p] != FT_L2 || (base && p_old < 0)
            || (p_old >= 0 && s->frame_count[p_old] + (p == p_old) < 2)) p = -2;
    } else if (op[0] != MMUEXT_TLB_FLUSH_LOCAL && op[0] != MMUEXT_INVLPG_LOCAL) {
        p = -2;
    }
    if (p == -2) {     /* Python's: it reads the op again in the same tables; the walk's counters go back */
        *s->walks = walks;
        *s->walk_refs = refs;
        return 0;
    }
    vclock_advance(s->clock_now, s->clock_extra, s->hypercall_cycles + s->request_cycles);
    if (p >= 0) {      /* get_type(L2) on a typed directory, then put_type of the old one: counts only */
        s->frame_count[p]++;
        if (p_old >= 0) s->frame_count[p_old]--;
        *s->base = op[1] << 12;
    }
    hypercall_done(s, uc, !(op[0] == MMUEXT_INVLPG_LOCAL && flush_one(s, op[1])), *s->base);
    s->mmuexts++;
    s->mmuexts_total++;
    return 1;
}

/* HYPERVISOR_iret (hypercalls.py iret, within ParaVcpu.hypercall): 1 when done here. */
static int pv_iret(pv_t *s, void *uc) {
    int err = 0;
    uint32_t eax, cs, eflags, esp, frame[4], mask;
    uint64_t walks, refs;
    eax = rd(s, uc, R_EAX, &err);
    if (err) return 0;
    if (eax == HYPERCALL_UVA) return pv_uva(s, uc);
    if (eax == HYPERCALL_MMU_UPDATE) return pv_mmu_update(s, uc);
    if (eax == HYPERCALL_MMUEXT) return pv_mmuext(s, uc);
    if (eax != HYPERCALL_IRET || !s->iret_seen) return 0;
    cs = rd(s, uc, R_CS, &err);
    eflags = rd(s, uc, R_EFLAGS, &err);
    esp = rd(s, uc, R_ESP, &err);
    if (err || (cs & 3) != 1 || (eflags & EFLAGS_VM)) return 0;     /* refused: -EPERM, Python's */
    /* struct iret_context { eax, eip, cs, eflags, ... } at ESP, read as Mmu.read_linear reads it; an
     * upcall that the new mask makes deliverable is Python's, which reads the frame again in the same
     * tables (the A bits this read set are set): only the walk's counters are put back then */
    walks = *s->walks;
    refs = *s->walk_refs;
    if (!s->linear(s->d, uc, esp, 16, 0, (uint8_t *)frame)) return 0;
    mask = (frame[3] & EFLAGS_IF) ? 0 : 1;
    if (s->shared[0] && !mask) {
        *s->walks = walks;
        *s->walk_refs = refs;
        return 0;
    }
    *s->in_upcall = 0;
    vclock_advance(s->clock_now, s->clock_extra, s->hypercall_cycles);     /* VirtualClock.advance(HYPERCALL_CYCLES) */
    s->shared[1] = (uint8_t)mask;
    if (wr(s, uc, R_EAX, frame[0]) || wr(s, uc, R_ESP, esp + 4) || wr(s, uc, R_EIP, s->iret_eip)) {
        s->refused(HYPERCALL_VECTOR);
        return 1;
    }
    s->irets++;
    s->irets_total++;
    return 1;
}

/* Load the ring-1 SS from ring 3 inside a hook, as ParaVcpu._enter_ring1_stack: CPL 1 in the saved
 * context's hflags first (the engine checks SS.RPL against it), then SS. */
static int enter_ring1_stack(pv_t *s, void *uc, uint32_t ss) {
    uint32_t hflags;
    if (s->context_save(uc, s->context)) return 1;
    memcpy(&hflags, s->context_hflags, 4);
    hflags = (hflags & ~3u) | 1u;
    memcpy(s->context_hflags, &hflags, 4);
    if (s->context_restore(uc, s->context)) return 1;
    return wr(s, uc, R_SS, ss);
}

#define DELIVERED 1
#define FALLBACK 0
#define ENGINE_REFUSED (-1)   /* a register write refused after the frame was written */

/* ParaVcpu.bounce through trap-table entry `t`, the frame's return address `eip` (and `error_code`
 * when has_ec), from the running CS and EFLAGS: FALLBACK having changed nothing when Python must
 * (the crash of a missing kernel stack, a frame that would fault). */
static int bounce_frame(pv_t *s, void *uc, const trap_t *t, uint32_t eip, uint32_t old_cs, uint32_t eflags,
                        int has_ec, uint32_t error_code) {
    int err = 0;
    uint32_t cpl = old_cs & 3, mask = s->shared[1], esp, ss = 0, n = 0, frame[6];
    if (cpl == 3 && !s->kstack_set) return FALLBACK;
    if (has_ec) frame[n++] = error_code;
    frame[n++] = eip;
    frame[n++] = (old_cs & 0xFFFFu) | (mask << 16);
    frame[n++] = (eflags & ~EFLAGS_IF) | (mask ? 0 : EFLAGS_IF);
    if (cpl == 3) {
        ss = s->kstack_ss;
        esp = s->kstack_esp;
        frame[n++] = rd(s, uc, R_ESP, &err);
        frame[n++] = rd(s, uc, R_SS, &err);
    } else {
        esp = rd(s, uc, R_ESP, &err);
    }
    if (err) return FALLBACK;
    esp -= n * 4;
    if (!s->linear(s->d, uc, esp, n * 4, 1, (uint8_t *)frame)) return FALLBACK;   /* Python crashes the domain */
    if ((ss && enter_ring1_stack(s, uc, ss)) || wr(s, uc, R_ESP, esp)
        || ((cpl == 3 || old_cs != t->cs) && wr(s, uc, R_CS, t->cs))
        || wr(s, uc, R_EFLAGS, (eflags & ~(EFLAGS_TF | EFLAGS_NT | EFLAGS_RF | EFLAGS_VM)) | EFLAGS_IF)
        || wr(s, uc, R_EIP, t->address))
        return ENGINE_REFUSED;
    if (t->flags & 4) s->shared[1] = 1;
    s->bounced++;
    return DELIVERED;
}

/* An `int n`/int3 (is_int) or a fault the engine raised, through the trap table
 * (ParaVcpu._deliver_engine_event, trap, bounce): 1 when done. */
static int pv_bounce(pv_t *s, void *uc, uint32_t intno) {
    int err = 0, r;
    int32_t is_int, old;
    uint32_t eip, start = 0, eflags, old_cs, error_code = 0, has_ec = 0;
    uint8_t prev;
    const trap_t *t;
    if (intno > 255 || !s->trap_table_set || s->traced) return 0;
    t = &s->trap[intno];
    if (!t->present) return 0;
    if (s->context_save(uc, s->context)) return 0;
    memcpy(&is_int, s->context_is_int, 4);
    eip = rd(s, uc, R_EIP, &err);
    eflags = rd(s, uc, R_EFLAGS, &err);
    old_cs = rd(s, uc, R_CS, &err);
    if (err || (eflags & EFLAGS_VM)) return 0;      /* V86: CPL 3 whatever CS says: Python's */
    if (is_int) {
        /* int3 (CC) and into (CE) are 1 byte, int n 2 (ParaVcpu._deliver_engine_event) */
        if (!s->peek(s->d, uc, eip - 1, 1, &prev)) return 0;
        start = eip - ((prev == 0xCC || prev == 0xCE) ? 1 : 2);
        if ((uint32_t)(t->flags & 3) < (old_cs & 3)) return 0;   /* above the entry's DPL: #GP, Python's */
    } else {
        if (intno == 3 || intno == 4) return 0;        /* #BP, #OF not from int3/into: Python's */
        if (s->has_error_code[intno >> 5] & (1u << (intno & 31))) {
            memcpy(&error_code, s->context_error_code, 4);
            has_ec = 1;
        }
    }
    if ((old_cs & 3) == 3 && !s->kstack_set) return 0;
    /* FaultState.take: the event is marked delivered (QEMU's old_exception = -1); the Python path
     * makes the same mark again if the bounce sends the event there after all */
    memcpy(&old, s->context_old_exception, 4);
    if (old != -1) {
        old = -1;
        memcpy(s->context_old_exception, &old, 4);
        if (s->context_restore(uc, s->context)) return 0;
    }
    r = bounce_frame(s, uc, t, eip, old_cs, eflags, (int)has_ec, error_code);
    if (r == FALLBACK) return 0;
    if (r == ENGINE_REFUSED) {
        s->refused(intno);
        return 1;
    }
    if (is_int) s->books_soft(s->d, intno, start, eip);
    else s->books_fault(s->d, intno, eip);
    return 1;
}

/* The guest #PF that cpu/_delivery.c's delivery_pf_hook found in the TLB fill (the walk of direct
 * paging, the error code, CR2 as Vcpu.exact_linear finds it), bounced as ParaVcpu.page_fault does:
 * CR2 in vcpu_info.arch.cr2, the frame with the error code through entry 14. Only when the run loop's
 * turn that the Python path makes would do nothing else: no upcall pending (before_entry, the mask's
 * trace). delivery_pf_hook makes the walk's A bit, the counters and the bookkeeping. */
int pv_page_fault(void *pv, void *uc, uint32_t eip, uint32_t error_code, uint32_t cr2) {
    pv_t *s = (pv_t *)pv;
    int err = 0, r;
    uint32_t eflags, cs, old_cr2;
    const trap_t *t = &s->trap[14];
    if (!s->enabled || !s->trap_table_set || s->traced || !t->present || s->shared[0]) return FALLBACK;
    eflags = rd(s, uc, R_EFLAGS, &err);
    cs = rd(s, uc, R_CS, &err);
    if (err || (eflags & EFLAGS_VM)) return FALLBACK;
    memcpy(&old_cr2, s->shared + VCPU_CR2, 4);
    memcpy(s->shared + VCPU_CR2, &cr2, 4);          /* EventChannels.set_cr2, before the frame */
    r = bounce_frame(s, uc, t, eip, cs, eflags, 1, error_code);
    if (r == FALLBACK) memcpy(s->shared + VCPU_CR2, &old_cr2, 4);
    return r;
}

void pv_intr_hook(void *uc, uint32_t intno, void *user_data) {
    pv_t *s = (pv_t *)user_data;
    if (s->enabled && (intno == HYPERCALL_VECTOR ? pv_iret(s, uc) : pv_bounce(s, uc, intno))) return;
    s->python_intr(uc, intno, NULL);
}

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_pvfast", NULL, -1, NULL};

PyMODINIT_FUNC PyInit__pvfast(void) { return PyModule_Create(&module); }
