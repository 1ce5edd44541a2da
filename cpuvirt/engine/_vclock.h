/*
 * What C outside _vclock.c may do to the virtual clock besides reading it: ask it to look at IF at the
 * next block boundary (VirtualClock.if_may_have_changed), after an emulated sti, popf, iret or a
 * delivery that may have set IF while an interrupt waits for the window.
 *
 * The blocks' stubs (_vclock.c, "Counting without the call") test one word, `limit`, instead of the
 * clock's flags: a flag raised must also bring `limit` to 0, or the stubs would run on past the
 * boundary where the window opens. The callers hold pointers to the flags only (each names the clock's
 * fields it uses), so `limit` is found beside check_if: the word before it, which _vclock.c asserts.
 */
#ifndef CPUVIRT_VCLOCK_H
#define CPUVIRT_VCLOCK_H

#include <stdint.h>
#include <string.h>

#define VCLOCK_LIMIT_BEFORE_CHECK_IF 8   /* offsetof(vclock_t, check_if) - offsetof(vclock_t, limit) */

static inline void vclock_look_at_if(const uint32_t *watch_if, uint32_t *check_if) {
    if (*watch_if && !*check_if) {
        uint64_t zero = 0;
        *check_if = 1;
        memcpy((char *)check_if - VCLOCK_LIMIT_BEFORE_CHECK_IF, &zero, sizeof zero);
    }
}

#endif
