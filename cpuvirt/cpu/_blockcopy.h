/*
 * The C copy of Machine.block_insns (its BlockMirror, machine/blocks.py; cpu/evdeliver.py BlockCopyKeeper
 * keeps it): each block's instruction starts, for Vcpu.left_block_at (the instructions of the running block
 * an event leaves that did not retire come off the clock). Used by native's and hw's deliveries
 * (cpu/_delivery.c) and by trap's and full's (cpu/_evdeliver.h).
 *
 * A header of static functions: each extension compiles its own copy of the same code.
 */
#ifndef CPUVIRT_BLOCKCOPY_H
#define CPUVIRT_BLOCKCOPY_H

#include <stdint.h>

#define ED_BLOCK_SLOTS 4096u   /* 2048 sets of 2: ed_block_set takes the top 11 bits of a 32-bit product */
#define ED_BLOCK_MAX_INSNS 58

typedef struct {
    uint64_t end;                         /* the address after the block's last instruction */
    uint32_t address;                     /* the block's key in Machine.block_insns */
    uint32_t first;                       /* its first instruction's address */
    uint16_t n;                           /* instructions; 0: the slot is empty */
    uint16_t offset[ED_BLOCK_MAX_INSNS];  /* each instruction's address - first */
    uint16_t ambiguous;                   /* (a set's first slot) the table may hold an entry the set lost */
    uint16_t pad[2];
} block_t;

/* Two-way set-associative (ED_BLOCK_SLOTS / 2 sets of two slots), and exact about absence as well:
 * a set that has lost an entry the table may still hold (a put into a full set, or one too long to
 * copy) is marked ambiguous (its first slot's flag) until the table says otherwise (the Python side,
 * cpu/evdeliver.BlockCopyKeeper, knows each set's entries and clears the flag or puts one back), so a
 * look-up answers "this entry", "no entry in the table" (Python's _retired then does nothing: a block
 * the clock counted without decoding it, such as one whose first instruction faults), or "ask
 * Python". `table` has ED_BLOCK_SLOTS entries. */
static inline block_t *ed_block_set(block_t *table, uint32_t address) {
    return &table[((uint32_t)(address * 2654435761u) >> 21) * 2];   /* Fibonacci hashing: 11 bits */
}

/* Copy one entry: 1, or 0 when it cannot be (too long, or its addresses too far apart: the set is
 * then ambiguous). A full set loses its second slot's entry. */
static inline int ed_blocks_put(block_t *table, uint32_t address, const uint32_t *addrs, uint32_t n, uint64_t end) {
    block_t *set = ed_block_set(table, address), *e;
    uint32_t k;
    if (set[0].n && set[0].address == address)
        e = &set[0];
    else if (set[1].n && set[1].address == address)
        e = &set[1];
    else if (!set[0].n)
        e = &set[0];
    else if (!set[1].n)
        e = &set[1];
    else {
        e = &set[1];
        set[0].ambiguous = 1;
    }
    e->n = 0;
    if (n == 0 || n > ED_BLOCK_MAX_INSNS) {
        set[0].ambiguous = 1;
        return 0;
    }
    for (k = 0; k < n; k++)
        if (addrs[k] < addrs[0] || addrs[k] - addrs[0] > 0xFFFFu) {
            set[0].ambiguous = 1;
            return 0;
        }
    e->address = address;
    e->first = addrs[0];
    e->end = end;
    for (k = 0; k < n; k++) e->offset[k] = (uint16_t)(addrs[k] - addrs[0]);
    e->n = (uint16_t)n;
    return 1;
}

static inline void ed_blocks_drop(block_t *table, uint32_t address) {
    block_t *set = ed_block_set(table, address);
    if (set[0].address == address) set[0].n = 0;
    if (set[1].address == address) set[1].n = 0;
}

static inline void ed_blocks_clear(block_t *table) {
    uint32_t k;
    for (k = 0; k < ED_BLOCK_SLOTS; k++) table[k].n = table[k].ambiguous = 0;
}

/* The running block's entry in the copy (`last`: the clock's last block): 1 with *out (NULL when the
 * table holds none: nothing to take off), 0 when the copy cannot tell (an ambiguous set: Python's;
 * counted in *misses). */
static inline int ed_running_block(block_t *table, uint64_t last, uint64_t *misses, const block_t **out) {
    const block_t *set = ed_block_set(table, (uint32_t)last), *e = NULL;
    if (last <= 0xFFFFFFFFu) {
        if (set[0].n && set[0].address == last)
            e = &set[0];
        else if (set[1].n && set[1].address == last)
            e = &set[1];
    }
    if (!e && (set[0].ambiguous || last > 0xFFFFFFFFu)) {
        (*misses)++;
        return 0;
    }
    *out = e;
    return 1;
}

/* Vcpu.left_block_at(boundary): instructions of the running block from `boundary` on (0: the copy
 * cannot tell, Python's) */
static inline int ed_left_block(block_t *table, uint64_t last, uint64_t *misses, uint32_t boundary, int64_t *out) {
    const block_t *e;
    int64_t n = 0;
    uint32_t k;
    if (!ed_running_block(table, last, misses, &e)) return 0;
    if (e && e->first <= boundary && boundary < e->end)
        for (k = 0; k < e->n; k++)
            if (e->first + (uint64_t)e->offset[k] >= boundary) n++;
    *out = n;
    return 1;
}

#endif
