/*
 * The common TLB fill of native mode in C: a guest page walk (32-bit paging, SDM 4.3) that needs no
 * side effect, over guest RAM. Mmu.fill (memory/mmu.py) stays the one complete fill: this hook runs
 * first and answers only when the answer is certain and changes nothing: a read or write, or a fetch
 * from a (linear page, frame) pair that has served a fetch before (so Python has seen it: the clock drops
 * the page's counts at a new pair, the intercepts note it; Mmu.fill reports each such pair through
 * fastfill.py), entries present with A (and D for a write) already set, rights that allow the access, a
 * frame inside guest RAM. Anything else (a
 * fault, an A/D update, a first fetch, paging structures or a frame outside RAM, a 4 MiB page above
 * 4 GiB) returns false, and Unicorn calls the next fill
 * hook, the Python one, with the same request. Walks of long loops over fresh pages (kvm-unit-tests'
 * sieve makes tens of millions) then cost a C call instead of a Python walk, and so do the refills
 * of code after every TLB flush (a mov to CR0 or CR3: kvm-unit-tests' vmexit toggles CR0.WP in a loop).
 *
 * Built as a Python extension so that setuptools compiles it; memory/fastfill.py loads it with ctypes (the
 * state is owned by Python and arrives as the hook's user_data), and memory/shadowmirror.py imports it for
 * its one Python function, `fold` (shadow paging's log of what C did, taken into the Python tables).
 */
#include <Python.h>
#include <stdint.h>

#include <dlfcn.h>
#include <stdbool.h>

#include "_shadowmirror.h"
#include "../engine/_got.h"
#include "../engine/_tlbhook.h"   /* the TLB-fill hook's entry and access types */

typedef int (*reg_read_fn)(void *uc, int regid, void *value);

/* The p2m's device ranges (memory/p2m.py P2m.mmio, kept equal by memory/fastfill.py MmioRanges): a
 * guest-physical page there is a device's registers, which Mmu.fill maps to the range's Unicorn MMIO region,
 * read and write (as the guest's entry allows), never execute. Native and the shadow fills answer such
 * pages too: a kernel that reads its local APIC after every CR3 load refilled that page in Python each time
 * (58,951 of xv6 usertests' Python fills under native). */
#define MMIO_RANGES 16
typedef struct {
    uint64_t lo, hi, hpa;    /* [lo, hi) guest-physical, page-aligned -> host-physical hpa */
} mmio_range_t;
typedef struct {
    uint32_t n, pad;         /* n > MMIO_RANGES: more than fit here, every device page is Python's */
    mmio_range_t r[MMIO_RANGES];
} mmio_ranges_t;

/* P2m.mmio_to_hpa for a page-aligned gpa: the host-physical page, or 0 (none: unbacked, or Python's) */
static inline uint64_t mmio_page(const mmio_ranges_t *mm, uint64_t gpa) {
    uint32_t i;
    if (!mm || mm->n > MMIO_RANGES) return 0;
    for (i = 0; i < mm->n; i++)
        if (mm->r[i].lo <= gpa && gpa < mm->r[i].hi) return mm->r[i].hpa + (gpa - mm->r[i].lo);
    return 0;
}


typedef struct {
    const uint8_t *ram;      /* guest RAM, guest-physical 0 */
    uint64_t ram_bytes;
    uint64_t ram_hpa;        /* where the engine sees guest RAM (p2m.RAM_HPA) */
    const uint8_t *code;     /* one byte per RAM frame: nonzero once it served a fetch (lazy W^X) */
    const uint32_t *fetched; /* per RAM frame: linear page | 1 of the last pair that served a fetch */
    reg_read_fn reg_read;
    int32_t cr0, cr3, cr4, ss;   /* Unicorn register ids */
    uint32_t enabled;
    /* para's direct paging (memory/direct.py): 0 in native. Else linear addresses from here up are the
     * hypervisor's (HYPERVISOR_VIRT_START: Python answers them), and the guest's entries hold machine
     * addresses (host-physical ram_hpa + offset), not guest-physical ones. */
    uint32_t hv_start;
    uint64_t fills, walks, walk_refs;   /* what the C path answered (added to Mmu.counters) */
    const mmio_ranges_t *mmio;          /* the p2m's device ranges (NULL: none answered here) */
} fastfill_t;

size_t fastfill_sizeof(void) { return sizeof(fastfill_t); }
size_t mmio_ranges_sizeof(void) { return sizeof(mmio_ranges_t); }

/*
 * The engine's state, restored only when a fill needs it. Unicorn 2.1.3 begins every TLB fill
 * (softmmu/unicorn_vtlb.c unicorn_fill_tlb) with cpu_restore_state(cpu, retaddr, false): it looks up the
 * translated block of the host address the access came from (a search of the tree of every block) and
 * decodes that block's instruction table, to put the instruction's EIP and the lazy flags' cc_op into the
 * CPU state before any fill hook runs. The fast fills below answer their common case from CR0, CR3, CR4
 * and SS, which that restore does not touch (the general registers are in the CPU state at every memory
 * access already). On xv6's usertests, which makes 50.8 M fills under native and hw, the restore was
 * 8-9% of the host's samples.
 *
 * So libunicorn's GOT entry for cpu_restore_state (it calls its own exported functions through its PLT)
 * points at lazy_restore_state, which passes every call through but the one at the start of
 * unicorn_fill_tlb, and that one only for an engine registered here (fill_engine_register, by
 * memory/fastfill.py when its fast fill is the engine's first fill hook): the call is kept (`pending`).
 * The fast fill's common answer then needs nothing else; every other path (a decline, after which the
 * next hook, C or Python, may read EIP or EFLAGS; a quick exit that records EIP) makes the kept call
 * first (restore_now), so every later reader sees the state exactly as before. A fill that every hook
 * declines ends in cpu_loop_exit_restore, which restores again by itself.
 */
typedef bool (*restore_fn)(void *cpu, uintptr_t host_pc, bool will_exit);

/* What this library knows of each engine whose fills it makes (fill_engine_register): where its paging
 * registers are, and whether its fills may keep their restore. */
typedef struct {
    void *uc, *cpu;
    const uint8_t *env;              /* its CPUX86State; NULL: registers through uc_reg_read */
    uint32_t cr0, cr3, cr4, ss;      /* offsets there (engine/internals.py register_offsets) */
    uint32_t lazy;                   /* its first fill hook is a fast fill: fills may keep the restore */
    uint32_t pending;                /* the restore kept by the fill under way */
    uintptr_t host_pc;               /* ... and its argument */
} engine_t;

#define ENGINES 16
static engine_t engines[ENGINES];
static engine_t *last_engine = &engines[0];
static restore_fn real_restore;      /* cpu_restore_state_x86_64 itself */
static uintptr_t fill_site;          /* where unicorn_fill_tlb's call to it returns to */
static uint64_t lazy_kept, lazy_made;

static inline engine_t *engine_of(void *uc) {
    int i;
    if (last_engine->uc == uc) return last_engine;
    for (i = 0; i < ENGINES; i++)
        if (engines[i].uc == uc) return last_engine = &engines[i];
    return NULL;
}

static bool lazy_restore_state(void *cpu, uintptr_t host_pc, bool will_exit) {
    int i;
    if ((uintptr_t)__builtin_return_address(0) == fill_site) {
        for (i = 0; i < ENGINES; i++) {
            if (engines[i].cpu == cpu && engines[i].lazy) {
                engines[i].host_pc = host_pc;
                engines[i].pending = 1;
                lazy_kept++;
                return true;   /* (unicorn_fill_tlb does not look at it) */
            }
        }
    }
    return real_restore(cpu, host_pc, will_exit);
}

/* The restore the fill kept for this engine, made now (before anything may read EIP or EFLAGS). */
static void restore_now(void *uc) {
    engine_t *g = engine_of(uc);
    if (g && g->pending) {
        g->pending = 0;
        lazy_made++;
        real_restore(g->cpu, g->host_pc, false);
    }
}

/* CR0, CR3, CR4 and SS's selector: read in the engine's CPU state where it is registered (a call through
 * uc_reg_read for each costs more than the walk itself: kvm-unit-tests' sieve, 2 G instructions under
 * native, 5.8-6.0 s -> 5.2 s), else through `reg_read` with the ids given. 0: the API refused one. */
static inline int paging_registers(void *uc, reg_read_fn reg_read, int32_t id0, int32_t id3, int32_t id4,
                                   int32_t idss, uint64_t *cr0, uint64_t *cr3, uint64_t *cr4, uint64_t *ss) {
    const engine_t *g = engine_of(uc);
    if (g && g->env) {
        *cr0 = *(const uint64_t *)(g->env + g->cr0);
        *cr3 = *(const uint64_t *)(g->env + g->cr3);
        *cr4 = *(const uint64_t *)(g->env + g->cr4);
        *ss = *(const uint32_t *)(g->env + g->ss);
        return 1;
    }
    return !reg_read(uc, id0, cr0) && !reg_read(uc, id3, cr3) && !reg_read(uc, id4, cr4) && !reg_read(uc, idss, ss);
}

/* SS's selector alone, the same way. */
static inline int read_ss(void *uc, reg_read_fn reg_read, int32_t idss, uint64_t *ss) {
    const engine_t *g = engine_of(uc);
    if (g && g->env) {
        *ss = *(const uint32_t *)(g->env + g->ss);
        return 1;
    }
    return !reg_read(uc, idss, ss);
}

/* The call in libunicorn's unicorn_fill_tlb_x86_64 to cpu_restore_state through the PLT stub that jumps
 * through `slot` (E8 rel32 to `FF 25 disp32`): the address it returns to, or 0. An E8 byte inside another
 * instruction gives any target: only one inside the library's own segments (dladdr, same object as the
 * function: PT_LOAD ranges, so mapped) is read. */
static uintptr_t find_fill_site(const uint8_t *fill, size_t size, uintptr_t slot) {
    Dl_info own, at, end;
    size_t k;
    if (!dladdr(fill, &own)) return 0;
    for (k = 0; k + 5 <= size; k++) {
        const uint8_t *plt;
        int32_t rel, disp;
        if (fill[k] != 0xE8) continue;
        memcpy(&rel, fill + k + 1, 4);
        plt = fill + k + 5 + rel;
        if (!dladdr(plt, &at) || !dladdr(plt + 5, &end) || at.dli_fbase != own.dli_fbase
            || end.dli_fbase != own.dli_fbase)
            continue;
        if (plt[0] != 0xFF || plt[1] != 0x25) continue;
        memcpy(&disp, plt + 2, 4);
        if ((uintptr_t)(plt + 6 + disp) == slot) return (uintptr_t)(fill + k + 5);
    }
    return 0;
}

/* Once per process: 1 = the wrapper is in place; 0 = this libunicorn is not of the expected shape (no
 * such GOT entry, symbol or call: every fill keeps its restore). */
static int lazy_install(void) {
    static int done = -1;
    got_search_t g = {"libunicorn", "cpu_restore_state_x86_64", 0, 0};
    void *lib, *fill, *restore;
    Dl_info info;
    const ElfW(Sym) *sym = NULL;
    if (done >= 0) return done;
    done = 0;
    dl_iterate_phdr(find_got_entry, &g);
    if (!g.slot) return 0;
    lib = dlopen("libunicorn.so.2", RTLD_LAZY | RTLD_NOLOAD);
    if (!lib) return 0;
    fill = dlsym(lib, "unicorn_fill_tlb_x86_64");
    restore = dlsym(lib, "cpu_restore_state_x86_64");
    dlclose(lib);
    if (!fill || !restore || !dladdr1(fill, &info, (void **)&sym, RTLD_DL_SYMENT) || !sym || !sym->st_size)
        return 0;
    fill_site = find_fill_site((const uint8_t *)fill, sym->st_size < 256 ? sym->st_size : 256, g.slot);
    if (!fill_site) return 0;
    real_restore = (restore_fn)restore;
    if (*(void **)g.slot != (void *)lazy_restore_state && !got_write(g.slot, (void *)lazy_restore_state)) {
        fill_site = 0;
        return 0;
    }
    done = 1;
    return 1;
}

/* The engine is gone (its Uc's finalization): its slot is free. */
void fill_engine_unregister(void *uc) {
    int i;
    for (i = 0; i < ENGINES; i++)
        if (engines[i].uc == uc) memset(&engines[i], 0, sizeof engines[i]);
}

/* Register engine `uc` (CPUState `cpu`, CPUX86State `env` with its paging registers at the offsets given;
 * env NULL: not known) for its fills; `lazy`: its first fill hook is a fast fill, so its fills may keep
 * their restore. Returns 0 when there is no room (its fills read through the API and restore as before),
 * else 1, plus 2 when the fills keep their restore (the wrapper is in place). */
int fill_engine_register(void *uc, void *cpu, void *env, uint32_t cr0, uint32_t cr3, uint32_t cr4, uint32_t ss,
                         int lazy) {
    int i;
    if (!uc) return 0;
    fill_engine_unregister(uc);
    for (i = 0; i < ENGINES; i++) {
        engine_t *g = &engines[i];
        if (!g->uc) {
            g->cpu = cpu, g->env = (const uint8_t *)env;
            g->cr0 = cr0, g->cr3 = cr3, g->cr4 = cr4, g->ss = ss;
            g->lazy = lazy && cpu && lazy_install();
            g->pending = 0, g->host_pc = 0;
            g->uc = uc;
            return 1 | (g->lazy ? 2 : 0);
        }
    }
    return 0;
}

/* What the fills read as CR0, CR3, CR4 and SS's selector of engine `uc` (tests compare it with the API):
 * 1 = read in its CPU state, 0 = not registered with one. */
int fill_engine_registers(void *uc, uint64_t out[4]) {
    const engine_t *g = engine_of(uc);
    if (!g || !g->env) return 0;
    return paging_registers(uc, NULL, 0, 0, 0, 0, &out[0], &out[1], &out[2], &out[3]);
}

/* (kept, made): the restores kept by fills, and those made afterwards because a fill needed them. */
uint64_t fill_lazy_kept(void) { return lazy_kept; }
uint64_t fill_lazy_made(void) { return lazy_made; }

/* The fast fill's answer; on a decline the kept restore is made, for the hooks after it. */
static inline int answered(void *uc, int r) {
    if (!r) restore_now(uc);
    return r;
}

#define UC_PROT_READ 1
#define UC_PROT_WRITE 2
#define UC_PROT_EXEC 4
#define P 0x1u
#define RW 0x2u
#define US 0x4u
#define A 0x20u
#define D 0x40u
#define PS 0x80u
#define CR0_PG 0x80000000u
#define CR0_WP 0x10000u
#define CR4_PSE 0x10u
#define CR4_SMEP 0x100000u

static inline int read_entry(const fastfill_t *s, uint64_t gpa, uint32_t *out) {
    if (gpa >= s->ram_bytes || s->ram_bytes - gpa < 4) return 0;   /* an offset wrapped below RAM too */
    *out = *(const uint32_t *)(s->ram + gpa);
    return 1;
}

static inline void write_entry(const fastfill_t *s, uint64_t gpa, uint32_t value) {
    *(uint32_t *)((uint8_t *)s->ram + gpa) = value;   /* read_entry checked gpa */
}

/* The guest walk of memory/walk.py for the cases it answers: entries present, rights granted, the frame
 * in RAM. It sets the accessed and dirty bits that walk would set (PDE.A on the way to a page table,
 * the leaf's A, and D for a write), counting each such write as a reference as walk does, but only once
 * it has decided to answer: a declined fill leaves every entry as it was, for Mmu.fill to walk again. */
static int fastfill(void *uc, uint64_t vaddr, int type, tlb_entry_t *e, void *user_data) {
    fastfill_t *s = (fastfill_t *)user_data;
    uint64_t cr0 = 0, cr3 = 0, cr4 = 0, ss = 0, gpa, pde_gpa = 0, leaf_gpa = 0, mmio = 0;
    uint64_t base = s->hv_start ? s->ram_hpa : 0;      /* entries hold base + offset in RAM */
    uint32_t pde = 0, leaf = 0, rights, refs, set_pde = 0, set_leaf = 0;
    int write = type == MEM_WRITE, user, writable, ok;
    if (!s->enabled || (type != MEM_READ && type != MEM_WRITE && type != MEM_FETCH)) return 0;
    if (s->hv_start && vaddr >= s->hv_start) return 0;   /* the hypervisor's window (GDT, LDT frames) */
    if (!paging_registers(uc, s->reg_read, s->cr0, s->cr3, s->cr4, s->ss, &cr0, &cr3, &cr4, &ss)) return 0;
    if (!(cr0 & CR0_PG)) {
        if (s->hv_start) return 0;                    /* para runs with paging from its first instruction */
        gpa = vaddr & 0xFFFFF000u;
        ok = 1;
        refs = 0;
    } else {
        user = (ss & 3) == 3;
        pde_gpa = ((cr3 & 0xFFFFF000u) | ((vaddr >> 20) & 0xFFC)) - base;
        if (!read_entry(s, pde_gpa, &pde) || !(pde & P)) return 0;
        if ((pde & PS) && (cr4 & CR4_PSE)) {
            if (pde & 0x003FE000u) return 0;          /* reserved bit 21, or PSE-36 bits: Python */
            leaf = rights = pde;
            leaf_gpa = pde_gpa;
            gpa = ((pde & 0xFFC00000u) | (vaddr & 0x003FF000u)) - base;
            refs = 1;
        } else {
            if (!(pde & A)) set_pde = A;              /* the walk sets PDE.A (SDM 4.8) */
            leaf_gpa = ((pde & 0xFFFFF000u) | ((vaddr >> 10) & 0xFFC)) - base;
            if (!read_entry(s, leaf_gpa, &leaf) || !(leaf & P)) return 0;
            rights = pde & leaf;
            gpa = (leaf & 0xFFFFF000u) - base;
            refs = 2;
        }
        if (user && !(rights & US)) return 0;
        if (type == MEM_FETCH && !user && (rights & US) && (cr4 & CR4_SMEP)) return 0;   /* #PF: Python's */
        writable = (rights & RW) || (!user && !(cr0 & CR0_WP));
        if (write && !writable) return 0;
        set_leaf = write ? (A | D) & ~leaf : A & ~leaf;
        ok = writable && ((leaf & D) || write);
    }
    if (gpa >= s->ram_bytes) {                        /* a device's registers (never fetched), or unbacked */
        mmio = type == MEM_FETCH || s->hv_start ? 0 : mmio_page(s->mmio, gpa);
        if (!mmio) return 0;                          /* Python */
    } else if (type == MEM_FETCH && s->fetched[gpa >> 12] != (((uint32_t)vaddr & 0xFFFFF000u) | 1u)) {
        return 0;                                     /* a new (page, frame) pair: Python sees it */
    }
    if (set_pde) {
        write_entry(s, pde_gpa, pde | A);
        refs++;
        if (leaf_gpa == pde_gpa) leaf |= A;           /* a table that maps itself: one entry */
    }
    if (set_leaf & ~leaf) {
        write_entry(s, leaf_gpa, leaf | set_leaf);
        refs++;
    }
    if (mmio) {
        e->paddr = mmio;
        e->perms = UC_PROT_READ | (ok ? UC_PROT_WRITE : 0);
    } else {
        e->paddr = s->ram_hpa + gpa;
        e->perms = UC_PROT_READ | (ok ? UC_PROT_WRITE : 0) | (s->code[gpa >> 12] ? UC_PROT_EXEC : 0);
    }
    s->fills++;
    if (refs) {
        s->walks++;
        s->walk_refs += refs;
    }
    return 1;
}

int fastfill_hook(void *uc, uint64_t vaddr, int type, tlb_entry_t *e, void *user_data) {
    return answered(uc, fastfill(uc, vaddr, type, e, user_data));
}

/* para: the hypervisor's window from hv_start up (memory/direct.py DirectPaging.gva_to_gpa), its GDT frames
 * then its LDT frames, shown read-only. The engine reads descriptors there at every ring change, and a
 * PTE update that flushes its TLB (update_va_mapping with a flush) sends the next such read to a fill:
 * answered here from the frames Python sets (DirectFastFill.window) where Mmu.fill would answer them;
 * a write or a fetch there, or a page showing no frame, stays Python's. */
#define WINDOW_PAGES 32

typedef struct {
    fastfill_t f;                      /* first, so that fastfill_hook takes the same state */
    uint32_t window[WINDOW_PAGES];     /* RAM frame + 1 shown at hv_start + i pages (0: none) */
} directfill_t;

size_t directfill_sizeof(void) { return sizeof(directfill_t); }

static int directfill(void *uc, uint64_t vaddr, int type, tlb_entry_t *e, void *user_data) {
    directfill_t *d = (directfill_t *)user_data;
    fastfill_t *s = &d->f;
    uint64_t i;
    uint32_t frame;
    if (vaddr < s->hv_start || !s->hv_start) return fastfill(uc, vaddr, type, e, user_data);
    if (!s->enabled || type != MEM_READ) return 0;
    i = (vaddr - s->hv_start) >> 12;
    if (i >= WINDOW_PAGES || !(frame = d->window[i])) return 0;
    frame--;
    if ((uint64_t)frame << 12 >= s->ram_bytes) return 0;
    e->paddr = s->ram_hpa + ((uint64_t)frame << 12);
    e->perms = UC_PROT_READ | (s->code[frame] ? UC_PROT_EXEC : 0);
    s->fills++;
    return 1;
}

int directfill_hook(void *uc, uint64_t vaddr, int type, tlb_entry_t *e, void *user_data) {
    return answered(uc, directfill(uc, vaddr, type, e, user_data));
}

/*
 * hw mode's common TLB fill under EPT (SDM Vol. 3C 29.3): the same guest walk with every
 * guest-physical reference (the PDE, the PTE, the final page) translated through the four EPT levels
 * in the hypervisor's memory, as memory/nested.py's EptWalk does in Python. It answers only what
 * changes nothing and is certain: a read or write, guest entries present with A (and D for a write)
 * already set, every EPT entry on the way read/write/execute (what the hypervisor maps guest RAM with),
 * every address inside guest RAM; a fetch only from a (linear page, frame) pair Mmu.fill has granted a
 * fetch before, as fastfill_hook does (the code refills after each TLB flush: kvm-unit-tests' vmexit
 * toggles CR0.WP and CR4.PGE in loops). A fault, an A/D update, a first fetch, an EPT entry with fewer rights (an
 * EPT violation, a misconfiguration, the APIC-access page), anything outside RAM: declined, and
 * Mmu.fill does it. References are counted as the Python walk counts them: the guest walk's entries
 * plus 4 per EPT translation, a walk only when paging is on.
 */
#define EPT_CACHE 512

typedef struct {
    const uint8_t *ram;      /* guest RAM, at host-physical ram_hpa */
    uint64_t ram_bytes;
    uint64_t ram_hpa;
    const uint8_t *code;     /* one byte per RAM frame: nonzero once it served a fetch (lazy W^X) */
    const uint32_t *fetched; /* as in fastfill_t (the layouts match) */
    reg_read_fn reg_read;
    int32_t cr0, cr3, cr4, ss;
    uint32_t enabled;
    uint32_t hv_start;      /* as in fastfill_t: 0 here */
    uint64_t fills, walks, walk_refs;
    const mmio_ranges_t *mmio;       /* (the layouts match; NULL here: EPT has its own device pages) */
    const uint8_t *hv;       /* the hypervisor's region (EPT tables), at host-physical hv_hpa */
    uint64_t hv_hpa, hv_size;
    uint64_t pml4;           /* EPT_POINTER's PML4 address */
    /* The quick EPT-violation exit (modes/hw/vmx.py VmxCpu.ept_quick_hook): when the final guest-physical
     * page of a fill has no EPT entry (an entry absent at some level, every entry above it read/write/
     * execute) and lies in guest RAM, C asks Python, which records the exit as vm_exit would and maps
     * the page (the default handler's lazy allocation) or declines (0: the fill is declined as before,
     * and the full exit follows). On 1 the refused attempt is counted as Mmu.fill counts it and the
     * fill is made again, as the engine's retry after the VM entry would make it. NULL: off. */
    int (*quick_cb)(uint64_t vaddr, int type, uint64_t gpa, uint32_t unused);
    uint64_t quick_exits;    /* exits the callback took */
    /* The same exit with no Python at all, when nothing else would happen at the full path's stop (Python
     * checks that at each VM entry and run-loop arm, C that nothing changed since): the page's EPT tables
     * exist (the leaf is written as Ept.map writes it), the fast exits are armed and quiet (no vmwrite since
     * the entry, the virtual-APIC page in step), no device changed its interrupt or timer state and no MMIO
     * range moved (epoch), the clock has the deadline the run loop armed and no stop pending. The exit is
     * recorded (RIP, the access, the registers and code bytes fault_address reads) for VmxCpu to fold in,
     * as the CPUID exits answered in C are. */
    uint32_t c_armed;            /* Python's conditions held at the last entry (VmxCpu._arm_quick_ept) */
    uint32_t eip_reg;
    const uint32_t *fx_armed;    /* fastexit_t.armed */
    int (*quiet_fn)(void *);     /* fastexit_quiet */
    void *quiet_state;
    const uint64_t *fx_cpuid;    /* fastexit_t.cpuid_exits: CPUID exits answered in C since the last fold */
    const uint64_t *clk_deadline;
    const uint32_t *clk_stopped, *clk_discard, *clk_stop_next, *clk_check_if;
    uint64_t armed_deadline;     /* what the run loop armed the clock with */
    uint64_t epoch, armed_epoch; /* interrupt/timer state or MMIO ranges changed; the value at that arm */
    uint64_t c_limit;            /* guest-physical pages below: guest RAM with no MMIO range */
    int (*peek)(void *state, void *uc, uint32_t gva, uint32_t n, uint8_t *out);   /* delivery_peek */
    void *peek_state;
    int32_t gpr[8];              /* Unicorn ids of EAX, ECX, EDX, EBX, ESP, EBP, ESI, EDI */
    uint64_t c_exits;            /* taken in C since the last fold */
    uint64_t c_total;
    uint64_t last_cpuid;         /* *fx_cpuid when the last one was taken */
    uint32_t last_eip, last_vaddr, last_type, last_gpa;
    uint32_t last_regs[8];
    uint8_t last_code[16];       /* the 15 code bytes at last_eip (a data access) */
    /* cpu/_delivery.c delivery_books_covers: is the running block known with the instruction inside it (the
     * full exit's Vcpu.left_block_at takes the rest of the block off the clock, the retry counts it again) */
    int (*covers)(void *books, uint32_t boundary);
    void *books;
    /* The translations ept_ram found, by guest-physical page (direct-mapped). The EPT tables change only
     * through Ept._map, which counts its writes in `ept_writes`, and quick_in_c, which only fills a leaf that
     * was absent (no translation here came from it); a write counted, or another pml4, empties it. */
    uint64_t ept_writes, cache_writes, cache_pml4;
    uint64_t cache_page[EPT_CACHE];   /* guest-physical page + 1; 0: empty */
    uint64_t cache_off[EPT_CACHE];    /* the page's offset in guest RAM */
} eptfill_t;

size_t eptfill_sizeof(void) { return sizeof(eptfill_t); }

#define EPT_RWX 7u
#define EPT_ADDR 0x000FFFFFFFFFF000ull

/* gpa -> offset in guest RAM through EPT, or -1 (declined), or -2 (declined: an entry not present, every
 * entry above it read/write/execute: what lazy EPT leaves); *refs += the entries read (a translation the
 * cache holds counts the four entries its walk read). gpa is 4-byte aligned within its page here (an
 * entry, or a page). */
static inline int64_t ept_ram(eptfill_t *s, uint64_t gpa, uint32_t *refs) {
    uint64_t table = s->pml4, entry, slot, hpa, page = gpa >> 12;
    uint32_t i = (uint32_t)page & (EPT_CACHE - 1);
    int shift;
    if (s->cache_writes != s->ept_writes || s->cache_pml4 != s->pml4) {
        memset(s->cache_page, 0, sizeof s->cache_page);
        s->cache_writes = s->ept_writes, s->cache_pml4 = s->pml4;
    }
    if (s->cache_page[i] == page + 1) {
        *refs += 4;
        return (int64_t)(s->cache_off[i] | (gpa & 0xFFF));
    }
    for (shift = 39; shift >= 12; shift -= 9) {
        slot = table + ((gpa >> shift) & 0x1FF) * 8;
        if (slot < s->hv_hpa || slot + 8 > s->hv_hpa + s->hv_size) return -1;
        entry = *(const uint64_t *)(s->hv + (slot - s->hv_hpa));
        (*refs)++;
        if ((entry & EPT_RWX) != EPT_RWX) return (entry & EPT_RWX) ? -1 : -2;
        table = entry & EPT_ADDR;
    }
    hpa = table | (gpa & 0xFFF);
    if (hpa < s->ram_hpa || hpa + 4 > s->ram_hpa + s->ram_bytes) return -1;
    if (table >= s->ram_hpa && table + 0x1000 <= s->ram_hpa + s->ram_bytes) {
        s->cache_page[i] = page + 1;
        s->cache_off[i] = table - s->ram_hpa;
    }
    return (int64_t)(hpa - s->ram_hpa);
}

static int quick_in_c(eptfill_t *s, void *uc, uint64_t vaddr, int type, uint64_t gpa);

/* The accessed/dirty bits the guest walk sets (fastfill_hook's rule), through EPT as EptWalk.write32
 * writes them: each write is a guest reference and an EPT translation for write (refs). The tables'
 * EPT entries were found read/write/execute on the way down, so the translations succeed. */
static void ept_set_ad(eptfill_t *s, uint64_t pde_gpa, uint32_t pde, uint32_t set_pde, uint64_t leaf_gpa,
                       uint32_t leaf, uint32_t set_leaf, uint32_t *refs, uint32_t *grefs) {
    int64_t off;
    if (set_pde) {
        off = ept_ram(s, pde_gpa, refs);
        if (off >= 0) *(uint32_t *)((uint8_t *)s->ram + off) = pde | A;
        (*grefs)++;
        if (leaf_gpa == pde_gpa) leaf |= A;           /* a table that maps itself: one entry */
    }
    if (set_leaf & ~leaf) {
        off = ept_ram(s, leaf_gpa, refs);
        if (off >= 0) *(uint32_t *)((uint8_t *)s->ram + off) = leaf | set_leaf;
        (*grefs)++;
    }
}

static int eptfill(void *uc, uint64_t vaddr, int type, tlb_entry_t *e, eptfill_t *s, int retry) {
    uint64_t cr0 = 0, cr3 = 0, cr4 = 0, ss = 0, gpa, pde_gpa = 0, leaf_gpa = 0;
    uint32_t pde = 0, leaf = 0, rights, refs = 0, grefs = 0, walk_refs, set_pde = 0, set_leaf = 0;
    int64_t off;
    int write = type == MEM_WRITE, user, writable, ok;
    if (!s->enabled || (type != MEM_READ && type != MEM_WRITE && type != MEM_FETCH)) return 0;
    if (!paging_registers(uc, s->reg_read, s->cr0, s->cr3, s->cr4, s->ss, &cr0, &cr3, &cr4, &ss)) return 0;
    if (!(cr0 & CR0_PG)) {
        gpa = vaddr & 0xFFFFF000u;
        ok = 1;
    } else {
        user = (ss & 3) == 3;
        pde_gpa = (cr3 & 0xFFFFF000u) | ((vaddr >> 20) & 0xFFC);
        off = ept_ram(s, pde_gpa, &refs);
        if (off < 0) return 0;
        pde = *(const uint32_t *)(s->ram + off);
        if (!(pde & P)) return 0;
        if ((pde & PS) && (cr4 & CR4_PSE)) {
            if (pde & 0x003FE000u) return 0;
            leaf = rights = pde;
            leaf_gpa = pde_gpa;
            gpa = (pde & 0xFFC00000u) | (vaddr & 0x003FF000u);
            grefs = 1;
        } else {
            if (!(pde & A)) set_pde = A;              /* the walk sets PDE.A (SDM 4.8) */
            leaf_gpa = (pde & 0xFFFFF000u) | ((vaddr >> 10) & 0xFFC);
            off = ept_ram(s, leaf_gpa, &refs);
            if (off < 0) return 0;
            leaf = *(const uint32_t *)(s->ram + off);
            if (!(leaf & P)) return 0;
            rights = pde & leaf;
            gpa = leaf & 0xFFFFF000u;
            grefs = 2;
        }
        if (user && !(rights & US)) return 0;
        if (type == MEM_FETCH && !user && (rights & US) && (cr4 & CR4_SMEP)) return 0;   /* #PF: Python's */
        writable = (rights & RW) || (!user && !(cr0 & CR0_WP));
        if (write && !writable) return 0;
        set_leaf = write ? (A | D) & ~leaf : A & ~leaf;
        ok = writable && ((leaf & D) || write);
    }
    walk_refs = refs;
    off = ept_ram(s, gpa, &refs);
    if (off == -2 && !retry && s->quick_cb != NULL && gpa < s->ram_bytes) {
        restore_now(uc);                              /* the exit records EIP, Python reads the state */
        if (!quick_in_c(s, uc, vaddr, type, gpa)) {
            if (!s->quick_cb(vaddr, type, gpa, 0)) return 0;
            s->quick_exits++;
        }
        /* The refused attempt, as Mmu.fill counts it: a fill, a walk with paging and the entries it read
         * and wrote (not those of the final translation, which raised before EptWalk counted them). */
        ept_set_ad(s, pde_gpa, pde, set_pde, leaf_gpa, leaf, set_leaf, &walk_refs, &grefs);
        s->fills++;
        if (cr0 & CR0_PG) s->walks++;
        s->walk_refs += walk_refs + grefs;
        return eptfill(uc, vaddr, type, e, s, 1);
    }
    if (off < 0) return 0;
    if (type == MEM_FETCH && s->fetched[off >> 12] != (((uint32_t)vaddr & 0xFFFFF000u) | 1u))
        return 0;                                     /* a new (page, frame) pair: Python sees it */
    ept_set_ad(s, pde_gpa, pde, set_pde, leaf_gpa, leaf, set_leaf, &refs, &grefs);
    e->paddr = s->ram_hpa + (uint64_t)off;
    e->perms = UC_PROT_READ | (ok ? UC_PROT_WRITE : 0) | (s->code[off >> 12] ? UC_PROT_EXEC : 0);
    s->fills++;
    if (cr0 & CR0_PG) s->walks++;
    s->walk_refs += refs + grefs;
    return 1;
}

/* The EPT leaf entry of gpa, or NULL when a table above it is absent. */
static inline uint64_t *ept_leaf(const eptfill_t *s, uint64_t gpa) {
    uint64_t table = s->pml4, entry, slot;
    int shift;
    for (shift = 39; shift >= 21; shift -= 9) {
        slot = table + ((gpa >> shift) & 0x1FF) * 8;
        if (slot < s->hv_hpa || slot + 8 > s->hv_hpa + s->hv_size) return NULL;
        entry = *(const uint64_t *)(s->hv + (slot - s->hv_hpa));
        if (!(entry & EPT_RWX)) return NULL;
        table = entry & EPT_ADDR;
    }
    slot = table + ((gpa >> 12) & 0x1FF) * 8;
    if (slot < s->hv_hpa || slot + 8 > s->hv_hpa + s->hv_size) return NULL;
    return (uint64_t *)(s->hv + (slot - s->hv_hpa));
}

/* The lazy-EPT violation of gpa taken in C (see eptfill_t): 1 = recorded and mapped. */
static int quick_in_c(eptfill_t *s, void *uc, uint64_t vaddr, int type, uint64_t gpa) {
    uint64_t *leaf, eip = 0, v;
    int i;
    if (!s->c_armed || gpa >= s->c_limit || !*s->fx_armed || s->epoch != s->armed_epoch) return 0;
    if (*s->clk_deadline != s->armed_deadline || *s->clk_stopped || *s->clk_discard || *s->clk_stop_next ||
        *s->clk_check_if || !s->quiet_fn(s->quiet_state))
        return 0;
    leaf = ept_leaf(s, gpa);
    if (leaf == NULL || (*leaf & EPT_RWX)) return 0;
    if (s->reg_read(uc, s->eip_reg, &eip)) return 0;
    if (s->covers == NULL || !s->covers(s->books, (uint32_t)eip)) return 0;
    if (type != MEM_FETCH && (s->peek == NULL || !s->peek(s->peek_state, uc, (uint32_t)eip, 15, s->last_code)))
        return 0;                                     /* fetch_bytes would not read it so: Python */
    for (i = 0; i < 8; i++) {
        v = 0;
        if (s->reg_read(uc, s->gpr[i], &v)) return 0;
        s->last_regs[i] = (uint32_t)v;
    }
    s->last_eip = (uint32_t)eip;
    s->last_vaddr = (uint32_t)vaddr;
    s->last_type = (uint32_t)type;
    s->last_gpa = (uint32_t)gpa;
    s->last_cpuid = *s->fx_cpuid;
    *leaf = ((s->ram_hpa + (gpa & ~0xFFFull)) & EPT_ADDR) | 0x30u /* WB */ | EPT_RWX;
    s->c_exits++;
    s->c_total++;
    return 1;
}

int eptfill_hook(void *uc, uint64_t vaddr, int type, tlb_entry_t *e, void *user_data) {
    return answered(uc, eptfill(uc, vaddr, type, e, (eptfill_t *)user_data, 0));
}

/*
 * Modes trap and full: a TLB fill answered from the C copy of shadow paging's current address space
 * (_shadowmirror.h), as ShadowPaging.gva_to_gpa answers a *shadow hit*: the engine's TLB dropped an
 * entry (a CR3 write, a flush, its own eviction) that the shadow still holds. It answers only where
 * Python would answer from the entry with no side effect: paging on, the root and mode of the virtual
 * CR0/CR3/CR4 the copy holds, an entry whose rights allow the access (a write only to a dirty entry),
 * no write let through by CR0.WP = 0 (ShadowPaging._granted), a frame inside guest RAM, a write to no
 * traced frame (a traced one is mapped read-only, as Mmu.fill maps it), a fetch only from a (linear
 * page, frame) pair Mmu.fill has granted a fetch before. Everything else (a miss: the hidden or true
 * fault's walk, a root switch, the hypervisor's windows from hv_start up) is declined for Mmu.fill.
 * The state starts as fastfill_t's, so that fastfill.py's bookkeeping of code frames serves it too.
 */
typedef struct {
    const uint8_t *ram;
    uint64_t ram_bytes;
    uint64_t ram_hpa;
    const uint8_t *code;
    const uint32_t *fetched;
    reg_read_fn reg_read;
    int32_t cr0, cr3, cr4, ss;  /* Unicorn register ids (only ss is read: the CPL of the access) */
    uint32_t enabled;           /* 0 until the virtual CRs and the mirror are known */
    uint32_t hv_start;          /* the hypervisor's linear windows start here (the shadow GDT, the TC) */
    uint64_t fills, walks, walk_refs;   /* walks and walk_refs stay 0: a hit walks nothing */
    const mmio_ranges_t *mmio;          /* as in fastfill_t */
    const shadowmirror_t *mirror;
    const uint32_t *vcr0, *vcr3, *vcr4;   /* the virtual CR0, CR3, CR4 (where the mode's C path keeps
                                              them); NULL: the engine's own (hw --no-ept: the guest's) */
    /* full: the translation cache's linear window [tc_lo, tc_hi), served to fetches at CPL 1 from the TC's
     * host frames at tc_hpa while *tc_on (the callout table's `enabled`: no 16-bit code runs in place), as
     * FullVcpu's fill does it, uncounted like it (modes/full/vcpu.py); tc_on NULL: none */
    uint32_t tc_lo, tc_hi;
    uint64_t tc_hpa;
    const uint32_t *tc_on;
    /* Modes trap and full: a miss is filled here too when the walk needs nothing but the accessed and dirty
     * bits (shadow_miss_fill); 0 under hw --no-ept (a miss is a #PF exit) and while hidden faults are traced */
    uint32_t fill_misses;
    uint64_t hidden;            /* the hidden faults filled here (among `fills`, and the walks) */
    /* hw --no-ept: such a miss is a #PF exit. quick_cb(vaddr, type, error code) takes it as the full exit
     * would leave it (VmxCpu.quick_shadow_exit): 1 = done, C fills the shadow and answers as the engine's
     * retry would (two fills then, the refused one and the retry, which hits); 0 = declined, and the fill
     * is Python's (its own quick exit, or the full one). NULL: off. */
    int (*quick_cb)(uint64_t vaddr, int type, uint32_t error_code);
    uint64_t quick_exits;
    /* ... asked first: the same exit recorded in C with no Python at all (modes/hw/_fastexit.c
     * fastexit_hidden_exit, on its state): 1 = done; 0 = ask quick_cb. NULL: off. */
    int (*quick_c)(void *state, void *uc, uint64_t vaddr, int type, uint32_t error_code);
    void *quick_c_state;
} shadowfill_t;

size_t shadowfill_sizeof(void) { return sizeof(shadowfill_t); }
size_t shadowmirror_sizeof(void) { return sizeof(shadowmirror_t); }

/* A shadow miss (the hidden fault): what ShadowPaging._resolve does, for the common case only. The guest's
 * walk (memory/walk.py) over entries present whose rights allow the access, setting the accessed and dirty
 * bits it would set (as fastfill_hook does, counted as references as walk counts them); the page directory's
 * and the page table's frames already traced by shadow paging itself (`pt_traced`: so that Python's _link
 * traces no new frame, which flushes the engine's TLB, a thing C must not do from a fill; and so that no
 * other owner's untracing can leave the frame the entry derives from writable before Python takes it); no
 * entry for the page in Python's table that the copy does not show (`present`: Python would answer from it);
 * room in the root (else Python trims it) and in the log; no write let through by CR0.WP = 0 (ShadowPaging._granted); a frame in RAM, and for a fetch a pairing
 * Mmu.fill has granted before. The entry goes into the copy, and into `made_log`, which ShadowPaging takes
 * into its own tables (links, traces, counters) before it next looks at them. Anything else: Python. */
static int shadow_miss_fill(shadowfill_t *s, void *uc, uint64_t vaddr, int type, tlb_entry_t *e, uint32_t cr0,
                            uint32_t cr3, uint32_t cr4, int user, int had_entry) {
    shadowmirror_t *m = (shadowmirror_t *)s->mirror;
    uint32_t page = (uint32_t)(vaddr >> 12), pde = 0, leaf = 0, rights, refs, set_pde = 0, set_leaf = 0;
    uint64_t pde_gpa, leaf_gpa, gpa;
    int64_t pte_addr;
    int write = type == MEM_WRITE, writable, ok, present;
    sentry_t *slot;
    smade_t *made;
    if (((cr0 & SM_PG) | (cr4 & SM_PSE)) != m->mode || !m->serial || (cr3 & 0xFFFFF000u) != m->key) return 0;
    present = sm_present(m, page);
    if (present && !sm_find(m, page, m->serial)) return 0;   /* Python's table has it, the copy lost it */
    if ((!present && !m->room) || m->made >= SM_MADE) return 0;
    pde_gpa = (cr3 & 0xFFFFF000u) | ((vaddr >> 20) & 0xFFC);
    if (!read_entry((const fastfill_t *)s, pde_gpa, &pde) || !(pde & P)) return 0;
    if (!sm_pt_traced(m, pde_gpa)) return 0;
    if ((pde & PS) && (cr4 & CR4_PSE)) {
        if (pde & 0x003FE000u) return 0;              /* reserved bit 21, or PSE-36 bits: Python */
        leaf = rights = pde;
        leaf_gpa = pde_gpa;
        pte_addr = -1;
        gpa = (pde & 0xFFC00000u) | (vaddr & 0x003FF000u);
        refs = 1;
    } else {
        if (!(pde & A)) set_pde = A;
        leaf_gpa = (pde & 0xFFFFF000u) | ((vaddr >> 10) & 0xFFC);
        if (!read_entry((const fastfill_t *)s, leaf_gpa, &leaf) || !(leaf & P)) return 0;
        if (!sm_pt_traced(m, leaf_gpa)) return 0;
        rights = pde & leaf;
        pte_addr = (int64_t)leaf_gpa;
        gpa = leaf & 0xFFFFF000u;
        refs = 2;
    }
    if (user && !(rights & US)) return 0;
    if (type == MEM_FETCH && !user && (rights & US) && (cr4 & CR4_SMEP)) return 0;
    if (!user && !(rights & RW) && !(cr0 & CR0_WP)) return 0;   /* WP = 0: _granted is Python's */
    writable = (rights & RW) != 0;
    if (write && !writable) return 0;
    if (gpa >= s->ram_bytes) return 0;
    if (type == MEM_FETCH && s->fetched[gpa >> 12] != (((uint32_t)vaddr & 0xFFFFF000u) | 1u)) return 0;
    if (sm_traced(m, gpa) && write) return 0;         /* a write to a traced frame: Mmu.fill's TracedWrite */
    if (!s->fill_misses) {   /* hw --no-ept: the #PF exit (P if the shadow had an entry, W, U as the access) */
        uint32_t code = (had_entry ? P : 0) | (write ? 2u : 0) | (user ? US : 0);
        restore_now(uc);                              /* the exit records EIP, Python reads the state */
        if (!(s->quick_c && s->quick_c(s->quick_c_state, uc, vaddr, type, code))
            && !(s->quick_cb && s->quick_cb(vaddr, type, code)))
            return 0;
        s->quick_exits++;
        s->fills++;          /* the refused fill; the retry is counted below, a hit (fills - hidden) */
    }
    set_leaf = write ? (A | D) & ~leaf : A & ~leaf;
    if (set_pde) {
        write_entry((const fastfill_t *)s, pde_gpa, pde | A);
        refs++;
        if (leaf_gpa == pde_gpa) leaf |= A;
    }
    if (set_leaf) {
        leaf |= set_leaf;
        write_entry((const fastfill_t *)s, leaf_gpa, leaf);
        refs++;
    }
    ok = (leaf & D) || write;                          /* the walk's writable (rights) and dirty */
    slot = sm_slot_for(m, page, m->serial);
    slot->page = page;
    slot->serial = m->serial;
    slot->gpa = (uint32_t)gpa;
    slot->rights = (uint16_t)(rights & (SM_RW | SM_US));
    slot->dirty = (leaf & D) ? 1 : 0;
    m->present[page >> 3] |= (uint8_t)(1u << (page & 7));
    if (!present) m->room--;
    made = &m->made_log[m->made++];
    m->pending = 1;
    made->page = page;
    made->gpa = (uint32_t)gpa;
    made->pde_addr = (int64_t)pde_gpa;
    made->pte_addr = pte_addr;
    made->rights = slot->rights;
    made->dirty = slot->dirty;
    made->serial = m->serial;
    made->fresh = (!present && pte_addr >= 0 && !sm_linked(m, (uint64_t)pte_addr) ? SM_PTE_FRESH : 0)
                  | (!sm_linked(m, pde_gpa) ? SM_PDE_FRESH : 0);
    made->pad = 0;
    sm_link(m, pde_gpa);                               /* what _fold's _link will record in rmap */
    if (pte_addr >= 0) sm_link(m, (uint64_t)pte_addr);
    e->paddr = s->ram_hpa + gpa;
    e->perms = UC_PROT_READ | (writable && ok && !sm_traced(m, gpa) ? UC_PROT_WRITE : 0) | (s->code[gpa >> 12] ? UC_PROT_EXEC : 0);
    s->fills++;
    s->walks++;
    s->walk_refs += refs;
    s->hidden++;
    return 1;
}

static int shadowfill(void *uc, uint64_t vaddr, int type, tlb_entry_t *e, void *user_data) {
    shadowfill_t *s = (shadowfill_t *)user_data;
    uint64_t ss = 0, gpa, r0 = 0, r3 = 0, r4 = 0;
    uint32_t cr0, cr3, cr4, rights;
    const sentry_t *en;
    int user, writable, allowed, ok;
    if (!s->enabled || (type != MEM_READ && type != MEM_WRITE && type != MEM_FETCH)) return 0;
    if (s->tc_on && type == MEM_FETCH && vaddr >= s->tc_lo && vaddr < s->tc_hi && *s->tc_on) {
        if (!read_ss(uc, s->reg_read, s->ss, &ss) || (ss & 3) != 1) return 0;   /* CPL 1: the guest kernel */
        e->paddr = s->tc_hpa + ((vaddr - s->tc_lo) & ~0xFFFull);
        e->perms = UC_PROT_EXEC;
        return 1;
    }
    if (vaddr >= s->hv_start) return 0;
    if (s->vcr0) {
        cr0 = *s->vcr0, cr3 = *s->vcr3, cr4 = *s->vcr4;
        if (!read_ss(uc, s->reg_read, s->ss, &ss)) return 0;
    } else {
        if (!paging_registers(uc, s->reg_read, s->cr0, s->cr3, s->cr4, s->ss, &r0, &r3, &r4, &ss)) return 0;
        cr0 = (uint32_t)r0, cr3 = (uint32_t)r3, cr4 = (uint32_t)r4;
    }
    if (!(cr0 & CR0_PG)) return 0;                    /* no paging: Python's (boot only) */
    en = sm_entry(s->mirror, cr0, cr3, cr4, (uint32_t)(vaddr >> 12));
    if (!en && !s->fill_misses && !s->quick_cb) return 0;
    user = (ss & 3) == 3;
    if (!en) return shadow_miss_fill(s, uc, vaddr, type, e, cr0, cr3, cr4, user, 0);
    rights = en->rights;
    if (user) {
        writable = (rights & RW) != 0;
        allowed = (rights & US) && (type != MEM_WRITE || writable);
    } else {
        writable = (rights & RW) || !(cr0 & CR0_WP);
        allowed = (type != MEM_WRITE || writable) && !(type == MEM_FETCH && (cr4 & CR4_SMEP) && (rights & US));
        if (writable && en->dirty && !(rights & RW)) return 0;   /* WP = 0 lets ring 1 write: _granted */
    }
    if (!allowed || (type == MEM_WRITE && !en->dirty)) {   /* a walk */
        if (!s->fill_misses && !s->quick_cb) return 0;
        return shadow_miss_fill(s, uc, vaddr, type, e, cr0, cr3, cr4, user, 1);
    }
    gpa = en->gpa;
    ok = writable && en->dirty;
    if (gpa >= s->ram_bytes) {                        /* a device's registers (never fetched), or unbacked */
        uint64_t mmio = type == MEM_FETCH ? 0 : mmio_page(s->mmio, gpa);
        if (!mmio) return 0;                          /* Python */
        e->paddr = mmio;
        e->perms = UC_PROT_READ | (ok ? UC_PROT_WRITE : 0);
        s->fills++;
        return 1;
    }
    if (sm_traced(s->mirror, gpa)) {
        if (type == MEM_WRITE) return 0;              /* Mmu.fill's TracedWrite */
        ok = 0;
    }
    if (type == MEM_FETCH && s->fetched[gpa >> 12] != (((uint32_t)vaddr & 0xFFFFF000u) | 1u)) return 0;
    e->paddr = s->ram_hpa + gpa;
    e->perms = UC_PROT_READ | (ok ? UC_PROT_WRITE : 0) | (s->code[gpa >> 12] ? UC_PROT_EXEC : 0);
    s->fills++;
    return 1;
}

int shadowfill_hook(void *uc, uint64_t vaddr, int type, tlb_entry_t *e, void *user_data) {
    return answered(uc, shadowfill(uc, vaddr, type, e, user_data));
}

/* -- Python's changes to the copy (memory/shadowmirror.py) ------------------------------------------- */
void shadowmirror_put(shadowmirror_t *m, uint8_t *present, uint32_t page, uint32_t serial, uint32_t gpa,
                      uint32_t rights, uint32_t dirty) {
    sentry_t *e = sm_slot_for(m, page, serial);
    present[page >> 3] |= (uint8_t)(1u << (page & 7));
    e->page = page;
    e->serial = serial;
    e->gpa = gpa & 0xFFFFF000u;
    e->rights = (uint16_t)(rights & (SM_RW | SM_US));
    e->dirty = dirty ? 1 : 0;
}

void shadowmirror_drop(shadowmirror_t *m, uint8_t *present, uint32_t page, uint32_t serial) {
    sentry_t *e = sm_find(m, page, serial);
    present[page >> 3] &= (uint8_t)~(1u << (page & 7));
    if (e) e->serial = 0;
}

static void set_bit(uint8_t *bits, uint64_t limit, uint64_t frame, uint32_t on) {
    uint64_t k = frame >> 12;
    if (k >= limit) return;
    if (on)
        bits[k >> 3] |= (uint8_t)(1u << (k & 7));
    else
        bits[k >> 3] &= (uint8_t)~(1u << (k & 7));
}

/* on: 0 untraced, 1 traced by shadow paging alone, 2 (also) by another owner */
void shadowmirror_traced(shadowmirror_t *m, uint64_t frame, uint32_t on) {
    set_bit(m->traced, m->traced_frames, frame, on != 0);
    set_bit(m->other_traced, m->traced_frames, frame, on == 2);
}

void shadowmirror_pt_traced(shadowmirror_t *m, uint64_t frame, uint32_t on) {
    set_bit(m->pt_traced, m->traced_frames, frame, on);
}

/* -- ShadowPaging._fold's common records, in C (memory/shadow.py) -------------------------------------------
 * The log C paths leave for Python's tables (made_log) holds, in xv6 under the shadow-paging modes, about one
 * record per 6 k instructions, and each cost Python about a microsecond: the entry's tuple, its two reverse-map
 * links (a set per guest PDE/PTE word, `linked` bits, frame references), the ptemods' per-site counts. Here
 * the same changes are made to the same Python objects, in the log's order: made entries, invlpgs, ptemods
 * and zaps. The first record that needs more (a link into a frame the shadow does not trace yet, a record of
 * another root) stops the loop, and Python takes that one (ShadowPaging._fold_record) and calls again from
 * the next. */

#define MAX_PTEMOD_SITES 65536   /* memory/shadow.py MAX_ROOT_ENTRIES: traced_writes is cleared beyond it */

typedef struct {
    shadowmirror_t *m;
    PyObject *key, *entries, *rmap, *refs, *traced, *unsync, *roots, *cur;
} fold_t;

static PyObject *addr_obj(int64_t a) { return PyLong_FromLongLong(a); }

/* linked[addr >> 2] = on: what memory/shadowmirror.py _LinkedAddresses._tell does as rmap gains or loses a key */
static void fold_linked(const shadowmirror_t *m, int64_t addr, int on) {
    uint64_t k = (uint64_t)addr >> 2;
    if (!m->linked || ((uint64_t)addr >> 12) >= m->traced_frames) return;
    if (on)
        m->linked[k >> 3] |= (uint8_t)(1u << (k & 7));
    else
        m->linked[k >> 3] &= (uint8_t)~(1u << (k & 7));
}

/* frame_refs[frame] += delta, popped at 0 (ShadowPaging._link / _unlink). -1: error. */
static int fold_ref(fold_t *f, int64_t addr, long delta) {
    PyObject *frame = addr_obj(addr & (int64_t)0xFFFFF000), *old, *v;
    long n;
    int r;
    if (!frame) return -1;
    old = PyDict_GetItemWithError(f->refs, frame);
    if (!old && PyErr_Occurred()) { Py_DECREF(frame); return -1; }
    n = (old ? PyLong_AsLong(old) : 0) + delta;
    if (n > 0) {
        v = PyLong_FromLong(n);
        r = v ? PyDict_SetItem(f->refs, frame, v) : -1;
        Py_XDECREF(v);
    } else {
        r = old ? PyDict_DelItem(f->refs, frame) : 0;
    }
    Py_DECREF(frame);
    return r;
}

/* ShadowPaging._link(addr, key, page): kp is link(key, page) (memory/shadow.py: key << 32 | page), a member of
 * a dict of ints, which the garbage collector leaves untracked. */
static int fold_link(fold_t *f, int64_t addr, PyObject *kp) {
    PyObject *a = addr_obj(addr), *links;
    int r = -1;
    if (!a) return -1;
    links = PyDict_GetItemWithError(f->rmap, a);
    if (links) {
        r = PyDict_SetItem(links, kp, Py_None);
    } else if (!PyErr_Occurred()) {
        links = PyDict_New();
        if (links && PyDict_SetItem(links, kp, Py_None) == 0 && PyDict_SetItem(f->rmap, a, links) == 0) {
            fold_linked(f->m, addr, 1);
            r = 0;
        }
        Py_XDECREF(links);
    }
    Py_DECREF(a);
    return r ? r : fold_ref(f, addr, 1);
}

/* ShadowPaging._unlink(key, page, e) */
static int fold_unlink(fold_t *f, PyObject *kp, PyObject *e) {
    int k;
    for (k = 3; k <= 4; k++) {
        PyObject *a = PyTuple_GET_ITEM(e, k), *links;
        int64_t addr = PyLong_AsLongLong(a);
        if (addr == -1 && PyErr_Occurred()) return -1;
        if (addr < 0) continue;
        links = PyDict_GetItemWithError(f->rmap, a);
        if (links) {
            int has = PyDict_Contains(links, kp);
            if (has < 0 || (has && PyDict_DelItem(links, kp) < 0)) return -1;
            if (PyDict_GET_SIZE(links) == 0) {
                if (PyDict_DelItem(f->rmap, a) < 0) return -1;
                fold_linked(f->m, addr, 0);
            }
        } else if (PyErr_Occurred()) {
            return -1;
        }
        if (fold_ref(f, addr, -1) < 0) return -1;
    }
    return 0;
}

/* ShadowPaging._zap_range(word, 4, copy_done=True): the entries derived from the word go, from every root (the
 * current root's copy is done: C zapped it; another root's entries are popped through its dict, which tells
 * the copy). The number zapped, or -1. */
static long fold_zap(fold_t *f, uint32_t word) {
    PyObject *a = addr_obj(word), *links, *keys = NULL, *key = NULL, *page = NULL;
    Py_ssize_t j;
    long n = 0;
    if (!a) return -1;
    links = PyDict_GetItemWithError(f->rmap, a);
    if (!links) {
        Py_DECREF(a);
        return PyErr_Occurred() ? -1 : 0;
    }
    keys = PyDict_Keys(links);
    if (!keys) goto error;
    for (j = 0; j < PyList_GET_SIZE(keys); j++) {
        PyObject *kp = PyList_GET_ITEM(keys, j), *root, *entries, *e = NULL;
        unsigned long long linked = PyLong_AsUnsignedLongLong(kp);   /* link(key, page) = key << 32 | page */
        if (linked == (unsigned long long)-1 && PyErr_Occurred()) goto error;
        key = PyLong_FromUnsignedLongLong(linked >> 32);
        page = PyLong_FromUnsignedLongLong(linked & 0xFFFFFFFFull);
        if (!key || !page) goto error;
        root = PyDict_GetItemWithError(f->roots, key);
        if (!root) {
            if (PyErr_Occurred()) goto error;
            Py_CLEAR(key);
            Py_CLEAR(page);
            continue;
        }
        if (root == f->cur) {
            e = PyDict_GetItemWithError(f->entries, page);
            if (e) {
                Py_INCREF(e);
                if (PyDict_DelItem(f->entries, page) < 0) { Py_DECREF(e); goto error; }
            } else if (PyErr_Occurred()) {
                goto error;
            }
        } else {
            entries = PyObject_GetAttrString(root, "entries");
            if (!entries) goto error;
            e = PyObject_CallMethod(entries, "pop", "OO", page, Py_None);
            Py_DECREF(entries);
            if (!e) goto error;
            if (e == Py_None) Py_CLEAR(e);
        }
        Py_CLEAR(key);
        Py_CLEAR(page);
        if (e) {
            int r = PyTuple_Check(e) && PyTuple_GET_SIZE(e) == 5 ? fold_unlink(f, kp, e) : -1;
            Py_DECREF(e);
            if (r < 0) goto error;
            n++;
        }
    }
    Py_DECREF(keys);
    if (PyDict_Contains(f->rmap, a) == 1) {     /* rmap.pop(addr, None) */
        if (PyDict_DelItem(f->rmap, a) < 0) { Py_DECREF(a); return -1; }
        fold_linked(f->m, word, 0);
    }
    Py_DECREF(a);
    return n;
error:
    if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "fold: unexpected reverse-map entry");
    Py_XDECREF(key);
    Py_XDECREF(page);
    Py_XDECREF(keys);
    Py_DECREF(a);
    return -1;
}

/* Is the frame of `addr` one ShadowPaging._link would start tracing? (Then Python links it.) */
static int fold_untraced(fold_t *f, int64_t addr) {
    PyObject *frame = addr_obj(addr & (int64_t)0xFFFFF000);
    int in;
    if (!frame) return -1;
    in = PySet_Contains(f->traced, frame);
    if (in == 0) in = PySet_Contains(f->unsync, frame);
    Py_DECREF(frame);
    return in < 0 ? -1 : !in;
}

/* fold(mirror, start, n, serial, key, entries, rmap, frame_refs, traced, unsync, traced_writes, roots, cur) ->
 * (next, hidden, invlpgs, ptemods, zapped): records start.. of the log taken into the current root's `entries`
 * and the shadow's tables (ShadowPaging._fold's loop), up to the first one Python must take (next < n), and
 * what it counted. */
static PyObject *fold(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
    fold_t f;
    PyObject *sites, *kp = NULL, *page = NULL, *e = NULL, *old;
    Py_ssize_t i, n;
    uint32_t serial;
    unsigned long long link_key;
    long hidden = 0, invlpgs = 0, ptemods = 0, zapped = 0;
    (void)mod;
    if (nargs != 13) {
        PyErr_SetString(PyExc_TypeError, "fold takes 13 arguments");
        return NULL;
    }
    f.m = (shadowmirror_t *)PyLong_AsVoidPtr(args[0]);
    i = PyLong_AsSsize_t(args[1]);
    n = PyLong_AsSsize_t(args[2]);
    serial = (uint32_t)PyLong_AsUnsignedLong(args[3]);
    if (PyErr_Occurred()) return NULL;
    f.key = args[4], f.entries = args[5], f.rmap = args[6], f.refs = args[7], f.traced = args[8];
    f.unsync = args[9];
    sites = args[10];
    f.roots = args[11], f.cur = args[12];
    if (!PyDict_Check(f.roots) || !PyDict_Check(f.entries) || !PyDict_Check(f.rmap) || !PyDict_Check(f.refs) || !PyAnySet_Check(f.traced)
        || !PyAnySet_Check(f.unsync) || !PyDict_Check(sites) || n > (Py_ssize_t)SM_MADE || i < 0) {
        PyErr_SetString(PyExc_TypeError, "fold: unexpected arguments");
        return NULL;
    }
    link_key = PyLong_AsUnsignedLongLong(f.key) << 32;   /* the root's half of link(key, page): memory/shadow.py */
    if (PyErr_Occurred()) return NULL;
    for (; i < n; i++) {
        const smade_t *r = &f.m->made_log[i];
        if (r->pte_addr == SM_DEAD) continue;      /* taken back by a zap in C (sm_cancel_made) */
        if (r->serial != serial || r->pte_addr < SM_ZAP) break;
        if (r->pte_addr == SM_ZAP) {               /* the zap of the word a ptemod C emulated wrote */
            long z = fold_zap(&f, r->gpa);
            if (z < 0) goto error;
            zapped += z;
            continue;
        }
        if (r->pte_addr == SM_PTEMOD) {          /* ShadowPaging._count_ptemod(eip) */
            PyObject *eip = PyLong_FromUnsignedLong(r->gpa), *cnt, *v;
            int ok;
            if (!eip) goto error;
            cnt = PyDict_GetItemWithError(sites, eip);
            if (!cnt && PyErr_Occurred()) { Py_DECREF(eip); goto error; }
            if (!cnt && PyDict_GET_SIZE(sites) >= MAX_PTEMOD_SITES) PyDict_Clear(sites);
            v = PyLong_FromLong((cnt ? PyLong_AsLong(cnt) : 0) + 1);
            ok = v && PyDict_SetItem(sites, eip, v) == 0;
            Py_XDECREF(v);
            Py_DECREF(eip);
            if (!ok) goto error;
            ptemods++;
            continue;
        }
        page = PyLong_FromUnsignedLong((unsigned long)r->page << 12);
        if (!page) goto error;
        kp = PyLong_FromUnsignedLongLong(link_key | ((unsigned long long)r->page << 12));  /* link(key, page) */
        if (!kp) goto error;
        if (r->pte_addr == SM_INVLPG) {           /* ShadowPaging.invlpg in the current root */
            old = PyDict_GetItemWithError(f.entries, page);
            if (old) {
                Py_INCREF(old);
                if (PyDict_DelItem(f.entries, page) < 0 || fold_unlink(&f, kp, old) < 0) { Py_DECREF(old); goto error; }
                Py_DECREF(old);
            } else if (PyErr_Occurred()) {
                goto error;
            }
            invlpgs++;
        } else {                                  /* an entry C made (pte_addr -1: a 4 MiB page) */
            int u = fold_untraced(&f, r->pde_addr);
            if (u == 0 && r->pte_addr >= 0) u = fold_untraced(&f, r->pte_addr);
            if (u < 0) goto error;
            if (u) break;                         /* _link would trace a frame: Python's */
            e = Py_BuildValue("(kkOLL)", (unsigned long)r->gpa, (unsigned long)r->rights,
                              r->dirty ? Py_True : Py_False, (long long)r->pde_addr, (long long)r->pte_addr);
            if (!e) goto error;
            old = PyDict_GetItemWithError(f.entries, page);
            if (old) {
                Py_INCREF(old);
                if (fold_unlink(&f, kp, old) < 0) { Py_DECREF(old); goto error; }
                Py_DECREF(old);
            } else if (PyErr_Occurred()) {
                goto error;
            }
            if (PyDict_SetItem(f.entries, page, e) < 0 || fold_link(&f, r->pde_addr, kp) < 0) goto error;
            if (r->pte_addr >= 0 && fold_link(&f, r->pte_addr, kp) < 0) goto error;
            Py_CLEAR(e);
            hidden++;
        }
        Py_CLEAR(kp);
        Py_CLEAR(page);
    }
    Py_XDECREF(kp);
    Py_XDECREF(page);
    return Py_BuildValue("(nllll)", i, hidden, invlpgs, ptemods, zapped);
error:
    Py_XDECREF(e);
    Py_XDECREF(kp);
    Py_XDECREF(page);
    return NULL;
}

static PyMethodDef methods[] = {
    {"fold", (PyCFunction)(void (*)(void))fold, METH_FASTCALL, "ShadowPaging._fold's common records (above)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_tlbfill", NULL, -1, methods};

PyMODINIT_FUNC PyInit__tlbfill(void) { return PyModule_Create(&module); }
