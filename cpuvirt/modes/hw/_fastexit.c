/*
 * hw's commonest VM exits answered in C when nothing in Python needs to see them (modes/hw/fastexit.py).
 *
 * - CPUID always exits (SDM Vol. 3C 25.1.2), and KVM answers it from its CPUID table: the root-mode
 *   handler (handlers.py handle_cpuid) does nothing else. This hook does the whole round trip (the exit's
 *   information fields, the handler's four registers, the entry) in C, and leaves a record (how many
 *   exits, the RIP of the last) that Python folds into the VMCS, the exit counters and the cost model's
 *   event count before anything reads them (VmxCpu.fold_fast_exits): what a reader sees is what the
 *   Python path would have left.
 * - A MOV to CR0 or CR4 that changes only guest-owned bits (the CR0/CR4 guest/host masks and read
 *   shadows, SDM 25.1.3) causes no exit on hardware: the processor writes the guest-owned bits and keeps
 *   the host-owned ones (SDM 25.3). The site's code hook does that in C (nonroot.py
 *   mov_system_register_access, the no-exit branch); a write that exits, a CR4 bit the CPU model lacks
 *   (#GP), CPL > 0, an interrupt shadow, code other than the site's: the Python hook. A MOV to CR3
 *   without CR3-load exiting is left to the engine, as Python leaves it; so is a PAUSE without PAUSE
 *   exiting (kvm-unit-tests' delay loops). With CR3-load exiting (shadow paging, hw --no-ept), a load of
 *   the root the shadow already runs on (a kernel flushing its TLB) is the whole CR_ACCESS round trip
 *   here, recorded for Python to fold as the CPUID exits are.
 * - RDTSC without RDTSC exiting reads the virtual clock (plus TSC_OFFSET with TSC offsetting).
 * - IN/OUT: whether an access exits (unconditional I/O exiting, or the I/O bitmaps) is decided here from
 *   the controls copied when armed; an exit goes to Python's quick I/O exit (the device models are
 *   Python), anything else to the Python hooks. The I/O-permission gate before an in/out passes CPL 0.
 *
 * Python arms the C path at the end of each VM entry it makes (its APIC-virtualization sync done), and
 * disarms it whenever something the C path copies may change (a vmwrite, the emulated APIC, a trace or
 * a VMCS dump, the run's end). While armed, the entry after a C exit would change nothing: the
 * virtual-APIC page already mirrors the APIC, and the checks below decline whenever the guest's own
 * writes to that page (TPR, ICR high) would make the sync do something.
 *
 * Built as a Python extension only so that setuptools compiles it; fastexit.py loads it with ctypes.
 */
#include <Python.h>
#include <stdint.h>
#include <string.h>
#include "../../engine/_vclock.h"   /* the clock's interrupt-window look (its stubs' limit) */
#include "../../memory/_shadowmirror.h"   /* without EPT: the shadow's current root, for an INVLPG exit */
#include "../../cpu/_modrm.h"             /* ... and its operand */
#include "../../cpu/_storeop.h"           /* a ptemod's decode and store, shared with trap's */
#include "../../cpu/_truefault.h"         /* a true #PF's walk and CR2, shared with trap's and full's */
#include "../../engine/_tlbhook.h"        /* the TLB-fill hook's entry and access types */

typedef int (*reg_read_fn)(void *uc, int regid, void *value);
typedef int (*reg_write_fn)(void *uc, int regid, const void *value);
typedef int (*context_fn)(void *uc, void *context);
typedef int (*peek_fn)(void *state, void *uc, uint32_t gva, uint32_t n, uint8_t *out);
typedef int (*cpuid_python_fn)(void *uc, void *user_data);
typedef void (*code_python_fn)(void *uc, uint64_t address, uint32_t size, void *user_data);
typedef int (*rdtsc_python_fn)(void *uc, void *user_data);
typedef uint32_t (*in_python_fn)(void *uc, uint32_t port, int size, void *user_data);
typedef void (*out_python_fn)(void *uc, uint32_t port, int size, uint32_t value, void *user_data);
typedef uint32_t (*io_exit_python_fn)(uint32_t port, uint32_t size, uint32_t flags, uint32_t value);
typedef void (*io_entry_python_fn)(void);

#define MAX_LEAVES 16
#define BLOCK_SITES 256

typedef struct {
    uint32_t leaf, eax, ebx, ecx, edx;
} leaf_t;

typedef struct {
    uint64_t block;          /* a block's address (the clock's last_block) */
    uint32_t site;           /* the cpuid in it whose hook runs (vmx.py _insn_site) */
    uint32_t valid;
} block_site_t;

typedef struct {
    reg_read_fn reg_read;
    reg_write_fn reg_write;
    context_fn context_save;
    void *context;               /* a (short) uc_context of this engine */
    const uint8_t *context_hflags;   /* env->hflags inside it */
    peek_fn peek;                /* cpu/_delivery.c delivery_peek: guest bytes through the walks */
    void *peek_state;
    cpuid_python_fn cpuid_python;    /* the guarded Python cpuid hook (VmxCpu.hook_cpuid) */
    rdtsc_python_fn rdtsc_python;    /* the guarded Python rdtsc hook (VmxCpu.rdtsc) */
    const vclock_time_t *clock_now;  /* the virtual clock's time (what rdtsc reads) */
    const volatile uint32_t *clock_last_block;
    uint32_t *clock_watch_if;
    uint32_t *clock_check_if;
    int32_t eax, ebx, ecx, edx, eip, cr0, cr4;
    uint32_t armed;
    /* VMCS fields, copied when armed */
    uint32_t cr0_mask, cr0_shadow, cr4_mask, cr4_shadow;
    uint32_t cr4_reserved;       /* CR4 bits the CPU model lacks (x86/cpuid.py) */
    uint32_t cr3_load_exiting;   /* the primary control (a MOV to CR3 then exits unless a target) */
    uint32_t pause_exiting, rdtsc_exiting, tsc_offsetting, pad0;
    uint64_t tsc_offset;
    /* APIC virtualization (vapic NULL: none) */
    uint32_t register_virt, tpr_shadow;
    uint32_t icr_hi;             /* the emulated APIC's ICR high at the last sync */
    int32_t max_irr_class;       /* its highest requested vector's class, -1: none */
    uint32_t tpr_threshold;
    const uint8_t *vapic;
    /* what C did, not yet folded into Python's records */
    uint64_t cpuid_exits;
    uint32_t last_rip;
    uint32_t pad;
    /* totals */
    uint64_t cpuid_total, cr_total, rdtsc_total, pause_total;
    uint32_t count;
    uint32_t pad2;
    leaf_t fallback;
    leaf_t leaves[MAX_LEAVES];
    block_site_t sites[BLOCK_SITES];
    uint32_t invlpg_exiting, cr3_store_exiting;   /* primary controls, copied when armed */
    uint64_t read_total;         /* INVLPG and MOV from CR2/CR3 answered here (nothing to do) */
    uint64_t io_gate_total;      /* in/out/ins/outs at CPL 0 passed by the I/O gate here */
    /* I/O exits (fastexit_in_hook, fastexit_out_hook) */
    in_python_fn in_python;          /* the guarded Python hooks (Vcpu.hook_in, hook_out) */
    out_python_fn out_python;
    io_exit_python_fn io_exit_python;    /* VmxCpu.io_exit_hook: an access that exits */
    uint32_t quick_io;               /* VmxCpu.quick_io */
    uint32_t io_bitmaps;             /* "use I/O bitmaps", copied when armed */
    uint32_t unconditional_io;       /* "unconditional I/O exiting", copied when armed */
    uint32_t pad3;
    const uint8_t *io_bitmap_a;      /* the bitmap pages in the hypervisor's memory, when armed */
    const uint8_t *io_bitmap_b;
    uint64_t io_exit_total;          /* I/O exits decided here (handed to io_exit_python) */
    vclock_time_t *clock_now_w;      /* the clock's time and extra (VirtualClock.advance) */
    uint64_t *clock_extra;
    uint64_t io_cycles;              /* the virtual time of a port access (cpu/vcpu.py IO_CYCLES) */
    io_entry_python_fn io_entry_python;  /* VmxCpu.io_entry: the VM entry after a quick exit */
    uint32_t quick_done;             /* set by Python when it made the quick exit (no entry yet) */
    uint32_t pad4;
    /* CR3-load exiting without EPT (shadow paging): a load of the root the shadow runs on, whose exit's
     * handler (handlers.py handle_cr -> ShadowPaging.on_cr3_write) only counts a root hit. The guard is
     * cpu/_delivery.c's (VmxCpu._mirror_shadow); NULL: every such load is Python's exit. */
    const uint32_t *shadow_ok;
    const uint32_t *shadow_key;
    uint64_t cr3_exits;              /* CR_ACCESS exits made here, not yet folded */
    uint32_t last_kind;              /* which record was written last: LAST_CPUID, LAST_CR3, LAST_INVLPG, LAST_PF */
    uint32_t last_cr3_qual;          /* the last one's exit qualification, length, RIP and value */
    uint32_t last_cr3_len;
    uint32_t last_cr3_rip;
    uint32_t last_cr3_value;
    int32_t cr3;                     /* Unicorn's register id */
    uint64_t cr3_exit_total;
    /* INVLPG exiting without EPT: the exit whose handler (handlers.py handle_invlpg) drops the page's
     * entry from the shadow's current root (ShadowPaging.invlpg) and lets the engine run the invlpg: made
     * here under the same guard as the CR3 loads', the entry dropped from the C copy of the root and logged
     * for Python's table (_shadowmirror.h sm_invlpg). NULL mirror: every such exit is Python's. */
    shadowmirror_t *mirror;
    const uint8_t *ram;              /* guest RAM (sm_invlpg reads the root's page directory there) */
    uint64_t ram_bytes;
    int32_t gpr_reg[8];              /* ... of EAX..EDI in ModRM order (the operand's registers) */
    uint64_t invlpg_exits;           /* INVLPG exits made here, not yet folded */
    uint32_t last_invlpg_qual;       /* the last one's exit qualification (the linear address), length, RIP */
    uint32_t last_invlpg_len;
    uint32_t last_invlpg_rip;
    uint32_t pad5;
    uint64_t invlpg_exit_total;
    const uint64_t *pf_exits;        /* without EPT: the #PF exits fastexit_pf_hook made, not yet folded (NULL: none) */
} fastexit_t;

enum { LAST_CPUID, LAST_CR3, LAST_INVLPG, LAST_PF };

typedef struct {
    fastexit_t *s;
    code_python_fn python;
    uint32_t size;           /* 0: always Python */
    int32_t cr;              /* 0, 3 or 4; -1: a pause; -2: an invlpg; 0x102, 0x103: a MOV from CR2, CR3;
                              * -3: an in/out/ins/outs (the I/O permission gate) */
    int32_t src_reg;         /* Unicorn register id of the source GPR */
    uint32_t qual;           /* a MOV to CR3: its CR_ACCESS exit qualification (CR, access, GPR) */
    uint64_t passed;
    uint8_t bytes[16];
} cr_site_t;

size_t fastexit_sizeof(void) { return sizeof(fastexit_t); }
size_t fastexit_cr_site_sizeof(void) { return sizeof(cr_site_t); }

/* QEMU's env->hflags (target/i386/cpu.h) */
#define HF_CPL_MASK 3u
#define HF_INHIBIT_IRQ (1u << 3)
#define HF_CS32 (1u << 4)
#define HF_PE (1u << 7)
#define HF_VM (1u << 17)

#define VAPIC_TPR 0x80
#define VAPIC_ICR_HI 0x310

static inline uint32_t slot(uint64_t block) { return (uint32_t)((block ^ (block >> 8) ^ (block >> 16)) & (BLOCK_SITES - 1)); }

void fastexit_put_site(fastexit_t *s, uint64_t block, uint32_t site) {
    block_site_t *e = &s->sites[slot(block)];
    e->valid = 0;
    e->block = block;
    e->site = site;
    e->valid = 1;
}

void fastexit_drop_site(fastexit_t *s, uint64_t block) {
    block_site_t *e = &s->sites[slot(block)];
    if (e->block == block) e->valid = 0;
}

/* VmxCpu._sync_vapic at the next entry would change nothing (the page and TPR_THRESHOLD stay). */
static int vapic_quiet(const fastexit_t *s) {
    uint32_t icr_hi, tpr, threshold;
    if (!s->vapic) return 1;
    if (s->register_virt) {
        memcpy(&icr_hi, s->vapic + VAPIC_ICR_HI, 4);
        if ((icr_hi & 0xFF000000u) != s->icr_hi) return 0;   /* VirtualApic.pull would change the APIC */
    }
    if (s->tpr_shadow) {
        tpr = s->vapic[VAPIC_TPR] >> 4;
        threshold = (s->max_irr_class < 0 || tpr < (uint32_t)s->max_irr_class) ? 0 : (uint32_t)s->max_irr_class;
        if (threshold != s->tpr_threshold) return 0;
    }
    return 1;
}

/* Would a VM entry now change nothing? Armed (no vmwrite, APIC change, trace or dump since the last
 * entry) and the virtual-APIC page in step: cpu/_delivery.c delivers a guest #PF without the run loop's
 * trip through VmxCpu.before_entry only then. */
int fastexit_quiet(void *state) {
    const fastexit_t *s = (const fastexit_t *)state;
    return s->armed && vapic_quiet(s);
}

/* UC_HOOK_INSN (UC_X86_INS_CPUID): 1 = the registers are the answer. */
int fastexit_cpuid_hook(void *uc, void *user_data) {
    fastexit_t *s = (fastexit_t *)user_data;
    const block_site_t *e;
    const leaf_t *l;
    uint64_t eax = 0, v;
    uint32_t i;
    if (!s->armed) goto python;
    e = &s->sites[slot(*s->clock_last_block)];
    if (!e->valid || e->block != *s->clock_last_block || !vapic_quiet(s)) goto python;
    if (s->reg_read(uc, s->eax, &eax)) goto python;
    l = &s->fallback;
    for (i = 0; i < s->count && i < MAX_LEAVES; i++) {
        if (s->leaves[i].leaf == (uint32_t)eax) {
            l = &s->leaves[i];
            break;
        }
    }
    v = l->eax; s->reg_write(uc, s->eax, &v);
    v = l->ebx; s->reg_write(uc, s->ebx, &v);
    v = l->ecx; s->reg_write(uc, s->ecx, &v);
    v = l->edx; s->reg_write(uc, s->edx, &v);
    s->cpuid_exits++;
    s->cpuid_total++;
    s->last_rip = e->site;
    s->last_kind = LAST_CPUID;
    return 1;
python:
    return s->cpuid_python(uc, NULL);
}

/* An INVLPG exit without EPT (nonroot.py invlpg -> vm_exit -> handle_invlpg -> vm_entry), made here while
 * the entry after it would change nothing else (the guard of the CR3 loads': the shadow's root and mode
 * change only through Python, nothing unsynchronised; the virtual-APIC page in step) and the engine's CR3
 * and paging mode select the copy's root: the page leaves the copy of the root and the log tells Python's
 * table, the exit is recorded for Python to fold (its counters, and its fields if it is the last), and the
 * engine runs the invlpg itself, as after the Python exit. 0: Python's exit, nothing changed. */
static int invlpg_exit(fastexit_t *s, void *uc, const cr_site_t *site, uint32_t address) {
    shadowmirror_t *m = s->mirror;
    uint64_t cr0 = 0, cr3 = 0, cr4 = 0;
    uint32_t la = 0;
    modrm_uc_regs_t regs = {s->reg_read, s->gpr_reg, uc};
    if (!m || !s->shadow_ok || !*s->shadow_ok || !vapic_quiet(s) || !m->serial || m->made >= SM_MADE) return 0;
    if (site->bytes[0] != 0x0F || site->bytes[1] != 0x01 || ((site->bytes[2] >> 3) & 7) != 7) return 0;
    if (s->reg_read(uc, s->cr0, &cr0) || s->reg_read(uc, s->cr3, &cr3) || s->reg_read(uc, s->cr4, &cr4)) return 0;
    if (((uint32_t)cr0 & SM_PG) == 0 || (((uint32_t)cr0 & SM_PG) | ((uint32_t)cr4 & SM_PSE)) != m->mode) return 0;
    if (((uint32_t)cr3 & 0xFFFFF000u) != m->key || m->key != *s->shadow_key) return 0;
    if (modrm_address(site->bytes + 2, modrm_uc_reg, &regs, &la) + 2 != (int)site->size) return 0;   /* (no prefix) */
    if (!sm_invlpg(m, la >> 12, s->ram, s->ram_bytes)) return 0;
    s->invlpg_exits++;
    s->invlpg_exit_total++;
    s->last_kind = LAST_INVLPG;
    s->last_invlpg_qual = la;
    s->last_invlpg_len = site->size;
    s->last_invlpg_rip = address;
    return 1;
}

/* UC_HOOK_CODE on one `mov cr0/cr4, r32` site (and the other sites of cr_site_t). */
void fastexit_cr_hook(void *uc, uint64_t address, uint32_t size, void *user_data) {
    cr_site_t *site = (cr_site_t *)user_data;
    fastexit_t *s = site->s;
    uint8_t now[16];
    uint64_t eip = 0, value = 0, real = 0, v;
    uint32_t hflags, mask, shadow;
    int creg;
    if (!s->armed || size != site->size || size > 16) goto python;
    if (s->context_save(uc, s->context)) goto python;
    memcpy(&hflags, s->context_hflags, 4);
    if (site->cr == -3) {
        /* The I/O permission check before an in/out (cpu/vcpu.py io_gate) always passes at CPL 0 in
         * protected mode outside V86 (CS.RPL = 0): nothing to do; the I/O exit, if any, follows in the
         * engine's IN/OUT hook. Elsewhere, or other bytes at the site: Python. */
        if ((hflags & (HF_PE | HF_VM | HF_CPL_MASK)) != HF_PE) goto python;
        if (!s->peek(s->peek_state, uc, (uint32_t)address, size, now) || memcmp(now, site->bytes, size)) goto python;
        s->io_gate_total++;
        vclock_look_at_if(s->clock_watch_if, s->clock_check_if);   /* as Python's hit */
        site->passed++;
        return;
    }
    /* 32-bit protected mode at CPL 0, no interrupt shadow (Python clears it when it skips) */
    if ((hflags & (HF_PE | HF_VM | HF_CS32 | HF_CPL_MASK | HF_INHIBIT_IRQ)) != (HF_PE | HF_CS32)) goto python;
    if (s->reg_read(uc, s->eip, &eip) || (uint32_t)eip != (uint32_t)address) goto python;
    if (!s->peek(s->peek_state, uc, (uint32_t)address, size, now) || memcmp(now, site->bytes, size)) goto python;
    if (site->cr == -1) {
        /* PAUSE exits only with PAUSE exiting (no PAUSE-loop exiting simulated): else nothing to do */
        if (s->pause_exiting) goto python;
        s->pause_total++;
        goto done;
    }
    if (site->cr == -2 && s->invlpg_exiting) {
        if (!invlpg_exit(s, uc, site, (uint32_t)address)) goto python;
        vclock_look_at_if(s->clock_watch_if, s->clock_check_if);
        site->passed++;
        return;
    }
    if (site->cr == -2 || site->cr >= 0x100) {
        /* INVLPG exits only with INVLPG exiting, a MOV from CR3 only with CR3-store exiting, a MOV from
         * CR2 never (nonroot.py invlpg, mov_system_register_access): else the engine does it all, a
         * kernel's #PF handler reading CR2 included */
        if (site->cr == 0x103 && s->cr3_store_exiting) goto python;
        s->read_total++;
        goto done;
    }
    if (site->cr == 3) {
        /* no CR3-load exiting: nothing to do in non-root operation, the engine loads CR3 (with EPT the
         * guest owns its page tables) */
        if (!s->cr3_load_exiting) goto done;
        /* CR3-load exiting (shadow paging, no CR3-target values: the guard's policy): a CR_ACCESS exit.
         * For the root the shadow runs on, the handler writes GUEST_CR3 and counts a root hit, and the
         * entry loads CR3 (the engine flushes its TLB): done here while that entry would change nothing
         * else; another root (ShadowPaging._select), or the guard down: Python's exit. */
        if (!s->shadow_ok || !*s->shadow_ok || !vapic_quiet(s)) goto python;
        if (s->reg_read(uc, site->src_reg, &value)) goto python;
        value &= 0xFFFFFFFFu;
        if (((uint32_t)value & 0xFFFFF000u) != *s->shadow_key) goto python;
        if (s->reg_write(uc, s->cr3, &value)) goto python;
        v = (uint32_t)(address + size);
        s->reg_write(uc, s->eip, &v);
        s->cr3_exits++;
        s->cr3_exit_total++;
        s->last_kind = LAST_CR3;
        s->last_cr3_qual = site->qual;
        s->last_cr3_len = size;
        s->last_cr3_rip = (uint32_t)address;
        s->last_cr3_value = (uint32_t)value;
        vclock_look_at_if(s->clock_watch_if, s->clock_check_if);
        site->passed++;
        return;
    }
    creg = site->cr == 0 ? s->cr0 : s->cr4;
    if (s->reg_read(uc, site->src_reg, &value) || s->reg_read(uc, creg, &real)) goto python;
    value &= 0xFFFFFFFFu;
    real &= 0xFFFFFFFFu;
    if (site->cr == 0) {
        mask = s->cr0_mask;
        shadow = s->cr0_shadow;
    } else {
        if (value & ~real & s->cr4_reserved) goto python;   /* #GP(0) (cpu/vcpu.py cr4_gate) */
        mask = s->cr4_mask;
        shadow = s->cr4_shadow;
    }
    if (mask & ((uint32_t)value ^ shadow)) goto python;      /* a CR_ACCESS exit */
    v = ((uint32_t)value & ~mask) | ((uint32_t)real & mask);
    if (s->reg_write(uc, creg, &v)) goto python;
    v = (uint32_t)(address + size);
    s->reg_write(uc, s->eip, &v);
done:
    vclock_look_at_if(s->clock_watch_if, s->clock_check_if);   /* VirtualClock.if_may_have_changed */
    site->passed++;
    s->cr_total++;
    return;
python:
    site->python(uc, address, size, NULL);
}

/* Does an access to `size` ports from `port` exit (SDM 25.1.3)? With I/O bitmaps, a bit set for any port
 * it touches, the port space wrapping at 0xFFFF; without, unconditional I/O exiting. (vmx.py _io_exits) */
static int io_exits(const fastexit_t *s, uint32_t port, int size) {
    int i;
    uint32_t p;
    if (!s->io_bitmaps) return s->unconditional_io != 0;
    for (i = 0; i < size; i++) {
        p = (port + (uint32_t)i) & 0xFFFFu;
        if (((p < 0x8000u ? s->io_bitmap_a : s->io_bitmap_b)[(p & 0x7FFFu) >> 3] >> (p & 7u)) & 1u) return 1;
    }
    return 0;
}

/* Exits made in C that Python has not folded yet (VmxCpu.fold_fast_exits). */
static int c_exits_pending(const fastexit_t *s) {
    return s->cpuid_exits || s->cr3_exits || s->invlpg_exits || (s->pf_exits && *s->pf_exits);
}

/* An access that exits: its virtual time spent here (Python takes it back if the run has ended), then
 * Python's exit (flags: 1 = in, 2 = exits made in C to fold first), then the VM entry only if the quick exit
 * was made and the entry would change something (what VmxCpu._quick_io_exit does in Python). */
static uint32_t io_exit(fastexit_t *s, uint32_t port, int size, uint32_t is_in, uint32_t value) {
    uint32_t r;
    s->io_exit_total++;
    vclock_advance(s->clock_now_w, s->clock_extra, s->io_cycles);
    s->quick_done = 0;
    r = s->io_exit_python(port, (uint32_t)size, is_in | (c_exits_pending(s) ? 2u : 0u), value);
    if (s->quick_done && !(s->armed && vapic_quiet(s))) s->io_entry_python();
    s->quick_done = 0;
    return r;
}

/* UC_HOOK_INSN (UC_X86_INS_IN, UC_X86_INS_OUT): an access that exits goes to the exit's Python (which
 * does the quick exit or the full one); anything else, or while disarmed, to the Python hooks. */
uint32_t fastexit_in_hook(void *uc, uint32_t port, int size, void *user_data) {
    fastexit_t *s = (fastexit_t *)user_data;
    if (s->armed && s->quick_io && io_exits(s, port, size)) return io_exit(s, port, size, 1, 0);
    return s->in_python(uc, port, size, NULL);
}

void fastexit_out_hook(void *uc, uint32_t port, int size, uint32_t value, void *user_data) {
    fastexit_t *s = (fastexit_t *)user_data;
    if (s->armed && s->quick_io && io_exits(s, port, size)) {
        io_exit(s, port, size, 0, value);
        return;
    }
    s->out_python(uc, port, size, value, NULL);
}

/* UC_HOOK_INSN (UC_X86_INS_RDTSC): the virtual clock, plus TSC_OFFSET with TSC offsetting, when RDTSC
 * does not exit (vmx.py VmxCpu.rdtsc; SDM 25.3). */
int fastexit_rdtsc_hook(void *uc, void *user_data) {
    fastexit_t *s = (fastexit_t *)user_data;
    uint64_t tsc, lo, hi;
    if (!s->armed || s->rdtsc_exiting) return s->rdtsc_python(uc, NULL);
    tsc = vclock_now(s->clock_now);
    if (s->tsc_offsetting) tsc += s->tsc_offset;
    lo = tsc & 0xFFFFFFFFu;
    hi = tsc >> 32;
    s->reg_write(uc, s->eax, &lo);
    s->reg_write(uc, s->edx, &hi);
    s->rdtsc_total++;
    return 1;
}

/* -- hw --no-ept: the #PF exit of a ptemod, from the TLB fill -------------------------------------------
 * Without EPT the shadow maps the guest's page tables read-only, so the guest kernel's store into one is a
 * #PF exit (VmxCpu.on_refused_fill -> _exception_exit -> vm_exit -> handle_exception_nmi ->
 * shadow_page_fault: ShadowPaging.page_fault's walk finds the traced frame, _on_write emulates the store,
 * GUEST_RIP moves past it -> vm_entry), about 80 us of Python. This fill hook, after the shadow's C fill
 * and before Mmu.fill, makes that whole round trip for the common case, while the stop the full path makes
 * would change nothing else: the fast exits armed and quiet (no vmwrite, trace or dump since the last
 * entry, the virtual-APIC page in step), what Python found at that entry (the default #PF handler: `c_armed`;
 * with interrupt-window exiting, IF = 0: pf_window_waits), no device change since the run loop armed the clock (`epoch`), the
 * clock's deadline and no stop pending; the shadow guard of the CR3 loads (its root and mode, nothing
 * unsynchronised); the #PF exits for its error code (the exception bitmap, PFEC_MASK/MATCH). The store is
 * a ptemod trap's fill hook takes (cpu/_storeop.h st_decode, memory/_shadowmirror.h sm_ptemod_plan) at
 * CPL 0, through an entry of the shadow's current root that the walk page_fault makes would make again
 * unchanged (no accessed or dirty bit to set). Then: the store and its flags, EIP past it, the block's
 * later instructions off the clock, the refused fill and the walk counted as Mmu.fill and _resolve count
 * them, the ptemod's record for ShadowPaging._fold, and the exit's record for VmxCpu.fold_fast_exits (its
 * fields if it is the last exit C made); the instruction is left as QEMU leaves one it abandons
 * (cpu_loop_exit). Anything else: 0, nothing changed, Mmu.fill's (the full exit). */
typedef int (*left_block_fn)(void *books, uint32_t boundary, int64_t *n);
typedef int (*uc_ctl_fn)(void *uc, int ctl, ...);
typedef int (*deliver_fn)(void *state, void *uc, uint32_t vector, uint32_t return_eip, uint32_t error_code,
                          int flags);
typedef int (*fault_linear_fn)(void *state, void *uc, uint32_t eip, uint32_t page, int access, uint32_t *out);

typedef struct {
    fastexit_t *s;               /* NULL until attached (fastexit.py PfExits.attach): every fill is Mmu.fill's */
    uint32_t ptemod_on;          /* CPUVIRT_HW_PTEMOD_C */
    uint32_t pf_on;              /* CPUVIRT_HW_PF_C: true #PFs too */
    uint32_t hidden_on;          /* CPUVIRT_HW_HIDDEN_PF_C: hidden faults' exits (fastexit_hidden_exit) too */
    uint32_t window;             /* at the last VM entry: interrupt-window exiting on (then IF must be 0) */
    const uint32_t *loading;     /* engine/regs.py Regs.loading_descriptor: Python is loading a segment register */
    fault_linear_fn fault_linear;   /* cpu/_delivery.c delivery_fault_linear, on the state of fastexit_t's peek */
    uint32_t c_armed;            /* at the last VM entry: the default #PF handler */
    uint32_t exception_bitmap, pfec_mask, pfec_match;   /* copied at that entry */
    int32_t ss, eflags;          /* Unicorn's register ids */
    uint64_t epoch, armed_epoch; /* a device changed the interrupt or timer state; the value at the clock's arm */
    uint64_t armed_deadline;     /* what the run loop armed the clock with */
    const uint64_t *clk_deadline;
    const uint32_t *clk_stopped, *clk_discard, *clk_stop_next, *clk_check_if;
    left_block_fn left_block;    /* cpu/_delivery.c delivery_books_left_block */
    void *books;
    uint64_t *fills;             /* the shadow fill's count (Mmu.fill's fills, and the shadow's hits) */
    uint64_t cpu_offset;         /* uc_struct's CPUState pointer (cpu/fastdelivery.py _engine_cpu) */
    void (*loop_exit)(void *cpu);   /* QEMU's cpu_loop_exit */
    uc_ctl_fn uc_ctl;
    int32_t tlb_flush_ctl;
    int32_t cr2;                 /* Unicorn's register id */
    deliver_fn deliver;          /* cpu/_delivery.c delivery_fast, on the state of fastexit_t's peek */
    /* counts for MmuCounters.walkers: _resolve's walks of the exits made here (cpu/truefault.py) */
    tf_counts_t pf;
    /* the exits made here, not yet folded, and the last one's fields; of the
     * true faults among them, how many and the last one's error code for the guest (the injection's) */
    uint64_t exits;
    uint32_t last_qual, last_code, last_rip, last_next;
    uint32_t true_exits;
    uint32_t last_guest_code;
    uint32_t refused;            /* the engine refused a register write delivering the #PF (a cpuvirt bug) */
    uint32_t hidden_exits;       /* the hidden faults among them (VmxCpu.quick_shadow_exits) */
    uint64_t ptemod_total, zap_total, hidden_total;   /* (the true faults: pf.faults) */
} pfexit_t;

size_t fastexit_pf_sizeof(void) { return sizeof(pfexit_t); }

#define PFEC_P 1u
#define PFEC_W 2u
#define PTE_P 1u
#define PTE_RW 2u
#define PTE_US 4u
#define PTE_A 0x20u
#define PTE_D 0x40u
#define PTE_PS 0x80u
#define EFLAGS_VM 0x20000u
#define EFLAGS_IF 0x200u

/* Would the stop the full exit makes change nothing but the exit? (VmxCpu._stop_changes_nothing, as
 * memory/_tlbfill.c quick_in_c decides it for the lazy-EPT exit.) */
static int pf_stop_quiet(const pfexit_t *p) {
    const fastexit_t *s = p->s;
    return p->c_armed && s->armed && p->epoch == p->armed_epoch && *p->clk_deadline == p->armed_deadline
        && !*p->clk_stopped && !*p->clk_discard && !*p->clk_stop_next && !*p->clk_check_if && vapic_quiet(s);
}

/* With interrupt-window exiting on, the stop would take the INTERRUPT_WINDOW exit if IF were 1 (before_entry);
 * with IF = 0 the window waits, as it does for the exit made here (which leaves IF alone, or clears it through
 * an interrupt gate): VmxCpu._quick_pf_exit's rule. */
static int pf_window_waits(const pfexit_t *p, void *uc) {
    uint64_t eflags = 0;
    if (!p->window) return 1;                /* (EFLAGS read only when the answer depends on it) */
    return !p->s->reg_read(uc, p->eflags, &eflags) && !(eflags & EFLAGS_IF);
}

/* Does a #PF with this error code exit? (SDM Vol. 3C 25.2; VmxCpu._exception_exits) */
static int pf_exits(const pfexit_t *p, uint32_t ec) {
    int match = (ec & p->pfec_mask) == p->pfec_match;
    return (p->exception_bitmap >> 14 & 1) ? match : !match;
}

/* ShadowPaging.page_fault's walk for a supervisor store at `gva` (memory/walk.py) when it sets no accessed
 * or dirty bit and finds what the shadow's entry `e` holds: the references it makes, or 0. */
static uint32_t unchanged_walk(const fastexit_t *s, uint32_t cr0, uint32_t cr3, uint32_t cr4, uint32_t gva,
                               const sentry_t *e) {
    uint32_t pde, leaf, rights, frame, refs;
    uint64_t at = (cr3 & 0xFFFFF000u) | ((gva >> 20) & 0xFFCu);
    if (at + 4 > s->ram_bytes) return 0;
    memcpy(&pde, s->ram + at, 4);
    if ((pde & (PTE_P | PTE_A)) != (PTE_P | PTE_A)) return 0;
    if ((pde & PTE_PS) && (cr4 & SM_PSE)) {
        if (pde & 0x003FE000u) return 0;
        leaf = rights = pde;
        frame = (pde & 0xFFC00000u) | (gva & 0x003FF000u);
        refs = 1;
    } else {
        at = (pde & 0xFFFFF000u) | ((gva >> 10) & 0xFFCu);
        if (at + 4 > s->ram_bytes) return 0;
        memcpy(&leaf, s->ram + at, 4);
        rights = pde & leaf;
        frame = leaf & 0xFFFFF000u;
        refs = 2;
    }
    if ((leaf & (PTE_P | PTE_A | PTE_D)) != (PTE_P | PTE_A | PTE_D)) return 0;
    if (!(rights & PTE_RW) && (cr0 & SM_WP)) return 0;   /* a protection fault (or WP = 0's grant): Python's */
    if (e->gpa != frame || e->rights != (rights & (PTE_RW | PTE_US)) || !e->dirty) return 0;
    return refs;
}

static int ptemod_exit(pfexit_t *p, void *uc, uint64_t vaddr) {
    fastexit_t *s = p->s;
    shadowmirror_t *m = s->mirror;
    uint64_t cr0 = 0, cr3 = 0, cr4 = 0, ss = 0, eflags = 0, eip = 0, v;
    uint32_t addr = 0, src = 0, size = 0, old = 0, value, refs;
    const sentry_t *e;
    sm_ptemod_t plan;
    modrm_uc_regs_t regs = {s->reg_read, s->gpr_reg, uc};
    uint8_t code[15];
    int op = 0, len;
    int64_t gpa, n = 0;
    if (!m || !s->shadow_ok || !*s->shadow_ok || !m->serial || m->made >= SM_MADE || !pf_stop_quiet(p)) return 0;
    if (!pf_exits(p, PFEC_P | PFEC_W)) return 0;   /* (a supervisor write to a present entry) */
    if (s->reg_read(uc, p->ss, &ss) || (ss & 3) != 0) return 0;
    if (s->reg_read(uc, p->eflags, &eflags) || (eflags & EFLAGS_VM) || (p->window && (eflags & EFLAGS_IF))) return 0;
    if (s->reg_read(uc, s->cr0, &cr0) || s->reg_read(uc, s->cr3, &cr3) || s->reg_read(uc, s->cr4, &cr4)) return 0;
    if (((uint32_t)cr0 & SM_PG) == 0 || ((uint32_t)cr3 & 0xFFFFF000u) != *s->shadow_key) return 0;
    if (s->reg_read(uc, s->eip, &eip) || !s->peek(s->peek_state, uc, (uint32_t)eip, 15, code)) return 0;
    len = st_decode(code, modrm_uc_reg, &regs, &op, &size, &src, &addr);
    if (!len || (addr & 0xFFFFF000u) != (uint32_t)vaddr || (addr & 0xFFFu) + size > 0x1000u) return 0;
    e = sm_entry(m, (uint32_t)cr0, (uint32_t)cr3, (uint32_t)cr4, addr >> 12);
    gpa = sm_hv_gpa(m, (uint32_t)cr0, (uint32_t)cr3, (uint32_t)cr4, addr, 1, 0);
    if (!e || gpa < 0 || !(refs = unchanged_walk(s, (uint32_t)cr0, (uint32_t)cr3, (uint32_t)cr4, addr, e))) return 0;
    if (!sm_ptemod_plan(m, s->ram, s->ram_bytes, (uint64_t)gpa, size, p->uc_ctl != NULL, &plan)) return 0;
    if (!p->left_block || !p->left_block(p->books, (uint32_t)eip, &n) || n < 1) return 0;
    /* From here on the exit is ours: the handler's emulation, then the entry's EIP. */
    value = st_apply((uint8_t *)s->ram + gpa, op, size, src, &old);
    if (op != ST_MOV) {
        v = st_flags(op, old, src & (size == 4 ? 0xFFFFFFFFu : 0xFFu), value, size, eflags);
        s->reg_write(uc, p->eflags, &v);
    }
    v = (uint32_t)(eip + (uint32_t)len);
    s->reg_write(uc, s->eip, &v);
    vclock_add(s->clock_now_w, -(int64_t)(n - 1));   /* Vcpu.left_block_at(eip), then clock.unretire(-1) */
    *p->fills += 1;                    /* Mmu.fill's refused fill, and its shadow hit */
    p->pf.walks++;                     /* page_fault's _resolve: its walk */
    p->pf.refs += refs;
    sm_ptemod_done(m, &plan, (uint32_t)eip);
    if (plan.zap) {                    /* ShadowPaging._flush_pages */
        sm_flush_pages(m, uc, p->uc_ctl, p->tlb_flush_ctl, plan.pages, plan.npages);
        p->zap_total++;
    }
    p->exits++;
    p->last_qual = addr;               /* CR2: the store's operand (VmxCpu.exact_linear) */
    p->last_code = PFEC_P | PFEC_W;
    p->last_rip = (uint32_t)eip;
    p->last_next = (uint32_t)v;
    s->last_kind = LAST_PF;
    p->ptemod_total++;
    p->loop_exit(*(void **)((uint8_t *)uc + p->cpu_offset));   /* does not return */
    return 0;
}

/* -- ... and of a true #PF ---------------------------------------------------------------------------------
 * A load or store at CPL 0 or 3 whose page the shadow's current root has no entry for, and whose walk of the
 * guest's tables faults: the full exit's stop (Vcpu.left_block_at), vm_exit, handle_exception_nmi
 * (ShadowPaging.page_fault: _resolve's walk, which sets PDE.A when it used the PDE, and counts the walk and
 * the true fault; CR2 := the exit qualification, the exact address: cpu/_truefault.h tf_operand's forms
 * only; the #PF injected with the guest's error code) and vm_entry (the delivery through the guest's IDT, in
 * C as the Python entry makes it: cpu/_delivery.c delivery_fast over the shadow's copy), under the
 * conditions of the ptemod's exit. A delivery delivery_fast declines puts back what was made (PDE.A, CR2):
 * the fill is Mmu.fill's. Fetches stay Python's (as trap's and full's). */
static int true_pf_exit(pfexit_t *p, void *uc, uint64_t vaddr, int type) {
    fastexit_t *s = p->s;
    shadowmirror_t *m = s->mirror;
    uint64_t cr0 = 0, cr3 = 0, cr4 = 0, ss = 0, eip = 0, old = 0, v;
    uint32_t ec = 0, refs = 0, ea = 0, code, cr2;
    int write = type == MEM_WRITE, user, r;
    int64_t pde_a, n = 0;
    modrm_uc_regs_t regs = {s->reg_read, s->gpr_reg, uc};
    tf_made_t made;
    uint8_t bytes[15];
    if (!m || !s->shadow_ok || !*s->shadow_ok || !m->serial || !pf_stop_quiet(p)) return 0;
    if (s->reg_read(uc, s->cr0, &cr0) || s->reg_read(uc, s->cr3, &cr3) || s->reg_read(uc, s->cr4, &cr4)) return 0;
    if (!((uint32_t)cr0 & SM_PG) || ((uint32_t)cr4 & 0x20u)) return 0;   /* (no PAE) */
    if ((((uint32_t)cr0 & SM_PG) | ((uint32_t)cr4 & SM_PSE)) != m->mode || ((uint32_t)cr3 & 0xFFFFF000u) != m->key
        || m->key != *s->shadow_key)
        return 0;
    if (sm_present(m, (uint32_t)vaddr >> 12)) return 0;   /* an entry: the shadow's error code has P; Python's */
    if (s->reg_read(uc, p->ss, &ss) || ((ss & 3) != 0 && (ss & 3) != 3)) return 0;
    if (!pf_window_waits(p, uc)) return 0;
    user = (ss & 3) == 3;
    code = (write ? PFEC_W : 0) | (user ? TF_PFEC_U : 0);   /* the shadow's #PF: no entry */
    if (!pf_exits(p, code)) return 0;
    if (!tf_walk(s->ram, s->ram_bytes, (uint32_t)cr0, (uint32_t)cr3, (uint32_t)cr4, (uint32_t)vaddr, write, user, &ec,
                 &refs, &pde_a))
        return 0;
    if (s->reg_read(uc, s->eip, &eip) || !s->peek(s->peek_state, uc, (uint32_t)eip, 15, bytes)) return 0;
    if (!tf_operand(bytes, modrm_uc_reg, &regs, &ea) || (ea & 0xFFFFF000u) != ((uint32_t)vaddr & 0xFFFFF000u)) return 0;
    if (!p->left_block || !p->left_block(p->books, (uint32_t)eip, &n) || n < 1) return 0;
    if (s->reg_read(uc, p->cr2, &old)) return 0;
    cr2 = (uint32_t)old;
    tf_make((uint8_t *)s->ram, pde_a, &cr2, ea, &made);   /* the walk's PDE.A; the handler's CR2 */
    v = cr2;
    if (s->reg_write(uc, p->cr2, &v)) r = 0;
    else r = p->deliver(s->peek_state, uc, 14, (uint32_t)eip, ec, 1 /* F_ERROR_CODE */);
    if (r == 0) {                      /* nothing delivered: put back what was made, Python does it */
        tf_unmake((uint8_t *)s->ram, &cr2, &made);
        v = cr2;
        s->reg_write(uc, p->cr2, &v);
        return 0;
    }
    if (r < 0) p->refused = 1;         /* the frame is pushed: a cpuvirt bug, Python raises at the fold */
    vclock_add(s->clock_now_w, -(int64_t)n);   /* Vcpu.left_block_at(eip): the instruction did not retire */
    tf_count(&p->pf, refs);            /* Mmu.fill's refused fill; _resolve's walk and true fault */
    p->exits++;
    p->true_exits++;
    p->last_qual = ea;
    p->last_code = code;
    p->last_rip = (uint32_t)eip;
    p->last_next = (uint32_t)eip;      /* GUEST_RIP: the faulting instruction (the handler writes none) */
    p->last_guest_code = ec;
    s->last_kind = LAST_PF;
    p->loop_exit(*(void **)((uint8_t *)uc + p->cpu_offset));   /* does not return */
    return 0;
}

/* -- ... and of a hidden fault ------------------------------------------------------------------------------
 * memory/_tlbfill.c's shadow fill has walked the guest's tables for a page the shadow has no entry allowing the
 * access for, found the walk would only fill the shadow (VmxCpu.quick_shadow_exit's conditions), and asks here
 * before it asks Python's quick exit: the #PF exit (`code`: the shadow's error code) is recorded as
 * VmxCpu._quick_pf_exit records it, under the conditions of the ptemod's exit and outside Python's own
 * segment loads (served without an exit), its CR2 found by delivery_fault_linear (x86/faultaddr.py's rules);
 * the fill then fills the shadow and answers as the engine's retry after the entry would. 1: recorded. */
int fastexit_hidden_exit(void *state, void *uc, uint64_t vaddr, int type, uint32_t code) {
    pfexit_t *p = (pfexit_t *)state;
    fastexit_t *s = p->s;
    uint64_t eip = 0;
    uint32_t gla = 0;
    int64_t n = 0;
    if (!s || !p->hidden_on || *p->loading || type < MEM_READ || type > MEM_FETCH) return 0;
    if (!pf_stop_quiet(p) || !pf_exits(p, code)) return 0;
    if (!pf_window_waits(p, uc)) return 0;
    if (s->reg_read(uc, s->eip, &eip)) return 0;
    if (!p->left_block || !p->left_block(p->books, (uint32_t)eip, &n) || n < 1) return 0;
    if (!p->fault_linear(s->peek_state, uc, (uint32_t)eip, (uint32_t)vaddr & 0xFFFFF000u, type - MEM_READ, &gla))
        return 0;
    p->exits++;
    p->hidden_exits++;
    p->last_qual = gla;
    p->last_code = code;
    p->last_rip = (uint32_t)eip;
    p->last_next = (uint32_t)eip;
    s->last_kind = LAST_PF;
    p->hidden_total++;
    return 1;
}

int fastexit_pf_hook(void *uc, uint64_t vaddr, int type, tlb_entry_t *e, void *user_data) {
    pfexit_t *p = (pfexit_t *)user_data;
    (void)e;
    if (!p->s) return 0;
    if (type == MEM_WRITE && p->ptemod_on && ptemod_exit(p, uc, vaddr)) return 1;   /* (never: cpu_loop_exit) */
    if ((type == MEM_WRITE || type == MEM_READ) && p->pf_on) return true_pf_exit(p, uc, vaddr, type);
    return 0;
}

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fastexit", NULL, -1, NULL};

PyMODINIT_FUNC PyInit__fastexit(void) { return PyModule_Create(&module); }
