/*
 * What C outside _vclock.c may do to the virtual clock besides reading it: ask it to look at IF at the
 * next block boundary (VirtualClock.if_may_have_changed), after an emulated sti, popf, iret or a
 * delivery that may have set IF while an interrupt waits for the window.
 *
 * The blocks count down to one word, `limit`, instead of testing the clock's flags: a flag raised must
 * also bring `limit` to 0 (the time kept: vclock_set_limit), or the blocks would run on past the boundary
 * where the window opens. The callers hold pointers to the flags only (each names the clock's fields it
 * uses), so the time is found beside check_if: the two words before it, which _vclock.c asserts.
 */
#ifndef CPUVIRT_VCLOCK_H
#define CPUVIRT_VCLOCK_H

#include <stdint.h>
#include <string.h>

/* The clock's time as the engine's blocks count it (_vclock.c, "Counting in the block"): each block takes
 * its count off the cycles that remain until `limit`, and goes to its slow path when they would go below
 * 0; so the time is limit - (left + *low). Those cycles are split: the blocks count down `*low`, the low
 * half of the engine's own exit-request word (QEMU's icount_decr.u16.low, which Unicorn 2.1.3 leaves to
 * us), by at most 0xFFFF at a time, and `left` holds the rest. `low` points at the clock's own word
 * until the engine's is known (VirtualClock, internals.engine_env). `limit` is the deadline, or 0 while a
 * flag asks the hook to look (check_if, discard, stop_next). C elsewhere reads and moves the time only
 * through these (its pointer to the clock's time: VirtualClock.time_address), which keep the split: `*low`
 * is never more than what remains, so a block the deadline falls in always takes its slow path. */
typedef struct {
    int64_t left;
    uint64_t limit;
    volatile uint16_t *low;
} vclock_time_t;

#define VCLOCK_LIMIT_MAX ((uint64_t)INT64_MAX)   /* a deadline further away counts down from here */
#define VCLOCK_LOW_MAX 0xFFFF                     /* what the engine's word holds at most */

/* The cycles that remain until `limit`. */
static inline int64_t vclock_left(const vclock_time_t *t) { return t->left + (int64_t)*t->low; }

/* Set what remains, split between the engine's word and `left`. */
static inline void vclock_set_left(vclock_time_t *t, int64_t left) {
    uint16_t low = left <= 0 ? 0 : left >= VCLOCK_LOW_MAX ? (uint16_t)VCLOCK_LOW_MAX : (uint16_t)left;
    *t->low = low;
    t->left = left - low;
}

static inline uint64_t vclock_now(const vclock_time_t *t) { return t->limit - (uint64_t)vclock_left(t); }

/* Spend `cycles` (negative: take them back, as unretire does). */
static inline void vclock_add(vclock_time_t *t, int64_t cycles) { vclock_set_left(t, vclock_left(t) - cycles); }

/* Spend `cycles` that are not instructions (VirtualClock.advance: an I/O bus cycle, a hypercall, a fetch
 * fault): the time, and the clock's `extra`, which instructions are told from. */
static inline void vclock_advance(vclock_time_t *t, uint64_t *extra, uint64_t cycles) {
    vclock_set_left(t, vclock_left(t) - (int64_t)cycles);
    *extra += cycles;
}

/* A new limit; the time stays. */
static inline void vclock_set_limit(vclock_time_t *t, uint64_t limit) {
    if (limit > VCLOCK_LIMIT_MAX) limit = VCLOCK_LIMIT_MAX;
    vclock_set_left(t, vclock_left(t) + (int64_t)(limit - t->limit));
    t->limit = limit;
}

#define VCLOCK_TIME_BEFORE_CHECK_IF 24   /* offsetof(vclock_t, check_if) - offsetof(vclock_t, time) */

static inline void vclock_look_at_if(const uint32_t *watch_if, uint32_t *check_if) {
    if (*watch_if && !*check_if) {
        *check_if = 1;
        vclock_set_limit((vclock_time_t *)(void *)((char *)check_if - VCLOCK_TIME_BEFORE_CHECK_IF), 0);
    }
}

#endif
