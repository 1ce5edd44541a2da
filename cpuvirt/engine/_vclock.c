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
#include <stddef.h>
#include <sys/mman.h>
#include <stdio.h>
#include <sys/time.h>
#include "_vclock.h"
#include "_got.h"

#ifndef MAP_FIXED_NOREPLACE
#define MAP_FIXED_NOREPLACE 0x100000   /* Linux 4.17; an older kernel takes it as a hint (stub_region checks) */
#endif

typedef int (*emu_stop_fn)(void *uc);
typedef int (*reg_read_fn)(void *uc, int regid, void *value);
typedef int (*reg_write_fn)(void *uc, int regid, const void *value);
typedef uint32_t (*count_fn)(uint64_t address, uint32_t size);

#define EFLAGS_IF 0x200u

#define TABLE_BITS 14
#define TABLE_SIZE (1u << TABLE_BITS)
#define TRY 0x8000u   /* in entry_t.count: a block just counted, which its next pass through the hook gives a stub */

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
    /* The time, virtual cycles (instructions retired + time spent outside them): limit - left (_vclock.h).
     * The blocks count down `left` (see "Counting in the block"); `limit` is the deadline, or 0 while
     * check_if, discard or stop_next is set, so that one sign sends a block to the hook's slow path for all
     * four. Whoever sets a flag or the deadline sets it too (relimit; _vclock.h for C elsewhere). */
    vclock_time_t time;
    uint32_t check_if;     /* look at IF at the start of the check_if-th next block (0: do not) */
    uint32_t discard;      /* set by Python's count_cb when it stopped the engine itself */
    uint16_t own_low;      /* the blocks' word (_vclock.h vclock_time_t.low) until the engine's is known */
    uint16_t own_high;     /* (its high half: always 0, as the engine's is while no exit is requested) */
    uint32_t stop_next;    /* 2: run one block then stop (armed with a deadline already due); 1: stop now */
    uint64_t deadline;     /* stop when the time reaches it */
    volatile uint32_t *last_block;  /* address of the block that ran last: beside the engine's word once
                                     * that is known (the blocks store it there), else own_last_block */
    uint32_t own_last_block;
    uint64_t misses;       /* blocks counted by Python */
    uint64_t extra;        /* cycles that were not instructions (I/O, idle, deadline rounding) */
    emu_stop_fn emu_stop;
    count_fn count_cb;
    /* The interrupt window (see vclock_if_hook): */
    reg_read_fn reg_read;  /* uc_reg_read */
    int32_t eflags_reg;    /* UC_X86_REG_EFLAGS */
    uint32_t watch_if;     /* 1 while an interrupt waits for EFLAGS.IF = 1 */
    uint32_t stopped;      /* set when the hook stopped the engine */
    uint32_t patching;     /* 1: each block counted counts itself (see "Counting in the block") */
    uint64_t window_checks;  /* times IF was looked at */
    uint64_t window_stops;   /* times it was found set (the engine stopped for the window) */
    /* rdtsc answered in C (see vclock_rdtsc_hook): */
    reg_write_fn reg_write;  /* uc_reg_write */
    int32_t eax_reg, edx_reg;  /* UC_X86_REG_EAX, UC_X86_REG_EDX */
    uint64_t rdtsc_reads;    /* rdtsc instructions answered */
    uint64_t retranslated;   /* counts dropped because the engine translated their block again */
    entry_t table[TABLE_SIZE];
    uint64_t remapped;       /* counts dropped because their linear page came to map another frame */
    uint64_t patched;        /* blocks that count themselves (see "Counting in the block") */
    uint64_t unpatched;      /* blocks that keep the hook's call */
    uint64_t stub_slow;      /* stubs' slow paths taken */
    void *stub_base;         /* the stubs' region (unmapped when the engine goes: vclock_stubs_free) */
    uint64_t stub_used;
    uint64_t stub_limit;     /* bytes of the region used at most (VirtualClock.STUB_BYTES) */
    uint32_t stub_failed;    /* no region within reach could be mapped */
    uint32_t stubs_full;     /* the region is full: Python drops the engine's translations and vclock_stubs_reset */
    uint64_t stub_size;      /* the region's bytes (STUB_REGION, or less where the free range within reach is smaller) */
    int32_t engine_disp;     /* where the engine's exit-request word is from its env (rbp): the blocks' word */
} vclock_t;

size_t vclock_sizeof(void) { return sizeof(vclock_t); }


#define NOW(s) vclock_now(&(s)->time)

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
    count &= TRY - 1u;   /* (an engine block holds at most 512 instructions) */
    if (s->patching) count |= TRY;
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
    } else if (NOW(s) + count > s->deadline && !s->stopped) {
        /* The deadline falls inside this block: stop before it. It does not run now, so it is not
         * counted; time moves to the deadline (the rounding is recorded as non-instruction time). */
        if (s->deadline > NOW(s)) {
            vclock_advance(&s->time, &s->extra, s->deadline - NOW(s));
        }
        s->stopped = 1;
        s->emu_stop(uc);
        return 1;
    }
    return 0;
}

/* The blocks' one test, after a flag or the deadline changed (see "Counting in the block"). */
static inline void relimit(vclock_t *s) {
    vclock_set_limit(&s->time, (s->discard | s->check_if | s->stop_next) ? 0 : s->deadline);
}

/* A block counted: what every block that runs does to the clock. */
static inline void block_ran(vclock_t *s, uint64_t address, uint32_t count) {
    vclock_add(&s->time, count);
    *s->last_block = (uint32_t)address;
}

/*
 * Counting in the block (`patching`). Unicorn calls a block hook that is the only one of its kind
 * straight from the translated block (its `add_inline_hook`), after storing the block's address to EIP,
 * and every block then tests the engine's exit-request word (QEMU's icount_decr, at [rbp - 0x10]: rbp
 * holds the CPU's env in translated code):
 *
 *     48 C7 85 <eip:4> <pc:4>   mov qword [rbp + eip], address   (or mov r32, address; mov [rbp + eip], r64)
 *     48 BF <uc:8>          mov rdi, uc           the hook's arguments: engine, address, size, user data
 *     BE <pc:4>             mov esi, address
 *     BA <size:4>           mov edx, size
 *     48 B9 <s:8>           mov rcx, s            (or 48 8D 0D <disp:4>, lea rcx, [rip + disp])
 *     E8 <rel:4>            call vclock_block_hook  (or FF 15 <disp:4>, call [rip + disp], when out of reach)
 *   ret:
 *     8B 5D F0              mov ebx, [rbp - 0x10]   the exit-request test (any register)
 *     85 DB                 test ebx, ebx
 *     0F 8C <rel:4>         jl exitreq
 *
 * A call per block costs more than the guest code of a small block (compute.S: 3.4 instructions a
 * block). Once the table holds a block's count, the EIP store's and the call's 43 to 48 bytes become the
 * count itself, which is the exit-request test too: the blocks count down the word's low half (QEMU's
 * icount budget, which Unicorn 2.1.3 never uses; _vclock.h vclock_time_t), whose high half Unicorn sets
 * to 0xFFFF to ask for an exit; so the word goes below 0 when the count runs out or an exit is asked for:
 *
 *     sub dword [rbp - 0x10], COUNT;  jl stub     (a jump to the stub's slow path, while it must recount)
 *     mov dword [rbp - 0x0C], PC                   the last block, in the padding after the word
 *     jmp after                                    (over the engine's own test, which the count replaced)
 *
 * with a stub of the block's own, in a region of our own within a jump's reach of the engine's code:
 *
 *   stub:  add dword [rbp - 0x10], COUNT           the block has not run yet: the word as it was
 *   slow:  mov dword [rbp + eip], address; mov dword [rbp + eip + 4], 0
 *          the original call's arguments; call vclock_stub_slow
 *          test eax, eax;  jz exitreq;  jmp after  (run the block, or leave it for the exit asked for)
 *
 * vclock_stub_slow is the hook's uncommon path (the table, Python's count, the window check, the deadline,
 * refilling the word from `left`) and writes the block's count again. The engine's test at `ret` stays:
 * the block's first pass returns there from the hook. EIP is stored only where the engine may stop at
 * the block's start: with a code hook anywhere, Unicorn leaves EIP as the translated code last stored it
 * when it stops there (it puts back the block's address only when there is none). A block that runs
 * needs no store (the bare engine makes none): the hooks called inside it find their instruction from
 * the running block, last_block (cpu/mmiosite.py, Vcpu.io_site), not from EIP, which the engine does not
 * store before them either; the code hooks and faults store or recover their own. (Each step was measured
 * on compute.S, bare Unicorn + the clock: a call per block 0.44 of bare Unicorn; a stub of the hook's three
 * tests 0.60, of one 0.68; the count in the block 0.77-0.80; the count as the engine's test 0.93, without
 * the EIP store 0.96-0.98: performance.md.) Nothing counts blocks themselves (VirtualClock.run_id tells
 * one run of a block from the next). The first pass through the hook
 * after Python counted a block (its entry's TRY bit) gives it this; a block whose code is not exactly of
 * that shape keeps the hook, as does every block translated while the stubs' region is full (the run loop
 * then drops the engine's translations and the region is reused: vclock_stubs_reset), where a jump would
 * be out of reach, or while the engine's word is not known. A count the engine's block holds must be the
 * table's, and it is: the engine translates a block again (a new block, with the hook's call) whenever its
 * code changes, and when counts are dropped for another reason (a remapped page, forget_blocks) every
 * counting block's entry becomes a jump to its stub's slow path (stubs_recount), so that each goes the
 * table's way once more, where Python counts again what the table lost.
 */
#define STUB_REGION (16u << 20)
#define STUB_SIZE 96u

size_t vclock_stub_size(void) { return STUB_SIZE; }

_Static_assert(offsetof(vclock_t, check_if) == offsetof(vclock_t, time) + VCLOCK_TIME_BEFORE_CHECK_IF,
               "_vclock.h finds the time beside check_if");

int vclock_stub_slow(void *uc, uint64_t address, uint32_t size, void *user_data);
void vclock_block_hook(void *uc, uint64_t address, uint32_t size, void *user_data);

static inline uint64_t rd64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }
static inline uint32_t rd32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static inline int rel32_ok(int64_t d) { return d == (int64_t)(int32_t)d; }

/* The layout of the count written in the block and of its stub (the offsets of what vclock_stub_slow and
 * stubs_recount rewrite; the same for every block, checked on each one written). */
enum { ENTRY = 7,            /* the block's first instruction (sub [rbp + disp], COUNT), or a jump over it */
       INLINE_COUNT = 3,     /* COUNT in it: 81 6D <disp> */
       INLINE_SIZE = 22,     /* the count written in the block */
       STUB_COUNT = 3,       /* COUNT in the stub's undo: 81 45 <disp> */
       STUB_SLOW = 7,        /* the slow path, after the undo: EIP, then the hook's call */
       STUB_BLOCK = 88 };    /* where the stub keeps the address of its block's count */
static size_t slow_ret;      /* offset in the stub of the instruction after the slow call */

typedef struct { uint8_t *p; } emit_t;
static void b(emit_t *e, uint8_t v) { *e->p++ = v; }
static void d32(emit_t *e, uint32_t v) { memcpy(e->p, &v, 4); e->p += 4; }
static void d64(emit_t *e, uint64_t v) { memcpy(e->p, &v, 8); e->p += 8; }
static void jmp_to(emit_t *e, const uint8_t *to) { b(e, 0xE9); d32(e, (uint32_t)(int32_t)((intptr_t)to - (intptr_t)(e->p + 4))); }
static void jcc_to(emit_t *e, uint8_t cc, const uint8_t *to) {
    b(e, 0x0F); b(e, cc); d32(e, (uint32_t)(int32_t)((intptr_t)to - (intptr_t)(e->p + 4)));
}
/* sub/add dword [rbp + disp8], imm32 (81 /5, 81 /0) */
static void rbp_word(emit_t *e, uint8_t op, int8_t disp, uint32_t imm) {
    b(e, 0x81); b(e, (uint8_t)(0x45 | (op << 3))); b(e, (uint8_t)disp); d32(e, imm);
}

/* The engine's exit-request test at `c` (mov r32, [rbp + disp8]; test r32, r32; jl exitreq), for the
 * engine's word at `disp`: its length, and where it jumps to (0: not of that shape). */
static size_t exit_test(const uint8_t *c, int32_t disp, const uint8_t **exitreq) {
    size_t i = 0;
    unsigned rex = 0, reg, rex2 = 0;
    if ((c[i] & 0xF0) == 0x40) rex = c[i++];
    if (rex & ~0x44u & 0x0Fu) return 0;                      /* only REX.R (a register r8-r15) */
    if (c[i] != 0x8B || (c[i + 1] & 0xC7) != 0x45 || (int8_t)c[i + 2] != disp) return 0;
    reg = ((c[i + 1] >> 3) & 7) | ((rex & 4) << 1);
    i += 3;
    if ((c[i] & 0xF0) == 0x40) rex2 = c[i++];
    if (rex2 & 0x08) return 0;
    if (c[i] != 0x85 || (c[i + 1] & 0xC0) != 0xC0) return 0;
    if ((((c[i + 1] >> 3) & 7) | ((rex2 & 4) << 1)) != reg || ((c[i + 1] & 7) | ((rex2 & 1) << 3)) != reg) return 0;
    i += 2;
    if (c[i] == 0x0F && c[i + 1] == 0x8C) {
        *exitreq = c + i + 6 + (int32_t)rd32(c + i + 2);
        return i + 6;
    }
    if (c[i] == 0x7C) {
        *exitreq = c + i + 2 + (int8_t)c[i + 1];
        return i + 2;
    }
    return 0;
}

/* The engine's store of the block's address to EIP ahead of the hook's call (Unicorn syncs EIP for a
 * block hook), ending at `p`: mov qword [rbp + disp32], imm32 (EIP below 2 GiB), or mov r32, imm32; mov
 * [rbp + disp32], r64. Its length (0: not of that shape), and EIP's offset in the CPU state. */
static size_t eip_sync(const uint8_t *p, uint32_t address, int32_t *eip_disp) {
    if (address < 0x80000000u && p[-11] == 0x48 && p[-10] == 0xC7 && p[-9] == 0x85 && rd32(p - 4) == address) {
        *eip_disp = (int32_t)rd32(p - 8);
        return 11;
    }
    if ((p[-12] & 0xF8) == 0xB8 && rd32(p - 11) == address && p[-7] == 0x48 && p[-6] == 0x89
        && p[-5] == (uint8_t)(0x85 | ((p[-12] & 7) << 3))) {
        *eip_disp = (int32_t)rd32(p - 4);
        return 12;
    }
    return 0;
}

#define MIB (1u << 20)
#define REACH ((uintptr_t)1 << 31)   /* a rel32 jump's */
/* Where to map the stubs' region: in a free range of /proc/self/maps, a megabyte from its neighbours, within
 * a jump's reach of `near` from end to end, up to `want` bytes: the nearest of 4 MiB or more (a block
 * farther from it than a jump's reach keeps the hook's call), else the largest (0: none of a megabyte).
 * Each engine's code buffer is a gigabyte with a few tens of megabytes between two: with several engines
 * alive in one process (a test run, `cpuvirt compare`), the range beside a buffer may hold another
 * engine's region already, so every free range within reach is a candidate. */
static uintptr_t free_range_in(FILE *f, uintptr_t near, size_t want, size_t *got) {
    char line[512];
    uintptr_t prev_end = 0x10000, best = 0, best_d = UINTPTR_MAX;
    size_t best_size = 0;
    while (fgets(line, sizeof line, f)) {
        unsigned long lo, hi;
        if (sscanf(line, "%lx-%lx", &lo, &hi) != 2) continue;
        if (lo > prev_end + 3 * MIB) {
            uintptr_t first = (prev_end + 2 * MIB - 1) & ~(uintptr_t)(MIB - 1);   /* a megabyte above, aligned */
            uintptr_t last = ((uintptr_t)lo - MIB) & ~(uintptr_t)(MIB - 1);       /* a megabyte below */
            size_t size = last > first ? (size_t)(last - first) : 0;
            uintptr_t a, d;
            if (size > want) size = want;
            if (size >= MIB) {
                a = near < first ? first : last - size;                            /* the end nearest `near` */
                d = a > near ? a + size - near : near - a;
                int big = size >= 4 * MIB, best_big = best_size >= 4 * MIB;
                if (d < REACH && (big > best_big || (big == best_big && (big ? d < best_d : size > best_size))))
                    best = a, best_d = d, best_size = size;
            }
        }
        if (hi > prev_end) prev_end = hi;
    }
    *got = best_size;
    return best;
}

static uintptr_t free_range_near(uintptr_t near, size_t want, size_t *got) {
    FILE *f = fopen("/proc/self/maps", "r");
    uintptr_t at;
    *got = 0;
    if (!f) return 0;
    at = free_range_in(f, near, want, got);
    fclose(f);
    return at;
}

/* The same choice over a given maps text (tests/test_clock_stubs.py). */
uint64_t vclock_free_range_in(const char *maps, uint64_t near, uint64_t want, uint64_t *got) {
    FILE *f = fmemopen((void *)maps, strlen(maps), "r");
    size_t size = 0;
    uintptr_t at;
    *got = 0;
    if (!f) return 0;
    at = free_range_in(f, (uintptr_t)near, (size_t)want, &size);
    fclose(f);
    *got = size;
    return at;
}

/* Our region for stubs, within a jump's reach of `near` (an address in the engine's code buffer). (Each
 * block's jumps are checked for reach as its stub is written.) */
static int stub_region(vclock_t *s, uint8_t *near) {
    uintptr_t at;
    size_t size = 0;
    void *p;
    if (s->stub_base) return 1;
    if (s->stub_failed) return 0;
    s->stub_failed = 1;   /* (tried once) */
    at = free_range_near((uintptr_t)near, STUB_REGION, &size);
    if (!at) return 0;
    p = mmap((void *)at, size, PROT_READ | PROT_WRITE | PROT_EXEC,
             MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED_NOREPLACE, -1, 0);
    if (p == MAP_FAILED) return 0;
    if (p != (void *)at || !rel32_ok((intptr_t)p - (intptr_t)near) || !rel32_ok((intptr_t)p + size - (intptr_t)near)) {
        munmap(p, size);
        return 0;
    }
    s->stub_base = p;
    s->stub_size = size;
    s->stub_used = 0;
    s->stub_failed = 0;
    return 1;
}

/* The engine is gone (VirtualClock registers this on its Uc's finalization): no block can jump to a stub. */
void vclock_stubs_free(vclock_t *s) {
    if (s->stub_base) munmap(s->stub_base, s->stub_size);
    s->stub_base = NULL;
    s->stub_failed = 1;
}

/* Write the stub for the block whose hook call returns to `ret`, and jump to it from the block. Returns
 * 1 when done, 0 when the block keeps its call (not of the expected shape, no room, out of reach). */
static int patch_block(vclock_t *s, void *uc, uint8_t *ret, uint64_t address, uint32_t size, uint32_t count) {
    uint8_t *p, *q, *stub, *after, inline_code[64];
    const uint8_t *exitreq;
    size_t test_len, sync_len;
    int32_t eip_disp = 0;
    emit_t e;
    uint64_t sp = (uint64_t)(uintptr_t)s;
    if (!s->engine_disp) return 0;   /* the engine's word is not known: the hook counts */
    /* the call, ending at `ret`: E8 rel32, or FF 15 disp32 (call [rip + disp], the target in the block's
     * constant pool) where the hook is out of a call's reach from the code buffer */
    if (ret[-5] == 0xE8 && (intptr_t)ret + (int32_t)rd32(ret - 4) == (intptr_t)&vclock_block_hook)
        q = ret - 5;
    else if (ret[-6] == 0xFF && ret[-5] == 0x15
             && rd64(ret + (int32_t)rd32(ret - 4)) == (uint64_t)(uintptr_t)&vclock_block_hook)
        q = ret - 6;
    else
        return 0;
    if (q[-10] == 0x48 && q[-9] == 0xB9 && rd64(q - 8) == sp)
        p = q - 30;                                        /* mov rcx, s */
    else if (q[-7] == 0x48 && q[-6] == 0x8D && q[-5] == 0x0D && (intptr_t)q + (int32_t)rd32(q - 4) == (intptr_t)sp)
        p = q - 27;                                        /* lea rcx, [rip + disp] */
    else
        return 0;
    if (p[0] != 0x48 || p[1] != 0xBF || rd64(p + 2) != (uint64_t)(uintptr_t)uc || p[10] != 0xBE
        || rd32(p + 11) != (uint32_t)address || p[15] != 0xBA || rd32(p + 16) != size)
        return 0;
    sync_len = eip_sync(p, (uint32_t)address, &eip_disp);
    test_len = exit_test(ret, s->engine_disp, &exitreq);
    if (!sync_len || !test_len || !stub_region(s, ret)) return 0;
    after = ret + test_len;
    p -= sync_len;   /* the count goes over the EIP store too: the stub's slow path makes it */
    if ((size_t)(ret - p) > sizeof inline_code) return 0;
    if (s->stub_used + STUB_SIZE > s->stub_limit || s->stub_used + STUB_SIZE > s->stub_size) {
        s->stubs_full = 1;
        return 0;
    }
    stub = (uint8_t *)s->stub_base + s->stub_used;
    if (!rel32_ok((intptr_t)stub - (intptr_t)p) || !rel32_ok((intptr_t)exitreq - (intptr_t)stub)
        || !rel32_ok((intptr_t)after - (intptr_t)stub) || after - (p + INLINE_SIZE) > 127)
        return 0;

    /* the stub: undo, slow, and the block's address */
    e.p = stub;
    rbp_word(&e, 0, (int8_t)s->engine_disp, count);                                /* add [rbp + disp], COUNT */
    b(&e, 0xC7); b(&e, 0x85); d32(&e, (uint32_t)eip_disp); d32(&e, (uint32_t)address);   /* slow: EIP (as */
    b(&e, 0xC7); b(&e, 0x85); d32(&e, (uint32_t)eip_disp + 4); d32(&e, 0);                /* the block did) */
    b(&e, 0x48); b(&e, 0xBF); d64(&e, (uint64_t)(uintptr_t)uc);                   /* the hook's arguments */
    b(&e, 0xBE); d32(&e, (uint32_t)address);
    b(&e, 0xBA); d32(&e, size);
    b(&e, 0x48); b(&e, 0xB9); d64(&e, sp);
    b(&e, 0x49); b(&e, 0xBB); d64(&e, (uint64_t)(uintptr_t)&vclock_stub_slow);    /* mov r11, fn; call r11 */
    b(&e, 0x41); b(&e, 0xFF); b(&e, 0xD3);
    slow_ret = (size_t)(e.p - stub);
    b(&e, 0x85); b(&e, 0xC0);                                                      /* test eax, eax */
    jcc_to(&e, 0x84, exitreq);                                                     /* jz exitreq */
    jmp_to(&e, after);
    if ((size_t)(e.p - stub) > STUB_BLOCK || rd32(stub + STUB_COUNT) != count || stub[STUB_SLOW] != 0xC7) return 0;
    memcpy(stub + STUB_BLOCK, &p, sizeof p);

    /* the block's count, written over the EIP store and the call */
    e.p = inline_code;
    rbp_word(&e, 5, (int8_t)s->engine_disp, count);                                /* sub [rbp + disp], COUNT */
    b(&e, 0x0F); b(&e, 0x8C); d32(&e, (uint32_t)(int32_t)((intptr_t)stub - (intptr_t)(p + (e.p - inline_code) + 4)));
    b(&e, 0xC7); b(&e, 0x45); b(&e, (uint8_t)(s->engine_disp + 4));              /* mov [rbp + disp + 4], PC */
    d32(&e, (uint32_t)address);
    b(&e, 0xEB); b(&e, (uint8_t)(after - (p + INLINE_SIZE)));                      /* jmp after */
    if (e.p - inline_code != INLINE_SIZE || rd32(inline_code + INLINE_COUNT) != count) return 0;
    memset(e.p, 0x90, (size_t)(ret - p) - INLINE_SIZE);   /* (never run: up to the call's end) */
    s->stub_used += STUB_SIZE;
    memcpy(p, inline_code, (size_t)(ret - p));
    s->patched++;
    return 1;
}

/* Counts were dropped: every stub's entry jumps to its slow path, which asks the table (and Python) for
 * the count again and puts the entry back. */
static void stubs_recount(vclock_t *s) {
    uint64_t off;
    for (off = 0; off + STUB_SIZE <= s->stub_used; off += STUB_SIZE) {
        uint8_t *stub = (uint8_t *)s->stub_base + off, *p, jmp[5];
        uint32_t rel;
        memcpy(&p, stub + STUB_BLOCK, sizeof p);
        rel = (uint32_t)(int32_t)((intptr_t)(stub + STUB_SLOW) - (intptr_t)(p + 5));
        jmp[0] = 0xE9;
        memcpy(jmp + 1, &rel, 4);
        memcpy(p, jmp, 5);
    }
}

/* Empty the table (VirtualClock.forget_blocks): every block is counted by Python again. */
void vclock_forget_blocks(vclock_t *s) {
    memset(s->table, 0, sizeof s->table);
    stubs_recount(s);
}

/* The engine dropped every translation (Vcpu.run does when the region is full): no block jumps to a stub
 * any more, so the region is reused, and every count in the table may give a stub again. */
void vclock_stubs_reset(vclock_t *s) {
    uint32_t i;
    s->stub_used = 0;
    s->stubs_full = 0;
    if (!s->patching) return;
    for (i = 0; i < TABLE_SIZE; i++)
        if (s->table[i].size) s->table[i].count |= TRY;
}

/* Drop the TRY mark of (address, size) from its set: the block has its stub, or cannot have one. */
static inline uint32_t tried(entry_t *e, uint64_t address, uint32_t size, uint32_t count) {
    uint32_t a = (uint32_t)address, i;
    for (i = 0; i < 2; i++)
        if (e[i].address == a && e[i].size == size) e[i].count &= ~TRY;
    return count & ~TRY;
}

/* The block about to run, its count known: the rare conditions and the deadline, then the count. Returns
 * 1 if the block must not run now (the engine was stopped before it, uncounted). */
static inline int block_enter(vclock_t *s, void *uc, uint64_t address, uint32_t count) {
    if (UNLIKELY((s->discard | s->check_if | s->stop_next) != 0 || NOW(s) + count > s->deadline)) {
        int skip = block_slow(s, uc, count);
        relimit(s);
        if (skip) return 1;
    }
    block_ran(s, address, count);
    return 0;
}

/* Everything but the common case, out of line so that the common path calls nothing and saves no
 * registers (measured: the pushes of a hook that may call were a sixth of its samples). `ret` is where
 * the hook's call returns to in the engine's block (for patch_block). */
static __attribute__((noinline)) void block_uncommon(vclock_t *s, void *uc, uint64_t address, uint32_t size,
                                                     entry_t *e, uint32_t count, uint8_t *ret) {
    if (!count) count = count_miss(s, e, address, size);
    if (count & TRY) {
        /* once: a block that cannot have a stub keeps the hook, whose common path this entry now takes */
        count = tried(e, address, size, count);
        if (!patch_block(s, uc, ret, address, size, count)) s->unpatched++;
    }
    block_enter(s, uc, address, count);
}

/* The table's answer for (address, size): its count, 0 when it holds none. */
static inline uint32_t lookup(const entry_t *e, uint32_t a, uint32_t size) {
    if (LIKELY(e[0].address == a && e[0].size == size)) return e[0].count;
    if (e[1].address == a && e[1].size == size) return e[1].count;
    return 0;   /* a miss: Python counts it (a count is never 0) */
}

/* Every block that has no stub, so the common path is short: one table hit, one test of the rare
 * conditions (discard, check_if, stop_next OR-ed together), one compare with the deadline. */
void vclock_block_hook(void *uc, uint64_t address, uint32_t size, void *user_data) {
    vclock_t *s = (vclock_t *)user_data;
    entry_t *e = set_of(s, (uint32_t)address);
    uint32_t count = lookup(e, (uint32_t)address, size);
    if (UNLIKELY(count - 1u >= TRY - 1u || (s->discard | s->check_if | s->stop_next) != 0
                 || NOW(s) + count > s->deadline)) {   /* (the first test: no count, or TRY) */
        block_uncommon(s, uc, address, size, e, count, (uint8_t *)__builtin_return_address(0));
        return;
    }
    block_ran(s, address, count);
}

/* A block's slow path (from its undo, or from the jump stubs_recount wrote): the hook's, the block's count
 * and entry written again. Returns 1 to run the block, 0 to leave it for the exit asked for (the engine's
 * own test, which the count replaced, would have left it then: counted or not, as the hook decided). */
int vclock_stub_slow(void *uc, uint64_t address, uint32_t size, void *user_data) {
    vclock_t *s = (vclock_t *)user_data;
    uint8_t *stub = (uint8_t *)__builtin_return_address(0) - slow_ret, *p;
    entry_t *e = set_of(s, (uint32_t)address);
    uint32_t count = lookup(e, (uint32_t)address, size);
    uint8_t entry[ENTRY] = {0x81, 0x6D, 0};   /* sub dword [rbp + disp], COUNT */
    int skip;
    memcpy(&p, stub + STUB_BLOCK, sizeof p);
    if (!count) count = count_miss(s, e, address, size);
    if (count & TRY) count = tried(e, address, size, count);   /* this block counts inline already */
    entry[2] = (uint8_t)s->engine_disp;
    memcpy(entry + INLINE_COUNT, &count, 4);
    memcpy(p, entry, ENTRY);
    memcpy(stub + STUB_COUNT, &count, 4);
    s->stub_slow++;
    skip = block_enter(s, uc, address, count);
    if (s->time.low[1] != 0) return 0;   /* the high half: an exit was asked for */
    if (skip) {
        s->emu_stop(uc);   /* (every skip stopped the engine already) */
        return 0;
    }
    return 1;
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
    stubs_recount(s);   /* the stubs of the page's blocks count no more without the table (above) */
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
    if (s->watch_if) s->check_if = 1, vclock_set_limit(&s->time, 0);
}

void vclock_sti_hook(void *uc, uint64_t address, uint32_t size, void *user_data) {
    vclock_t *s = (vclock_t *)user_data;
    if (s->watch_if) s->check_if = 2, vclock_set_limit(&s->time, 0);
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
    uint64_t now = NOW(s), lo = now & 0xFFFFFFFFu, hi = now >> 32;
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
    vclock_advance(&p->clock->time, &p->clock->extra, p->cycles);
    return p->port_in(port, (uint32_t)size);
}

void vclock_out_hook(void *uc, uint32_t port, int size, uint32_t value, void *user_data) {
    port_io_t *p = (port_io_t *)user_data;
    vclock_advance(&p->clock->time, &p->clock->extra, p->cycles);
    p->port_out(port, (uint32_t)size, value);
}

/* -- The engine's TLB sizing, on a clock of its own ------------------------------------------------------ *
 * QEMU resizes its software TLB at each flush from the use it saw in the last 100 ms of *host* time
 * (cputlb.c tlb_mmu_resize_locked, through get_clock_realtime, that is gettimeofday: the only use Unicorn
 * 2.1.3 makes of it). So how many TLB misses a run makes, and with them the guest page walks counted in
 * native mode, the shadow hits and the modelled cost of those walks, changed with the host's speed from one
 * run to the next (xv6, 0.5 G instructions under native: 219,032 and 218,938 walk references in two runs).
 * vclock_pin_tlb_clock points libunicorn's own GOT entry for gettimeofday at tlb_clock, which advances one
 * millisecond per call: a window is then 100 flushes, whatever the host does. Done once per process,
 * before the first engine is made (engine/internals.py pin_tlb_clock). The clock is the process's: engines
 * made only to probe libunicorn put it back as they found it (vclock_tlb_clock_set), so that a run's
 * decisions do not depend on whether the probes ran before it in the same process. */
static uint64_t tlb_clock_ms;

uint64_t vclock_tlb_clock(void) { return tlb_clock_ms; }
void vclock_tlb_clock_set(uint64_t ms) { tlb_clock_ms = ms; }

static int tlb_clock(struct timeval *tv, void *tz) {
    uint64_t ms = tlb_clock_ms++;
    (void)tz;
    tv->tv_sec = (time_t)(ms / 1000);
    tv->tv_usec = (suseconds_t)((ms % 1000) * 1000);
    return 0;
}

/* 0: done (or done before); -1: no loaded library has `lib` in its name; -2: it imports no gettimeofday;
 * -3: its GOT could not be made writable. */
int vclock_pin_tlb_clock(const char *lib) {
    got_search_t g = {lib, "gettimeofday", 0, 0};
    dl_iterate_phdr(find_got_entry, &g);
    if (!g.seen) return -1;
    if (!g.slot) return -2;
    if (*(void **)g.slot == (void *)tlb_clock) return 0;
    return got_write(g.slot, (void *)tlb_clock) ? 0 : -3;
}

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_vclock", NULL, -1, NULL};

PyMODINIT_FUNC PyInit__vclock(void) { return PyModule_Create(&module); }
