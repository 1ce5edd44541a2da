/*
 * Unicorn 2.1.3's TLB-fill hook (UC_HOOK_TLB_FILL, with UC_TLB_VIRTUAL): the entry a hook fills and the
 * access types it is asked for, shared by every C fill hook (memory/_tlbfill.c, cpu/_delivery.c,
 * modes/_trapfast.c, bt/_callout.c).
 */
#ifndef CPUVIRT_TLBHOOK_H
#define CPUVIRT_TLBHOOK_H

#include <stdint.h>

typedef struct {
    uint64_t paddr;
    uint32_t perms;
} tlb_entry_t;

#define MEM_READ 16    /* UC_MEM_READ */
#define MEM_WRITE 17   /* UC_MEM_WRITE */
#define MEM_FETCH 18   /* UC_MEM_FETCH */

#endif
