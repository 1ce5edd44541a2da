/*
 * Mode `trap`: the common traps of the deprivileged guest kernel answered in C (modes/trapfast.py,
 * docs/deprivileging.md "The common traps in C").
 *
 * At ring 1 with IOPL 0, cli, sti, clts and mov from/to CR0 and CR4 raise #GP (SDM Vol. 3A 6.15,
 * "Interrupt 13"); TrapVcpu.on_engine_event decodes the instruction and privileged.py emulates it
 * against the VirtualCpu. kvm-unit-tests' `vmexit` runs hundreds of millions of them. This INTR hook
 * sits in front of the vCPU's Python one and answers, for the guest kernel (real CPL 1, not V86):
 *
 *   FA          cli            IF := 0
 *   FB          sti            IF := 1, the one-instruction interrupt shadow when IF was 0 (SDM 6.8.3);
 *                              only while no interrupt waits for the window (the clock's watch_if)
 *   0F 06       clts           CR0.TS := 0
 *   0F 20 /r    mov r32, crN   N = 0 or 4 (ModRM.mod = 11)
 *   0F 22 /r    mov crN, r32   N = 0 or 4, when the write changes only CR0.WP or only CR4.PGE (and
 *                              sets no reserved bit) and the shadow needs no engine TLB flush for it
 *                              (ShadowPaging.tlb_flush would answer False): the hypervisor's own TLB
 *                              is flushed by a generation count (cpu/hvtlb.py)
 *
 * doing exactly what the Python path does: the same registers written in the same order, QEMU's
 * old_exception cleared (the escalation workaround of cpu/quirks.py FaultState.take), the block's
 * instructions that did not retire taken off the clock (TrapVcpu._retired, from a copy of
 * Machine.block_insns kept as its mirror, machine/blocks.py), the interrupt-window check
 * (VirtualClock.if_may_have_changed), and the event counters, which Python folds into Vcpu.counts and
 * Vcpu.reasons when they are read. The virtual CR0, CR3 and CR4 live here (trapfast.py
 * TrapVirtualCpu). The instruction's bytes are read through the guest's own page tables with no side
 * effect, as TrapVcpu._trap_site reads them (Mmu.fetch_bytes); anything else (a 15-byte read that
 * would cross a page, PAE, a non-present entry, memory that is not RAM, a register form this file
 * does not know, the first event of each kind, a block the copy cannot tell about) goes to Python
 * unchanged. Never while tracing (Python switches `enabled` off).
 *
 * The same hook also delivers the common events through the guest's IDT (deliver_event, below: `int n`,
 * #DE, #GP from ring 3; trapfast_deliver_fault takes the #PF of a refused fill from Python's run loop),
 * and trapfast_iret_hook passes the common iretd site (docs/deprivileging.md, "Event delivery and
 * iretd sites in C").
 *
 * Built as a Python extension only so that setuptools compiles it; Python calls it through ctypes.
 */
#include <Python.h>
#include <stdint.h>
#include <string.h>

#include "../cpu/_evseg.h"   /* the segment loads and iretd, shared with full's callouts */
#include "../memory/_shadowmirror.h"   /* the copy of the current shadow root and traced frames */

typedef int (*reg_read_fn)(void *uc, int regid, void *value);
typedef int (*reg_write_fn)(void *uc, int regid, const void *value);
typedef void (*intr_fn)(void *uc, uint32_t intno, void *user_data);

#define EFLAGS_IF 0x200u
#define EFLAGS_VM 0x20000u
#define EFLAGS_NT 0x4000u
#define EFLAGS_RF 0x10000u
#define EFLAGS_IOPL 0x3000u
#define CR0_ET 0x10u
#define CR0_TS 0x8u
#define CR0_PG 0x80000000u
#define CR0_WP 0x10000u
#define CR4_PSE 0x10u
#define CR4_PAE 0x20u
#define CR4_PGE 0x80u
#define HF_INHIBIT_IRQ (1u << 3)


#define BLOCK_SLOTS 4096u
#define BLOCK_MAX_INSNS 58
#define PTE_RW 2u
#define PTE_US 4u
#define EFLAGS_TF 0x100u
#define EFLAGS_IOPL_SHIFT 12

/* The kinds answered here, each with its (kind, reason) key of Vcpu.reasons (trapfast.py REASONS). */
enum { K_CLI, K_STI, K_CLTS, K_MOV_CR0, K_MOV_CR4, K_MOV_SREG, K_POP_SREG, K_MOV_CR2, K_IRETD, K_COUNT };

typedef struct {
    uint64_t end;                      /* the address after the block's last instruction */
    uint32_t address;                  /* the block's key in Machine.block_insns */
    uint32_t first;                    /* its first instruction's address */
    uint16_t n;                        /* instructions; 0: the slot is empty */
    uint16_t offset[BLOCK_MAX_INSNS];  /* each instruction's address - first */
    uint16_t ambiguous;                /* the table may hold an entry this slot lost (see below) */
    uint16_t pad[2];
} block_t;

typedef struct {
    reg_read_fn reg_read;
    reg_write_fn reg_write;
    intr_fn python_intr;       /* the vCPU's own INTR hook (Vcpu.hook_intr, guarded): everything else */
    uint32_t off_old_exception, off_is_int;   /* fields inside env (quirks.ContextLayout) */
    int32_t r_eip, r_eflags, r_cs, r_esp;
    int32_t r_gpr[8];          /* Unicorn ids of EAX..EDI in encoding order */
    uint32_t enabled;          /* 0: every event is Python's (tracing, CPUVIRT_TRAP_FAST=0) */
    uint32_t crs[3];           /* the VirtualCpu's CR0, CR3, CR4 (TrapVirtualCpu) */
    uint32_t cr4_reserved;     /* x86/cpuid.py CR4_RESERVED: a write setting one is #GP (Python's) */
    uint32_t shadow_ok;        /* ShadowPaging: no unsynchronised frame, engine TLB not stale */
    uint32_t wp_granted;       /* ... and a supervisor write was let through while WP was 0 */
    uint64_t *clock_now;       /* the virtual clock (engine/_vclock.c) */
    const uint64_t *clock_last_block;
    uint32_t *clock_watch_if, *clock_check_if;
    uint64_t pending;          /* events counted here since Python last folded them */
    uint64_t count[K_COUNT];
    uint8_t seen[K_COUNT];     /* Python has recorded this kind once (its counter keys exist) */
    uint8_t pad2[7];
    uint64_t answered, to_python, misses;
    /* env, RAM, the hypervisor-TLB copy, the virtual GDTR/CR2/IOPL, `_loaded` (cpu/_evseg.h) */
    evseg_t ev;
    block_t block[BLOCK_SLOTS];
    /* event delivery through the guest's IDT (deliver_event) */
    uint32_t deliver_on;       /* 0: every delivery is Python's (CPUVIRT_TRAP_DELIVERY_C=0, MMIO in RAM) */
    uint32_t off_error_code;   /* QEMU's env->error_code (quirks.ContextLayout) */
    uint32_t idt_base, idt_limit;   /* the VirtualCpu's IDTR and TR (TrapVirtualCpu) */
    uint32_t tr_base, tr_limit;
    const shadowmirror_t *mirror;   /* the current shadow root, the traced frames (memory/shadowmirror.py) */
    uint64_t delivered;        /* events delivered here */
    uint64_t dpending;         /* ... since Python last folded them */
    uint64_t soft_count[256];  /* Vcpu.reasons[("interrupt", "int 0x..")] to add */
    uint64_t fault_count[32];  /* Vcpu.reasons[("exception", "#..")] to add */
    uint8_t soft_seen[256];    /* Python has recorded this key once */
    uint8_t fault_seen[32];
    int32_t r_ss;
    uint32_t iret_on;          /* 0: every iret site is Python's (CPUVIRT_TRAP_IRET_C=0) */
    uint64_t irets;            /* iret sites passed here */
} trapfast_t;

size_t trapfast_sizeof(void) { return sizeof(trapfast_t); }

/* -- the copy of Machine.block_insns (the BlockMirror of machine/blocks.py) ------------------------
 * Direct-mapped, and exact about absence as well: a slot that has lost an entry the table may still
 * hold (a put over another live entry, or one too long to copy) is marked ambiguous until the table
 * is cleared, so a look-up answers "this entry", "no entry in the table" (Python's _retired then does
 * nothing: a block the clock counted without decoding it, such as one whose first instruction
 * faults), or "ask Python". */
static block_t *block_slot(trapfast_t *s, uint32_t address) {
    return &s->block[(address ^ (address >> 12)) & (BLOCK_SLOTS - 1)];
}

int trapfast_blocks_put(trapfast_t *s, uint32_t address, const uint32_t *addrs, uint32_t n, uint64_t end) {
    block_t *e = block_slot(s, address);
    uint32_t k;
    if (e->n && e->address != address) e->ambiguous = 1;
    e->n = 0;
    if (n == 0 || n > BLOCK_MAX_INSNS) {
        e->ambiguous = 1;
        return 0;
    }
    for (k = 0; k < n; k++)
        if (addrs[k] < addrs[0] || addrs[k] - addrs[0] > 0xFFFFu) {
            e->ambiguous = 1;
            return 0;
        }
    e->address = address;
    e->first = addrs[0];
    e->end = end;
    for (k = 0; k < n; k++) e->offset[k] = (uint16_t)(addrs[k] - addrs[0]);
    e->n = (uint16_t)n;
    return 1;
}

void trapfast_blocks_drop(trapfast_t *s, uint32_t address) {
    block_t *e = block_slot(s, address);
    if (e->address == address) e->n = 0;
}

void trapfast_blocks_clear(trapfast_t *s) {
    uint32_t k;
    for (k = 0; k < BLOCK_SLOTS; k++) s->block[k].n = s->block[k].ambiguous = 0;
}

/* The running block's entry in the copy (the clock's last block): 1 with *out (NULL when the table
 * holds none: nothing to take off), 0 when the copy cannot tell (an ambiguous slot: Python's). */
static int running_block(trapfast_t *s, const block_t **out) {
    uint64_t last = *s->clock_last_block;
    const block_t *e = block_slot(s, (uint32_t)last);
    if (e->n == 0 || e->address != last) {
        if (e->ambiguous || last > 0xFFFFFFFFu) {
            s->misses++;
            return 0;
        }
        e = NULL;
    }
    *out = e;
    return 1;
}

/* TrapVcpu._retired(eip): how many instructions to take off the clock (-1: the engine cut the block
 * before the faulting instruction, so the clock never counted it; 0 when the table holds no entry for
 * the block). Returns 0 when the copy cannot tell (Python's to do). */
static int retired(trapfast_t *s, uint32_t eip, int64_t *out) {
    const block_t *e;
    int64_t n = 0;
    int in = 0;
    uint32_t k;
    if (!running_block(s, &e)) return 0;
    if (!e) {
        *out = 0;                          /* no entry: _retired returns at once */
        return 1;
    }
    for (k = 0; k < e->n; k++) {
        uint64_t a = e->first + (uint64_t)e->offset[k];
        if (a == eip) in = 1;
        if (e->first <= eip && eip < e->end && a > eip) n++;
    }
    *out = in ? n : n - 1;
    return 1;
}

/* -- the instruction's bytes: the guest's tables read with no side effect (Mmu.fetch_bytes) -------- */
static int ram32(const trapfast_t *s, uint64_t gpa, uint32_t *out) {
    if (gpa + 4 > s->ev.ram_bytes) return 0;
    memcpy(out, s->ev.ram + gpa, 4);
    return 1;
}

/* 1 and `n` bytes at `eip` when the whole 15-byte window TrapVcpu._trap_site reads is in one present
 * page of guest RAM (32-bit paging, 4 KiB or 4 MiB pages, or paging off). */
static int code_at(const trapfast_t *s, uint32_t eip, uint8_t *out, uint32_t n) {
    uint32_t cr0 = s->crs[0], cr3 = s->crs[1], cr4 = s->crs[2];
    uint64_t gpa;
    if ((eip & 0xFFFu) > 0x1000u - 15u) return 0;
    if (!(cr0 & CR0_PG)) {
        gpa = eip;
    } else {
        uint32_t pde, pte;
        if (cr4 & CR4_PAE) return 0;
        if (!ram32(s, (cr3 & 0xFFFFF000u) | ((eip >> 20) & 0xFFCu), &pde) || !(pde & 1)) return 0;
        if ((pde & 0x80u) && (cr4 & CR4_PSE)) {
            if (pde & 0x3FE000u) return 0;  /* PSE-36 high bits or the reserved bit: Python's walk decides */
            gpa = (pde & 0xFFC00000u) | (eip & 0x3FFFFFu);
        } else {
            if (!ram32(s, (pde & 0xFFFFF000u) | ((eip >> 10) & 0xFFCu), &pte) || !(pte & 1)) return 0;
            gpa = (pte & 0xFFFFF000u) | (eip & 0xFFFu);
        }
    }
    if (gpa + 15 > s->ev.ram_bytes) return 0;
    memcpy(out, s->ev.ram + gpa, n);
    return 1;
}

/* -- mov to CR0/CR4: EmulatingVcpu.write_cr when it only stores the value ------------------------------ */
static int write_cr_plain(trapfast_t *s, int cr4, uint32_t value) {
    uint32_t *slot = &s->crs[cr4 ? 2 : 0];
    uint32_t old = *slot, new = cr4 ? value : (value | CR0_ET);
    uint32_t allowed = cr4 ? CR4_PGE : CR0_WP;
    if ((old ^ new) & ~allowed) return 0;                       /* PG, PE, PAE, PSE...: Python's */
    if (cr4 && (value & ~old & s->cr4_reserved)) return 0;      /* #GP: Python's */
    if (old != new) {
        /* flush_guest_tlb(rules_changed=False): ShadowPaging.tlb_flush must find nothing to do */
        if (!s->shadow_ok) return 0;
        if (!cr4 && (new & CR0_WP) && s->wp_granted) return 0;
        s->ev.rtlb_gen++;
    }
    *slot = new;
    return 1;
}

static int rd(trapfast_t *s, void *uc, int reg, uint64_t *v) {
    *v = 0;
    return s->reg_read(uc, reg, v) == 0;
}

/* -- the hypervisor's own linear accesses of event delivery (Mmu.read_linear / write_linear with
 * user=False under ShadowPaging): the guest-physical address of `n` bytes at `gva` in one page when
 * ShadowPaging.gva_to_gpa answers it from an entry of the current root with no side effect at all
 * (no walk, no root selection, no mode change, no WP grant) and it is RAM; for a write, also the
 * entry's D bit set, writable, and a frame no one traces (Mmu.write_linear would call hv_wrote).
 * 0 for anything else: Python's. */
static int shadow_gpa(const trapfast_t *s, uint32_t gva, uint32_t n, int write, uint64_t *out) {
    uint32_t cr0 = s->crs[0], cr3 = s->crs[1], cr4 = s->crs[2], page = gva >> 12, writable;
    uint64_t gpa;
    if ((gva & 0xFFFu) + n > 0x1000u) return 0;
    if (!(cr0 & CR0_PG)) {
        gpa = gva;
    } else {
        const sentry_t *e = sm_entry(s->mirror, cr0, cr3, cr4, page);   /* else a mode change, _select, a walk */
        if (!e) return 0;
        writable = (e->rights & PTE_RW) || !(cr0 & CR0_WP);
        if (writable && e->dirty && !(e->rights & PTE_RW) && !s->wp_granted) return 0;   /* _granted */
        if (write && !(writable && e->dirty)) return 0;
        gpa = (uint64_t)e->gpa | (gva & 0xFFFu);
    }
    if (gpa + n > s->ev.ram_bytes) return 0;
    if (write && sm_traced(s->mirror, gpa)) return 0;
    *out = gpa;
    return 1;
}

/* read_hv with the guest-physical address of what it read */
static int read_hv_at(const trapfast_t *s, uint32_t gva, void *out, uint32_t n, uint64_t *gpa) {
    uint32_t page = gva >> 12;
    const ev_rtlb_t *e = &s->ev.rtlb[page & (EV_RTLB_SLOTS - 1)];
    if (!ev_read_hv(&s->ev, gva, out, n)) return 0;
    *gpa = e->gpa + (gva & 0xFFFu);
    return 1;
}

/* SegmentLoadingVcpu.descriptor(selector) for a GDT selector, read through the hypervisor's TLB */
static int gdt_descriptor(const trapfast_t *s, uint32_t selector, uint32_t desc[2], uint64_t *gpa) {
    uint32_t index = selector & ~7u;
    if ((selector & 4) || !index || index + 7 > s->ev.gdt_limit) return 0;
    if ((uint64_t)s->ev.gdt_base + index + 8 > 0x100000000ull) return 0;
    return read_hv_at(s, s->ev.gdt_base + index, desc, 8, gpa);
}

static int overlaps(uint64_t a, uint32_t an, uint64_t b, uint32_t bn) { return a < b + bn && b < a + an; }

/* Vcpu.left_block_at(boundary): instructions of the running block from `boundary` on (0: the copy
 * cannot tell, Python's) */
static int left_block(trapfast_t *s, uint32_t boundary, int64_t *out) {
    const block_t *e;
    int64_t n = 0;
    uint32_t k;
    if (!running_block(s, &e)) return 0;
    if (e && e->first <= boundary && boundary < e->end)
        for (k = 0; k < e->n; k++)
            if (e->first + (uint64_t)e->offset[k] >= boundary) n++;
    *out = n;
    return 1;
}

/* -- an event through the guest's IDT: RingCompressedDelivery (EventDelivery._deliver) -------------
 * Only its common case: a present 32-bit interrupt or trap gate (DPL >= CPL for `int n`) to a
 * present, accessed, non-conforming, 32-bit DPL-0 code segment of the GDT, from the guest kernel
 * (virtual CPL 0, real ring 1, the gate's CS being the one it runs in: no CS load) or from ring 3
 * (the TSS's SS0:ESP0 with a present, accessed, writable DPL-0 data segment of the GDT: SS and CS
 * loaded ring-compressed as _load_direct does); the IDT entry, the TSS slot and the frame each in
 * one page shadow paging maps with no side effect (shadow_gpa), the descriptors in pages the
 * hypervisor's TLB holds (read_hv), the frame in none of the bytes read after it. The registers
 * are written in Python's order: (SS, CS,) ESP, EFLAGS, EIP. Returns 0 with nothing changed for
 * anything else: a fault of the delivery, a task gate, V86, a ring Python must load... */
static int deliver_event(trapfast_t *s, void *uc, uint32_t vector, int soft, uint32_t ret_eip, int has_ec,
                         uint32_t ec, uint32_t cs_real, uint64_t eflags_real) {
    uint32_t gate[2], cdesc[2], sdesc[2] = {0, 0}, tss[2], frame[6], selector, offset, gtype, cpl, old_cs;
    uint32_t new_ss = 0, esp, n = 0, k, guest_eflags, new_flags;
    uint64_t gpa, cgpa, sgpa = 0, fgpa, v, esp_now, ss_now;
    uint8_t tssb[6];
    if (!s->ev.segs_ok || (eflags_real & EFLAGS_VM)) return 0;
    if ((cs_real & 3) == 3)
        cpl = 3;
    else if ((cs_real & 3) == 1)
        cpl = 0;
    else
        return 0;
    if (vector * 8 + 7 > s->idt_limit) return 0;
    if ((uint64_t)s->idt_base + vector * 8 + 8 > 0x100000000ull) return 0;
    if (!shadow_gpa(s, s->idt_base + vector * 8, 8, 0, &gpa)) return 0;
    memcpy(gate, s->ev.ram + gpa, 8);
    gtype = (gate[1] >> 8) & 0x1F;
    if (gtype != 0xE && gtype != 0xF) return 0;
    if (soft && ((gate[1] >> 13) & 3) < cpl) return 0;
    if (!(gate[1] & EV_DESC_P)) return 0;
    selector = gate[0] >> 16;
    offset = (gate[0] & 0xFFFFu) | (gate[1] & 0xFFFF0000u);
    if (!gdt_descriptor(s, selector, cdesc, &cgpa)) return 0;
    if (!(cdesc[1] & EV_DESC_CODE) || !(cdesc[1] & EV_DESC_S) || (cdesc[1] & EV_DESC_C)) return 0;
    if (((cdesc[1] >> 13) & 3) != 0 || !(cdesc[1] & EV_DESC_P)) return 0;
    if (!(cdesc[1] & EV_DESC_A) || !(cdesc[1] & (1u << 22))) return 0;   /* _set_accessed, CODE16 */
    guest_eflags = ((uint32_t)eflags_real & ~EFLAGS_IOPL) | (s->ev.iopl << EFLAGS_IOPL_SHIFT);
    old_cs = (cs_real & 3) == 1 ? cs_real & ~3u : cs_real;              /* guest_selector */
    if (has_ec) frame[n++] = ec;
    frame[n++] = ret_eip;
    frame[n++] = old_cs;
    frame[n++] = guest_eflags;
    if (!rd(s, uc, s->r_esp, &esp_now)) return 0;
    if (cpl == 3) {                                                     /* _stack_from_tss(0) */
        if (4 + 5 > s->tr_limit) return 0;
        if ((uint64_t)s->tr_base + 4 + 6 > 0x100000000ull) return 0;
        if (!shadow_gpa(s, s->tr_base + 4, 6, 0, &gpa)) return 0;
        memcpy(tssb, s->ev.ram + gpa, 6);
        memcpy(&tss[0], tssb, 4);
        new_ss = (uint32_t)tssb[4] | ((uint32_t)tssb[5] << 8);
        if (!(new_ss & ~3u) || (new_ss & 3)) return 0;
        if (!gdt_descriptor(s, new_ss, sdesc, &sgpa)) return 0;
        if (((sdesc[1] >> 13) & 3) != 0 || !(sdesc[1] & EV_DESC_S) || (sdesc[1] & EV_DESC_CODE) || !(sdesc[1] & EV_DESC_R))
            return 0;
        if (!(sdesc[1] & EV_DESC_P) || !(sdesc[1] & EV_DESC_A)) return 0;
        if (!rd(s, uc, s->r_ss, &ss_now)) return 0;
        frame[n++] = (uint32_t)esp_now;
        frame[n++] = (uint32_t)ss_now;                                  /* ring 3: its own view */
        esp = tss[0];
    } else {
        if ((cs_real & ~3u) != (selector & ~3u)) return 0;              /* a CS load: Python's */
        esp = (uint32_t)esp_now;
    }
    esp -= 4 * n;
    if (!shadow_gpa(s, esp, 4 * n, 1, &fgpa)) return 0;
    /* Python reads the descriptors again after the frame is written (load_cs_ss, hv_load) */
    if (cpl == 3 && (overlaps(fgpa, 4 * n, cgpa, 8) || overlaps(fgpa, 4 * n, sgpa, 8))) return 0;
    /* _load_direct's checks of the shadow descriptors (a RuntimeError there) */
    if (cpl == 3 && !(cdesc[1] & EV_DESC_R)) return 0;                      /* execute-only CS */
    /* From here on the delivery is ours. */
    for (k = 0; k < n; k++) memcpy((uint8_t *)s->ev.ram + fgpa + 4 * k, &frame[k], 4);
    new_flags = guest_eflags & ~(EFLAGS_TF | EFLAGS_NT | EFLAGS_RF | EFLAGS_VM);
    if (gtype == 0xE) new_flags &= ~EFLAGS_IF;
    if (cpl == 3) {                                                     /* load_cs_ss -> _load_direct */
        ev_segcache_t *segs = (ev_segcache_t *)(s->ev.env + s->ev.off_segs);
        uint32_t hf, shi, lim, sel;
        int which;
        memcpy(&hf, s->ev.env + s->ev.off_hflags, 4);
        hf = (hf & ~3u) | 1u;
        for (which = 0; which < 2; which++) {                           /* SS, then CS */
            const uint32_t *d = which ? cdesc : sdesc;
            int seg = which ? 1 : 2;
            sel = ((which ? selector : new_ss) & ~3u) | 1u;
            shi = d[1] | (1u << 13);                                    /* ShadowGdt.compress: DPL 1 */
            segs[seg].selector = sel;
            segs[seg].base = (d[0] >> 16) | ((shi & 0xFFu) << 16) | (shi & 0xFF000000u);
            lim = (d[0] & 0xFFFFu) | (shi & 0xF0000u);
            segs[seg].limit = (shi & EV_DESC_G) ? (lim << 12) | 0xFFFu : lim;
            segs[seg].flags = shi | EV_DESC_A;
            if (which)
                hf = (hf & ~EV_HF_CS32) | (((shi >> 22) & 1u) << 4);
            else
                hf = (hf & ~3u) | 1u;
            s->ev.loaded[seg][0] = sel;
            s->ev.loaded[seg][1] = d[0];
            s->ev.loaded[seg][2] = d[1] | EV_DESC_A;
            s->ev.loaded_new |= 1u << seg;
            s->ev.loaded_known |= 1u << seg;
        }
        hf = (hf & ~(EV_HF_SS32 | EV_HF_ADDSEG)) | (((segs[2].flags >> 22) & 1u) << 5);
        if (!(hf & EV_HF_CS32) || (segs[0].base | segs[2].base | segs[3].base)) hf |= EV_HF_ADDSEG;
        memcpy(s->ev.env + s->ev.off_hflags, &hf, 4);
    }
    v = esp;
    s->reg_write(uc, s->r_esp, &v);
    s->ev.iopl = (new_flags >> EFLAGS_IOPL_SHIFT) & 3;                     /* set_guest_eflags: real IOPL 0 */
    v = (new_flags & ~EFLAGS_IOPL) | 2u;
    s->reg_write(uc, s->r_eflags, &v);
    v = offset;
    s->reg_write(uc, s->r_eip, &v);
    return 1;
}

/* An event the engine raised, when deliver_event can deliver it: `int n` (not int3/into, whose
 * length Python decides) or #DE, or #GP from ring 3 (at ring 1 a #GP is trap's emulation), of a
 * kind Python has recorded once. Does what Vcpu.hook_intr and TrapVcpu.on_engine_event do around
 * the delivery: FaultState.take's old_exception, left_block_at, the counts, if_may_have_changed. */
static int event(trapfast_t *s, void *uc, uint32_t intno, int soft) {
    uint64_t cs, eflags, eip;
    uint32_t ec = 0;
    int32_t minus1 = -1;
    int64_t n = 0;
    int has_ec = 0;
    if (!s->deliver_on || intno > 255) return 0;
    if (soft) {
        if (intno == 3 || intno == 4 || !s->soft_seen[intno]) return 0;
    } else {
        if ((intno != 0 && intno != 13) || !s->fault_seen[intno]) return 0;
        if (intno == 13) {
            has_ec = 1;
            memcpy(&ec, s->ev.env + s->off_error_code, 4);
        }
    }
    if (!rd(s, uc, s->r_cs, &cs) || !rd(s, uc, s->r_eflags, &eflags) || !rd(s, uc, s->r_eip, &eip)) return 0;
    if (intno == 13 && ((cs & 3) != 3 || (eflags & EFLAGS_VM))) return 0;
    if (!left_block(s, (uint32_t)eip, &n)) return 0;
    if (!deliver_event(s, uc, intno, soft, (uint32_t)eip, has_ec, ec, (uint32_t)cs, eflags)) return 0;
    memcpy(s->ev.env + s->off_old_exception, &minus1, 4);
    *s->clock_now -= (uint64_t)n;
    if (*s->clock_watch_if && !*s->clock_check_if) *s->clock_check_if = 1;
    if (soft)
        s->soft_count[intno]++;
    else
        s->fault_count[intno]++;
    s->dpending++;
    s->delivered++;
    return 1;
}

/* A #PF Python's run loop found (a refused TLB fill: DeprivilegedVcpu.page_fault, which recorded it and
 * set the virtual CR2) delivered here when deliver_event can: 1, or 0 with nothing changed (Python
 * delivers it). Called through ctypes with the engine stopped; the counts and the clock are Python's. */
int trapfast_deliver_fault(trapfast_t *s, void *uc, uint32_t vector, uint32_t eip, uint32_t error_code) {
    uint64_t cs, eflags;
    if (!s->enabled || !s->deliver_on || vector != 14) return 0;
    if (!rd(s, uc, s->r_cs, &cs) || !rd(s, uc, s->r_eflags, &eflags)) return 0;
    if (!deliver_event(s, uc, vector, 0, eip, 1, error_code, (uint32_t)cs, eflags)) return 0;
    s->delivered++;
    return 1;
}

void trapfast_intr_hook(void *uc, uint32_t intno, void *user_data) {
    trapfast_t *s = (trapfast_t *)user_data;
    uint64_t cs, eflags, eip, value = 0, next, esp = 0;
    uint32_t frame[5], plain;
    uint8_t code[3];
    int32_t is_int, minus1 = -1;
    int64_t unretire = 0;
    int kind, size, reg = -1, to_cr = 0, seg = -1;
    if (!s->enabled) goto python;
    memcpy(&is_int, s->ev.env + s->off_is_int, 4);
    if (is_int || intno != 13) {
        if (event(s, uc, intno, is_int != 0)) return;
        goto python;
    }
    if (!rd(s, uc, s->r_cs, &cs)) goto python;
    if ((cs & 3) == 3 && event(s, uc, intno, 0)) return;
    if ((cs & 3) != 1) goto python;
    if (!rd(s, uc, s->r_eflags, &eflags) || (eflags & EFLAGS_VM)) goto python;
    if (!rd(s, uc, s->r_eip, &eip)) goto python;
    if (!code_at(s, (uint32_t)eip, code, 3)) goto python;
    if (code[0] == 0xFA) {
        kind = K_CLI, size = 1;
    } else if (code[0] == 0xFB) {
        if (*s->clock_watch_if) goto python;   /* an interrupt waits for this window: Python's */
        kind = K_STI, size = 1;
    } else if (code[0] == 0x0F && code[1] == 0x06) {
        kind = K_CLTS, size = 2;
    } else if (code[0] == 0x0F && code[1] == 0x20 && (code[2] >> 6) == 3 && ((code[2] >> 3) & 7) == 2) {
        kind = K_MOV_CR2, size = 3;                                     /* mov r32, cr2 */
        reg = code[2] & 7;
    } else if (code[0] == 0x0F && (code[1] == 0x20 || code[1] == 0x22) && (code[2] >> 6) == 3) {
        int n = (code[2] >> 3) & 7;
        if (n != 0 && n != 4) goto python;
        kind = n ? K_MOV_CR4 : K_MOV_CR0, size = 3;
        reg = code[2] & 7;
        to_cr = code[1] == 0x22;
    } else if (code[0] == 0x8E && (code[1] >> 6) == 3) {                /* mov sreg, r32 */
        kind = K_MOV_SREG, size = 2;
        seg = (code[1] >> 3) & 7;
        reg = code[1] & 7;
    } else if (code[0] == 0x66 && code[1] == 0x8E && (code[2] >> 6) == 3) {   /* mov sreg, r16 */
        kind = K_MOV_SREG, size = 3;
        seg = (code[2] >> 3) & 7;
        reg = code[2] & 7;
    } else if (code[0] == 0xCF) {                                       /* iretd */
        kind = K_IRETD, size = 1;
    } else if (code[0] == 0x07 || code[0] == 0x1F) {                    /* pop es / pop ds */
        kind = K_POP_SREG, size = 1;
        seg = code[0] == 0x07 ? 0 : 3;
    } else if (code[0] == 0x0F && (code[1] == 0xA1 || code[1] == 0xA9)) {   /* pop fs / pop gs */
        kind = K_POP_SREG, size = 2;
        seg = code[1] == 0xA1 ? 4 : 5;
    } else {
        goto python;
    }
    if (!s->seen[kind] || !retired(s, (uint32_t)eip, &unretire)) goto python;
    if (to_cr) {
        if (!rd(s, uc, s->r_gpr[reg], &value)) goto python;
        if (!write_cr_plain(s, kind == K_MOV_CR4, (uint32_t)value)) goto python;   /* nothing changed */
    } else if (kind == K_MOV_SREG) {
        if (!rd(s, uc, s->r_gpr[reg], &value)) goto python;
        if (ev_load_data_segment(&s->ev, seg, (uint32_t)value, &plain) != 1) goto python;  /* nothing changed */
    } else if (kind == K_IRETD) {
        /* to the kernel's own ring only (an iretd to ring 3 runs natively at ring 1) */
        if (!rd(s, uc, s->r_esp, &esp) || ev_iret(&s->ev, (uint32_t)esp, (uint32_t)cs, (uint32_t)eflags, 1, 0, frame) != 1)
            goto python;
    } else if (kind == K_POP_SREG) {
        uint16_t sel;
        if (!rd(s, uc, s->r_esp, &esp)) goto python;
        if (!ev_read_hv(&s->ev, (uint32_t)esp, &sel, 2)) goto python;
        if (ev_load_data_segment(&s->ev, seg, sel, &plain) != 1) goto python;  /* nothing changed */
    }
    /* From here on the trap is ours: FaultState.take's escalation fix, then the emulation. */
    memcpy(s->ev.env + s->off_old_exception, &minus1, 4);
    next = (uint32_t)(eip + size);
    switch (kind) {
    case K_CLI:
        eflags &= ~(uint64_t)EFLAGS_IF;
        s->reg_write(uc, s->r_eflags, &eflags);
        s->reg_write(uc, s->r_eip, &next);
        break;
    case K_STI: {
        uint64_t set = eflags | EFLAGS_IF;
        s->reg_write(uc, s->r_eflags, &set);
        s->reg_write(uc, s->r_eip, &next);
        if (!(eflags & EFLAGS_IF)) {           /* SegmentLoadingVcpu.set_interrupt_shadow */
            uint32_t hf;
            memcpy(&hf, s->ev.env + s->ev.off_hflags, 4);
            hf |= HF_INHIBIT_IRQ;
            memcpy(s->ev.env + s->ev.off_hflags, &hf, 4);
        }
        break;
    }
    case K_CLTS:
        s->crs[0] &= ~CR0_TS;
        s->reg_write(uc, s->r_eip, &next);
        break;
    case K_MOV_SREG:
        s->reg_write(uc, s->r_eip, &next);
        break;
    case K_MOV_CR2:
        value = s->ev.cr2;
        s->reg_write(uc, s->r_gpr[reg], &value);
        s->reg_write(uc, s->r_eip, &next);
        break;
    case K_IRETD: {                /* ESP, the virtual IOPL and the real EFLAGS (IOPL 0), EIP */
        uint64_t up = (uint32_t)(esp + 12), fl, to = frame[0];
        s->reg_write(uc, s->r_esp, &up);
        s->ev.iopl = (frame[2] >> 12) & 3;
        fl = (frame[2] & ~(EFLAGS_RF | EFLAGS_IOPL)) | 2u;
        s->reg_write(uc, s->r_eflags, &fl);
        s->reg_write(uc, s->r_eip, &to);
        break;
    }
    case K_POP_SREG: {
        uint64_t up = (uint32_t)(esp + 4);
        s->reg_write(uc, s->r_esp, &up);
        s->reg_write(uc, s->r_eip, &next);
        break;
    }
    default:
        if (!to_cr) {
            value = s->crs[kind == K_MOV_CR4 ? 2 : 0];
            s->reg_write(uc, s->r_gpr[reg], &value);
        }
        s->reg_write(uc, s->r_eip, &next);
        break;
    }
    *s->clock_now -= (uint64_t)unretire;       /* VirtualClock.unretire */
    if (*s->clock_watch_if && !*s->clock_check_if) *s->clock_check_if = 1;   /* if_may_have_changed */
    s->count[kind]++;
    s->pending++;
    s->answered++;
    return;
python:
    s->to_python++;
    s->python_intr(uc, intno, NULL);
}

/* -- iret sites: the intercept's code hook in front of every iret (Vcpu.far_site) -----------------
 * Before an iretd runs, Python looks at it (cpu/vcpu.py far_site): iret_image_rf clears RF in the
 * EFLAGS image (read with no side effect, as Mmu.fetch_bytes reads), iret_site ends NMI blocking and
 * does task returns (NT), and at CPL > 0 iret_to_v86 / strip_vm_image read the image through the
 * hypervisor's TLB for VM. In the common case none applies and Python does nothing but the interrupt-
 * window check of the intercept's caller. This hook does that case here: an iretd (CF, 32-bit code and
 * stack), no NMI blocking, no VM or NT in EFLAGS, real CPL 1 or 3, CR0.WP set (the side-effect-free read
 * of the image then grants nothing: ShadowPaging.gva_to_gpa), the image at SS:ESP + 8 in one page of
 * RAM through the guest's tables with RF clear, and at ESP + 8 in a page the hypervisor's TLB holds with
 * VM clear. Anything else: the Python hook. */
typedef void (*code_fn)(void *uc, uint64_t address, uint32_t size, void *user_data);

typedef struct {
    trapfast_t *s;
    code_fn python;            /* Intercepts._hit, guarded */
    uint64_t passed;
} iret_site_t;

size_t trapfast_iret_site_sizeof(void) { return sizeof(iret_site_t); }

/* the guest-physical address of `gva` through the guest's 32-bit tables, with no side effect */
static int peek_gpa(const trapfast_t *s, uint32_t gva, uint64_t *out) {
    uint32_t cr0 = s->crs[0], cr3 = s->crs[1], cr4 = s->crs[2], pde, pte;
    if (!(cr0 & CR0_PG)) {
        *out = gva;
        return 1;
    }
    if (cr4 & CR4_PAE) return 0;
    if (!ram32(s, (cr3 & 0xFFFFF000u) | ((gva >> 20) & 0xFFCu), &pde) || !(pde & 1)) return 0;
    if ((pde & 0x80u) && (cr4 & CR4_PSE)) {
        if (pde & 0x3FE000u) return 0;
        *out = (pde & 0xFFC00000u) | (gva & 0x3FFFFFu);
        return 1;
    }
    if (!ram32(s, (pde & 0xFFFFF000u) | ((gva >> 10) & 0xFFCu), &pte) || !(pte & 1)) return 0;
    *out = (pte & 0xFFFFF000u) | (gva & 0xFFFu);
    return 1;
}

static int iret_nothing_to_do(trapfast_t *s, void *uc, uint32_t address, uint32_t size) {
    uint64_t eflags, cs, esp, gpa;
    uint32_t hf, image, linear;
    uint8_t code[1];
    const ev_segcache_t *segs;
    if (!s->enabled || !s->iret_on || !s->ev.segs_ok || s->ev.nmi_blocked || size != 1) return 0;
    if (!peek_gpa(s, address, &gpa) || gpa + 1 > s->ev.ram_bytes) return 0;
    memcpy(code, s->ev.ram + gpa, 1);
    if (code[0] != 0xCF) return 0;                                      /* (re)decoded by Python */
    memcpy(&hf, s->ev.env + s->ev.off_hflags, 4);
    if (!(hf & EV_HF_CS32) || !(hf & EV_HF_SS32)) return 0;
    if (!(s->crs[0] & CR0_WP)) return 0;
    if (!rd(s, uc, s->r_eflags, &eflags) || (eflags & (EFLAGS_VM | EFLAGS_NT))) return 0;
    if (!rd(s, uc, s->r_cs, &cs) || ((cs & 3) != 1 && (cs & 3) != 3)) return 0;
    if (!rd(s, uc, s->r_esp, &esp)) return 0;
    segs = (const ev_segcache_t *)(s->ev.env + s->ev.off_segs);
    linear = (uint32_t)(segs[2].base + (uint32_t)(esp + 8));            /* iret_image_rf */
    if ((linear & 0xFFFu) > 0x1000u - 4 || !peek_gpa(s, linear, &gpa) || gpa + 4 > s->ev.ram_bytes) return 0;
    memcpy(&image, s->ev.ram + gpa, 4);
    if (image & EFLAGS_RF) return 0;
    if (!ev_read_hv(&s->ev, (uint32_t)(esp + 8), &image, 4) || (image & EFLAGS_VM)) return 0;   /* iret_to_v86 */
    return 1;
}

void trapfast_iret_hook(void *uc, uint64_t address, uint32_t size, void *user_data) {
    iret_site_t *site = (iret_site_t *)user_data;
    trapfast_t *s = site->s;
    if (!iret_nothing_to_do(s, uc, (uint32_t)address, size)) {
        site->python(uc, address, size, NULL);
        return;
    }
    if (*s->clock_watch_if && !*s->clock_check_if) *s->clock_check_if = 1;   /* if_may_have_changed */
    site->passed++;
    s->irets++;
}

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_trapfast", NULL, -1, NULL};

PyMODINIT_FUNC PyInit__trapfast(void) { return PyModule_Create(&module); }
