/*
 * The C copy of shadow paging's current address space (memory/shadowmirror.py ShadowMirror over
 * memory/shadow.py ShadowPaging), and of the set of write-traced guest frames (Mmu.traces.frames).
 *
 * Python keeps it equal to its own tables: every entry the current root gains or loses, every root
 * switch, mode change and trim, every frame traced or untraced is told here at once. C paths read it to
 * answer what Python's ShadowPaging.gva_to_gpa would answer from an entry with no side effect: the TLB
 * fills of modes trap, full and hw --no-ept (_tlbfill.c shadowfill_hook) and the hypervisor's own
 * accesses of an event delivery (cpu/_evdeliver.h for trap and full, cpu/_delivery.c for hw --no-ept). A slot holds one linear page's entry, valid only while its serial
 * is the current root's; a root's serial changes when it loses every entry, so stale slots need no
 * clearing. Owned by Python (ctypes), shared by the extensions that include this header.
 */
#ifndef CPUVIRT_SHADOWMIRROR_H
#define CPUVIRT_SHADOWMIRROR_H

#include <stdint.h>
#include <string.h>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

/* 2^16 sets of two slots, a set indexed by the linear page number's low bits mixed with the root's serial:
 * 256 MiB of contiguous linear memory of one root (what it may shadow before it is trimmed, memory/shadow.py
 * MAX_ROOT_ENTRIES) without eviction, and room for a second page with the same low bits. A kernel mapped high
 * over the same low bits as its processes (xv6: user page 0x1000 and kernel page 0x80001000) needs both: with
 * one slot a set, the two evicted each other and 6.5 M of xv6's 50 M fills under hw --no-ept (3 G cycles of
 * usertests) went to Python as hits the copy had lost. The serial keeps the roots of processes that map the
 * same kernel pages apart: with sets shared by every root, three processes touching one kernel page evicted
 * each other's entries (77 k fills to Python in 1.5 G cycles of usertests). Four slots a set (a set then spans
 * two cache lines) made every fill slower: kvm-unit-tests' sieve (153 M fills) under full 34 -> 39-41 s. */
#define SHADOW_WAYS 2u
#define SHADOW_SETS 65536u
#define SHADOW_SLOTS (SHADOW_WAYS * SHADOW_SETS)

/* linear page -> (guest frame, U/S and R/W over the walk's path, the leaf's D bit) */
typedef struct {
    uint32_t page;     /* linear page number (address >> 12) */
    uint32_t serial;   /* the root this entry belongs to; 0: empty */
    uint32_t gpa;      /* guest-physical frame address */
    uint16_t rights;   /* PTE_US | PTE_RW */
    uint16_t dirty;
} sentry_t;

/* A shadow entry made in C (_tlbfill.c, a hidden fault's fill) for Python to take into the current root's
 * tables (ShadowPaging._fold): the fields of memory/shadow.py's entry tuple, and the root's serial. */
typedef struct {
    uint32_t page;     /* linear page number */
    uint32_t gpa;      /* guest-physical frame address */
    int64_t pde_addr, pte_addr;   /* the guest PDE and PTE it derives from (pte_addr -1: a 4 MiB page) */
    uint16_t rights, dirty;
    uint32_t serial;
    uint32_t fresh;    /* SM_PTE_FRESH, SM_PDE_FRESH: no entry derived from that word before (sm_cancel_made) */
    uint32_t pad;      /* a record taken back (SM_DEAD): its PTE word */
} smade_t;

#define SM_PTE_FRESH 1u
#define SM_PDE_FRESH 2u

#define SM_MADE 1024u   /* entries C may make between two of Python's folds */
#define SM_SITES 16u    /* ptemod sites C counts itself between two folds (sm_ptemod_done) */

/* A ptemod site's count since the last fold: ShadowPaging.traced_writes[eip] to add */
typedef struct {
    uint32_t eip, count;
} ssite_t;
/* smade_t.pte_addr of a record that is no entry (memory/shadow.py _fold takes them in order with the entries):
 * an invlpg of `page` (sm_invlpg), a ptemod trap's fill hook emulated at EIP `gpa` (modes/_trapfast.c), the
 * zap of the word at `gpa` (sm_zap) */
#define SM_INVLPG (-2)
#define SM_PTEMOD (-3)
#define SM_ZAP (-4)
#define SM_DEAD (-5)    /* an entry a later zap in C took back (sm_cancel_made): nothing to take */

typedef struct {
    uint32_t key;      /* ShadowPaging._cur_key (1: none) */
    uint32_t mode;     /* ShadowPaging._mode (0xFFFFFFFF: None) */
    uint32_t serial;   /* the serial of ShadowPaging._cur (0: none) */
    uint32_t traced_frames;   /* RAM frames covered by `traced` */
    uint8_t *traced;   /* a bit per RAM frame: in Mmu.traces.frames (any owner: page tables, code) */
    uint8_t *pt_traced;   /* a bit per RAM frame: in ShadowPaging.traced (traced as a page table) */
    /* A bit per linear page: the current root's Python table holds an entry for it (a slot can lose its
     * entry to another page's, of this root or another: then Python answers from its table, not a walk) */
    uint8_t *present;
    /* A bit per 4-byte word of RAM: ShadowPaging.rmap holds its address (an entry of some root derives from
     * the guest PDE or PTE there, so a store into it zaps: Python's). Beyond RAM, or NULL (not kept: only
     * full's callout hook and trap's fill hook ask, memory/shadowmirror.py track_links): say yes. */
    uint8_t *linked;
    /* A bit per RAM frame: traced by an owner other than shadow paging (full's code traces) */
    uint8_t *other_traced;
    uint32_t room;     /* new entries the current root may still take before ShadowPaging would trim it */
    uint32_t made;     /* entries in `made`, not yet taken by Python */
    /* The invlpg records among them unlink their entries' PDE and PTE words when Python takes them: until
     * then `linked` may show words no entry derives from any more. How many such words each frame may lose,
     * by frame number mod 256 (sm_unlinks), and the records whose page table C could not tell. */
    uint32_t invlpgs_unknown;
    uint32_t pad;
    /* QEMU's tlb_flush_page and the engine's CPU (engine/internals.py PageFlush), or NULL: sm_flush_pages */
    void (*flush_page)(void *cpu, uint64_t linear);
    void *cpu;
    /* What C did that the fold needs no record for, being counts only (their order does not matter): the
     * invlpgs of pages the current root holds no entry for, and the ptemods by site (`sites_room`: how many
     * new sites traced_writes may take before ShadowPaging would clear it; set by Python at each fold).
     * `pending`: something (a record or a count) waits for ShadowPaging._fold. */
    uint32_t pending;
    uint32_t invlpgs_quiet;
    uint32_t hidden_quiet, zapped_quiet;   /* entries made and zapped again before the fold (sm_cancel_made) */
    uint32_t sites_room;
    uint32_t nsites;
    ssite_t sites[SM_SITES];
    uint16_t unlinks[256];
    smade_t made_log[SM_MADE];
    sentry_t slot[SHADOW_SLOTS];
} shadowmirror_t;

#define SM_PG 0x80000000u
#define SM_PSE 0x10u
#define SM_RW 2u
#define SM_US 4u

/* Is this guest frame write-traced? (a frame beyond the bitmap: say yes, so that no C path writes it) */
static inline int sm_traced(const shadowmirror_t *m, uint64_t gpa) {
    uint64_t k = gpa >> 12;
    if (k >= m->traced_frames) return 1;
    return (m->traced[k >> 3] >> (k & 7)) & 1;
}

/* Is this guest frame traced by shadow paging itself, as a page table? (beyond the bitmap: no) */
static inline int sm_pt_traced(const shadowmirror_t *m, uint64_t gpa) {
    uint64_t k = gpa >> 12;
    if (k >= m->traced_frames) return 0;
    return (m->pt_traced[k >> 3] >> (k & 7)) & 1;
}

/* Does an entry of some root derive from the guest PDE/PTE in this 4-byte word? */
static inline int sm_linked(const shadowmirror_t *m, uint64_t gpa) {
    uint64_t k = gpa >> 2;
    if (!m->linked || (gpa >> 12) >= m->traced_frames) return 1;
    return (m->linked[k >> 3] >> (k & 7)) & 1;
}

static inline void sm_link(shadowmirror_t *m, uint64_t gpa) {
    uint64_t k = gpa >> 2;
    if (m->linked && (gpa >> 12) < m->traced_frames) m->linked[k >> 3] |= (uint8_t)(1u << (k & 7));
}

/* Is this guest frame traced by another owner than shadow paging? (beyond the bitmap: yes) */
static inline int sm_other_traced(const shadowmirror_t *m, uint64_t gpa) {
    uint64_t k = gpa >> 12;
    if (k >= m->traced_frames) return 1;
    return (m->other_traced[k >> 3] >> (k & 7)) & 1;
}

/* Does Python's table (the current root) hold an entry for the linear page? (The copy may have lost it.) */
static inline int sm_present(const shadowmirror_t *m, uint32_t page) {
    return (m->present[page >> 3] >> (page & 7)) & 1;
}

/* The SHADOW_WAYS slots of a linear page's set: the page's low bits mixed with the root's serial, so that
 * the roots of several processes, which map their kernel at the same pages, do not share sets. */
static inline sentry_t *sm_set(const shadowmirror_t *m, uint32_t page, uint32_t serial) {
    return (sentry_t *)&m->slot[SHADOW_WAYS * ((page ^ ((serial * 0x9E3779B1u) >> 16)) & (SHADOW_SETS - 1))];
}

/* The slot holding a linear page's entry of the root with this serial, or NULL. */
static inline sentry_t *sm_find(const shadowmirror_t *m, uint32_t page, uint32_t serial) {
    sentry_t *w = sm_set(m, page, serial);
    uint32_t k;
    for (k = 0; k < SHADOW_WAYS; k++)
        if (w[k].page == page && w[k].serial == serial) return &w[k];
    return 0;
}

/* Where a new entry for (page, serial) goes: its own slot, else an empty one, else one holding another
 * root's entry, else the first (the others move down one, the last's entry is dropped: the most recent stay). */
static inline sentry_t *sm_slot_for(shadowmirror_t *m, uint32_t page, uint32_t serial) {
    sentry_t *w = sm_set(m, page, serial), *e = sm_find(m, page, serial);
    uint32_t k;
    if (e) return e;
    for (k = 0; k < SHADOW_WAYS; k++)
        if (!w[k].serial) return &w[k];
    for (k = 0; k < SHADOW_WAYS; k++)
        if (w[k].serial != serial) return &w[k];
    memmove(&w[1], &w[0], (SHADOW_WAYS - 1) * sizeof *w);
    return &w[0];
}

/* The current root's entry for a linear page, when the virtual CR0/CR3/CR4 select the root and the mode
 * the copy holds (else ShadowPaging would first change mode or select a root: Python's); NULL if none. */
static inline const sentry_t *sm_entry(const shadowmirror_t *m, uint32_t cr0, uint32_t cr3, uint32_t cr4,
                                       uint32_t page) {
    if (((cr0 & SM_PG) | (cr4 & SM_PSE)) != m->mode) return 0;
    if (!m->serial || (cr3 & 0xFFFFF000u) != m->key) return 0;
    return sm_find(m, page, m->serial);
}

/* A record of `kind` (SM_INVLPG, SM_PTEMOD, SM_ZAP) at the end of the log, which must have room. */
static inline void sm_record(shadowmirror_t *m, int64_t kind, uint32_t page, uint32_t gpa) {
    smade_t *r = &m->made_log[m->made++];
    m->pending = 1;
    memset(r, 0, sizeof *r);
    r->page = page;
    r->gpa = gpa;
    r->pde_addr = -1;
    r->pte_addr = kind;
    r->serial = m->serial;
}

/* ShadowPaging.invlpg in the current root (C's copy now, Python's table at its next fold, in the log's
 * order): the page's entry goes, whether the copy's slots hold it or not. `ram`: guest RAM, where the
 * root's page directory tells which page table the entry came from (the one it can unlink a word of:
 * the directory is traced, so a PDE changed since would have zapped the entry, unless a frame is left
 * unsynchronised: users of `unlinks` must not rely on it then). A page the root holds no entry for leaves
 * no record, only a count (`invlpgs_quiet`). 0: the log is full. */
static inline int sm_invlpg(shadowmirror_t *m, uint32_t page, const uint8_t *ram, uint64_t ram_bytes) {
    sentry_t *e;
    uint64_t pde_addr = m->key | ((page >> 8) & 0xFFCu);
    uint32_t pde;
    if (!m->serial) return 0;
    if (!((m->present[page >> 3] >> (page & 7)) & 1)) {   /* no entry: what invlpg does is count it */
        m->invlpgs_quiet++;
        m->pending = 1;
        return 1;
    }
    if (m->made >= SM_MADE) return 0;
    {                                                  /* an entry to pop: its PDE and PTE words unlink */
        m->unlinks[(m->key >> 12) & 255]++;
        if (pde_addr + 4 > ram_bytes) {
            m->invlpgs_unknown++;
        } else {
            memcpy(&pde, ram + pde_addr, 4);
            if ((pde & 1) && !((pde & 0x80u) && (m->mode & SM_PSE))) m->unlinks[(pde >> 12) & 255]++;
        }
    }
    e = sm_find(m, page, m->serial);
    if (e) e->serial = 0;
    m->present[page >> 3] &= (uint8_t)~(1u << (page & 7));
    sm_record(m, SM_INVLPG, page, 0);
    return 1;
}

/* May the invlpgs not yet taken by Python unlink `links` or more words of this frame (see `unlinks`)? */
static inline int sm_may_unlink_all(const shadowmirror_t *m, uint64_t frame, uint32_t links) {
    return m->invlpgs_unknown || links <= m->unlinks[(frame >> 12) & 255];
}

#define SM_ZAP_MAX 16u

/* The current root's entries a store into the PTE at `word` zaps (ShadowPaging._zap_range would drop them),
 * as linear pages: those whose page-directory entry points at the word's frame (the directory is traced, and
 * the caller has made sure nothing is unsynchronised, so an entry derived through another PDE value was
 * zapped when it changed) and that the root holds (`present`: Python's table drops what the copy's slots
 * lost, at the fold). 0: the word is in the current page directory itself, invlpgs not yet folded may
 * unlink words of its frame (then `linked`, which says whether anything is zapped at all, may be stale),
 * or more than SM_ZAP_MAX pages. */
static inline int sm_zap_pages(const shadowmirror_t *m, const uint8_t *ram, uint64_t ram_bytes, uint32_t word,
                               uint32_t *pages, uint32_t *count) {
    uint32_t frame = word & 0xFFFFF000u, want = frame | 1u, chunk, k, pdi, pde, page, hits;
    const uint8_t *pd = ram + m->key;
    *count = 0;
    if (frame == (m->key & 0xFFFFF000u) || m->invlpgs_unknown || m->unlinks[(frame >> 12) & 255]) return 0;
    if ((uint64_t)m->key + 4096 > ram_bytes) return 0;
    /* The directory 64 entries at a time: first whether any present one points at the frame, four at a time
     * where the host has SSE2 (one entry a time made the scan a fifth of a zap's ptemod exit). */
    for (chunk = 0; chunk < 1024; chunk += 64) {
#if defined(__SSE2__)
        {
            const __m128i mask = _mm_set1_epi32((int)0xFFFFF001u), w = _mm_set1_epi32((int)want);
            __m128i any = _mm_setzero_si128();
            for (k = 0; k < 64; k += 4)
                any = _mm_or_si128(
                    any, _mm_cmpeq_epi32(_mm_and_si128(_mm_loadu_si128((const __m128i *)(pd + 4 * (chunk + k))), mask), w));
            hits = (uint32_t)_mm_movemask_epi8(any);
        }
#else
        for (k = 0, hits = 0; k < 64; k++) {
            memcpy(&pde, pd + 4 * (chunk + k), 4);
            hits |= (pde & 0xFFFFF001u) == want;
        }
#endif
        for (k = 0; hits && k < 64; k++) {
            memcpy(&pde, pd + 4 * (chunk + k), 4);
            if ((pde & 0xFFFFF001u) != want) continue;
            if ((pde & 0x80u) && (m->mode & SM_PSE)) continue;
            pdi = chunk + k;
            page = (pdi << 10) | ((word & 0xFFFu) >> 2);
            if (!((m->present[page >> 3] >> (page & 7)) & 1)) continue;     /* no entry there */
            if (*count >= SM_ZAP_MAX) return 0;
            pages[(*count)++] = page;
        }
    }
    return 1;
}

/* Does a live record of the log (an entry still to be taken) derive an entry from the word at `addr`? */
static inline int sm_logged_link(const shadowmirror_t *m, int64_t addr) {
    uint32_t k;
    for (k = 0; k < m->made; k++) {
        const smade_t *r = &m->made_log[k];
        if (r->pte_addr >= -1 && (r->pde_addr == addr || r->pte_addr == addr)) return 1;
    }
    return 0;
}

/* Was the word at `addr` linked by no entry Python holds? The first record of the log that derives an entry
 * from it says (taken back or not: a taken-back record keeps its PTE word in `pad`). Records taken back from
 * the log's end are gone, but a word whose first one went so was unlinked then, and later records say so. */
static inline int sm_word_was_fresh(const shadowmirror_t *m, int64_t addr) {
    uint32_t k;
    for (k = 0; k < m->made; k++) {
        const smade_t *r = &m->made_log[k];
        int64_t pte = r->pte_addr == SM_DEAD ? (int64_t)r->pad : r->pte_addr;
        if (r->pte_addr < -1 && r->pte_addr != SM_DEAD) continue;   /* not an entry */
        if (r->pde_addr == addr) return (r->fresh & SM_PDE_FRESH) != 0;
        if (pte == addr) return (r->fresh & SM_PTE_FRESH) != 0;
    }
    return 0;
}

/* A zap of the word whose every page's entry C itself made since the last fold, from a word no entry derived
 * from before (so the zap takes nothing else, in any root): the made entries' records are taken back instead
 * of logging the zap (a pair of records is a microsecond of the fold; nanobench's pgfault loop makes one each
 * iteration). Python's tables end the same: the entries never come in, the links the zap would undo are never
 * made, and `linked` loses a directory word no entry derives from any more (no live record, none Python holds:
 * the zap's unlink of the last one). The counts are kept (hidden faults, zapped). 0: log the zap (nothing
 * changed). Only while the log is short (a zap that found no record to take back scanned the whole log:
 * kvm-unit-tests' sieve under full took 8% longer). */
#define SM_CANCEL_LOG 32u   /* only while the log is this short: the look-ups below scan it */

static inline int sm_cancel_made(shadowmirror_t *m, uint32_t word, const uint32_t *pages, uint32_t n) {
    uint32_t k, at[SM_ZAP_MAX];
    int64_t j;
    if (m->made > SM_CANCEL_LOG) return 0;
    for (k = 0; k < n; k++) {                 /* each page's last record: its entry, made from `word` fresh */
        for (j = (int64_t)m->made - 1; j >= 0; j--)
            if (m->made_log[j].pte_addr != SM_DEAD && m->made_log[j].page == pages[k]) break;
        if (j < 0) return 0;
        if (m->made_log[j].pte_addr != (int64_t)word || !(m->made_log[j].fresh & SM_PTE_FRESH)) return 0;
        at[k] = (uint32_t)j;
    }
    for (k = 0; k < n; k++) {
        smade_t *r = &m->made_log[at[k]];
        r->pad = (uint32_t)r->pte_addr;
        r->pte_addr = SM_DEAD;
    }
    for (k = 0; k < n; k++) {                 /* the directory words: still linked by anything? */
        const smade_t *r = &m->made_log[at[k]];
        if (!sm_logged_link(m, r->pde_addr) && sm_word_was_fresh(m, r->pde_addr)) {
            uint64_t d = (uint64_t)r->pde_addr;
            m->linked[d >> 5] &= (uint8_t)~(1u << ((d >> 2) & 7));
        }
    }
    while (m->made && m->made_log[m->made - 1].pte_addr == SM_DEAD) m->made--;
    m->hidden_quiet += n;
    m->zapped_quiet += n;
    m->pending = 1;
    return 1;
}

/* The zap in the C copy (the pages sm_zap_pages found leave it, the word leaves `linked`) and its record for
 * Python's tables (or none: sm_cancel_made); the caller flushes the engine's TLB. The log must have room. */
static inline void sm_zap(shadowmirror_t *m, uint32_t word, const uint32_t *pages, uint32_t n) {
    uint32_t k;
    for (k = 0; k < n; k++) {
        sentry_t *e = sm_find(m, pages[k], m->serial);
        if (e) e->serial = 0;
        m->present[pages[k] >> 3] &= (uint8_t)~(1u << (pages[k] & 7));
    }
    m->linked[word >> 5] &= (uint8_t)~(1u << ((word >> 2) & 7));   /* rmap.pop(word) */
    if (n && sm_cancel_made(m, word, pages, n)) return;
    sm_record(m, SM_ZAP, 0, word);
}

/* A guest store into a page table (a ptemod) that C may emulate as ShadowPaging._on_write takes it
 * (modes/_trapfast.c for trap, modes/hw/_fastexit.c for hw --no-ept): */
typedef struct {
    uint32_t word;     /* the 4-byte word written */
    uint32_t zap;      /* 1: entries derive from it (they go: sm_ptemod_done), the caller flushes the engine's TLB */
    uint32_t npages;
    uint32_t pages[SM_ZAP_MAX];
} sm_ptemod_t;

/* May a store of `size` bytes at guest-physical `gpa` be emulated in C, with nothing else for _on_write to
 * do? The frame is traced by shadow paging alone; some entry still derives from it (else Python untraces
 * it after the store): more linked words than the invlpgs not yet taken by Python may unlink there (and
 * than the word a zap unlinks); if entries derive from the word written (a zap), it is one word, the caller
 * can flush the engine's TLB (`can_flush`) and sm_zap_pages finds them; room in the log for the records.
 * The caller must have made sure nothing is unsynchronised (else the unlink counts could be wrong). */
static inline int sm_ptemod_plan(const shadowmirror_t *m, const uint8_t *ram, uint64_t ram_bytes, uint64_t gpa,
                                 uint32_t size, int can_flush, sm_ptemod_t *p) {
    uint32_t frame = (uint32_t)gpa & 0xFFFFF000u, k, links;
    if (!m->linked || !m->serial || gpa + size > ram_bytes) return 0;
    if (!sm_pt_traced(m, gpa) || sm_other_traced(m, gpa)) return 0;
    p->word = (uint32_t)gpa & ~3u;
    p->zap = (uint32_t)sm_linked(m, p->word);
    p->npages = 0;
    if (p->zap && (((uint32_t)gpa & 3u) + size > 4u || !can_flush)) return 0;   /* one word only */
    if (!p->zap && sm_linked(m, (gpa + size - 1) & ~3ull)) return 0;
    if (m->invlpgs_unknown) return 0;           /* (sm_may_unlink_all would say so below) */
    for (k = 0, links = 0; k < 1024 / 64 && links <= m->unlinks[(frame >> 12) & 255] + p->zap; k++) {
        uint64_t w;                    /* (counted only as far as the test below needs) */
        memcpy(&w, m->linked + (frame >> 5) + 8 * k, 8);
        if (w) links += (uint32_t)__builtin_popcountll(w);
    }
    if (sm_may_unlink_all(m, frame, links - p->zap)) return 0;
    if (p->zap && !sm_zap_pages(m, ram, ram_bytes, p->word, p->pages, &p->npages)) return 0;
    return m->made + (p->zap ? 2u : 1u) <= SM_MADE;
}

/* After the store: the zap in the C copy, if any, and the ptemod counted for ShadowPaging._fold as _on_write
 * counts it (ptemods, traced_writes at `eip`, the traces' writes): by site, or beyond SM_SITES a record. */
static inline void sm_ptemod_done(shadowmirror_t *m, const sm_ptemod_t *p, uint32_t eip) {
    uint32_t k;
    if (p->zap) sm_zap(m, p->word, p->pages, p->npages);
    for (k = 0; k < m->nsites; k++) {       /* counted by site, no record (the order of counts is nobody's) */
        if (m->sites[k].eip == eip) {
            m->sites[k].count++;
            m->pending = 1;
            return;
        }
    }
    if (m->nsites < SM_SITES && m->nsites < m->sites_room) {
        m->sites[m->nsites].eip = eip;
        m->sites[m->nsites++].count = 1;
        m->pending = 1;
        return;
    }
    sm_record(m, SM_PTEMOD, 0, eip);        /* a new site beyond them: in the log's order */
}

/* The engine's TLB after a zap or an invlpg in the current root (ShadowPaging._flush_pages, which the Python
 * paths call with the same pages): each of the linear pages whose entries went (n <= SM_ZAP_MAX), or the whole
 * TLB without the page flush. A whole flush made the engine refill every page the guest used next, about two
 * microseconds each time in nanobench's pgfault loop, which made two an iteration. C paths run only while the
 * engine holds nothing the shadow dropped (shadow_ok: no trim, nothing unsynchronised), so the pages are all. */
static inline void sm_flush_pages(const shadowmirror_t *m, void *uc, int (*uc_ctl)(void *, int, ...), int ctl,
                                  const uint32_t *pages, uint32_t n) {
    uint32_t k;
    if (!n) return;
    if (!m->flush_page || n > SM_ZAP_MAX) {
        uc_ctl(uc, ctl);
        return;
    }
    for (k = 0; k < n; k++) m->flush_page(m->cpu, (uint64_t)pages[k] << 12);
}

#define SM_WP 0x10000u

/* ShadowPaging.gva_to_gpa for the hypervisor's own supervisor access (an event delivery's reads and
 * frame: side effects allowed, not the guest's access, so no shadow fill) when it answers from an entry
 * of the current root with no side effect at all: no walk, no root selection, no mode change, and no
 * write let through to a read-only page by CR0.WP = 0 that it would record (`_granted`, unless
 * `wp_granted` says it is recorded already); a write needs the entry dirty and writable. The guest-
 * physical address, or -1 (Python's). Paging must be on; RAM and traced frames are the caller's. */
static inline int64_t sm_hv_gpa(const shadowmirror_t *m, uint32_t cr0, uint32_t cr3, uint32_t cr4, uint32_t gva,
                                int write, int wp_granted) {
    const sentry_t *e = sm_entry(m, cr0, cr3, cr4, gva >> 12);
    int writable;
    if (!e) return -1;
    writable = (e->rights & SM_RW) || !(cr0 & SM_WP);
    if (writable && e->dirty && !(e->rights & SM_RW) && !wp_granted) return -1;
    if (write && !(writable && e->dirty)) return -1;
    return (int64_t)(e->gpa | (gva & 0xFFFu));
}

#endif
