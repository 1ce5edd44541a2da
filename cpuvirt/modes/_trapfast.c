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
 *   0F 01 /7    invlpg m       the page out of the hypervisor's TLB and the shadow's current root
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
#include "../cpu/_evdeliver.h"   /* event delivery and the block copy, shared with full (with _shadowmirror.h) */
#include "../cpu/_modrm.h"   /* the ModRM memory operand, shared with the native #PF's CR2 (cpu/_delivery.c) */
#include "../cpu/_truefault.h"   /* a true #PF's walk and CR2, shared with full's (bt/_callout.c) */
#include "../cpu/_storeop.h"   /* the value and flags of an emulated store, shared with full's adaptive stores */
#include "../engine/_vclock.h"   /* the clock's interrupt-window look (its stubs' limit) */
#include "../engine/_tlbhook.h"   /* the TLB-fill hook's entry and access types */

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


#define BLOCK_SLOTS ED_BLOCK_SLOTS

/* The kinds answered here, each with its (kind, reason) key of Vcpu.reasons (trapfast.py REASONS). */
enum { K_CLI, K_STI, K_CLTS, K_MOV_CR0, K_MOV_CR4, K_MOV_SREG, K_POP_SREG, K_MOV_CR2, K_IRETD, K_MOV_CR3, K_INVLPG,
       K_PTEMOD, K_PF, K_COUNT };

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
    vclock_time_t *clock_now;  /* the virtual clock's time (engine/_vclock.h) */
    const volatile uint32_t *clock_last_block;
    uint32_t *clock_watch_if, *clock_check_if;
    uint64_t pending;          /* events counted here since Python last folded them */
    uint64_t count[K_COUNT];
    uint8_t seen[K_COUNT];     /* Python has recorded this kind once (its counter keys exist) */
    uint8_t pad2[6];
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
    /* mov to CR3 that selects the current shadow root again (cr3_reload_ok) */
    int (*uc_ctl)(void *uc, int control, ...);   /* uc_ctl, for the engine's TLB flush */
    int32_t tlb_flush_ctl;     /* UC_CTL_WRITE(UC_CTL_TLB_FLUSH, 0) */
    uint32_t invlpg_on;        /* 0: invlpg is Python's (CPUVIRT_INVLPG_C=0) */
    uint64_t cr3_reloads;      /* ShadowCounters.cr3_switches and root_hits to add (Python folds them) */
} trapfast_t;

size_t trapfast_sizeof(void) { return sizeof(trapfast_t); }

/* -- the copy of Machine.block_insns (the BlockMirror of machine/blocks.py; cpu/_evdeliver.h) ------ */
int trapfast_blocks_put(trapfast_t *s, uint32_t address, const uint32_t *addrs, uint32_t n, uint64_t end) {
    return ed_blocks_put(s->block, address, addrs, n, end);
}

void trapfast_blocks_drop(trapfast_t *s, uint32_t address) { ed_blocks_drop(s->block, address); }

void trapfast_blocks_clear(trapfast_t *s) { ed_blocks_clear(s->block); }

static int running_block(trapfast_t *s, const block_t **out) {
    return ed_running_block(s->block, *s->clock_last_block, &s->misses, out);
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

/* 1 and `n` bytes at `eip` when the whole 15-byte window TrapVcpu._trap_site reads is in one present
 * page of guest RAM (32-bit paging, 4 KiB or 4 MiB pages, or paging off). */
static int code_at(const trapfast_t *s, uint32_t eip, uint8_t *out, uint32_t n) {
    uint64_t gpa;
    if ((eip & 0xFFFu) > 0x1000u - 15u || !peek_gpa(s, eip, &gpa)) return 0;
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

/* -- mov to CR3 that selects the shadow's current root again (a TLB flush: kernels reload CR3 for it) --
 * EmulatingVcpu.write_cr(3) then does only this: the virtual CR3, the hypervisor's TLB cleared, and
 * ShadowPaging.on_cr3_write's switch count, root hit (the key is _cur_key) and engine TLB flush, when its
 * _resync has nothing to do (no unsynchronised frame: shadow_ok). Another root: Python's (_select). */
static int cr3_reload_ok(const trapfast_t *s, uint32_t value) {
    const shadowmirror_t *m = s->mirror;
    return m && s->uc_ctl && s->shadow_ok && m->serial && (value & 0xFFFFF000u) == m->key;
}

static int rd(trapfast_t *s, void *uc, int reg, uint64_t *v) {
    *v = 0;
    return s->reg_read(uc, reg, v) == 0;
}

/* EIP where the engine goes on, from the interrupt hook or a path that ends in cpu_loop_exit (_evseg.h
 * ev_set_eip: not through uc_reg_write, whose EIP makes the engine leave its loop and enter it again). */
static void set_eip(trapfast_t *s, void *uc, uint64_t *eip) {
    if (!ev_set_eip(&s->ev, (uint32_t)*eip)) s->reg_write(uc, s->r_eip, eip);
}

/* invlpg m: privileged.py _invlpg when it does only this (ShadowPaging.invlpg in the shadow's current
 * root, as bt/_callout.c's INVLPG does it): the page leaves the hypervisor's TLB and the shadow root (the
 * copies now, Python's dict and table when they are next used), the engine's TLB is flushed. 0: the
 * virtual CRs do not select the copy's root and mode, or a log is full (Python's, nothing changed). */
static int invlpg_ok(trapfast_t *s, uint32_t gva) {
    shadowmirror_t *m = (shadowmirror_t *)s->mirror;
    uint32_t page = gva >> 12;
    if (!s->invlpg_on || !m || !s->uc_ctl || !m->serial || m->made >= SM_MADE) return 0;
    if (((s->crs[0] & CR0_PG) | (s->crs[2] & CR4_PSE)) != m->mode || (s->crs[1] & 0xFFFFF000u) != m->key) return 0;
    if (!ev_rtlb_pop(&s->ev, page)) return 0;
    sm_invlpg(m, page, s->ev.ram, s->ev.ram_bytes);
    return 1;
}

/* Vcpu.left_block_at(boundary) (cpu/_evdeliver.h) */
static int left_block(trapfast_t *s, uint32_t boundary, int64_t *out) {
    return ed_left_block(s->block, *s->clock_last_block, &s->misses, boundary, out);
}

/* -- an event through the guest's IDT: cpu/_evdeliver.h ed_deliver_event, the handler run in place ---- */
static int enter_in_place(void *ctx, void *uc, uint32_t offset, uint32_t cs_after, uint32_t ss_after, uint32_t *eip) {
    (void)ctx, (void)uc, (void)cs_after, (void)ss_after;
    *eip = offset;
    return 1;
}

static int deliver_event(trapfast_t *s, void *uc, uint32_t vector, int soft, uint32_t ret_eip, int has_ec,
                         uint32_t ec, uint32_t cs_real, uint64_t eflags_real, int leaves_block) {
    evdeliver_t d;
    d.ev = &s->ev;
    d.reg_read = s->reg_read;
    d.reg_write = s->reg_write;
    d.r_eip = s->r_eip, d.r_eflags = s->r_eflags, d.r_esp = s->r_esp, d.r_ss = s->r_ss;
    d.cr0 = s->crs[0], d.cr3 = s->crs[1], d.cr4 = s->crs[2];
    d.wp_granted = s->wp_granted;
    d.idt_base = s->idt_base, d.idt_limit = s->idt_limit;
    d.tr_base = s->tr_base, d.tr_limit = s->tr_limit;
    d.mirror = s->mirror;
    d.kernel_iopl = 0;                 /* TrapVcpu: the real IOPL is always 0 (cli/sti trap) */
    d.enter = enter_in_place;
    d.enter_ctx = NULL;
    d.leaves_block = leaves_block;
    return ed_deliver_event(&d, uc, vector, soft, ret_eip, has_ec, ec, cs_real, eflags_real);
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
    if (!deliver_event(s, uc, intno, soft, (uint32_t)eip, has_ec, ec, (uint32_t)cs, eflags, 1)) return 0;
    memcpy(s->ev.env + s->off_old_exception, &minus1, 4);
    vclock_add(s->clock_now, -(int64_t)(n));
    vclock_look_at_if(s->clock_watch_if, s->clock_check_if);
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
    if (!deliver_event(s, uc, vector, 0, eip, 1, error_code, (uint32_t)cs, eflags, 0)) return 0;
    s->delivered++;
    return 1;
}

void trapfast_intr_hook(void *uc, uint32_t intno, void *user_data) {
    trapfast_t *s = (trapfast_t *)user_data;
    uint64_t cs, eflags, eip, value = 0, next, esp = 0;
    uint32_t frame[5], plain, linear = 0;
    uint8_t code[8];
    int32_t is_int, minus1 = -1;
    int64_t unretire = 0;
    int kind, size, reg = -1, to_cr = 0, seg = -1;
    modrm_uc_regs_t regs = {s->reg_read, s->r_gpr, uc};
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
    if (!code_at(s, (uint32_t)eip, code, 8)) goto python;
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
        if (n != 0 && n != 3 && n != 4) goto python;
        kind = n == 3 ? K_MOV_CR3 : n ? K_MOV_CR4 : K_MOV_CR0, size = 3;
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
    } else if (code[0] == 0x0F && code[1] == 0x01 && (code[2] >> 6) != 3 && ((code[2] >> 3) & 7) == 7) {
        kind = K_INVLPG;                                                /* invlpg m */
        size = modrm_address(code + 2, modrm_uc_reg, &regs, &linear);
        if (!size) goto python;
        size += 2;
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
        if (kind == K_MOV_CR3 ? !cr3_reload_ok(s, (uint32_t)value)
                              : !write_cr_plain(s, kind == K_MOV_CR4, (uint32_t)value))
            goto python;                                                /* nothing changed */
    } else if (kind == K_MOV_SREG) {
        if (!rd(s, uc, s->r_gpr[reg], &value)) goto python;
        if (ev_load_data_segment(&s->ev, seg, (uint32_t)value, &plain) != 1) goto python;  /* nothing changed */
    } else if (kind == K_IRETD) {
        /* to the kernel's own ring only (an iretd to ring 3 runs natively at ring 1) */
        if (!rd(s, uc, s->r_esp, &esp) || ev_iret(&s->ev, (uint32_t)esp, (uint32_t)cs, (uint32_t)eflags, 1, 0, frame) != 1)
            goto python;
    } else if (kind == K_INVLPG) {
        if (!invlpg_ok(s, linear)) goto python;                         /* nothing changed */
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
        set_eip(s, uc, &next);
        break;
    case K_STI: {
        uint64_t set = eflags | EFLAGS_IF;
        s->reg_write(uc, s->r_eflags, &set);
        set_eip(s, uc, &next);
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
        set_eip(s, uc, &next);
        break;
    case K_MOV_SREG:
        set_eip(s, uc, &next);
        break;
    case K_INVLPG: {
        uint32_t page = (uint32_t)(linear >> 12);
        sm_flush_pages((shadowmirror_t *)s->mirror, uc, s->uc_ctl, s->tlb_flush_ctl, &page, 1);  /* _flush_pages */
        set_eip(s, uc, &next);
        break;
    }
    case K_MOV_CR3:
        if (to_cr) {                           /* EmulatingVcpu.write_cr(3) -> ShadowPaging.on_cr3_write */
            s->crs[1] = (uint32_t)value;
            s->ev.rtlb_gen++;                  /* the hypervisor's TLB: _rtlb.clear() */
            s->cr3_reloads++;                  /* cr3_switches, root_hits */
            s->uc_ctl(uc, s->tlb_flush_ctl);   /* _flush_engine */
        } else {
            value = s->crs[1];
            s->reg_write(uc, s->r_gpr[reg], &value);
        }
        set_eip(s, uc, &next);
        break;
    case K_MOV_CR2:
        value = s->ev.cr2;
        s->reg_write(uc, s->r_gpr[reg], &value);
        set_eip(s, uc, &next);
        break;
    case K_IRETD: {                /* ESP, the virtual IOPL and the real EFLAGS (IOPL 0), EIP */
        uint64_t up = (uint32_t)(esp + 12), fl, to = frame[0];
        s->reg_write(uc, s->r_esp, &up);
        s->ev.iopl = (frame[2] >> 12) & 3;
        fl = (frame[2] & ~(EFLAGS_RF | EFLAGS_IOPL)) | 2u;
        s->reg_write(uc, s->r_eflags, &fl);
        set_eip(s, uc, &to);
        break;
    }
    case K_POP_SREG: {
        uint64_t up = (uint32_t)(esp + 4);
        s->reg_write(uc, s->r_esp, &up);
        set_eip(s, uc, &next);
        break;
    }
    default:
        if (!to_cr) {
            value = s->crs[kind == K_MOV_CR4 ? 2 : 0];
            s->reg_write(uc, s->r_gpr[reg], &value);
        }
        set_eip(s, uc, &next);
        break;
    }
    vclock_add(s->clock_now, -(int64_t)(unretire));       /* VirtualClock.unretire */
    vclock_look_at_if(s->clock_watch_if, s->clock_check_if);   /* if_may_have_changed */
    s->count[kind]++;
    s->pending++;
    s->answered++;
    return;
python:
    s->to_python++;
    s->python_intr(uc, intno, NULL);
}

/* -- stores into the shadow's page tables (ptemods), from the TLB fill --------------------------------
 * A guest-kernel store into a page table shadow paging traces refuses its TLB fill (memory/_tlbfill.c
 * leaves it to Mmu.fill, which makes it a TracedWrite): the engine stops, and ShadowPaging._on_write
 * emulates the store (x86/emulate.py emulate_store), zaps what derives from the words written, and
 * skips the instruction. This fill hook, after the C fill and before Mmu.fill, does the common case
 * without the stop: `mov`, `or`, `and`, `xor` of a register or an immediate into a dword or a byte (no
 * prefix, 32-bit addressing), at real ring 1, into the page the fill is for; the current shadow root
 * maps it writable and dirty for the kernel (no walk, no grant); the frame is traced by shadow paging
 * alone, some entry still derives from it (else Python untraces it) but none from the words written
 * (nothing to zap). Unicorn 2.1.3 has restored the CPU state to the store before it asks the fill hooks,
 * so EIP and the flags are the instruction's: the bytes are written, the flags emulate_store writes, EIP
 * past the instruction, the block's instructions after it off the clock, the counts (Mmu.fill's fill and
 * its shadow hit, the ptemod for ShadowPaging._fold, the event), and the instruction is left as QEMU
 * leaves one it abandons (cpu_loop_exit). Anything else: 0, nothing changed, Mmu.fill's. */


typedef struct {
    trapfast_t *s;             /* the trap table, once TrapFast is attached (NULL: every fill is Mmu.fill's) */
    uint64_t cpu_offset;       /* uc_struct's CPUState pointer (cpu/fastdelivery.py _engine_cpu) */
    void (*loop_exit)(void *cpu);   /* QEMU's cpu_loop_exit */
    uint64_t *fills;           /* the shadow fill's count (memory/shadowmirror.py): Mmu.fill's fill and hit */
    uint32_t on;               /* CPUVIRT_TRAP_PTEMOD_C */
    uint32_t pf_on;            /* CPUVIRT_TRAP_PF_C: true #PFs delivered from the fill (true_fault) */
    uint64_t stores;           /* ptemods done here */
    uint64_t zaps;             /* ... that zapped shadow entries */
    const uint32_t *hv_start;  /* the shadow fill's: the hypervisor's linear windows start there */
    /* the true faults' counts, as Mmu.fill and ShadowPaging._resolve count them (Python adds them:
     * MmuCounters.walkers, ShadowCounters.walkers) */
    tf_counts_t pf;
} trapstore_t;

size_t trapstore_sizeof(void) { return sizeof(trapstore_t); }


static int ptemod(trapstore_t *t, void *uc, uint64_t vaddr, int type) {
    trapfast_t *s = t->s;
    shadowmirror_t *m;
    uint64_t ss, eflags, eip, next, fl;
    uint32_t addr = 0, src = 0, size = 0, old = 0, value;
    sm_ptemod_t plan;
    uint8_t code[15];
    int op = 0, len;
    int64_t gpa, n = 0;
    modrm_uc_regs_t regs;
    if (!t->on || !s || !s->enabled || type != MEM_WRITE || !s->seen[K_PTEMOD]) return 0;
    regs = (modrm_uc_regs_t){s->reg_read, s->r_gpr, uc};
    if (!s->shadow_ok) return 0;       /* a frame left unsynchronised: the unlink counts could be wrong */
    m = (shadowmirror_t *)s->mirror;
    if (!m || m->made >= SM_MADE) return 0;
    if (!rd(s, uc, s->r_ss, &ss) || (ss & 3) != 1) return 0;            /* the guest kernel (ring 1) */
    if (!rd(s, uc, s->r_eflags, &eflags) || (eflags & EFLAGS_VM)) return 0;
    if (!rd(s, uc, s->r_eip, &eip) || !code_at(s, (uint32_t)eip, code, 15)) return 0;
    len = st_decode(code, modrm_uc_reg, &regs, &op, &size, &src, &addr);
    if (!len || (addr & 0xFFFFF000u) != (uint32_t)vaddr || (addr & 0xFFFu) + size > 0x1000u) return 0;
    gpa = sm_hv_gpa(m, s->crs[0], s->crs[1], s->crs[2], addr, 1, (int)s->wp_granted);
    if (gpa < 0 || !sm_ptemod_plan(m, s->ev.ram, s->ev.ram_bytes, (uint64_t)gpa, size, s->uc_ctl != NULL, &plan))
        return 0;
    if (!left_block(s, (uint32_t)eip, &n)) return 0;
    /* From here on the store is ours. */
    value = st_apply((uint8_t *)s->ev.ram + gpa, op, size, src, &old);
    if (op != ST_MOV) {
        fl = st_flags(op, old, src & (size == 4 ? 0xFFFFFFFFu : 0xFFu), value, size, eflags);
        s->reg_write(uc, s->r_eflags, &fl);
    }
    next = (uint32_t)(eip + (uint32_t)len);
    set_eip(s, uc, &next);
    vclock_add(s->clock_now, -(int64_t)((n - 1)));   /* Vcpu.left_block_at(eip), then the store retired */
    *t->fills += 1;                    /* Mmu.fill's fill, and its shadow hit */
    sm_ptemod_done(m, &plan, (uint32_t)eip);   /* hv_wrote -> _on_write: _zap_range; the counts */
    if (plan.zap) {                    /* ... _flush_pages */
        sm_flush_pages(m, uc, s->uc_ctl, s->tlb_flush_ctl, plan.pages, plan.npages);
        t->zaps++;
    }
    s->count[K_PTEMOD]++;              /* the page_fault/ptemod event */
    s->pending++;
    t->stores++;
    t->loop_exit(*(void **)((uint8_t *)uc + t->cpu_offset));   /* does not return */
    return 0;
}

/* -- a true #PF, found and delivered in the fill ---------------------------------------------------------
 * A load or store at ring 1 or 3 whose page the shadow's current root has no entry for (so that Python's
 * ShadowPaging.gva_to_gpa would go to _resolve) and whose walk of the guest's tables faults: what Mmu.fill,
 * _resolve, the run loop and DeprivilegedVcpu.page_fault do, made here without the engine's stop, as
 * cpu/_delivery.c delivery_pf_hook does it for native. The walk (memory/walk.py's rules: the error code,
 * PDE.A set when the PDE is used although the PTE then faults, the references counted), CR2 exact as
 * x86/faultaddr.py finds it (the instruction's one memory operand, when it is on the faulting page: the
 * forms of cpu/_truefault.h tf_operand), the virtual CR2, the instructions of the block from the faulting
 * one on off the clock, the counts (the fill, the walk, the fault for Mmu and the shadow, the page_fault
 * event), the delivery through the guest's IDT (deliver_event), and the instruction left as QEMU leaves
 * one that faulted (cpu_loop_exit). Anything else (a fetch, whose charged time the run loop must see; an unknown
 * instruction; a table outside RAM; a 4 MiB page with reserved bits; PAE; a delivery deliver_event
 * declines) is Python's, with nothing changed. */
static int true_fault(trapstore_t *t, void *uc, uint64_t vaddr, int type) {
    trapfast_t *s = t->s;
    const shadowmirror_t *m;
    uint64_t ss, cs, eflags, eip;
    uint32_t page = (uint32_t)vaddr >> 12, ec = 0, refs = 0, ea = 0;
    modrm_uc_regs_t regs;
    tf_made_t made;
    int64_t pde_a, n = 0;
    int user, write = type == MEM_WRITE;
    uint8_t code[15];
    if (!t->pf_on || !s || !s->enabled || !s->deliver_on || !s->seen[K_PF] || !t->hv_start) return 0;
    regs = (modrm_uc_regs_t){s->reg_read, s->r_gpr, uc};
    if ((type != MEM_READ && type != MEM_WRITE) || (uint32_t)vaddr >= *t->hv_start) return 0;
    m = s->mirror;
    if (!m || !m->serial || !s->shadow_ok) return 0;
    if (!(s->crs[0] & CR0_PG) || (s->crs[2] & CR4_PAE)) return 0;
    if (((s->crs[0] & CR0_PG) | (s->crs[2] & CR4_PSE)) != m->mode || (s->crs[1] & 0xFFFFF000u) != m->key) return 0;
    if (sm_present(m, page)) return 0;        /* Python's table holds the page: its entry's rights decide */
    if (!rd(s, uc, s->r_ss, &ss) || ((ss & 3) != 1 && (ss & 3) != 3)) return 0;   /* the guest's own access */
    user = (ss & 3) == 3;
    if (!tf_walk(s->ev.ram, s->ev.ram_bytes, s->crs[0], s->crs[1], s->crs[2], (uint32_t)vaddr, write, user, &ec,
                 &refs, &pde_a))
        return 0;
    if (!rd(s, uc, s->r_eip, &eip) || !code_at(s, (uint32_t)eip, code, 15)) return 0;
    if (!tf_operand(code, modrm_uc_reg, &regs, &ea) || (ea & 0xFFFFF000u) != ((uint32_t)vaddr & 0xFFFFF000u)) return 0;
    if (!rd(s, uc, s->r_cs, &cs) || !rd(s, uc, s->r_eflags, &eflags) || (eflags & EFLAGS_VM)) return 0;
    if (!left_block(s, (uint32_t)eip, &n)) return 0;
    tf_make((uint8_t *)s->ev.ram, pde_a, &s->ev.cr2, ea, &made);   /* PDE.A, CR2; then the delivery */
    if (!deliver_event(s, uc, 14, 0, (uint32_t)eip, 1, ec, (uint32_t)cs, eflags, 1)) {
        tf_unmake((uint8_t *)s->ev.ram, &s->ev.cr2, &made);
        return 0;
    }
    vclock_add(s->clock_now, -(int64_t)(n));      /* Vcpu.left_block_at(eip): the faulting instruction did not retire */
    tf_count(&t->pf, refs);            /* Mmu.fill's fill; _resolve's walk and true fault */
    s->count[K_PF]++;                  /* the page_fault/#PF event */
    s->pending++;
    s->delivered++;
    vclock_look_at_if(s->clock_watch_if, s->clock_check_if);   /* if_may_have_changed */
    t->loop_exit(*(void **)((uint8_t *)uc + t->cpu_offset));   /* does not return */
    return 0;
}

/* cpu/_truefault.h's walk and operand decode on given memory and registers, for the property tests that
 * compare them with memory/walk.py and x86/faultaddr.py (tests/test_truefault_model.py). out: error code,
 * references, the PDE whose A bit the walk sets (-1: none). */
int trapfast_tf_walk(const uint8_t *ram, uint64_t ram_bytes, uint32_t cr0, uint32_t cr3, uint32_t cr4, uint32_t gva,
                     int write, int user, uint32_t *ec, uint32_t *refs, int64_t *pde_a) {
    return tf_walk(ram, ram_bytes, cr0, cr3, cr4, gva, write, user, ec, refs, pde_a);
}

static int array_reg(void *ctx, int reg, uint32_t *out) {
    *out = ((const uint32_t *)ctx)[reg];
    return 1;
}

int trapfast_tf_operand(const uint8_t *code, const uint32_t *gpr, uint32_t *ea) {
    return tf_operand(code, array_reg, (void *)gpr, ea);
}

/* trap's first TLB-fill hook: a ptemod emulated, or a true #PF delivered; else the shadow's fill and
 * Mmu.fill answer (0). */
int trapfast_fill_hook(void *uc, uint64_t vaddr, int type, tlb_entry_t *e, void *user_data) {
    trapstore_t *t = (trapstore_t *)user_data;
    (void)e;
    if (ptemod(t, uc, vaddr, type)) return 1;   /* (never: it leaves through cpu_loop_exit) */
    return true_fault(t, uc, vaddr, type);
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
    vclock_look_at_if(s->clock_watch_if, s->clock_check_if);   /* if_may_have_changed */
    site->passed++;
    s->irets++;
}

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_trapfast", NULL, -1, NULL};

PyMODINIT_FUNC PyInit__trapfast(void) { return PyModule_Create(&module); }
