/*
 * The 16-byte alignment check of legacy-SSE instructions, in C (SDM Vol. 2A 2.4, "Instruction
 * Exception Specification": a legacy-SSE instruction with a 128-bit memory operand raises #GP(0) when
 * the operand's linear address is not a multiple of 16, but for movups/movupd/movdqu/lddqu and the
 * SSE4.2 string compares). Unicorn 2.1.3 (QEMU 5's TCG) makes no such check.
 *
 * cpu/intercept.py finds the sites when their page is first fetched (or their block first translated)
 * and cpu/ssealign.py puts align_hook on each, with the operand's addressing form decoded once (base,
 * index, scale, displacement, segment). Each execution then costs the engine's call of this hook: the
 * effective address from two register reads, the segment base and the code size from one context save
 * (the engine's register interface gives no DS/ES/SS base). An aligned operand (the common case) ends
 * here; anything else goes to the Python hook behind it, which decodes the instruction again as the
 * CPU sees it and raises #GP(0) if the operand really is misaligned: real-address and virtual-8086
 * mode, 16-bit code, code that changed since it was decoded (its size, or its bytes in the guest
 * frame it was decoded from: the site is then re-aimed at the new instruction, which may be no
 * aligned-SSE one at all), and the misaligned case itself. A linear page that has held code from
 * more than one frame (processes at the same address) has its sites checked in Python only.
 *
 * Built as a Python extension only so that setuptools compiles it; Python calls it through ctypes.
 */
#include <Python.h>
#include <stdint.h>
#include <string.h>

typedef int (*reg_read_fn)(void *uc, int regid, void *value);
typedef int (*context_fn)(void *uc, void *context);
typedef void (*code_fn)(void *uc, uint64_t address, uint32_t size, void *user_data);

/* QEMU's env->hflags bits (target/i386/cpu.h) */
#define HF_CS32 (1u << 4)
#define HF_PE (1u << 7)
#define HF_VM (1u << 17)
#define SEG_CACHE_BYTES 24     /* QEMU's SegmentCache: selector u32, (pad), base u64, limit u32, flags u32 */
#define SEG_BASE 8

typedef struct {
    reg_read_fn reg_read;      /* uc_reg_read */
    context_fn context_save;   /* uc_context_save */
    void *context;             /* a uc_context of this engine */
    uint8_t *context_hflags;   /* env->hflags inside it (cpu/quirks.py finds the offset) */
    uint8_t *context_segs;     /* env->segs[0] inside it (cpu/deprivilege.segs_offset) */
    uint64_t checks;           /* executions checked here */
    uint64_t passed;           /* ... found aligned here */
} align_t;

/* One hooked address: the instruction decoded there, with its memory operand's addressing form when it
 * is an aligned-SSE one decoded as 32-bit code, and the bytes it was decoded from. */
typedef struct {
    align_t *s;
    code_fn python;            /* Intercepts._hit, guarded */
    int32_t base, index;       /* Unicorn register ids, or -1 */
    uint32_t scale, disp;
    uint32_t seg;              /* QEMU's segment index: ES CS SS DS FS GS */
    uint32_t size;             /* the instruction's length when decoded; 0: always Python */
    uint32_t valid;            /* 0: the code at this address is no longer this instruction (TC flush) */
    uint32_t check;            /* 1: an m128 operand to check; 0: the bytes are no such instruction */
    const uint8_t *code;       /* the instruction's bytes in guest RAM (host memory), or NULL */
    uint8_t bytes[16];         /* ... as they were when decoded */
} align_site_t;

size_t align_sizeof(void) { return sizeof(align_t); }
size_t align_site_sizeof(void) { return sizeof(align_site_t); }

static int reg32(align_t *s, void *uc, int32_t id, uint32_t *out) {
    uint64_t v = 0;
    if (id < 0) {
        *out = 0;
        return 0;
    }
    if (s->reg_read(uc, id, &v)) return 1;
    *out = (uint32_t)v;
    return 0;
}

void align_hook(void *uc, uint64_t address, uint32_t size, void *user_data) {
    align_site_t *site = (align_site_t *)user_data;
    align_t *s = site->s;
    uint32_t base, index, hflags, ea;
    uint64_t seg_base;
    if (!site->valid) return;
    /* Code rewritten since it was decoded (self-modifying code, a reused frame): Python decodes it
     * again and re-aims this site. */
    if (size != site->size || (site->code && memcmp(site->code, site->bytes, size))) goto python;
    if (!site->check) return;
    s->checks++;
    if (reg32(s, uc, site->base, &base) || reg32(s, uc, site->index, &index)
        || s->context_save(uc, s->context)) goto python;
    memcpy(&hflags, s->context_hflags, 4);
    if ((hflags & (HF_PE | HF_VM | HF_CS32)) != (HF_PE | HF_CS32)) goto python;   /* not 32-bit protected */
    memcpy(&seg_base, s->context_segs + SEG_CACHE_BYTES * site->seg + SEG_BASE, 8);
    ea = site->disp + base + index * site->scale;
    if (((uint32_t)seg_base + ea) & 15) goto python;
    s->passed++;
    return;
python:
    site->python(uc, address, size, NULL);
}

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_ssealign", NULL, -1, NULL};

PyMODINIT_FUNC PyInit__ssealign(void) { return PyModule_Create(&module); }
