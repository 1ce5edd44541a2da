/*
 * The common case of event delivery through the guest IDT, in C (SDM Vol. 3A 6.12.1, "Exception- and
 * Interrupt-Handler Procedures"). EventDelivery (cpu/events.py) stays the complete, reference path:
 * this function answers only a protected-mode delivery through a present 32-bit interrupt or trap gate
 * to a present, non-conforming code segment in the GDT, at the same privilege or from CPL > 0 to ring 0
 * with the stack from the TSS, outside virtual-8086 mode, where no read of the IDT, GDT or TSS and no
 * push of the frame faults, and every byte it touches is guest RAM. Anything else returns FALLBACK
 * having changed nothing, and Python delivers the event (task gates, #DF rules, faults during
 * delivery, V86, real mode, LDT selectors, conforming code, rings 1 and 2 as targets...).
 *
 * When it delivers, it leaves exactly the state the Python path leaves: the same registers written in
 * the same order (segment loads make the engine read descriptors through the TLB-fill hooks, so the
 * order is observable), the same frame, the same accessed/dirty bits set in the same order by the same
 * walks (memory/walk.py is the model), and the same walk counters. tests/test_fast_delivery.py checks
 * that against the Python path on random descriptor tables and page tables.
 *
 * The state is owned by Python (cpu/fastdelivery.py) and passed in; guest RAM is read and written
 * directly (it is cpuvirt's own buffer, guest-physical 0 at `ram`), never outside [0, ram_bytes).
 * Built as a Python extension only so that setuptools compiles it; Python calls it through ctypes.
 */
#include <Python.h>
#include <stdint.h>
#include <string.h>

#include "../memory/_shadowmirror.h"   /* hw --no-ept: the shadow root the hypervisor's accesses use */
#include "_blockcopy.h"                 /* the copy of Machine.block_insns, shared with trap's and full's */
#include "_modrm.h"                     /* the ModRM memory operand, shared with trap's */
#include "../engine/_vclock.h"   /* the clock's interrupt-window look (its stubs' limit) */
#include "../engine/_tlbhook.h"   /* the TLB-fill hook's entry and access types */

typedef int (*reg_read_fn)(void *uc, int regid, void *value);
typedef int (*reg_write_fn)(void *uc, int regid, const void *value);
typedef int (*context_fn)(void *uc, void *context);
typedef void (*intr_fn)(void *uc, uint32_t intno, void *user_data);
typedef void (*soft_fn)(uint32_t vector, uint32_t start, uint32_t eip);
typedef void (*fault_fn)(uint32_t vector, uint32_t eip);
typedef void (*code_fn)(void *uc, uint64_t address, uint32_t size, void *user_data);
typedef void (*pf_fn)(uint32_t eip, uint32_t access);
typedef void (*loop_exit_fn)(void *cpu);

/* uc_x86_mmr: a descriptor-table register (GDTR, IDTR, LDTR, TR) as libunicorn passes it. */
typedef struct {
    uint16_t selector;
    uint64_t base;
    uint32_t limit;
    uint32_t flags;
} mmr_t;

enum { R_EAX, R_ESP, R_EIP, R_EFLAGS, R_CS, R_SS, R_CR0, R_CR3, R_CR4, R_GDTR, R_IDTR, R_TR,
       R_CR2, R_ECX, R_EDX, R_EBX, R_EBP, R_ESI, R_EDI, R_COUNT };

typedef struct {
    uint8_t *ram;            /* guest RAM, guest-physical 0 */
    uint64_t ram_bytes;      /* every access stays below this */
    reg_read_fn reg_read;
    reg_write_fn reg_write;
    context_fn context_save; /* uc_context_save / uc_context_restore, for the ring-0 SS load */
    context_fn context_restore;
    void *context;           /* a uc_context of this engine */
    uint8_t *context_hflags; /* QEMU's env->hflags inside that context (quirks.py finds the offset) */
    uint8_t *context_ss;     /* env->segs[R_SS].selector inside it */
    int32_t reg[R_COUNT];    /* Unicorn register ids */
    uint32_t enabled;
    uint64_t walks, walk_refs;       /* added to Mmu.counters, as the Python walk counts them */
    uint64_t delivered, fallbacks;
    /* The INTR hook (delivery_intr_hook): */
    intr_fn python_intr;     /* the vCPU's own INTR hook (Vcpu.hook_intr, guarded): everything else */
    soft_fn soft_done;       /* Python's bookkeeping of an `int n` delivered here (counts, the clock) */
    fault_fn fault_done;     /* the same for a fault (and the block's unretired instructions) */
    uint8_t *context_is_int; /* QEMU's exception_is_int, old_exception, error_code inside `context` */
    uint8_t *context_old_exception;
    uint8_t *context_error_code;
    uint32_t has_error_code[8];  /* bit v: vector v pushes an error code (x86/vectors.py HAS_ERROR_CODE) */
    uint64_t soft_delivered, faults_delivered;
    /* The iret sites (delivery_iret_hook): */
    uint32_t nmi_blocked;        /* Vcpu.nmi_blocked, kept equal by Python */
    uint32_t pad;
    uint32_t *clock_watch_if;    /* the virtual clock's watch_if and check_if (engine/_vclock.c) */
    uint32_t *clock_check_if;
    uint64_t irets;
    /* The native guest #PF (delivery_pf_hook): */
    uint32_t pf_enabled;
    uint32_t busy;               /* delivery_fast is running: its fills are never the guest's own access */
    uint64_t cpu_offset;         /* where libunicorn's uc_struct holds its CPUState pointer */
    loop_exit_fn loop_exit;      /* QEMU's cpu_loop_exit: leave the faulting instruction */
    pf_fn pf_done;               /* Python's bookkeeping of a #PF delivered here (counts, the clock) */
    uint64_t pf_fills, pf_faults; /* added to Mmu.counters as Mmu.fill counts a refused fill */
    /* hw with EPT: every guest-physical reference through the EPT tables (memory/nested.py's EptWalk) */
    uint32_t ept;                /* 0: guest-physical = offset in `ram` (native) */
    uint32_t pad2;
    const uint8_t *hv;           /* the hypervisor's region holding the EPT tables, at host-physical hv_hpa */
    uint64_t hv_hpa, hv_size;
    uint64_t pml4;               /* EPT_POINTER's PML4 address */
    uint64_t ram_hpa;            /* where `ram` is in host-physical memory */
    /* The virtual clock (engine/_vclock.c), for the time a fetch fault costs (Vcpu.charge_fault): */
    const vclock_time_t *clock_now;   /* the clock's time (engine/_vclock.h) */
    const uint64_t *clock_deadline;
    const uint32_t *clock_stop_next;
    uint64_t fetch_fault_cycles;
    struct books *books;         /* native's event bookkeeping in C (delivery_books_*), or NULL */
    /* hw (VMX non-root operation): which events the processor delivers without a VM exit (SDM Vol. 3C
     * 25.2), from the VMCS as of the last VM entry (modes/hw/vmx.py VmxCpu._arm_delivery) */
    uint32_t vmx;                /* 1: the hooks apply hw's rules below (and leave IF to VM entry) */
    uint32_t vmx_armed;          /* the copies below are the VMCS's: 0 after any vmwrite, until the entry */
    uint32_t exception_bitmap;   /* EXCEPTION_BITMAP */
    uint32_t pfec_mask, pfec_match;  /* PAGE_FAULT_ERROR_CODE_MASK / _MATCH */
    uint32_t window_exiting;     /* "interrupt-window exiting": the run loop's next entry may exit */
    int (*quiet)(void *);        /* modes/hw/_fastexit.c fastexit_quiet: the next entry would do nothing */
    void *quiet_state;
    /* para (modes/para/pvfast.py): direct paging's tables hold machine addresses (ram_hpa + offset in
     * `ram`, as _tlbfill.c's hv_start mode), linear addresses from hv_start up are the hypervisor's
     * window (Python's), and an iretd at CPL > 0 stays in C when its EFLAGS image has neither VM nor RF. */
    uint32_t machine_addrs;
    uint32_t hv_start;
    uint32_t iret_any_cpl;
    uint32_t pad3;
    /* para: delivery_pf_hook hands the guest #PF it found to para's bounce (modes/para/_pvfast.c
     * pv_page_fault: CR2 in vcpu_info, the frame through the trap table) instead of the IDT */
    int (*pv_pf)(void *pv, void *uc, uint32_t eip, uint32_t error_code, uint32_t cr2);
    void *pv;
    /* hw without EPT (modes/hw/vmx.py _mirror_shadow): delivery_peek reads guest code over the guest's
     * own tables only while memory/shadow.py's shadow of them is current, so that it gives what the
     * Python read (a shadow entry when there is one) gives, and Python's read would change nothing: the
     * shadow's paging mode (CR0.PG | CR4.PSE) and root (CR3's frame) are the running ones, no frame is
     * untraced (`unsync`), and CR0.WP is set (a read through a read-only dirty entry with WP clear would
     * set the shadow's WP grant). shadow_ok = 0: every peek is Python's. */
    uint32_t shadow;             /* 1: the guard below applies */
    uint32_t shadow_ok;          /* Python's last look found the shadow current, nothing dirtied since */
    uint32_t shadow_mode;        /* ShadowPaging._mode then */
    uint32_t shadow_key;         /* ShadowPaging._cur_key then */
    /* hw without EPT, deliveries (and delivery_linear): the hypervisor's own accesses go through
     * shadow paging's current root as ShadowPaging.gva_to_gpa answers them with no side effect, from
     * its C copy (memory/shadowmirror.py); a page it has no such entry for is Python's (its walk is
     * counted), and so is a write to a write-traced frame (Mmu.write_linear tells the owners). NULL:
     * the guest's own tables are walked (native, EPT, para). */
    const shadowmirror_t *mirror;
    /* rd() reads a register at env + at[r] - 1 in the engine's CPU state, the field uc_reg_read returns
     * (its low 32 bits), where at[r] is not 0 (engine/internals.py register_offsets): a call through the
     * API costs a tenth of a delivery's own work per register. EFLAGS and the table registers are
     * computed by the API (0 here). env NULL: every read through the API. */
    const uint8_t *env;
    uint32_t at[R_COUNT];
    uint32_t pad4;
} delivery_t;

/* One intercepted iret: its bytes when it was decoded, and the Python hook behind it. */
typedef struct {
    delivery_t *s;
    code_fn python;          /* Intercepts._hit, guarded */
    uint32_t size;
    uint32_t wide;           /* iretd */
    uint8_t bytes[16];
} iret_site_t;

size_t delivery_iret_site_sizeof(void) { return sizeof(iret_site_t); }

/* One intercepted mov to CR4 from a general register (see delivery_cr4_hook). */
typedef struct {
    delivery_t *s;
    code_fn python;          /* Intercepts._hit, guarded */
    uint32_t size;
    int32_t src_reg;         /* the Unicorn id of the source register */
    uint32_t reserved;       /* CR4 bits the CPU model lacks (x86/cpuid.py CR4_RESERVED) */
    uint32_t pad;
    uint64_t passed;         /* times the common case was answered here */
    uint8_t bytes[16];
} cr4_site_t;

size_t delivery_cr4_site_sizeof(void) { return sizeof(cr4_site_t); }

/* One intercepted in/out/ins/outs (see delivery_io_hook). */
typedef struct {
    delivery_t *s;
    code_fn python;          /* Intercepts._hit, guarded */
    uint32_t size;
    uint32_t pad;
    uint64_t passed;         /* times the common case was answered here */
    uint8_t bytes[16];
} io_site_t;

size_t delivery_io_site_sizeof(void) { return sizeof(io_site_t); }

size_t delivery_sizeof(void) { return sizeof(delivery_t); }

#define FALLBACK 0
#define DELIVERED 1
#define ENGINE_REFUSED (-1)    /* a register write was refused after the frame was pushed */

#define F_ERROR_CODE 1
#define F_SOFT 2               /* int n, int3, into: the gate's DPL is checked (SDM 6.12.1.1) */
#define F_EXTERNAL 4           /* the EXT bit of error codes: only a fault path uses it */
#define F_LEAVES_BLOCK 8       /* the caller leaves the engine's block itself (the interrupt hook, a path
                                * that ends in cpu_loop_exit): EIP goes into the CPU state, not through
                                * uc_reg_write, whose EIP makes the engine leave its loop and enter it again */

#define PTE_P 0x1u
#define PTE_RW 0x2u
#define PTE_A 0x20u
#define PTE_D 0x40u
#define PTE_PS 0x80u
#define CR0_PE 0x1u
#define CR0_WP 0x10000u
#define CR0_PG 0x80000000u
#define CR4_PSE 0x10u
#define EFLAGS_TF 0x100u
#define EFLAGS_IF 0x200u
#define EFLAGS_NT 0x4000u
#define EFLAGS_RF 0x10000u
#define EFLAGS_VM 0x20000u
#define GATE_INT32 0xEu
#define GATE_TRAP32 0xFu
#define HF_CPL_MASK 3u

static uint64_t rd(delivery_t *s, void *uc, int r, int *err) {
    uint64_t v = 0;
    if (s->env && s->at[r]) {
        uint32_t low;
        memcpy(&low, s->env + s->at[r] - 1, 4);
        return low;
    }
    if (s->reg_read(uc, s->reg[r], &v)) *err = 1;
    return v;
}

static int wr(delivery_t *s, void *uc, int r, uint64_t value) {
    uint64_t v = value & 0xFFFFFFFFu;   /* a buffer per write: a segment load re-reads it (regs.py) */
    return s->reg_write(uc, s->reg[r], &v);
}

/* The handler's EIP (F_LEAVES_BLOCK: in the CPU state; cpu/_evseg.h ev_set_eip says why). */
static int wr_eip(delivery_t *s, void *uc, uint32_t eip, int flags) {
    if ((flags & F_LEAVES_BLOCK) && s->env && s->at[R_EIP]) {
        uint64_t v = eip;
        memcpy((uint8_t *)s->env + s->at[R_EIP] - 1, &v, 8);
        return 0;
    }
    return wr(s, uc, R_EIP, eip);
}

/* ---- the guest page walk, 32-bit paging (SDM 4.3, 4.6, 4.8), supervisor accesses only ------------
 * The same decisions as memory/walk.py for user = False: a walk that would fault, or that reaches a
 * paging structure or a frame outside RAM, or a 4 MiB page with PSE-36 bits, returns -1 (Python then
 * delivers, and raises the guest's #PF itself). With `side` = 0 it only looks; with `side` = 1 it sets
 * A (and D for a write) exactly as walk.py does, logging each entry it changes (so that a pass that
 * must fall back after all can put memory back), and counts walks and references as Mmu does. */
typedef struct { uint32_t cr0, cr3, cr4; } crs_t;

#define UNDO_MAX 32
typedef struct {
    uint32_t n;
    uint64_t off[UNDO_MAX];    /* where in `ram` */
    uint32_t old[UNDO_MAX];
} undo_t;

typedef struct {
    delivery_t *s;
    crs_t c;
    int side;          /* make the accesses for real (A/D bits, counters, the frame) */
    int shadow;        /* through s->mirror (a delivery or delivery_linear under hw --no-ept) */
    undo_t undo;
} pass_t;

#define EPT_R 1u
#define EPT_W 2u
#define EPT_ADDR 0x000FFFFFFFFFF000ull

/* Where guest-physical [gpa, gpa + n) is in guest RAM (an offset into `ram`) for an access needing the
 * EPT right `bit`: itself natively; under EPT through the four levels of the tables, as Ept.translate
 * (SDM Vol. 3C 29.3), adding to *refs the 4 entries a translation reads. -1: not guest RAM, or an entry on
 * the way without the right (Python then has the EPT violation, the misconfiguration or the device). */
static int64_t ram_at(const delivery_t *s, uint64_t gpa, uint32_t n, uint32_t bit, uint32_t *refs) {
    uint64_t table, entry, slot, hpa;
    int shift;
    if (!s->ept) {
        if (s->machine_addrs) {                      /* para: a machine address (direct paging) */
            if (gpa < s->ram_hpa) return -1;
            gpa -= s->ram_hpa;
        }
        return gpa + n <= s->ram_bytes ? (int64_t)gpa : -1;
    }
    table = s->pml4;
    for (shift = 39; shift >= 12; shift -= 9) {
        slot = table + ((gpa >> shift) & 0x1FF) * 8;
        if (slot < s->hv_hpa || slot + 8 > s->hv_hpa + s->hv_size) return -1;
        memcpy(&entry, s->hv + (slot - s->hv_hpa), 8);
        if (!(entry & EPT_R) || !(entry & bit)) return -1;
        table = entry & EPT_ADDR;
    }
    *refs += 4;
    hpa = table | (gpa & 0xFFF);
    if (hpa < s->ram_hpa || hpa - s->ram_hpa + n > s->ram_bytes) return -1;
    return (int64_t)(hpa - s->ram_hpa);
}

/* A paging-structure entry read by the walk (EptWalk.read32); 0: leave it to Python. */
static int entry_at(delivery_t *s, uint64_t gpa, uint32_t *out, uint32_t *refs) {
    int64_t off = ram_at(s, gpa, 4, EPT_R, refs);
    if (off < 0) return 0;
    memcpy(out, s->ram + off, 4);
    return 1;
}

/* The walk's A/D update of an entry (EptWalk.write32: a translation for writing of its own). */
static int set_entry(pass_t *w, uint64_t gpa, uint32_t old, uint32_t value, uint32_t *refs) {
    int64_t off = ram_at(w->s, gpa, 4, EPT_W, refs);
    if (off < 0) return 0;
    w->undo.off[w->undo.n] = (uint64_t)off;
    w->undo.old[w->undo.n++] = old;
    memcpy(w->s->ram + off, &value, 4);
    return 1;
}

static int64_t walk(pass_t *w, uint32_t gva, int write) {
    delivery_t *s = w->s;
    const crs_t *c = &w->c;
    uint64_t pde_addr, leaf_addr, gpa;
    uint32_t pde, leaf, rights, refs, erefs = 0;
    int large, writable;
    if (!(c->cr0 & CR0_PG)) return s->machine_addrs ? -1 : (int64_t)gva;   /* no paging: identity, nothing counted */
    if (w->shadow) return sm_hv_gpa(s->mirror, c->cr0, c->cr3, c->cr4, gva, write, 0);   /* hw --no-ept */
    if (s->hv_start && gva >= s->hv_start) return -1;   /* para: the hypervisor's window is Python's */
    if (w->undo.n + 2 > UNDO_MAX) return -1;
    pde_addr = (c->cr3 & 0xFFFFF000u) | ((gva >> 20) & 0xFFC);
    if (!entry_at(s, pde_addr, &pde, &erefs) || !(pde & PTE_P)) return -1;
    if ((pde & PTE_PS) && (c->cr4 & CR4_PSE)) {
        if (pde & 0x003FE000u) return -1;            /* reserved bit 21 (#PF), or above 4 GiB */
        large = 1;
        refs = 1;
        leaf = rights = pde;
        leaf_addr = pde_addr;
    } else {
        large = 0;
        refs = 2;
        if (!(pde & PTE_A) && w->side) {             /* the PDE is used: accessed (SDM 4.8) */
            if (!set_entry(w, pde_addr, pde, pde | PTE_A, &erefs)) return -1;
            pde |= PTE_A;
            refs = 3;
        }
        leaf_addr = (pde & 0xFFFFF000u) | ((gva >> 10) & 0xFFC);
        if (!entry_at(s, leaf_addr, &leaf, &erefs) || !(leaf & PTE_P)) return -1;
        rights = pde & leaf;
    }
    writable = (rights & PTE_RW) || !(c->cr0 & CR0_WP);   /* supervisor rights (SDM 4.6) */
    if (write) {
        if (!writable) return -1;
        if ((leaf & (PTE_A | PTE_D)) != (PTE_A | PTE_D) && w->side) {
            if (!set_entry(w, leaf_addr, leaf, leaf | PTE_A | PTE_D, &erefs)) return -1;
            leaf |= PTE_A | PTE_D;
            refs++;
        }
    } else if (!(leaf & PTE_A) && w->side) {
        if (!set_entry(w, leaf_addr, leaf, leaf | PTE_A, &erefs)) return -1;
        leaf |= PTE_A;
        refs++;
    }
    gpa = large ? (leaf & 0xFFC00000u) | (gva & 0x003FFFFFu) : (leaf & 0xFFFFF000u) | (gva & 0xFFFu);
    if (w->side) {
        s->walks++;
        s->walk_refs += refs + erefs;     /* under EPT its references too, as EptWalk counts them */
    }
    return (int64_t)gpa;
}

/* A linear access of n <= 24 bytes as Mmu.read_linear / write_linear make it: one walk per page
 * touched, low page first, every page guest RAM (under EPT the final guest-physical address translated
 * too, and counted, as EptWalk.gpa_to_hpa does). A read copies the bytes into buf; a write translates
 * all its pages first (a fault writes nothing) and copies buf out only in a pass with side effects. */
static int linear(pass_t *w, uint32_t gva, uint32_t n, int write, uint8_t *buf) {
    uint64_t gpas[2];
    uint32_t sizes[2], pieces = 0, done = 0, i;
    while (done < n) {
        uint32_t a = gva + done, chunk = 0x1000 - (a & 0xFFF), erefs = 0;
        int64_t gpa;
        if (chunk > n - done) chunk = n - done;
        if (pieces == 2) return 0;
        gpa = walk(w, a, write);
        if (gpa >= 0) gpa = ram_at(w->s, (uint64_t)gpa, chunk, write ? EPT_W : EPT_R, &erefs);
        if (gpa < 0) return 0;                       /* a fault, or not RAM */
        if (write && w->shadow && sm_traced(w->s->mirror, (uint64_t)gpa)) return 0;   /* hv_wrote: Python's */
        if (w->side) w->s->walk_refs += erefs;
        gpas[pieces] = (uint64_t)gpa;
        sizes[pieces++] = chunk;
        done += chunk;
    }
    if (write && !w->side) return 1;
    for (i = 0, done = 0; i < pieces; done += sizes[i], i++) {
        if (write) memcpy(w->s->ram + gpas[i], buf + done, sizes[i]);
        else memcpy(buf + done, w->s->ram + gpas[i], sizes[i]);
    }
    return 1;
}

/* A read of a system table at base + offset (IDT, GDT, TSS): Python adds them without wrapping, so an
 * access past 4 GiB is not the wrapped one: leave it to Python. */
static int table_read(pass_t *w, uint64_t base, uint32_t offset, uint32_t n, uint8_t *buf) {
    if (base + offset + n > 0x100000000ull) return 0;
    return linear(w, (uint32_t)(base + offset), n, 0, buf);
}

static uint32_t le32(const uint8_t *p) {
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* The high word of a GDT descriptor (SDM 3.4.5) with EventDelivery._descriptor's checks; 0: fall back
 * (an LDT selector, a null one, one beyond the limit: Python raises or reads the LDT). */
static int gdt_descriptor(pass_t *w, const mmr_t *gdt, uint32_t selector, uint32_t *hi) {
    uint8_t d[8];
    uint32_t index = selector & ~7u;
    if ((selector & 4) || index == 0 || index + 7 > gdt->limit) return 0;
    if (!table_read(w, gdt->base, index, 8, d)) return 0;
    *hi = le32(d + 4);
    return 1;
}

/* ---- one delivery -------------------------------------------------------------------------------- */
typedef struct {
    uint32_t selector, offset, gate_type, cpl, new_cpl, eflags, old_cs, esp, new_ss, frame_n;
    uint32_t frame[6];
} plan_t;

/* Every check of EventDelivery._deliver, in its order, with every guest-memory access it makes, the
 * frame pushed last (SDM 6.12.1). 0: the Python path must deliver this event. */
static int deliver_pass(pass_t *w, void *uc, uint32_t vector, uint32_t return_eip, uint32_t error_code,
                        int flags, plan_t *p) {
    delivery_t *s = w->s;
    int err = 0;
    mmr_t idt, gdt, tr;
    uint8_t gate[8], slot[6], frame[24];
    uint32_t lo, hi, dhi, shi, code_dpl, i, n = 0;
    if (s->reg_read(uc, s->reg[R_IDTR], &idt) || s->reg_read(uc, s->reg[R_GDTR], &gdt)) return 0;
    /* The gate (SDM 6.10, 6.11): inside the IDT's limit, a present 32-bit interrupt or trap gate. */
    if ((uint64_t)vector * 8 + 7 > idt.limit) return 0;                  /* #GP */
    if (!table_read(w, idt.base, vector * 8, 8, gate)) return 0;
    lo = le32(gate);
    hi = le32(gate + 4);
    p->gate_type = (hi >> 8) & 0x1F;
    p->cpl = (uint32_t)rd(s, uc, R_CS, &err) & 3;
    p->eflags = (uint32_t)rd(s, uc, R_EFLAGS, &err);
    if (err || (p->eflags & EFLAGS_VM)) return 0;                 /* virtual-8086 mode: Python */
    if (p->gate_type != GATE_INT32 && p->gate_type != GATE_TRAP32) return 0;   /* task gate, or #GP */
    if ((flags & F_SOFT) && ((hi >> 13) & 3) < p->cpl) return 0;  /* int n above the gate's DPL: #GP */
    if (!(hi & 0x8000)) return 0;                                 /* #NP */
    p->selector = lo >> 16;
    p->offset = (lo & 0xFFFF) | (hi & 0xFFFF0000u);
    /* The handler's code segment (SDM 6.12.1): code, DPL <= CPL, present; conforming ones: Python. */
    if (!gdt_descriptor(w, &gdt, p->selector, &dhi)) return 0;
    if (!((dhi >> 11) & 1) || !((dhi >> 12) & 1)) return 0;
    code_dpl = (dhi >> 13) & 3;
    if (code_dpl > p->cpl || !(dhi & 0x8000) || ((dhi >> 10) & 1)) return 0;
    p->new_cpl = code_dpl;
    p->old_cs = (uint32_t)rd(s, uc, R_CS, &err) & 0xFFFF;
    /* Through the shadow (hw --no-ept) the engine's own segment loads below must not write an accessed
     * bit: that store's fill may miss the shadow, which refuses a guest access (a #PF exit); Python's
     * loads are served there (Regs.loading_descriptor). Descriptors already accessed only, then, where
     * CS is loaded at all (deliver_fast keeps CS when the selector and CPL stay: no load, no A bit, as
     * the Python path; a kernel that never left ring 0 has a code descriptor the CPU never marked). */
    if (w->shadow && !(dhi & 0x100) && ((p->old_cs & ~3u) != (p->selector & ~3u) || p->new_cpl != p->cpl))
        return 0;
    p->frame[n++] = return_eip;
    p->frame[n++] = p->old_cs;
    p->frame[n++] = p->eflags;
    if (p->new_cpl < p->cpl) {
        /* The stack switch from the TSS (SDM 6.12.1, 7.2.1), only to ring 0 here. */
        uint32_t ss_slot = 4 + 8 * p->new_cpl;
        if (p->new_cpl != 0) return 0;
        if (s->reg_read(uc, s->reg[R_TR], &tr) || ss_slot + 5 > tr.limit) return 0;   /* #TS */
        if (!table_read(w, tr.base, ss_slot, 6, slot)) return 0;
        p->esp = le32(slot);
        p->new_ss = slot[4] | (uint32_t)slot[5] << 8;
        if ((p->new_ss & ~3u) == 0) return 0;                                      /* #TS */
        if (!gdt_descriptor(w, &gdt, p->new_ss, &shi)) return 0;
        /* A present, writable data segment with RPL = DPL = the new CPL (else #TS, or #SS). */
        if ((p->new_ss & 3) != 0 || ((shi >> 13) & 3) != 0 || !(shi & (1u << 12)) || (shi & (1u << 11))
            || !(shi & (1u << 9)) || !(shi & 0x8000)) return 0;
        if (w->shadow && !(shi & 0x100)) return 0;                    /* (as the code segment's) */
        p->frame[n++] = (uint32_t)rd(s, uc, R_ESP, &err);
        p->frame[n++] = (uint32_t)rd(s, uc, R_SS, &err) & 0xFFFF;
    } else {
        p->new_ss = 0;
        p->esp = (uint32_t)rd(s, uc, R_ESP, &err);
    }
    if (err) return 0;
    if (flags & F_ERROR_CODE) {                       /* the error code goes below EIP (SDM 6.13) */
        memmove(p->frame + 1, p->frame, n * 4);
        p->frame[0] = error_code;
        n++;
    }
    p->frame_n = n;
    p->esp -= n * 4;
    for (i = 0; i < n; i++) memcpy(frame + 4 * i, &p->frame[i], 4);
    return linear(w, p->esp, n * 4, 1, frame);        /* a fault here (#PF) is Python's to raise */
}

/* Load SS for ring 0 from a hook (EventDelivery.load_stack_segment, FaultState.set_cpl): the engine
 * checks SS.RPL against the CPL it holds, still the old one, so the CPL bits of QEMU's hflags are set
 * to 0 first through a saved context, and SS's selector too: the TLB-fill hooks take an access's
 * privilege from SS.RPL, and the load's descriptor read and accessed-bit write are supervisor
 * accesses (implicit supervisor-mode accesses, SDM 4.6). The SS load then gives SS its descriptor (and
 * sets CPL from it). */
static int load_ring0_ss(delivery_t *s, void *uc, uint32_t ss) {
    uint32_t hflags, sel;
    if (s->context_save(uc, s->context)) return 1;
    memcpy(&hflags, s->context_hflags, 4);
    memcpy(&sel, s->context_ss, 4);
    if ((hflags & HF_CPL_MASK) || sel != ss) {
        hflags &= ~HF_CPL_MASK;
        memcpy(s->context_hflags, &hflags, 4);
        memcpy(s->context_ss, &ss, 4);
        if (s->context_restore(uc, s->context)) return 1;
    }
    return wr(s, uc, R_SS, ss);
}

/* Deliver `vector` with the frame's return address `return_eip` (and `error_code` with F_ERROR_CODE).
 * DELIVERED: done, EIP is the handler's. FALLBACK: nothing changed. ENGINE_REFUSED: the engine refused
 * a segment load after the frame was pushed (a cpuvirt bug, as the Python path's RuntimeError). */
static int deliver_fast(delivery_t *s, void *uc, uint32_t vector, uint32_t return_eip, uint32_t error_code,
                        int flags);

/* Its segment loads make the engine read descriptors through the TLB-fill hooks: while it runs, a fill
 * is never the guest's own access, and delivery_pf_hook leaves it alone (`busy`). */
int delivery_fast(delivery_t *s, void *uc, uint32_t vector, uint32_t return_eip, uint32_t error_code, int flags) {
    uint32_t busy = s->busy;
    int r;
    s->busy = 1;
    r = deliver_fast(s, uc, vector, return_eip, error_code, flags);
    s->busy = busy;
    return r;
}

static int deliver_fast(delivery_t *s, void *uc, uint32_t vector, uint32_t return_eip, uint32_t error_code,
                        int flags) {
    int err = 0;
    pass_t w;
    plan_t p;
    uint32_t new_flags;
    uint64_t walks = s->walks, refs = s->walk_refs;
    if (!s->enabled || vector > 255) return FALLBACK;
    w.s = s;
    w.c.cr0 = (uint32_t)rd(s, uc, R_CR0, &err);
    w.c.cr3 = (uint32_t)rd(s, uc, R_CR3, &err);
    w.c.cr4 = (uint32_t)rd(s, uc, R_CR4, &err);
    if (err || !(w.c.cr0 & CR0_PE)) goto fallback;    /* real-address mode: the IVT (SDM 20.1.4) */
    w.shadow = s->mirror != NULL;
    /* Pass 1 only looks. Pass 2, run only when pass 1 went through, makes the accesses for real in the
     * Python path's order (gate, code descriptor, TSS slot, stack descriptor, frame); it can still
     * decide otherwise only if an A/D bit it set changed a byte it then read (a page table inside a
     * descriptor table): then memory is put back and Python delivers. */
    w.side = 0;
    w.undo.n = 0;
    if (!deliver_pass(&w, uc, vector, return_eip, error_code, flags, &p)) goto fallback;
    w.side = 1;
    if (!deliver_pass(&w, uc, vector, return_eip, error_code, flags, &p)) {
        while (w.undo.n) {
            w.undo.n--;
            memcpy(s->ram + w.undo.off[w.undo.n], &w.undo.old[w.undo.n], 4);
        }
        s->walks = walks;
        s->walk_refs = refs;
        goto fallback;
    }
    /* The handler's state (EventDelivery._enter): SS:ESP on a stack switch, CS, EFLAGS, EIP. */
    if (p.new_ss && load_ring0_ss(s, uc, p.new_ss & ~3u)) return ENGINE_REFUSED;
    if (wr(s, uc, R_ESP, p.esp)) return ENGINE_REFUSED;
    if ((p.old_cs & ~3u) != (p.selector & ~3u) || p.new_cpl != p.cpl) {
        if (wr(s, uc, R_CS, (p.selector & ~3u) | p.new_cpl)) return ENGINE_REFUSED;
    }
    /* SDM 6.12.1.2: TF, NT, RF and VM cleared; IF too through an interrupt gate. */
    new_flags = p.eflags & ~(EFLAGS_TF | EFLAGS_NT | EFLAGS_RF | EFLAGS_VM);
    if (p.gate_type == GATE_INT32) new_flags &= ~EFLAGS_IF;
    if (wr(s, uc, R_EFLAGS, new_flags) || wr_eip(s, uc, p.offset, flags)) return ENGINE_REFUSED;
    s->delivered++;
    return DELIVERED;
fallback:
    s->fallbacks++;
    return FALLBACK;
}

/* Bytes at a guest-linear address as Mmu.fetch_bytes reads them (a supervisor read, SDM 4.6) but with
 * no side effect at all: no A bit, no counter. 1 when every byte is guest RAM behind a good
 * translation; 0 for anything else (a fault, device or unbacked memory: Python answers those). The
 * hypervisor reads code this way to check an intercepted instruction, to find the length of an
 * `int n`, and to decode a faulting access. */
int delivery_peek(delivery_t *s, void *uc, uint32_t gva, uint32_t n, uint8_t *out) {
    int err = 0;
    pass_t w;
    uint32_t done = 0;
    if (n > 32) return 0;
    w.s = s;
    w.side = 0;
    w.shadow = 0;      /* the guest's own tables, under the guard below */
    w.undo.n = 0;
    w.c.cr0 = (uint32_t)rd(s, uc, R_CR0, &err);
    if (err) return 0;
    if (w.c.cr0 & CR0_PG) {
        w.c.cr3 = (uint32_t)rd(s, uc, R_CR3, &err);
        w.c.cr4 = (uint32_t)rd(s, uc, R_CR4, &err);
        if (err) return 0;
        if (s->shadow && (!s->shadow_ok || !(w.c.cr0 & CR0_WP)
                          || ((w.c.cr0 & CR0_PG) | (w.c.cr4 & CR4_PSE)) != s->shadow_mode
                          || (w.c.cr3 & 0xFFFFF000u) != s->shadow_key))
            return 0;                  /* the shadow is not the running one's: Python reads (and syncs) */
    }
    while (done < n) {                 /* page by page, as the chunks of Mmu.read_linear */
        uint32_t a = gva + done, chunk = 0x1000 - (a & 0xFFF), erefs = 0;
        int64_t gpa;
        if (chunk > n - done) chunk = n - done;
        gpa = walk(&w, a, 0);
        if (gpa >= 0) gpa = ram_at(s, (uint64_t)gpa, chunk, EPT_R, &erefs);
        if (gpa < 0) return 0;
        memcpy(out + done, s->ram + gpa, chunk);
        done += chunk;
    }
    return 1;
}

/*
 * Native's bookkeeping of an event delivered in C, in C as well (cpu/fastdelivery.py EventBooks): what
 * the Python callbacks soft_done, fault_done and pf_done do besides the delivery (Vcpu.left_block_at,
 * the event counters, Vcpu.charge_fault, VirtualClock.if_may_have_changed), so that an `int n` system
 * call, a fault or a #PF delivered here runs no Python at all.
 *
 * left_block_at takes the instructions of the running block that did not retire off the clock; their
 * addresses are decoded by Python when the clock first counts the block (Machine.block_insns). That
 * table is mirrored here as Python puts and drops its entries (machine/blocks.py BlockInsns, through
 * cpu/evdeliver.py BlockCopyKeeper), in _blockcopy.h's copy: where the copy cannot tell (a set that lost an
 * entry the table may hold) the event goes to the Python callback, as before, so the two never disagree.
 * The counters are per vector; Python adds them to Vcpu.counts and Vcpu.reasons when they are read
 * (Vcpu.counts). The first event of each kind still goes to Python, which puts its counters' keys in
 * the order the Python path puts them (the summary prints them in that order).
 */
typedef struct books {
    vclock_time_t *clock_now;   /* the virtual clock's time (engine/_vclock.h) */
    uint64_t *clock_extra;
    const volatile uint32_t *clock_last_block;
    uint32_t *clock_watch_if, *clock_check_if;
    uint64_t pending;                    /* events counted here since Python last took the counters */
    uint64_t soft[256], fault[256];      /* `int n` by vector, faults by vector */
    uint64_t pf[3];                      /* #PF by access (read, write, fetch) */
    uint64_t misses;                     /* events left to Python: their block was not in the cache */
    uint8_t soft_seen[256], fault_seen[256];
    uint32_t pf_seen, pad;
    block_t block[ED_BLOCK_SLOTS];
} books_t;

size_t delivery_books_sizeof(void) { return sizeof(books_t); }

/* Machine.block_insns[address] = (addrs, end): the same entry here (ed_blocks_put). Returns 1 when stored. */
int delivery_books_put(books_t *b, uint32_t address, const uint32_t *addrs, uint32_t n, uint64_t end) {
    return ed_blocks_put(b->block, address, addrs, n, end);
}

/* del Machine.block_insns[address] */
void delivery_books_drop(books_t *b, uint32_t address) { ed_blocks_drop(b->block, address); }

/* Machine.block_insns.clear() */
void delivery_books_clear(books_t *b) { ed_blocks_clear(b->block); }

/* Does the copy hold the running block (the clock's last_block) with `boundary` inside it, so that
 * Vcpu.left_block_at(boundary) would take the instructions from there on off the clock? (hw's lazy-EPT
 * exit in C, memory/_tlbfill.c, asks: the full exit it stands for does that.) */
int delivery_books_covers(books_t *b, uint32_t boundary) {
    const block_t *e = NULL;
    uint64_t misses = 0;
    if (!ed_running_block(b->block, *b->clock_last_block, &misses, &e) || !e) return 0;
    return e->first <= boundary && boundary < e->end;
}

/* How many instructions Vcpu.left_block_at(boundary) would take off the clock (*n), without taking them: 1,
 * or 0 when the copy cannot tell. (hw --no-ept's #PF exits in C, modes/hw/_fastexit.c, ask.) */
int delivery_books_left_block(books_t *b, uint32_t boundary, int64_t *n) {
    *n = 0;
    return ed_left_block(b->block, *b->clock_last_block, &b->misses, boundary, n);
}

/* Vcpu.left_block_at(boundary): 1 when done here, 0: Python's to do. */
static int books_left_block_at(books_t *b, uint32_t boundary) {
    int64_t n = 0;
    if (!ed_left_block(b->block, *b->clock_last_block, &b->misses, boundary, &n)) return 0;
    vclock_add(b->clock_now, -(int64_t)(n));       /* VirtualClock.unretire */
    return 1;
}

/* VirtualClock.if_may_have_changed (native's hook_intr makes it; hw's Python path does not: an event
 * delivered in non-root operation never sets IF), and the counters to fold. */
static void books_done(const delivery_t *s, books_t *b) {
    if (!s->vmx) vclock_look_at_if(b->clock_watch_if, b->clock_check_if);
    b->pending++;
}

static void books_soft(delivery_t *s, uint32_t vector, uint32_t start, uint32_t eip) {
    books_t *b = s->books;
    if (b && b->soft_seen[vector] && books_left_block_at(b, eip)) {
        b->soft[vector]++;
        books_done(s, b);
        return;
    }
    s->soft_done(vector, start, eip);
    if (b) b->soft_seen[vector] = 1;
}

static void books_fault(delivery_t *s, uint32_t vector, uint32_t eip) {
    books_t *b = s->books;
    if (b && b->fault_seen[vector] && books_left_block_at(b, eip)) {
        b->fault[vector]++;
        books_done(s, b);
        return;
    }
    s->fault_done(vector, eip);
    if (b) b->fault_seen[vector] = 1;
}

static void books_pf(delivery_t *s, uint32_t eip, uint32_t access) {
    books_t *b = s->books;
    if (b && b->pf_seen && access < 3 && books_left_block_at(b, eip)) {
        if (access == 2) {        /* Vcpu.charge_fault: a fetch fault retires nothing but costs time */
            vclock_advance(b->clock_now, b->clock_extra, s->fetch_fault_cycles);
        }
        b->pf[access]++;
        books_done(s, b);
        return;
    }
    s->pf_done(eip, access);
    if (b) b->pf_seen = 1;
}

/* For other C hooks built on this state (modes/para/_pvfast.c): the bookkeeping of an `int n` or a
 * fault they delivered, as delivery_intr_hook makes it (Python's soft_done / fault_done the first
 * time and on a miss). */
void delivery_books_soft(delivery_t *s, uint32_t vector, uint32_t start, uint32_t eip) {
    books_soft(s, vector, start, eip);
}

void delivery_books_fault(delivery_t *s, uint32_t vector, uint32_t eip) {
    books_fault(s, vector, eip);
}

/* A supervisor access of n <= 24 bytes at a guest-linear address with its side effects (A/D bits,
 * the walk counters), as Mmu.read_linear / write_linear make it (a write translates every page
 * before it writes). 1: done; 0: nothing changed (a fault, a page outside RAM, the hypervisor's
 * window): Python makes the access. For para's bounce frame and HYPERVISOR_iret's frame. */
int delivery_linear(delivery_t *s, void *uc, uint32_t gva, uint32_t n, int write, uint8_t *buf) {
    int err = 0;
    pass_t w;
    uint64_t walks = s->walks, refs = s->walk_refs;
    if (n > 24) return 0;
    w.s = s;
    w.c.cr0 = (uint32_t)rd(s, uc, R_CR0, &err);
    w.c.cr3 = (uint32_t)rd(s, uc, R_CR3, &err);
    w.c.cr4 = (uint32_t)rd(s, uc, R_CR4, &err);
    if (err) return 0;
    w.side = 0;
    w.shadow = s->mirror != NULL;
    w.undo.n = 0;
    if (!linear(&w, gva, n, write, buf)) return 0;
    w.side = 1;
    if (!linear(&w, gva, n, write, buf)) {   /* an A/D bit it set changed what it then read */
        while (w.undo.n) {
            w.undo.n--;
            memcpy(s->ram + w.undo.off[w.undo.n], &w.undo.old[w.undo.n], 4);
        }
        s->walks = walks;
        s->walk_refs = refs;
        return 0;
    }
    return 1;
}

/* hw: an event the engine raised that this hook leaves to VmxCpu.hook_intr: one that causes a VM exit
 * (SDM Vol. 3C 25.2: `int n` never does; int3 and into, software exceptions, and every fault do when
 * their bit of the exception bitmap is set), an NMI, a #DF, a #PF (its exit also depends on the error
 * code; the engine raises guest #PFs through the TLB fill anyway), and every event while the copy of
 * the VMCS is stale (a vmwrite since the last VM entry). */
static int vmx_to_python(const delivery_t *s, uint32_t intno, int32_t is_int) {
    if (!s->vmx_armed || intno == 2 || intno == 8 || intno == 14) return 1;
    if (is_int && intno != 3 && intno != 4) return 0;
    return intno < 32 && (s->exception_bitmap >> intno & 1);
}

/* The vCPU's INTR hook in native and hw, in front of the Python one (Vcpu.hook_intr, VmxCpu.hook_intr), for the hot cases
 * of every kernel: a software interrupt (`int n`, int3, into: QEMU's exception_is_int) or a fault the
 * engine raised (#DE, #GP...) delivered through a gate delivery_fast takes. It does what hook_intr does
 * for such an event: the fault is marked delivered (QEMU's old_exception = -1, the escalation
 * workaround of quirks.FaultState.take), the frame gets EIP (past an `int n`, at a fault) and the
 * fault's error code if its vector has one (SDM 6.13), and Python is told once (soft_done,
 * fault_done: the event counters, the instructions of the block that did not retire, the
 * interrupt-window check; the trace is never on while this hook is). Everything else goes to the
 * Python hook unchanged (delivery_fast changes nothing when it declines). Under hw (`vmx`) only the
 * events that cause no VM exit, which the processor delivers through the guest IDT itself. */
void delivery_intr_hook(void *uc, uint32_t intno, void *user_data) {
    delivery_t *s = (delivery_t *)user_data;
    int err = 0, flags;
    int32_t is_int, old;
    uint32_t eip, start = 0, error_code = 0;
    uint8_t prev;
    if (intno > 255 || s->context_save(uc, s->context)) goto python;
    memcpy(&is_int, s->context_is_int, 4);
    if (s->vmx && vmx_to_python(s, intno, is_int)) goto python;
    eip = (uint32_t)rd(s, uc, R_EIP, &err);
    if (err) goto python;
    if (is_int) {
        /* where the instruction starts: int3 (CC) and into (CE) are 1 byte, int n 2 (Vcpu._deliver_engine_event) */
        if (!delivery_peek(s, uc, eip - 1, 1, &prev)) goto python;
        start = eip - ((prev == 0xCC || prev == 0xCE) ? 1 : 2);
        flags = F_SOFT;
    } else {
        if (intno == 3 || intno == 4) goto python;    /* #BP, #OF not from int3/into: Python's way */
        flags = 0;
        if (s->has_error_code[intno >> 5] & (1u << (intno & 31))) {
            memcpy(&error_code, s->context_error_code, 4);
            flags = F_ERROR_CODE;
        }
    }
    memcpy(&old, s->context_old_exception, 4);
    if (old != -1) {                           /* what FaultState.take does: mark it delivered */
        old = -1;
        memcpy(s->context_old_exception, &old, 4);
        if (s->context_restore(uc, s->context)) goto python;
    }
    if (delivery_fast(s, uc, intno, eip, error_code, flags | F_LEAVES_BLOCK) != DELIVERED)
        goto python;                           /* nothing changed */
    if (is_int) {
        s->soft_delivered++;
        books_soft(s, intno, start, eip);
    } else {
        s->faults_delivered++;
        books_fault(s, intno, eip);
    }
    return;
python:
    s->python_intr(uc, intno, NULL);
}

#define HF_CS32 (1u << 4)     /* QEMU's hflags: CS.D, SS.B */
#define HF_SS32 (1u << 5)

/* Does the 32-bit EFLAGS image the iretd is about to pop (SS:ESP + 8) set any bit of `bits` (RF; VM
 * too at CPL > 0)? 1 also when it cannot tell here (16-bit code or stack, an image that is not
 * readable RAM): Python looks then. */
static int iret_image_has(delivery_t *s, void *uc, uint32_t bits) {
    uint32_t hflags, esp, image;
    uint64_t ss_base;
    int err = 0;
    if (s->context_save(uc, s->context)) return 1;
    memcpy(&hflags, s->context_hflags, 4);
    if ((hflags & (HF_CS32 | HF_SS32)) != (HF_CS32 | HF_SS32)) return 1;
    memcpy(&ss_base, s->context_ss + 8, 8);    /* SegmentCache: selector, (pad), base */
    esp = (uint32_t)rd(s, uc, R_ESP, &err);
    if (err || !delivery_peek(s, uc, (uint32_t)ss_base + esp + 8, 4, (uint8_t *)&image)) return 1;
    return (image & bits) != 0;
}

/* In native mode every iret is intercepted (cpu/intercept.py), for what the engine would get wrong:
 * a task return (EFLAGS.NT, SDM 7.3), the end of NMI blocking (SDM 6.7.1), EFLAGS.VM in the image
 * at CPL > 0 (Vcpu.iret_site), and RF in the image (Vcpu.iret_image_rf: the engine's pushf would
 * store it). In the common case none of them applies and Python did nothing: the
 * instruction (its bytes unchanged since it was decoded) is left to the engine, and only the
 * interrupt-window check of the intercept's caller is made (Vcpu.enable_intercepts, `hit`). Anything
 * else goes to the Python hook. */
void delivery_iret_hook(void *uc, uint64_t address, uint32_t size, void *user_data) {
    iret_site_t *site = (iret_site_t *)user_data;
    delivery_t *s = site->s;
    uint8_t now[16];
    uint32_t eflags, cs;
    int err = 0;
    if (s->nmi_blocked || size != site->size || size > 16
        || !delivery_peek(s, uc, (uint32_t)address, size, now) || memcmp(now, site->bytes, size)) goto python;
    eflags = (uint32_t)rd(s, uc, R_EFLAGS, &err);
    cs = (uint32_t)rd(s, uc, R_CS, &err);
    if (err || (eflags & (EFLAGS_VM | EFLAGS_NT)) || (site->wide && (cs & 3) && !s->iret_any_cpl)) goto python;
    if (!((uint32_t)rd(s, uc, R_CR0, &err) & CR0_PE) || err) goto python;   /* real mode: Vcpu.iret_image_rf */
    /* at CPL > 0 (para) Vcpu.iret_to_v86 strips VM from the image: Python's when it is there */
    if (site->wide && iret_image_has(s, uc, EFLAGS_RF | ((cs & 3) ? EFLAGS_VM : 0))) goto python;
    if (site->wide && (cs & 3)) {
        /* Vcpu.strip_vm_image reads the image at ESP + 8 as the processor would (CpuView.read): its
         * walk's A bits and counters, made here too (nothing changes if it would fault: Python's) */
        uint8_t image[4];
        uint32_t esp = (uint32_t)rd(s, uc, R_ESP, &err);
        if (err || !delivery_linear(s, uc, esp + 8, 4, 0, image)) goto python;
    }
    vclock_look_at_if(s->clock_watch_if, s->clock_check_if);   /* VirtualClock.if_may_have_changed */
    s->irets++;
    return;
python:
    site->python(uc, address, size, NULL);
}

/* A mov to CR4 is intercepted in native mode only for the #GP the engine does not raise: a newly set
 * bit the CPU model lacks (Vcpu.cr4_gate, SDM Vol. 3A 2.5). In the common case no such bit is set and
 * Python did nothing: the instruction is left to the engine, with the interrupt-window check of the
 * intercept's caller. Anything else (bytes changed since the site was decoded, a reserved bit) goes
 * to the Python hook. kvm-unit-tests' vmexit toggles CR4.PGE about a hundred million times. */
void delivery_cr4_hook(void *uc, uint64_t address, uint32_t size, void *user_data) {
    cr4_site_t *site = (cr4_site_t *)user_data;
    delivery_t *s = site->s;
    uint8_t now[16];
    uint64_t value = 0;
    uint32_t cr4;
    int err = 0;
    if (size != site->size || size > 16 || !delivery_peek(s, uc, (uint32_t)address, size, now)
        || memcmp(now, site->bytes, size)) goto python;
    if (s->reg_read(uc, site->src_reg, &value)) goto python;
    cr4 = (uint32_t)rd(s, uc, R_CR4, &err);
    if (err || ((uint32_t)value & ~cr4 & site->reserved)) goto python;
    vclock_look_at_if(s->clock_watch_if, s->clock_check_if);   /* VirtualClock.if_may_have_changed */
    site->passed++;
    return;
python:
    site->python(uc, address, size, NULL);
}

/* ---- the guest #PF under native (and hw), from the TLB fill to the handler ------------------------
 * Mmu.fill (memory/mmu.py) refuses a fill that the guest's walk faults; the engine then stops, and the
 * run loop finds the exact linear address (x86/faultaddr.py), writes CR2 and delivers the #PF. This
 * hook, between the C fill (memory/_tlbfill.c) and Mmu.fill, does all of that for the common case
 * without stopping: the walk of memory/walk.py (the error code of SDM 4.7, PDE.A set when the PDE is
 * used even though the PTE then faults), CR2 as x86/faultaddr.py computes it (from the memory operand
 * of the instructions decoded below), and delivery_fast. The faulting instruction is then left the
 * way QEMU leaves an instruction that raised its own #PF (cpu_loop_exit) and the engine goes on at the
 * handler. Anything else (no fault, paging structures outside RAM, an instruction not decoded here, a
 * delivery delivery_fast declines) returns false having changed nothing, and Mmu.fill does it all.
 * tests/test_fast_delivery.py compares both paths on random page tables and accesses. Under hw with
 * EPT (`vmx`) the walk's references are translated and counted as EptWalk does, and only a #PF that
 * causes no VM exit (vmx_pf_exits) is delivered here, when the run loop would do nothing else before
 * the next entry (vmx_pf_quiet); tests/test_hw_delivery.py compares with the Python path. */

#define ACC_WRITE 1
#define ACC_FETCH 2
#define PTE_US 0x4u
#define PFEC_P 1u
#define PFEC_W 2u
#define PFEC_U 4u
#define PFEC_RSVD 8u
#define PFEC_I 16u
#define CR4_SMEP 0x100000u
#define PF_REFUSED 0xFFFFFFFFu      /* pf_done's access when the engine refused a register write */

static uint32_t pf_code(uint32_t cause, int access, int user, uint32_t cr4) {
    if (user) cause |= PFEC_U;
    if (access == ACC_WRITE) cause |= PFEC_W;
    else if (access == ACC_FETCH && (cr4 & CR4_SMEP)) cause |= PFEC_I;
    return cause;
}

/* memory/walk.py's walk with side effects, decided first and made later: 1 = a fault (*ec, *refs, and
 * *pde_a >= 0: the PDE whose A bit the walk sets), 0 = no fault, -1 = a paging structure outside RAM
 * (Python's reader answers all-ones there: left to it). */
static int pf_walk(delivery_t *s, const crs_t *c, uint32_t gva, int access, int user, uint32_t *ec,
                   uint32_t *refs, int64_t *pde_a) {
    uint64_t pde_addr, leaf_addr;
    uint32_t pde, leaf, rights, erefs = 0;   /* under EPT: its references, counted as EptWalk counts them */
    int writable;
    *pde_a = -1;
    if (!(c->cr0 & CR0_PG)) return 0;
    pde_addr = (c->cr3 & 0xFFFFF000u) | ((gva >> 20) & 0xFFC);
    if (!entry_at(s, pde_addr, &pde, &erefs)) return -1;
    *refs = 1;
    if (!(pde & PTE_P)) {
        *ec = pf_code(0, access, user, c->cr4);
        goto fault;
    }
    if ((pde & PTE_PS) && (c->cr4 & CR4_PSE)) {
        if (pde & (1u << 21)) {
            *ec = pf_code(PFEC_P | PFEC_RSVD, access, user, c->cr4);
            goto fault;
        }
        leaf = rights = pde;
    } else {
        *refs = 2;
        if (!(pde & PTE_A)) {          /* where in `ram` (EptWalk.write32 translates it for writing) */
            *pde_a = ram_at(s, pde_addr, 4, EPT_W, &erefs);
            if (*pde_a < 0) return -1;
            *refs = 3;
        }
        leaf_addr = (pde & 0xFFFFF000u) | ((gva >> 10) & 0xFFC);
        if (!entry_at(s, leaf_addr, &leaf, &erefs)) return -1;
        if (!(leaf & PTE_P)) {
            *ec = pf_code(0, access, user, c->cr4);
            goto fault;
        }
        rights = pde & leaf;
    }
    if (user) {
        if (!(rights & PTE_US)) goto protection;
        writable = (rights & PTE_RW) != 0;
    } else {
        writable = (rights & PTE_RW) || !(c->cr0 & CR0_WP);
        if (access == ACC_FETCH && (rights & PTE_US) && (c->cr4 & CR4_SMEP)) goto protection;
    }
    if (access == ACC_WRITE && !writable) goto protection;
    *pde_a = -1;                       /* no fault: nothing of this walk is made here */
    return 0;
protection:
    *ec = pf_code(PFEC_P, access, user, c->cr4);
fault:
    *refs += erefs;
    return 1;
}

/* hw: does a #PF with error code `ec` exit? Bit 14 of the exception bitmap with PFEC_MASK/MATCH (SDM
 * Vol. 3C 25.2): set, it exits when (ec & mask) == match; clear, when they differ. */
static int vmx_pf_exits(const delivery_t *s, uint32_t ec) {
    int match = (ec & s->pfec_mask) == s->pfec_match;
    return (s->exception_bitmap >> 14 & 1) ? match : !match;
}

/* hw: a guest #PF delivered here skips the run loop's trip (VmxCpu.before_entry, the clock armed again)
 * that the Python path makes: only when that trip would change nothing. The C exit path is armed with
 * the virtual-APIC page in step (fastexit_quiet: nothing for the entry's APIC sync to do), no
 * interrupt-window exiting, and no stop requested or due at the next block boundary. */
static int vmx_pf_quiet(const delivery_t *s) {
    return s->vmx && s->vmx_armed && !s->window_exiting && s->quiet && s->quiet(s->quiet_state)
        && !*s->clock_stop_next && vclock_now(s->clock_now) < *s->clock_deadline;
}

/* The explicit memory operand of an instruction as capstone (32-bit mode) reports it for
 * x86/faultaddr.py: base and index registers (-1: none), scale, displacement, size in bytes. *has = 0
 * for an instruction of the list with no memory operand (push r, pop r, call rel32, ret...). 0: not an
 * instruction decoded here (Python decodes it). 32-bit addressing only, as that decoder's. */
typedef struct {
    int base, index, has;
    uint32_t scale, size;
    int32_t disp;
} memop_t;

static const int gpr_reg[8] = {R_EAX, R_ECX, R_EDX, R_EBX, R_ESP, R_EBP, R_ESI, R_EDI};

static int decode_memop(const uint8_t *code, memop_t *m) {
    uint32_t i = 0, v = 4, size;
    uint8_t op, modrm, reg;
    modrm_mem_t mem;
    int rep = 0;
    m->has = 0;
    for (;; i++) {                     /* operand-size, rep and segment prefixes (flat segments) */
        if (i >= 4) return 0;
        if (code[i] == 0x66) v = 2;
        else if (code[i] == 0xF2 || code[i] == 0xF3) rep = 1;
        else if (!(code[i] == 0x26 || code[i] == 0x2E || code[i] == 0x36 || code[i] == 0x3E || code[i] == 0x64
                   || code[i] == 0x65)) break;
    }
    op = code[i++];
    if (op >= 0xAA && op <= 0xAF) {    /* stos, lods, scas, rep or not: one operand, es:[edi] ([esi] for lods) */
        m->has = 1;
        m->size = (op & 1) ? v : 1;
        m->base = (op == 0xAC || op == 0xAD) ? R_ESI : R_EDI;
        m->index = -1;
        m->scale = 1;
        m->disp = 0;
        return 1;
    }
    if (rep) return 0;                 /* movs and cmps (two operands), pause, SSE forms: Python */
    if ((op >= 0x50 && op <= 0x5F) || op == 0x68 || op == 0x6A || op == 0x9C || op == 0x9D || op == 0xC3
        || op == 0xE8)
        return v == 4;                 /* push/pop r, push imm, pushfd/popfd, ret, call rel32 */
    if (op >= 0xA0 && op <= 0xA3) {    /* mov al/eax, [moffs32] and back: a displacement, no ModRM */
        m->has = 1;
        m->size = (op & 1) ? v : 1;
        m->base = m->index = -1;
        m->scale = 1;
        memcpy(&m->disp, code + i, 4);
        return 1;
    }
    modrm = code[i];
    reg = (modrm >> 3) & 7;
    if (op == 0x0F) {
        op = code[i++];
        modrm = code[i];
        reg = (modrm >> 3) & 7;
        if (op == 0xB6 || op == 0xBE) size = 1;          /* movzx, movsx r, r/m8 */
        else if (op == 0xB7 || op == 0xBF) size = 2;     /* movzx, movsx r, r/m16 */
        else if (op == 0xAF) size = v;                   /* imul r, r/m */
        else return 0;
    } else if (op < 0x40 && (op & 7) < 4) {
        size = (op & 1) ? v : 1;                         /* add or adc sbb and sub xor cmp */
    } else if (op >= 0x84 && op <= 0x8B) {
        size = (op & 1) ? v : 1;                         /* test xchg mov */
    } else if (op == 0x80 || op == 0xC0 || op == 0xD0 || op == 0xD2) {
        if (op != 0x80 && reg == 6) return 0;
        size = 1;
    } else if (op == 0x81 || op == 0x83 || op == 0xC1 || op == 0xD1 || op == 0xD3) {
        if (op != 0x81 && op != 0x83 && reg == 6) return 0;
        size = v;
    } else if (op == 0xC6 || op == 0xC7) {
        if (reg != 0) return 0;
        size = op == 0xC6 ? 1 : v;                       /* mov r/m, imm */
    } else if (op == 0xF6 || op == 0xF7) {
        if (reg == 1) return 0;
        size = op == 0xF6 ? 1 : v;                       /* test not neg mul imul div idiv */
    } else if (op == 0xFE) {
        if (reg > 1) return 0;
        size = 1;                                        /* inc, dec r/m8 */
    } else if (op == 0xFF) {
        if (reg == 3 || reg == 5 || reg == 7) return 0;  /* far call/jmp: Python */
        size = v;                                        /* inc dec call jmp push */
    } else if (op == 0x8F) {
        if (reg != 0) return 0;
        size = v;                                        /* pop r/m */
    } else if (op == 0x69 || op == 0x6B) {
        size = v;                                        /* imul r, r/m, imm */
    } else {
        return 0;
    }
    if (!modrm_mem(code + i, &mem)) return 1;   /* a register operand: no memory operand */
    m->has = 1;
    m->size = size;
    m->base = mem.base >= 0 ? gpr_reg[mem.base] : -1;
    m->index = mem.index >= 0 ? gpr_reg[mem.index] : -1;
    m->scale = mem.scale;
    m->disp = mem.disp;
    return 1;
}

/* The exact linear address of a #PF on `page` for CR2, as Vcpu.exact_linear and x86/faultaddr.py find
 * it: a fetch faults at EIP when EIP is on that page, else at the page; a data access at the first
 * candidate (the instruction's memory operand, then the stack slots and ESI/EDI it may touch) on the
 * page, else at the page's first byte. 0: Python must find it (the code cannot be read here, or the
 * instruction is not decoded here). */
int delivery_fault_linear(delivery_t *s, void *uc, uint32_t eip, uint32_t page, int access, uint32_t *out) {
    static const uint32_t below[9] = {4, 8, 12, 16, 20, 24, 28, 32, 2};
    uint8_t code[16];
    uint32_t ea[13], n = 0, i, esp;
    memop_t m;
    int err = 0;
    if (access == ACC_FETCH) {
        *out = (eip & 0xFFFFF000u) == page ? eip : page;
        return 1;
    }
    if (!delivery_peek(s, uc, eip, 15, code) || !decode_memop(code, &m)) return 0;
    if (m.has) {
        uint32_t a = (uint32_t)m.disp;
        if (m.base >= 0) a += (uint32_t)rd(s, uc, m.base, &err);
        if (m.index >= 0) a += (uint32_t)rd(s, uc, m.index, &err) * m.scale;
        ea[n++] = a;
    }
    esp = (uint32_t)rd(s, uc, R_ESP, &err);
    for (i = 0; i < 9; i++) ea[n++] = esp - below[i];
    ea[n++] = esp;
    ea[n++] = (uint32_t)rd(s, uc, R_ESI, &err);
    ea[n++] = (uint32_t)rd(s, uc, R_EDI, &err);
    if (err) return 0;
    for (i = 0; i < n; i++)
        if ((ea[i] & 0xFFFFF000u) == page) {
            *out = ea[i];
            return 1;
        }
    *out = page;           /* an access straddling into the page, or none found: the page's first byte */
    return 1;
}

int delivery_pf_hook(void *uc, uint64_t vaddr, int type, tlb_entry_t *e, void *user_data) {
    delivery_t *s = (delivery_t *)user_data;
    int err = 0, access, user, r;
    crs_t c;
    uint32_t ec = 0, refs = 0, eip, cr2, old_pde = 0, old_cr2;
    int64_t pde_a;
    uint64_t walks, walk_refs;
    (void)e;
    if (!s->pf_enabled || s->busy || type < MEM_READ || type > MEM_FETCH) return 0;
    if (s->hv_start && vaddr >= s->hv_start) return 0;   /* para: the hypervisor's window, Python's */
    if (s->vmx && !vmx_pf_quiet(s)) return 0;
    access = type - MEM_READ;
    c.cr0 = (uint32_t)rd(s, uc, R_CR0, &err);
    if (err || !(c.cr0 & CR0_PG)) return 0;
    c.cr3 = (uint32_t)rd(s, uc, R_CR3, &err);
    c.cr4 = (uint32_t)rd(s, uc, R_CR4, &err);
    user = ((uint32_t)rd(s, uc, R_SS, &err) & 3) == 3;   /* CPL from SS, as Mmu.fill */
    if (err) return 0;
    r = pf_walk(s, &c, (uint32_t)vaddr, access, user, &ec, &refs, &pde_a);
    if (r != 1 || (s->vmx && vmx_pf_exits(s, ec))) return 0;    /* an exception-bitmap exit: Python's */
    /* A fetch fault retires nothing but costs time, and a handler whose own code faults would fault
     * again and again without a block ever starting, where the clock looks at its deadline: one that
     * this fault's time would reach (the budget, a timer) is left to the run loop, which sees it. */
    if (access == ACC_FETCH
        && (*s->clock_stop_next || vclock_now(s->clock_now) + s->fetch_fault_cycles >= *s->clock_deadline)) return 0;
    eip = (uint32_t)rd(s, uc, R_EIP, &err);
    if (err || !delivery_fault_linear(s, uc, eip, (uint32_t)vaddr & 0xFFFFF000u, access, &cr2)) return 0;
    old_cr2 = s->pv_pf ? 0 : (uint32_t)rd(s, uc, R_CR2, &err);
    if (err) return 0;
    /* Made in Python's order: the walk's PDE.A, CR2, the delivery. */
    walks = s->walks;
    walk_refs = s->walk_refs;
    if (pde_a >= 0) {
        uint32_t pde;
        memcpy(&old_pde, s->ram + pde_a, 4);
        pde = old_pde | PTE_A;
        memcpy(s->ram + pde_a, &pde, 4);
    }
    s->walks++;
    s->walk_refs += refs;
    if (s->pv_pf) {                    /* para: its bounce, which changes nothing when it declines */
        s->busy = 1;
        r = s->pv_pf(s->pv, uc, eip, ec, cr2);
        s->busy = 0;
    } else {
        r = wr(s, uc, R_CR2, cr2) ? FALLBACK : delivery_fast(s, uc, 14, eip, ec, F_ERROR_CODE | F_LEAVES_BLOCK);
    }
    if (r != DELIVERED) {              /* nothing delivered: put back what this hook made, Python does it */
        if (r == ENGINE_REFUSED) {     /* the frame is pushed: a cpuvirt bug, as in FastDelivery.deliver */
            s->pf_enabled = 0;
            s->pf_done(eip, PF_REFUSED);
        }
        if (pde_a >= 0) memcpy(s->ram + pde_a, &old_pde, 4);
        if (!s->pv_pf) wr(s, uc, R_CR2, old_cr2);
        s->walks = walks;
        s->walk_refs = walk_refs;
        return 0;
    }
    s->pf_fills++;
    s->pf_faults++;
    books_pf(s, eip, (uint32_t)access);
    s->loop_exit(*(void **)((uint8_t *)uc + s->cpu_offset));   /* does not return */
    return 0;
}

/* Once the guest has run outside ring 0, every in/out/ins/outs is intercepted in native mode for the
 * I/O permission check the engine does not make (Vcpu.io_gate, SDM Vol. 1 19.5). At CPL 0 outside
 * virtual-8086 mode the check always passes and Python did nothing: the instruction (its bytes unchanged
 * since it was decoded) is left to the engine and its device hook, with only the interrupt-window check
 * of the intercept's caller (Vcpu.enable_intercepts, `hit`). Anything else goes to the Python hook. */
void delivery_io_hook(void *uc, uint64_t address, uint32_t size, void *user_data) {
    io_site_t *site = (io_site_t *)user_data;
    delivery_t *s = site->s;
    uint8_t now[16];
    uint32_t cs, eflags;
    int err = 0;
    if (size != site->size || size > 16 || !delivery_peek(s, uc, (uint32_t)address, size, now)
        || memcmp(now, site->bytes, size)) goto python;
    cs = (uint32_t)rd(s, uc, R_CS, &err);
    eflags = (uint32_t)rd(s, uc, R_EFLAGS, &err);
    if (err || (cs & 3) || (eflags & EFLAGS_VM)) goto python;
    vclock_look_at_if(s->clock_watch_if, s->clock_check_if);   /* VirtualClock.if_may_have_changed */
    site->passed++;
    return;
python:
    site->python(uc, address, size, NULL);
}

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_delivery", NULL, -1, NULL};

PyMODINIT_FUNC PyInit__delivery(void) { return PyModule_Create(&module); }
