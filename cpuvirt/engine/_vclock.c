/*
 * The virtual clock: a Unicorn block hook in C, so that deterministic time costs ~1.3x and not the
 * 14x of a per-instruction hook (UNICORN-NOTES.md, "Deterministic virtual time").
 *
 * Time is counted in guest instructions, per translated block: the first time a block (address,
 * size) is seen, the hook asks Python (count_cb) how many instructions it holds and caches the
 * answer in a small two-way set-associative cache; every later execution is a table hit. When the clock reaches
 * the deadline (next timer event, instruction budget, or a "poll soon" request) the hook calls
 * uc_emu_stop, whose address Python hands over at start-up so this file does not link Unicorn.
 *
 * Built as a Python extension module only so that setuptools compiles it; Python talks to it
 * through ctypes; the state (one per machine, owned by Python) arrives as the hook's user_data.
 */
#include <Python.h>
#include <stdint.h>
#include <string.h>

typedef int (*emu_stop_fn)(void *uc);
typedef int (*reg_read_fn)(void *uc, int regid, void *value);
typedef int (*reg_write_fn)(void *uc, int regid, const void *value);
typedef uint32_t (*count_fn)(uint64_t address, uint32_t size);

#define EFLAGS_IF 0x200u

#define TABLE_BITS 14
#define TABLE_SIZE (1u << TABLE_BITS)

/* A two-way set-associative cache of block -> instruction count: 8-byte entries, 128 KiB, so that it
 * stays in cache. A block that finds both ways of its set taken is counted again by Python, which costs
 * microseconds: direct-mapped, two hot blocks of xv6's kernel shared a slot and made 182,000 of the
 * 190,000 Python counts of 800 M instructions of `usertests`. A new count goes to way 0, whose previous
 * entry moves to way 1 (the older of the two is the one dropped). */
typedef struct {
    uint32_t address;
    uint16_t size;     /* 0 = empty */
    uint16_t count;
} entry_t;

typedef struct {
    uint64_t now;          /* virtual cycles: instructions retired + time spent outside them */
    uint64_t deadline;     /* stop when now >= deadline */
    uint64_t blocks;       /* blocks executed */
    uint64_t last_block;   /* address of the block that ran last */
    uint64_t misses;       /* blocks counted by Python */
    uint64_t extra;        /* cycles that were not instructions (I/O, idle, deadline rounding) */
    uint32_t stopped;      /* set when the hook stopped the engine */
    uint32_t discard;      /* set by Python's count_cb when it stopped the engine itself */
    uint32_t stop_next;    /* 2: run one block then stop (armed with a deadline already due); 1: stop now */
    uint32_t pad2;
    emu_stop_fn emu_stop;
    count_fn count_cb;
    /* The interrupt window (see vclock_if_hook): */
    reg_read_fn reg_read;  /* uc_reg_read */
    int32_t eflags_reg;    /* UC_X86_REG_EFLAGS */
    uint32_t watch_if;     /* 1 while an interrupt waits for EFLAGS.IF = 1 */
    uint32_t check_if;     /* look at IF at the start of the check_if-th next block (0: do not) */
    uint32_t pad3;
    uint64_t window_checks;  /* times IF was looked at */
    uint64_t window_stops;   /* times it was found set (the engine stopped for the window) */
    /* rdtsc answered in C (see vclock_rdtsc_hook): */
    reg_write_fn reg_write;  /* uc_reg_write */
    int32_t eax_reg, edx_reg;  /* UC_X86_REG_EAX, UC_X86_REG_EDX */
    uint64_t rdtsc_reads;    /* rdtsc instructions answered */
    uint64_t retranslated;   /* counts dropped because the engine translated their block again */
    entry_t table[TABLE_SIZE];
    uint64_t remapped;       /* counts dropped because their linear page came to map another frame */
} vclock_t;

size_t vclock_sizeof(void) { return sizeof(vclock_t); }

#define LIKELY(x) __builtin_expect(!!(x), 1)
#define UNLIKELY(x) __builtin_expect(!!(x), 0)

/* The set a block's address belongs to: its two entries (the hash of the direct-mapped table this was,
 * less its low bit: as cheap on the hot path). */
static inline entry_t *set_of(vclock_t *s, uint32_t a) {
    return &s->table[(a ^ (a >> TABLE_BITS)) & (TABLE_SIZE - 2)];
}

static uint32_t count_miss(vclock_t *s, entry_t *set, uint64_t address, uint32_t size) {
    uint32_t count = s->count_cb ? s->count_cb(address, size) : 1;
    if (count == 0) count = 1;
    set[1] = set[0];   /* (after the callback: Python may have emptied the table) */
    set[0].address = (uint32_t)address;
    set[0].size = (uint16_t)size;
    set[0].count = (uint16_t)count;
    s->misses++;
    return count;
}

/* The slow path: a stop requested by Python, a window check, the deadline. Returns 1 if this block
 * must not run now (the engine was stopped before it). */
static int block_slow(vclock_t *s, void *uc, uint32_t count) {
    if (s->discard) {
        /* Python stopped the engine before this block (to retranslate it): it runs again later. */
        s->discard = 0;
        return 1;
    }
    if (s->check_if && --s->check_if == 0) {
        /* An instruction that may have set IF (sti, popf, iret, or the hypervisor) ran before this
         * block: if IF is now 1 the interrupt window is open, and the waiting interrupt goes before
         * this block's first instruction. */
        uint64_t flags = 0;
        s->window_checks++;
        if (s->reg_read(uc, s->eflags_reg, &flags) == 0 && (flags & EFLAGS_IF) && !s->stopped) {
            s->window_stops++;
            s->stopped = 1;
            s->emu_stop(uc);
            return 1;
        }
    }
    if (s->stop_next == 1) {
        /* Python asked for exactly one more block (a deadline already due when armed). */
        s->stop_next = 0;
        s->stopped = 1;
        s->emu_stop(uc);
        return 1;
    }
    if (s->stop_next == 2) {
        s->stop_next = 1;                  /* run this block, stop before the next */
    } else if (s->now + count > s->deadline && !s->stopped) {
        /* The deadline falls inside this block: stop before it. It does not run now, so it is not
         * counted; time moves to the deadline (the rounding is recorded as non-instruction time). */
        if (s->deadline > s->now) {
            s->extra += s->deadline - s->now;
            s->now = s->deadline;
        }
        s->stopped = 1;
        s->emu_stop(uc);
        return 1;
    }
    return 0;
}

/* A block counted: what every block that runs does to the clock. */
static inline void block_ran(vclock_t *s, uint64_t address, uint32_t count) {
    s->now += count;
    s->blocks++;
    s->last_block = address;
}

/* Everything but the common case, out of line so that the common path calls nothing and saves no
 * registers (measured: the pushes of a hook that may call were a sixth of its samples). */
static __attribute__((noinline)) void block_uncommon(vclock_t *s, void *uc, uint64_t address, uint32_t size,
                                                     entry_t *e, uint32_t count) {
    if (!count) count = count_miss(s, e, address, size);
    if (UNLIKELY((s->discard | s->check_if | s->stop_next) != 0 || s->now + count > s->deadline)) {
        if (block_slow(s, uc, count)) return;
    }
    block_ran(s, address, count);
}

/* Every block, so the common path is short: one table hit, one test of the rare conditions (discard,
 * check_if, stop_next OR-ed together), one compare with the deadline. */
void vclock_block_hook(void *uc, uint64_t address, uint32_t size, void *user_data) {
    vclock_t *s = (vclock_t *)user_data;
    uint32_t a = (uint32_t)address, count;
    entry_t *e = set_of(s, a);
    if (LIKELY(e[0].address == a && e[0].size == size))
        count = e[0].count;
    else if (e[1].address == a && e[1].size == size)
        count = e[1].count;
    else
        count = 0;   /* a miss: Python counts it (a count is never 0) */
    if (UNLIKELY(!count || (s->discard | s->check_if | s->stop_next) != 0 || s->now + count > s->deadline)) {
        block_uncommon(s, uc, address, size, e, count);
        return;
    }
    block_ran(s, address, count);
}

/*
 * The engine translated a block (UC_HOOK_EDGE_GENERATED: called before the new block first runs). A
 * block is translated again after its code was rewritten (the engine drops translations of code pages
 * the guest stores to), possibly with the same length and another number of instructions: its cached
 * count is dropped, so the block hook asks Python again (which also decodes the new instruction list
 * and looks for instructions that need a hook). The engine calls this only for a block reached by a
 * chained jump from the block before it (not for the first block of a run, the first after an event
 * delivered by a hook, or one that spans two pages): docs/design.md, "Known limits".
 */
typedef struct {
    uint64_t pc;
    uint16_t icount;
    uint16_t size;
} uc_tb_t;

void vclock_translated_hook(void *uc, uc_tb_t *cur, uc_tb_t *prev, void *user_data) {
    vclock_t *s = (vclock_t *)user_data;
    uint32_t a = (uint32_t)cur->pc, i;
    entry_t *e = set_of(s, a);
    for (i = 0; i < 2; i++) {
        if (e[i].address == a && e[i].size != 0) {
            e[i].size = 0;
            s->retranslated++;
        }
    }
}

/*
 * The table is keyed by linear address, and switching page tables translates nothing new: a linear page
 * that comes to map another frame (another process's code at the same address, a remapped window) would
 * keep the counts of the code it held before. Mmu.fill sees the first fetch through each new (page, frame)
 * pairing (the C fills answer only the pairing it saw last, memory/fastfill.py) and drops here the counts
 * of every block on that page, or running into it from the page before.
 */
void vclock_drop_page(vclock_t *s, uint32_t page) {
    uint64_t lo = page & 0xFFFFF000u, hi = lo + 0x1000u;
    uint32_t i;
    for (i = 0; i < TABLE_SIZE; i++) {
        entry_t *e = &s->table[i];
        if (e->size && e->address < hi && (uint64_t)e->address + e->size > lo) {
            e->size = 0;
            s->remapped++;
        }
    }
}

/*
 * One-address code hooks on the instructions that can set IF: they run before the instruction, so
 * they only ask the block hook to look at IF once it has run. Every one of them ends its engine
 * block (QEMU ends a block after sti, popf and iret), so "the next block" starts at the next
 * instruction boundary, where hardware would take the interrupt. After sti the interrupt shadow
 * covers one more instruction, which the engine runs as a block of its own: look one block later.
 * They cost a flag test while nothing waits for the window.
 */
void vclock_if_hook(void *uc, uint64_t address, uint32_t size, void *user_data) {
    vclock_t *s = (vclock_t *)user_data;
    if (s->watch_if) s->check_if = 1;
}

void vclock_sti_hook(void *uc, uint64_t address, uint32_t size, void *user_data) {
    vclock_t *s = (vclock_t *)user_data;
    if (s->watch_if) s->check_if = 2;
}

/*
 * rdtsc reads the virtual clock (the time stamp counter of a machine whose clock is its instruction
 * count). Unicorn asks a hook for every rdtsc; answered in Python it costs two register writes through
 * the binding, which kvm-unit-tests' delay loops do hundreds of thousands of times. Returning 1 tells the
 * engine the instruction was handled. Modes that intercept rdtsc (hw's RDTSC exiting, TSC offsetting)
 * keep their Python hook.
 */
int vclock_rdtsc_hook(void *uc, void *user_data) {
    vclock_t *s = (vclock_t *)user_data;
    uint64_t lo = s->now & 0xFFFFFFFFu, hi = s->now >> 32;
    s->reg_write(uc, s->eax_reg, &lo);
    s->reg_write(uc, s->edx_reg, &hi);
    s->rdtsc_reads++;
    return 1;
}

/*
 * Port I/O with the clock in C: a port access spends IO_CYCLES of virtual time (cpu/vcpu.py) before the
 * device sees it (a device reading the clock, the PIT, sees the time after the access). The device
 * models are Python, so the access itself still goes to Python (port_in, port_out: Vcpu.timed_in,
 * timed_out); only the clock's update, two ctypes field writes that cost as much as the device call, is
 * made here. Used while no trace is written (an I/O trace row is Python's).
 */
typedef uint32_t (*port_in_fn)(uint32_t port, uint32_t size);
typedef void (*port_out_fn)(uint32_t port, uint32_t size, uint32_t value);

typedef struct {
    vclock_t *clock;
    uint64_t cycles;         /* the virtual time of one port access */
    port_in_fn port_in;
    port_out_fn port_out;
} port_io_t;

size_t vclock_port_io_sizeof(void) { return sizeof(port_io_t); }

uint32_t vclock_in_hook(void *uc, uint32_t port, int size, void *user_data) {
    port_io_t *p = (port_io_t *)user_data;
    p->clock->now += p->cycles;
    p->clock->extra += p->cycles;
    return p->port_in(port, (uint32_t)size);
}

void vclock_out_hook(void *uc, uint32_t port, int size, uint32_t value, void *user_data) {
    port_io_t *p = (port_io_t *)user_data;
    p->clock->now += p->cycles;
    p->clock->extra += p->cycles;
    p->port_out(port, (uint32_t)size, value);
}

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_vclock", NULL, -1, NULL};

PyMODINIT_FUNC PyInit__vclock(void) { return PyModule_Create(&module); }
