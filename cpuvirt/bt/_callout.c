/*
 * The callout hook of mode `full` (bt/runtime.py), in C: one UC_HOOK_CODE over the translation
 * cache's callout slots that answers the callouts needing nothing but the CPU model or the virtual
 * clock (`cpuid`, `rdtsc`) without Python, and hands every other slot to the Python hook. The guest
 * kernel's `in`/`out` (always allowed at its virtual CPL 0) are served here too: the access's virtual
 * time, the operands and EAX here, the device through one Python call (the devices are Python's).
 *
 * Translated code reaches a callout by jumping to its slot (one int3 byte). The hypervisor serves it
 * and writes EIP: the translation of the next guest instruction. Once Python has served a cpuid or
 * rdtsc site and found that translation, it "links" the slot: kind[slot] says what the instruction
 * is and dest[slot] where to go on. A linked slot is then served here, exactly as Python would serve
 * it (the same answer from the same model, the same EIP, the same look at the interrupt window), and
 * the engine's blocks and the virtual clock see the same thing: the slot is still a block of its own.
 * Python unlinks a slot whenever its destination stops being the live translation (invalidated,
 * flushed) and counts what was served here into its own counters (fastcallout.py).
 *
 * Built as a Python extension module only so that setuptools compiles it; Python talks to it through
 * ctypes (cpuvirt/bt/fastcallout.py mirrors the structure and checks its size).
 */
#include <Python.h>
#include <stdint.h>
#include <string.h>

#include "../cpu/_evseg.h"   /* the guest kernel's segment loads and iretd, shared with trap's C path */
#include "../cpu/_evdeliver.h"   /* event delivery through the guest's IDT and the block copy, shared too */
#include "../cpu/_storeop.h"   /* the value and flags of an emulated store, shared with trap's ptemods */
#include "../engine/_vclock.h"   /* the clock's interrupt-window look (its stubs' limit) */
#include "../cpu/_modrm.h"       /* the ModRM memory operand ... */
#include "../cpu/_truefault.h"   /* ... and a true #PF's walk and CR2, shared with trap's (modes/_trapfast.c) */
#include "../engine/_tlbhook.h"   /* the TLB-fill hook's entry and access types */

typedef int (*reg_read_fn)(void *uc, int regid, void *value);
typedef int (*reg_write_fn)(void *uc, int regid, const void *value);
typedef void (*code_fn)(void *uc, uint64_t address, uint32_t size, void *user_data);
typedef int (*insn_fn)(void *uc, void *user_data);
typedef uint32_t (*port_in_fn)(uint32_t port, uint32_t size);
typedef uint32_t (*port_out_fn)(uint32_t port, uint32_t size, uint32_t value);
typedef void (*intr_fn)(void *uc, uint32_t intno, void *user_data);

#define SLOTS 0x10000

enum { PYTHON = 0, CPUID = 1, RDTSC = 2, MOV_CR0 = 3, MOV_CR4 = 4, PORT_IN = 5, PORT_OUT = 6,
       MOV_SREG = 7, POP_SREG = 8, MOV_CR2 = 9, IRETD = 10,
       IRETD_OUTER = 11,  /* a count only: an IRETD slot's returns to ring 3 (no translation looked up) */
       MOV_CR3 = 12,      /* mov cr3, r32 reloading the CR3 it holds (cr3_reload) */
       ADAPTIVE = 13,     /* an adaptive store (modes/full/adaptive.py) into a traced frame: store[] */
       INVLPG = 14,       /* invlpg m: store[] holds its address's form */
       LTR = 15,          /* ltr r16 (arg: the register) */
       KINDS = 16 };

/* An adaptive store site as C does it (x86/emulate.py store_site): `op [base + index * scale + disp], src`
 * with op mov, or, and, xor, add, sub, inc, dec; src a register's bits (shift 0, or 8 for ah..bh) or an
 * immediate (1 for inc and dec). */
#define ST_NONE 0xFFu
typedef struct {
    int32_t disp;
    uint32_t imm;
    uint8_t op, size;          /* size 0: not a form C stores (Python serves the slot) */
    uint8_t src, shift;        /* src: GPR index in ModRM order, ST_NONE for the immediate */
    uint8_t base, index;       /* GPR indexes, ST_NONE: none */
    uint8_t scale;
    uint8_t pad;
    uint32_t run;              /* the site's untraced run (adaptive.py _untraced_run), kept here while linked */
    uint32_t limit;            /* the run at which Python makes the site native again (_native_after) */
} store_t;

/* The guest kernel's events (modes/full/evfast.py, CPUVIRT_FULL_EVENTS_C=0 keeps them Python's):
 *   MOV_SREG  mov ds/es/fs/gs, r16/r32   arg: the ModRM byte's sreg and register fields (bits 0-5)
 *   POP_SREG  pop ds/es/fs/gs            arg: the QEMU segment index
 *   MOV_CR2   mov r32, cr2               arg: the ModRM byte
 *   IRETD     iretd                      arg: 1 when dest[] is the translation of geip[] (a return to
 *                                        the kernel's own ring there goes on at dest); a return to
 *                                        ring 3 needs no translation */

/* io[slot] of a PORT_IN/PORT_OUT slot: the access size in bytes (1, 2, 4) and whether the port is DX
 * (else arg[slot] holds the imm8 port). */
#define IO_SIZE 7u
#define IO_DX 8u

#define CR0_ET 0x10u
#define CR0_WP 0x10000u
#define CR0_PG_ 0x80000000u
#define CR4_PGE 0x80u
#define MAX_MAP_FRAMES 16
#define NO_MAPS 0xFFFFFFFFu
#define MAPS_CR0 0x80000001u  /* PG | PE: the bits a walk depends on (coherence.py _maps_key) */
#define MAPS_CR4 0x00100030u  /* SMEP | PAE | PSE */

/* -- event delivery through the guest's IDT (modes/full/deliverfast.py) -------------------------------
 * The translation cache's block entries as C finds them: guest EIP -> TC address of the live
 * translation (TCache.blocks), and TC address of each translated instruction's start -> its guest EIP
 * (what TCache.guest_eip answers there). Both direct-mapped: a slot holds one key, a look-up that
 * finds another key (or none) answers "not known", and the event is Python's. */
#define TC_ENTRY_SLOTS 8192u
#define TC_START_SLOTS 65536u

typedef struct {
    uint32_t geip;
    uint32_t tc;               /* 0: empty */
} tc_map_t;

typedef struct {
    uint32_t on;               /* 0: every event is Python's (CPUVIRT_FULL_DELIVERY_C=0, a trace, ...) */
    uint32_t off_old_exception, off_is_int, off_error_code;   /* fields inside env (quirks.ContextLayout) */
    intr_fn python_intr;       /* the vCPU's own INTR hook (Vcpu.hook_intr, guarded): everything else */
    uint32_t idt_base, idt_limit;   /* the VirtualCpu's IDTR and TR (evfast.FullEvVirtualCpu) */
    uint32_t tr_base, tr_limit;
    const shadowmirror_t *mirror;   /* the current shadow root, the traced frames (memory/shadowmirror.py) */
    vclock_time_t *clock_now;  /* the virtual clock's time (engine/_vclock.h) */
    const volatile uint32_t *clock_last_block;
    uint32_t tc_lo, tc_hi;     /* the TC's code: a kernel EIP there is mapped through start[] */
    uint64_t delivered;        /* events delivered here */
    uint64_t pending;          /* ... since Python last folded them */
    uint64_t to_python, misses;
    uint64_t soft_count[256];  /* Vcpu.reasons[("interrupt", "int 0x..")] to add */
    uint64_t fault_count[32];  /* Vcpu.reasons[("exception", "#..")] to add */
    uint8_t soft_seen[256];    /* Python has recorded this key once */
    uint8_t fault_seen[32];
    tc_map_t entry[TC_ENTRY_SLOTS];   /* guest EIP -> TC (keyed by geip) */
    tc_map_t start[TC_START_SLOTS];   /* TC instruction start -> guest EIP (keyed by tc) */
    block_t block[ED_BLOCK_SLOTS];    /* the copy of Machine.block_insns */
} fulldeliver_t;

typedef struct {
    reg_read_fn reg_read;      /* uc_reg_read */
    reg_write_fn reg_write;    /* uc_reg_write */
    code_fn python;            /* the guarded Python callout hook */
    insn_fn answer[KINDS];     /* CPUID: _cpuid.c's cpuid_hook; RDTSC: _vclock.c's vclock_rdtsc_hook */
    void *answer_data[KINDS];  /* their tables (the CPU model's leaves, the clock) */
    uint32_t *watch_if;        /* the clock's interrupt-window flags (vclock_t) */
    uint32_t *check_if;
    uint64_t base;             /* linear address of slot 0 */
    int32_t eip_reg, cs_reg;   /* UC_X86_REG_EIP, UC_X86_REG_CS */
    uint32_t kernel_ring;      /* slots serve guest-kernel code only: CS.RPL of the kernel ring, or NO_RING */
    uint32_t enabled;          /* 0 while the guest kernel runs 16-bit code in place (bt/direct.py) */
    uint64_t served[KINDS];    /* callouts answered here, by kind */
    /* mov to CR0/CR4 (modes/full/crfast.py): the virtual CR0 and CR4 live here */
    int32_t gpr_reg[8];        /* UC_X86_REG_EAX.. in ModRM order */
    uint32_t cr[2];            /* the virtual CR0, CR4 (VirtualCpu reads them here) */
    uint32_t snap[2];          /* CR0, CR4 as the translations' coherence check last saw them */
    uint32_t deps[2];          /* a translation baked CR0 / CR4 in: Python serves the write */
    uint32_t shadow_ok;        /* shadow paging needs no engine flush for a TLB flush */
    uint32_t wp_granted;       /* ... except when WP is set: a write was let through by WP = 0 */
    uint32_t events_on;        /* MOV_SREG .. IRETD and LTR may be served here (CPUVIRT_FULL_EVENTS_C) */
    uint32_t maps_n;           /* page-table frames of the code-mapping snapshot, or NO_MAPS */
    uint32_t maps_cr0, maps_cr4;  /* the snapshot's paging-mode bits (CR0.PG|PE, CR4.PSE|PAE|SMEP) */
    uint32_t cr3;              /* the virtual CR3 (read by the shadow's C fill, memory/shadowmirror.py) */
    uint8_t *maps_live[MAX_MAP_FRAMES];  /* the frames in guest RAM */
    uint8_t *maps_copy[MAX_MAP_FRAMES];  /* what they held at the last full check */
    /* the guest kernel's port I/O (PORT_IN, PORT_OUT): the access's virtual time here, the device in
     * Python (port_in/port_out: the counters as the Python callout counts them, then the bus; port_out
     * returns 0 when the access ended the run: EIP is then left alone, as Python leaves it) */
    vclock_time_t *clock_now;  /* the clock's time, and its extra (engine/_vclock.c) */
    uint64_t *clock_extra;
    uint64_t io_cycles;        /* the virtual time of one port access (Vcpu's IO_CYCLES) */
    port_in_fn port_in;
    port_out_fn port_out;
    int32_t eax_reg, edx_reg;  /* UC_X86_REG_EAX, UC_X86_REG_EDX */
    int32_t esp_reg, eflags_reg;
    int32_t seg_reg[6];        /* UC_X86_REG_ES .. GS by QEMU segment index */
    int32_t ss_reg;
    /* the virtual-CPU snapshot translations are checked against (modes/full/coherence.py _vsnap): its
     * real CS, SS and IOPL. C serves an event only while they hold, so that the Python path's
     * _virtual_changed would find nothing to drop */
    uint32_t snap_ok, snap_cs, snap_ss, snap_iopl;
    uint32_t snap_tr;          /* ... and its TR selector (0xFFFFFFFF: none) */
    uint32_t tr_sel;           /* the virtual TR's selector (its base and limit are dl's): FullEvVirtualCpu.tr */
    /* the hypervisor-TLB copy (its generation bumped by mov_cr's flushes), the virtual GDTR, CR2, IOPL,
     * `_loaded`, NMI blocking (cpu/_evseg.h, cpu/evseg.py) */
    evseg_t ev;
    uint32_t geip[SLOTS];      /* IRETD: the guest EIP dest[] translates */
    uint8_t kind[SLOTS];
    uint8_t arg[SLOTS];        /* the ModRM byte of a mov to CR */
    uint32_t dest[SLOTS];      /* EIP to go on at (a TC address) */
    uint8_t io[SLOTS];         /* a port access's size and port operand (IO_SIZE, IO_DX) */
    fulldeliver_t dl;          /* event delivery through the guest's IDT (full_intr_hook, below) */
    int (*uc_ctl)(void *uc, int control, ...);   /* uc_ctl, for cr3_reload's flush of the engine's TLB */
    int32_t tlb_flush_ctl;     /* UC_CTL_WRITE(UC_CTL_TLB_FLUSH, 0) */
    uint32_t pad_cr3;
    uint8_t *code_pages;       /* a bit per linear page that holds translated code (FullVcpu._page_frame) */
    /* A bit per 64-byte line of RAM that a translation's source bytes were read from since the last TC
     * flush (coherence.py _frame_index), and one per line of code the engine ran in place (inplace.py; NULL
     * while nothing is indexed): a store elsewhere in a code frame changes no translation */
    uint8_t *tc_lines;
    uint8_t *inplace_lines;
    uint64_t lines;            /* lines in RAM */
    uint64_t zaps;             /* ADAPTIVE stores that zapped shadow entries */
    store_t store[SLOTS];      /* ADAPTIVE and INVLPG slots */
} callouts_t;

size_t callouts_sizeof(void) { return sizeof(callouts_t); }

/*
 * A mov to CR0 or CR4 that changes nothing but CR0.WP or CR4.PGE (or nothing), in the state where the
 * Python path would do nothing else than store it, count it and go on: no translation baked the
 * register in, shadow paging needs no flush of the engine's TLB (kept coherent by write tracing; when
 * WP is set, no write was let through by WP = 0), and the page
 * tables the code mappings were last checked against are unchanged (so that check would find nothing).
 * Returns 0 when Python must serve it.
 */
static int snapshot_holds(callouts_t *t, void *uc, uint64_t cs);

static int mov_cr(callouts_t *t, void *uc, uint8_t modrm, uint64_t cs) {
    int n = ((modrm >> 3) & 7) == 0 ? 0 : 1;
    uint64_t value = 0;
    t->reg_read(uc, t->gpr_reg[modrm & 7], &value);
    uint32_t new = n == 0 ? ((uint32_t)value | CR0_ET) : (uint32_t)value;
    uint32_t old = t->cr[n];
    uint32_t allowed = n == 0 ? CR0_WP : CR4_PGE;
    if (((new ^ old) & ~allowed) || t->deps[n] || !t->shadow_ok) return 0;
    if (!snapshot_holds(t, uc, cs)) return 0;   /* Python's mov to CR checks the snapshot after it */
    if (n == 0 && (new & ~old & CR0_WP) && t->wp_granted) return 0;
    if (new != t->snap[n]) {
        if (t->maps_n == NO_MAPS || t->maps_n > MAX_MAP_FRAMES) return 0;
        if ((t->cr[0] & MAPS_CR0) != t->maps_cr0 || (t->cr[1] & MAPS_CR4) != t->maps_cr4) return 0;
        for (uint32_t f = 0; f < t->maps_n; f++)
            if (memcmp(t->maps_live[f], t->maps_copy[f], 4096) != 0) return 0;
        t->snap[n] = new;
    }
    if (new != old) t->ev.rtlb_gen++; /* flush_guest_tlb: the hypervisor's TLB (cpu/evseg.EvHvTlb) */
    t->cr[n] = new;
    return 1;
}

/* mov cr3, r32 reloading the virtual CR3 it holds (a kernel's TLB flush; nanobench's cr3): what
 * Callouts._mov_to_cr leaves then: EmulatingVcpu.write_cr(3) (the hypervisor's TLB cleared, and
 * ShadowPaging.on_cr3_write's switch count, root hit and engine TLB flush, with nothing for its _resync to
 * do: shadow_ok), the callout counted, and _virtual_changed finding nothing (the same CR3; CS, SS and IOPL
 * the snapshot's). Another value, another root, an unsynchronised frame: Python's. The switch and the root
 * hit are counted as the served kind (Callouts.sync_counts adds them to ShadowCounters). */
static int cr3_reload(callouts_t *t, void *uc, uint8_t modrm, uint64_t cs) {
    uint64_t value = 0;
    const shadowmirror_t *m = t->dl.mirror;
    t->reg_read(uc, t->gpr_reg[modrm & 7], &value);
    if ((uint32_t)value != t->cr3 || !m || !t->uc_ctl || !t->shadow_ok) return 0;
    if (!m->serial || (t->cr3 & 0xFFFFF000u) != m->key) return 0;
    if (!snapshot_holds(t, uc, cs)) return 0;
    t->ev.rtlb_gen++;                          /* the hypervisor's TLB (cpu/evseg.EvHvTlb) */
    t->uc_ctl(uc, t->tlb_flush_ctl);           /* _flush_engine */
    return 1;
}

/* in/out of the guest kernel (virtual CPL 0: always allowed): as the Python callout does it (full's
 * Callouts._special, kernel_port_io, Vcpu.port_io): the time, then the device; `in` merges the value into
 * EAX. Returns 0 when the run ended (the device asked to stop): EIP stays where it is. */
static int port_io(callouts_t *t, void *uc, uint64_t i, int in) {
    uint32_t size = t->io[i] & IO_SIZE, port = t->arg[i];
    uint32_t mask = size == 4 ? 0xFFFFFFFFu : (1u << (8 * size)) - 1;
    uint64_t eax = 0, edx = 0;
    if (t->io[i] & IO_DX) {
        t->reg_read(uc, t->edx_reg, &edx);
        port = (uint32_t)edx & 0xFFFF;
    }
    vclock_advance(t->clock_now, t->clock_extra, t->io_cycles);
    if (in) {
        uint32_t value = t->port_in(port, size) & mask;
        t->reg_read(uc, t->eax_reg, &eax);
        eax = ((uint32_t)eax & ~mask) | value;
        t->reg_write(uc, t->eax_reg, &eax);
        return 1;
    }
    t->reg_read(uc, t->eax_reg, &eax);
    return (int)t->port_out(port, size, (uint32_t)eax & mask);
}

/* Would the Python path's _virtual_changed (after a callout it emulates) find nothing? CR0/CR4 are
 * mov_cr's own; CR3, the descriptor tables and TR change only where Python takes a snapshot; CS, SS and
 * IOPL may have changed since (a delivery into another kernel code segment): they must be the
 * snapshot's. */
static int snapshot_is(const callouts_t *t, uint32_t cs, uint32_t ss) {
    return t->snap_ok && t->ev.iopl == t->snap_iopl && cs == t->snap_cs && ss == t->snap_ss;
}

static int snapshot_holds(callouts_t *t, void *uc, uint64_t cs) {
    uint64_t ss = 0;
    if (!t->snap_ok || (uint32_t)cs != t->snap_cs) return 0;
    t->reg_read(uc, t->ss_reg, &ss);
    return snapshot_is(t, (uint32_t)cs, (uint32_t)ss);
}

/* The guest kernel's segment loads, CR2 read and iretd (the kinds MOV_SREG .. IRETD), as the Python
 * callout does them (privileged.py _mov/_pop, EmulatingVcpu.iret through cpu/_evseg.h). Returns 0 with
 * nothing changed when Python must serve it, else the served kind (IRETD_OUTER for a return to ring 3)
 * with *eip where the engine goes on. */
/* SegmentLoadingVcpu.load_segment of a data segment: a DPL-0 descriptor through _evseg.h, a null
 * selector or a DPL 1-3 one written to the register as Python writes it (the engine loads it). 0:
 * Python's, nothing changed. */
static int load_segment(callouts_t *t, void *uc, int seg, uint32_t selector) {
    uint32_t plain = 0;
    uint64_t value;
    int r = ev_load_data_segment(&t->ev, seg, selector, &plain);
    if (r != 2) return r;
    value = plain;
    return t->reg_write(uc, t->seg_reg[seg], &value) == 0;  /* refused: Python tries it, and fails */
}

/* GuestViewVcpu.read_guest's walk when its TLB misses, for a read the Python path of this site makes
 * (`n` bytes at `gva`): the current shadow root's entry where ShadowPaging.gva_to_gpa would answer from it
 * with no side effect (sm_hv_gpa, as the C deliveries read), put into the TLB as Python would (ev_rtlb_fill).
 * A CR3 load empties that TLB, and every return to user mode after a switch began with two callouts
 * Python served, a pop for the stack's page and one for the GDT's (29,000 in xv6's usertests). */
static void hv_walk(callouts_t *t, uint32_t gva, uint32_t n) {
    uint32_t page = gva >> 12;
    const ev_rtlb_t *e = &t->ev.rtlb[page & (EV_RTLB_SLOTS - 1)];
    int64_t gpa;
    if ((gva & 0xFFFu) + n > 0x1000u || !t->dl.mirror || !(t->cr[0] & CR0_PG_)) return;
    if (e->valid && e->page == page && e->gen == t->ev.rtlb_gen) return;
    gpa = sm_hv_gpa(t->dl.mirror, t->cr[0], t->cr3, t->cr[1], gva, 0, 0);
    if (gpa >= 0) ev_rtlb_fill(&t->ev, page, (uint64_t)gpa & ~0xFFFull);
}

/* SegmentLoadingVcpu.descriptor's read of a data selector's GDT entry, which it makes when the selector
 * is not null, is a GDT one and is within the limit (then hv_walk) */
static void hv_walk_descriptor(callouts_t *t, uint32_t selector) {
    uint32_t index = selector & 0xFFF8u;
    if (!(selector & 0xFFFCu) || (selector & 4) || index + 7 > t->ev.gdt_limit) return;
    if ((uint64_t)t->ev.gdt_base + index + 8 > 0x100000000ull) return;
    hv_walk(t, t->ev.gdt_base + index, 8);
}

static int events(callouts_t *t, void *uc, uint64_t i, uint8_t k, uint64_t cs, uint64_t *eip) {
    uint64_t v = 0, esp = 0, fl = 0;
    uint8_t a = t->arg[i];
    if (!t->events_on || !snapshot_holds(t, uc, cs)) return 0;
    if (k == MOV_SREG) {
        t->reg_read(uc, t->gpr_reg[a & 7], &v);
        hv_walk_descriptor(t, (uint32_t)v);
        return load_segment(t, uc, (a >> 3) & 7, (uint32_t)v) ? k : 0;
    }
    if (k == POP_SREG) {
        uint16_t sel;
        t->reg_read(uc, t->esp_reg, &esp);
        hv_walk(t, (uint32_t)esp, 2);
        if (!ev_read_hv(&t->ev, (uint32_t)esp, &sel, 2)) return 0;
        hv_walk_descriptor(t, sel);
        if (!load_segment(t, uc, a, sel)) return 0;
        esp = (uint32_t)(esp + 4);
        t->reg_write(uc, t->esp_reg, &esp);
        return k;
    }
    if (k == MOV_CR2) {
        v = t->ev.cr2;
        t->reg_write(uc, t->gpr_reg[a & 7], &v);
        return k;
    }
    if (k == IRETD) {
        uint32_t frame[5], peek[3], cs_in;
        int r;
        t->reg_read(uc, t->esp_reg, &esp);
        t->reg_read(uc, t->eflags_reg, &fl);
        if (!ev_read_hv(&t->ev, (uint32_t)esp, peek, 12)) return 0;
        /* the virtual IOPL stays (a translation may have baked it in: Python's) */
        if (((peek[2] >> 12) & 3) != t->ev.iopl) return 0;
        cs_in = peek[1] & 3;
        if (cs_in != 3 && (!a || peek[0] != t->geip[i])) return 0;   /* no translation known here */
        r = ev_iret(&t->ev, (uint32_t)esp, (uint32_t)cs, (uint32_t)fl, t->kernel_ring, 1, frame);
        if (r == 1) {               /* the kernel's own ring: real IOPL 1 (FullVcpu.real_iopl) */
            esp = (uint32_t)(esp + 12);
            fl = (frame[2] & ~(EV_EFLAGS_RF | EV_EFLAGS_IOPL)) | (1u << 12) | 2u;
            t->reg_write(uc, t->esp_reg, &esp);
            t->reg_write(uc, t->eflags_reg, &fl);
            *eip = t->dest[i];
            return IRETD;
        }
        if (r == 3) {               /* ring 3: real IOPL 0, its code runs in place */
            esp = frame[3];
            fl = (frame[2] & ~(EV_EFLAGS_RF | EV_EFLAGS_IOPL)) | 2u;
            t->reg_write(uc, t->esp_reg, &esp);
            t->reg_write(uc, t->eflags_reg, &fl);
            *eip = frame[0];
            return IRETD_OUTER;
        }
        return 0;
    }
    return 0;
}

/* ltr r16 by the guest kernel (privileged.py _ltr, the switch to a process's TSS): an available TSS descriptor
 * of the GDT, present, read through the hypervisor's TLB; its busy bit written as Mmu.write_linear would, into
 * a frame nobody traces through a shadow entry that answers the write with no side effect; TR's base and limit
 * where the C delivery reads them, the selector beside them (FullEvVirtualCpu.tr reads all three). Only for the TR selector of the
 * translations' snapshot (another is Python's: _virtual_changed) and while CS, SS and IOPL are the snapshot's.
 * 0: Python's (a fault, a busy TSS, a 4 GiB wrap, anything else), nothing changed. */
static int ltr(callouts_t *t, void *uc, uint64_t i, uint64_t cs) {
    const shadowmirror_t *m = t->dl.mirror;
    uint64_t v = 0;
    uint32_t sel, index, desc[2], hi, type, base, limit;
    int64_t gpa;
    if (!t->events_on || !m || !t->ev.ram || !snapshot_holds(t, uc, cs)) return 0;
    t->reg_read(uc, t->gpr_reg[t->arg[i] & 7], &v);
    sel = (uint32_t)v & 0xFFFFu, index = sel & ~7u;
    if (sel != t->snap_tr || !(sel & ~3u) || (sel & 4)) return 0;
    if ((uint64_t)t->ev.gdt_base + index + 8 > 0x100000000ull) return 0;
    hv_walk_descriptor(t, sel);
    if (!ev_descriptor(&t->ev, sel, desc)) return 0;
    hi = desc[1], type = (hi >> 8) & 0xFu;
    if ((hi & EV_DESC_S) || (type != 1 && type != 9) || !(hi & EV_DESC_P)) return 0;
    gpa = sm_hv_gpa(m, t->cr[0], t->cr3, t->cr[1], t->ev.gdt_base + index + 4, 1, 0);
    if (gpa < 0 || (uint64_t)gpa + 4 > t->ev.ram_bytes || sm_traced(m, (uint64_t)gpa)) return 0;
    hi |= 2u << 8;                              /* busy */
    memcpy((uint8_t *)t->ev.ram + gpa, &hi, 4);
    base = (desc[0] >> 16) | ((desc[1] & 0xFFu) << 16) | (desc[1] & 0xFF000000u);
    limit = (desc[0] & 0xFFFFu) | (desc[1] & 0xF0000u);
    if (desc[1] & (1u << 23)) limit = (limit << 12) | 0xFFFu;
    t->dl.tr_base = base, t->dl.tr_limit = limit;
    t->tr_sel = sel;
    return 1;
}

/* The linear address of a slot's memory operand (store[]: base + index * scale + disp, flat segments). */
static uint32_t site_address(callouts_t *t, void *uc, const store_t *st) {
    uint64_t v = 0;
    uint32_t gva = (uint32_t)st->disp;
    if (st->base != ST_NONE) {
        t->reg_read(uc, t->gpr_reg[st->base], &v);
        gva += (uint32_t)v;
    }
    if (st->index != ST_NONE) {
        t->reg_read(uc, t->gpr_reg[st->index], &v);
        gva += (uint32_t)v * st->scale;
    }
    return gva;
}

/* invlpg m of the guest kernel (INVLPG) as the Python callout does it (privileged.py _invlpg,
 * ShadowPaging.invlpg, then FullVcpu's check of the code mappings of that page): the page leaves the
 * hypervisor's TLB (ev_rtlb_pop) and the current shadow root (sm_invlpg: the copy now, Python's table at
 * its next fold), the engine's TLB is flushed, the instruction is counted. Only when the virtual CRs
 * select the copy's root and mode, the page holds no translated code (its check would walk: Python's),
 * both logs have room, and CS, SS and IOPL are the snapshot's (_virtual_changed finds nothing). */
static int invlpg(callouts_t *t, void *uc, uint64_t i, uint64_t cs) {
    shadowmirror_t *m = (shadowmirror_t *)t->dl.mirror;
    uint32_t page;
    if (!m || !t->uc_ctl || !t->code_pages || !t->events_on) return 0;
    if (((t->cr[0] & SM_PG) | (t->cr[1] & SM_PSE)) != m->mode || !m->serial || (t->cr3 & 0xFFFFF000u) != m->key)
        return 0;
    if (!snapshot_holds(t, uc, cs)) return 0;
    page = site_address(t, uc, &t->store[i]) >> 12;
    if ((t->code_pages[page >> 3] >> (page & 7)) & 1) return 0;
    if (m->made >= SM_MADE || !ev_rtlb_pop(&t->ev, page)) return 0;
    sm_invlpg(m, page, t->ev.ram, t->ev.ram_bytes);
    sm_flush_pages(m, uc, t->uc_ctl, t->tlb_flush_ctl, &page, 1);   /* ShadowPaging._flush_pages */
    return 1;
}

/* Do the bytes gpa .. gpa + size - 1 share no 64-byte line with a translation's source or with code run in
 * place? Then FullVcpu._check_range, after the store, would drop nothing. */
static int code_untouched(const callouts_t *t, uint64_t gpa, uint32_t size) {
    uint64_t k;
    if (!t->tc_lines) return 0;
    for (k = gpa >> 6; k <= (gpa + size - 1) >> 6; k++) {
        if (k >= t->lines) return 0;
        if ((t->tc_lines[k >> 3] >> (k & 7)) & 1) return 0;
        if (t->inplace_lines && ((t->inplace_lines[k >> 3] >> (k & 7)) & 1)) return 0;
    }
    return 1;
}

/* An adaptive store (ADAPTIVE) as modes/full/adaptive.py _adaptive_store does it through
 * ShadowPaging.guest_store, when that would do nothing but the store, its flags and the counts: the
 * current shadow root maps the page writable and dirty for the kernel (sm_hv_gpa: no walk, no A/D bit, no
 * CR0.WP = 0 grant), in RAM, within one page; and either the frame is traced by shadow paging alone (if
 * entries derive from the word written, `linked`, the store zaps them: sm_zap_pages finds the current root's,
 * when nothing is unsynchronised (shadow_ok) and the store is one word; sm_zap drops them from the copy and
 * logs the zap for Python's tables, and the engine's TLB is flushed, as _on_write does), or it is traced for
 * translated code alone and the bytes share no line with code (code_untouched: coherence.py would drop
 * nothing). A store to a frame nobody traces is a plain store that adds one to the site's untraced run (a
 * traced one sets it to 0, as Python does), up to the store that would reach `limit`: that one is Python's,
 * which makes the site native again. 0: Python's, nothing changed. */
static int adaptive_store(callouts_t *t, void *uc, uint64_t i) {
    store_t *st = &t->store[i];
    const shadowmirror_t *m = t->dl.mirror;
    uint64_t v = 0, fl = 0;
    uint32_t gva, src, old = 0, value, mask, word = 0, nzap = 0, zap_pages[SM_ZAP_MAX];
    int64_t gpa;
    int zap = 0;
    int untraced;
    if (!m || !t->ev.ram || !st->size) return 0;
    gva = site_address(t, uc, st);
    if ((gva & 0xFFFu) + st->size > 0x1000u) return 0;
    gpa = sm_hv_gpa(m, t->cr[0], t->cr3, t->cr[1], gva, 1, 0);
    if (gpa < 0 || (uint64_t)gpa + st->size > t->ev.ram_bytes) return 0;
    untraced = !sm_traced(m, (uint64_t)gpa);
    if (untraced) {
        if (st->run + 1 >= st->limit) return 0;  /* Python makes the site native */
    } else if (sm_pt_traced(m, (uint64_t)gpa)) {  /* a page table */
        word = (uint32_t)gpa & ~3u;
        if (sm_other_traced(m, (uint64_t)gpa)) return 0;
        if (sm_linked(m, word)) {                /* entries derive from the word: they are zapped */
            if (((uint32_t)gpa & 3u) + st->size > 4u || !t->uc_ctl || !t->shadow_ok || m->made >= SM_MADE) return 0;
            if (!sm_zap_pages(m, t->ev.ram, t->ev.ram_bytes, word, zap_pages, &nzap)) return 0;
            zap = 1;
        } else if (sm_linked(m, ((uint64_t)gpa + st->size - 1) & ~3ull)) {
            return 0;
        }
    } else if (!code_untouched(t, (uint64_t)gpa, st->size)) {   /* a code frame (the other owner) */
        return 0;
    }
    mask = st->size == 4 ? 0xFFFFFFFFu : (1u << (8 * st->size)) - 1;
    if (st->src == ST_NONE) {
        src = st->imm & mask;
    } else {
        t->reg_read(uc, t->gpr_reg[st->src], &v);
        src = ((uint32_t)v >> st->shift) & mask;
    }
    memcpy(&old, t->ev.ram + gpa, st->size);
    value = st_value(st->op, old, src, mask);
    memcpy((uint8_t *)t->ev.ram + gpa, &value, st->size);
    if (zap) {                                   /* hv_wrote -> ShadowPaging._on_write: _zap_range, the flush */
        sm_zap((shadowmirror_t *)m, word, zap_pages, nzap);
        sm_flush_pages(m, uc, t->uc_ctl, t->tlb_flush_ctl, zap_pages, nzap);
        t->zaps++;
    }
    if (st->op != ST_MOV) {
        t->reg_read(uc, t->eflags_reg, &fl);
        fl = st_flags(st->op, old, src, value, st->size, fl);
        t->reg_write(uc, t->eflags_reg, &fl);
    }
    st->run = untraced ? st->run + 1 : 0;
    return 1;
}

/* Python is told (its hook's data word) whether the guest kernel runs: 2 yes, 1 no (CS is read here),
 * 3 when the table knows no kernel ring (a bare runtime: Python asks itself). */
#define NO_RING 0xFFFFFFFFu
#define TO_PYTHON(kernel) \
    t->python(uc, address, size, (void *)(uintptr_t)(t->kernel_ring == NO_RING ? 3 : (kernel) ? 2 : 1))

void callout_hook(void *uc, uint64_t address, uint32_t size, void *user_data) {
    callouts_t *t = (callouts_t *)user_data;
    uint64_t i = address - t->base;
    uint64_t cs = 0;
    t->reg_read(uc, t->cs_reg, &cs);
    int kernel = (cs & 3) == t->kernel_ring && t->enabled;
    if (i < SLOTS && t->kind[i] != PYTHON) {
        if (kernel) {
            uint8_t k = t->kind[i];
            uint64_t eip = t->dest[i];
            if (k == MOV_CR0 || k == MOV_CR4) {
                if (!mov_cr(t, uc, t->arg[i], cs)) {
                    TO_PYTHON(1);
                    return;
                }
            } else if (k == MOV_CR3) {
                if (!cr3_reload(t, uc, t->arg[i], cs)) {
                    TO_PYTHON(1);
                    return;
                }
            } else if (k >= MOV_SREG && k <= IRETD) {
                int served = events(t, uc, i, k, cs, &eip);
                if (!served) {
                    TO_PYTHON(1);
                    return;
                }
                k = (uint8_t)served;
            } else if (k == LTR) {
                if (!ltr(t, uc, i, cs)) {
                    TO_PYTHON(1);
                    return;
                }
            } else if (k == INVLPG) {
                if (!invlpg(t, uc, i, cs)) {
                    TO_PYTHON(1);
                    return;
                }
            } else if (k == ADAPTIVE) {
                if (!adaptive_store(t, uc, i)) {
                    TO_PYTHON(1);
                    return;
                }
            } else if (k == PORT_IN || k == PORT_OUT) {
                if (!port_io(t, uc, i, k == PORT_IN)) {
                    vclock_look_at_if(t->watch_if, t->check_if);
                    t->served[k]++;
                    return;
                }
            } else {
                t->answer[k](uc, t->answer_data[k]);
            }
            t->reg_write(uc, t->eip_reg, &eip);
            vclock_look_at_if(t->watch_if, t->check_if); /* as clock.if_may_have_changed */
            t->served[k]++;
            return;
        }
    }
    TO_PYTHON(kernel);
}

/* -- event delivery through the guest's IDT -------------------------------------------------------------
 * Under full, the guest's events arrive at the vCPU's INTR hook as under trap; this hook sits in front
 * of it (modes/full/deliverfast.py) and delivers, with cpu/_evdeliver.h (trap's code), the common ones:
 * `int n` from ring 3 (not int3/into), #DE from ring 3 or from the kernel's translated code (at a TC
 * address that starts a translated instruction: its guest EIP is the return address), #GP from ring
 * 3; each of a kind Python has recorded once. The handler is entered at its translation when one
 * exists (entry[]) and when the real CS, SS and the virtual IOPL after the transfer are the snapshot's
 * (coherence.py _vsnap: nothing _virtual_changed would do could apply). It does what Vcpu.hook_intr
 * and FullVcpu.on_engine_event do around the delivery: FaultState.take's old_exception, left_block_at,
 * the counts (folded by Python with the TC's look-up), if_may_have_changed. Anything else: Python. */
static inline uint32_t entry_slot(uint32_t geip) { return (geip ^ (geip >> 13)) & (TC_ENTRY_SLOTS - 1); }
static inline uint32_t start_slot(uint32_t tc) { return (tc ^ (tc >> 16)) & (TC_START_SLOTS - 1); }

void full_tc_entry(callouts_t *t, uint32_t geip, uint32_t tc) {
    tc_map_t *e = &t->dl.entry[entry_slot(geip)];
    e->geip = geip;
    e->tc = tc;
}

void full_tc_drop(callouts_t *t, uint32_t geip) {
    tc_map_t *e = &t->dl.entry[entry_slot(geip)];
    if (e->geip == geip) e->tc = 0;
}

void full_tc_start(callouts_t *t, uint32_t tc, uint32_t geip) {
    tc_map_t *e = &t->dl.start[start_slot(tc)];
    e->tc = tc;
    e->geip = geip;
}

void full_tc_clear(callouts_t *t) {
    memset(t->dl.entry, 0, sizeof t->dl.entry);
    memset(t->dl.start, 0, sizeof t->dl.start);
}

int full_blocks_put(callouts_t *t, uint32_t address, const uint32_t *addrs, uint32_t n, uint64_t end) {
    return ed_blocks_put(t->dl.block, address, addrs, n, end);
}

void full_blocks_drop(callouts_t *t, uint32_t address) { ed_blocks_drop(t->dl.block, address); }

void full_blocks_clear(callouts_t *t) { ed_blocks_clear(t->dl.block); }

/* FullVcpu.enter_kernel(offset) when rt.lookup would find a live translation (no translation made),
 * and the state after the transfer is the snapshot's */
static int enter_translation(void *ctx, void *uc, uint32_t offset, uint32_t cs_after, uint32_t ss_after, uint32_t *eip) {
    callouts_t *t = (callouts_t *)ctx;
    const tc_map_t *e = &t->dl.entry[entry_slot(offset)];
    (void)uc;
    if (!e->tc || e->geip != offset) {
        t->dl.misses++;
        return 0;
    }
    if (!snapshot_is(t, cs_after, ss_after)) return 0;
    *eip = e->tc;
    return 1;
}

/* cpu/_evdeliver.h's parameters under full */
static void full_evdeliver(callouts_t *t, evdeliver_t *d) {
    fulldeliver_t *f = &t->dl;
    d->ev = &t->ev;
    d->reg_read = t->reg_read;
    d->reg_write = t->reg_write;
    d->r_eip = t->eip_reg, d->r_eflags = t->eflags_reg, d->r_esp = t->esp_reg, d->r_ss = t->ss_reg;
    d->cr0 = t->cr[0], d->cr3 = t->cr3, d->cr4 = t->cr[1];
    d->wp_granted = 0;         /* not mirrored under full: an access WP = 0 would grant is Python's */
    d->idt_base = f->idt_base, d->idt_limit = f->idt_limit;
    d->tr_base = f->tr_base, d->tr_limit = f->tr_limit;
    d->mirror = f->mirror;
    d->kernel_iopl = 1;        /* FullVcpu.real_iopl(0) */
    d->enter = enter_translation;
    d->enter_ctx = t;
    d->leaves_block = 0;       /* (EIP through uc_reg_write: writing it in the CPU state measured no faster here) */
}

static int full_event(callouts_t *t, void *uc, uint32_t intno) {
    fulldeliver_t *f = &t->dl;
    evdeliver_t d;
    uint64_t cs = 0, eflags = 0, eip = 0;
    uint32_t ec = 0, ret_eip;
    int32_t is_int, minus1 = -1;
    int64_t n = 0;
    int has_ec = 0, soft;
    if (!f->on || !t->enabled || !t->events_on || intno > 255) return 0;
    memcpy(&is_int, t->ev.env + f->off_is_int, 4);
    soft = is_int != 0;
    if (soft) {
        if (intno == 3 || intno == 4 || !f->soft_seen[intno]) return 0;   /* int3/into: Python's length */
    } else {
        if ((intno != 0 && intno != 13) || !f->fault_seen[intno]) return 0;
        if (intno == 13) {
            has_ec = 1;
            memcpy(&ec, t->ev.env + f->off_error_code, 4);
        }
    }
    if (t->reg_read(uc, t->cs_reg, &cs) || t->reg_read(uc, t->eflags_reg, &eflags) || t->reg_read(uc, t->eip_reg, &eip))
        return 0;
    if (eflags & EV_EFLAGS_VM) return 0;
    if ((cs & 3) == 3) {
        ret_eip = (uint32_t)eip;                                       /* user code runs in place */
    } else if ((cs & 3) == t->kernel_ring && intno == 0) {             /* FullVcpu.guest_position */
        const tc_map_t *e = &f->start[start_slot((uint32_t)eip)];
        if (eip < f->tc_lo || eip >= f->tc_hi || e->tc != (uint32_t)eip) return 0;
        ret_eip = e->geip;
    } else {
        return 0;
    }
    if (!ed_left_block(f->block, *f->clock_last_block, &f->misses, (uint32_t)eip, &n)) return 0;
    full_evdeliver(t, &d);
    if (!ed_deliver_event(&d, uc, intno, soft, ret_eip, has_ec, ec, (uint32_t)cs, eflags)) return 0;
    memcpy(t->ev.env + f->off_old_exception, &minus1, 4);                /* FaultState.take */
    vclock_add(f->clock_now, -(int64_t)(n));                                       /* left_block_at */
    vclock_look_at_if(t->watch_if, t->check_if);                /* if_may_have_changed */
    if (soft)
        f->soft_count[intno]++;
    else
        f->fault_count[intno]++;
    f->pending++;
    f->delivered++;
    return 1;
}

/* A #PF Python's run loop found (a refused TLB fill: DeprivilegedVcpu.page_fault recorded it, counted
 * it and set the virtual CR2; FullVcpu.guest_position made `eip` the guest's), delivered here when
 * ed_deliver_event can, from ring 3 or the kernel: 1, or 0 with nothing changed (Python delivers it).
 * Called through ctypes with the engine stopped; the clock is Python's (as trap's trapfast_deliver_fault). */
int full_deliver_fault(callouts_t *t, void *uc, uint32_t vector, uint32_t eip, uint32_t error_code) {
    uint64_t cs = 0, eflags = 0;
    evdeliver_t d;
    if (!t->dl.on || !t->enabled || !t->events_on || vector != 14) return 0;
    if (t->reg_read(uc, t->cs_reg, &cs) || t->reg_read(uc, t->eflags_reg, &eflags)) return 0;
    if ((cs & 3) != 3 && (cs & 3) != t->kernel_ring) return 0;
    full_evdeliver(t, &d);
    if (!ed_deliver_event(&d, uc, vector, 0, eip, 1, error_code, (uint32_t)cs, eflags)) return 0;
    t->dl.delivered++;
    return 1;
}

void full_intr_hook(void *uc, uint32_t intno, void *user_data) {
    callouts_t *t = (callouts_t *)user_data;
    if (full_event(t, uc, intno)) return;
    t->dl.to_python++;
    t->dl.python_intr(uc, intno, NULL);
}

/* -- a true #PF found in the TLB fill, delivered there (modes/full/deliverfast.py FullFaults) ----------------
 * trap's true_fault (modes/_trapfast.c) for full: a load or store at the kernel's ring or ring 3, below the
 * hypervisor's windows, the shadow's current root the one the virtual CR3 selects and holding no entry for
 * the page, nothing unsynchronised, and a walk of the guest's tables that faults; what Mmu.fill, _resolve,
 * the run loop, FullVcpu.on_refused_fill and DeprivilegedVcpu.page_fault do, made here. Kernel code runs
 * from its translation: CR2 comes from the TC instruction, as on_refused_fill decodes it, and the fault is
 * the guest instruction's the TC address starts (start[], as full_event's #DE). User code runs in place:
 * its bytes are read through the guest's tables. The delivery is full_evdeliver's, into the handler's
 * translation (its look-up counted with `delivered`). Anything else: 0, nothing changed. */

typedef struct {
    callouts_t *t;             /* the callout table, once attached (NULL: every fill is the others') */
    uint64_t cpu_offset;       /* uc_struct's CPUState pointer (cpu/fastdelivery.py _engine_cpu) */
    void (*loop_exit)(void *cpu);   /* QEMU's cpu_loop_exit */
    const uint32_t *hv_start;  /* the shadow fill's: the hypervisor's linear windows start there */
    const uint8_t *tc_host;    /* the translation cache's bytes, which its linear window tc_window maps */
    uint32_t tc_window, tc_size;
    uint32_t on;               /* CPUVIRT_FULL_PF_C */
    uint32_t seen;             /* Python has recorded a page_fault/#PF event (its counters' keys exist) */
    /* the counts, as Mmu.fill and ShadowPaging._resolve count them (Python adds them: MmuCounters.walkers,
     * ShadowCounters.walkers) and the event's (folded into Vcpu.counts and reasons: FullFaults.fold) */
    tf_counts_t pf;            /* (cpu/_truefault.h) */
    uint64_t pending;
} fullpf_t;

size_t fullpf_sizeof(void) { return sizeof(fullpf_t); }

#define CR4_PAE_ 0x20u

/* 15 bytes at `gva` read through the guest's 32-bit tables with no side effect (Mmu.fetch_bytes), when they
 * are in one present page of RAM. */
static int guest_code(const callouts_t *t, uint32_t gva, uint8_t *out) {
    uint32_t pde, pte;
    uint64_t gpa;
    if ((gva & 0xFFFu) > 0x1000u - 15u) return 0;
    if (!tf_ram32(t->ev.ram, t->ev.ram_bytes, (t->cr3 & 0xFFFFF000u) | ((gva >> 20) & 0xFFCu), &pde) || !(pde & TF_PTE_P))
        return 0;
    if ((pde & TF_PTE_PS) && (t->cr[1] & TF_CR4_PSE)) {
        if (pde & 0x003FE000u) return 0;
        gpa = (pde & 0xFFC00000u) | (gva & 0x003FFFFFu);
    } else {
        if (!tf_ram32(t->ev.ram, t->ev.ram_bytes, (pde & 0xFFFFF000u) | ((gva >> 10) & 0xFFCu), &pte) || !(pte & TF_PTE_P))
            return 0;
        gpa = (pte & 0xFFFFF000u) | (gva & 0xFFFu);
    }
    if (gpa + 15 > t->ev.ram_bytes) return 0;
    memcpy(out, t->ev.ram + gpa, 15);
    return 1;
}

int full_pf_hook(void *uc, uint64_t vaddr, int type, tlb_entry_t *e, void *user_data) {
    fullpf_t *p = (fullpf_t *)user_data;
    callouts_t *t = p->t;
    fulldeliver_t *f;
    const shadowmirror_t *m;
    evdeliver_t d;
    uint64_t ss = 0, cs = 0, eflags = 0, eip = 0;
    uint32_t page = (uint32_t)vaddr >> 12, ec = 0, refs = 0, ea = 0, ret_eip;
    modrm_uc_regs_t regs;
    tf_made_t made;
    uint32_t cr0, cr3, cr4;
    int64_t pde_a, n = 0;
    int user, write = type == MEM_WRITE;
    uint8_t code[15];
    (void)e;
    if (!t || !p->on || !p->seen) return 0;
    regs = (modrm_uc_regs_t){t->reg_read, t->gpr_reg, uc};
    f = &t->dl;
    if (!f->on || !t->enabled || !t->events_on) return 0;
    if ((type != MEM_READ && type != MEM_WRITE) || (uint32_t)vaddr >= *p->hv_start) return 0;
    m = f->mirror;
    cr0 = t->cr[0], cr3 = t->cr3, cr4 = t->cr[1];
    if (!m || !m->serial || !t->shadow_ok) return 0;
    if (!(cr0 & CR0_PG_) || (cr4 & CR4_PAE_)) return 0;
    if (((cr0 & CR0_PG_) | (cr4 & TF_CR4_PSE)) != m->mode || (cr3 & 0xFFFFF000u) != m->key) return 0;
    if (sm_present(m, page)) return 0;        /* Python's table holds the page: its entry's rights decide */
    if (t->reg_read(uc, t->ss_reg, &ss) || ((ss & 3) != t->kernel_ring && (ss & 3) != 3)) return 0;
    user = (ss & 3) == 3;
    if (!tf_walk(t->ev.ram, t->ev.ram_bytes, cr0, cr3, cr4, (uint32_t)vaddr, write, user, &ec, &refs, &pde_a))
        return 0;
    if (t->reg_read(uc, t->cs_reg, &cs) || t->reg_read(uc, t->eflags_reg, &eflags) || t->reg_read(uc, t->eip_reg, &eip))
        return 0;
    if (eflags & EV_EFLAGS_VM) return 0;
    if ((cs & 3) == 3) {                                                /* user code runs in place */
        if (!guest_code(t, (uint32_t)eip, code)) return 0;
        ret_eip = (uint32_t)eip;
    } else if ((cs & 3) == t->kernel_ring) {                            /* FullVcpu.guest_position */
        const tc_map_t *st = &f->start[start_slot((uint32_t)eip)];
        if (eip < f->tc_lo || eip >= f->tc_hi || st->tc != (uint32_t)eip) return 0;
        if (eip < p->tc_window || eip - p->tc_window + 15 > p->tc_size) return 0;
        memcpy(code, p->tc_host + (eip - p->tc_window), 15);
        ret_eip = st->geip;
    } else {
        return 0;
    }
    if (!tf_operand(code, modrm_uc_reg, &regs, &ea) || (ea & 0xFFFFF000u) != ((uint32_t)vaddr & 0xFFFFF000u)) return 0;
    if (!ed_left_block(f->block, *f->clock_last_block, &f->misses, (uint32_t)eip, &n)) return 0;
    tf_make((uint8_t *)t->ev.ram, pde_a, &t->ev.cr2, ea, &made);   /* PDE.A, CR2; then the delivery */
    full_evdeliver(t, &d);
    if (!ed_deliver_event(&d, uc, 14, 0, ret_eip, 1, ec, (uint32_t)cs, eflags)) {
        tf_unmake((uint8_t *)t->ev.ram, &t->ev.cr2, &made);
        return 0;
    }
    vclock_add(f->clock_now, -(int64_t)(n));     /* Vcpu.left_block_at(eip): the faulting instruction did not retire */
    tf_count(&p->pf, refs);           /* Mmu.fill's fill; _resolve's walk and true fault */
    p->pending++;                     /* the page_fault/#PF event */
    f->delivered++;                   /* (and enter_kernel's look-up of the handler's translation) */
    vclock_look_at_if(t->watch_if, t->check_if);                /* if_may_have_changed */
    p->loop_exit(*(void **)((uint8_t *)uc + p->cpu_offset));   /* does not return */
    return 0;
}

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_callout", NULL, -1, NULL};

PyMODINIT_FUNC PyInit__callout(void) { return PyModule_Create(&module); }
