/*
 * CPUID answered in C from a table that Python fills with cpuvirt's CPU model (x86/cpuid.py).
 *
 * Unicorn asks a hook for every cpuid; answered in Python it costs a hook call and four register
 * writes through the binding (about 18 us here), and kvm-unit-tests' vmexit runs its cpuid loop for
 * 2^30 virtual cycles, a few hundred million times. The model has no subleaves and answers every
 * leaf outside its table with one fallback entry (SDM: the highest basic leaf's data), so a table
 * of a few entries is the whole model. Modes that intercept CPUID (hw: an unconditional VM exit)
 * keep their Python hook.
 *
 * Built as a Python extension module only so that setuptools compiles it; Python talks to it through
 * ctypes (cpuvirt/engine/cpuid.py mirrors the structure and checks its size).
 */
#include <Python.h>
#include <stdint.h>

typedef int (*reg_read_fn)(void *uc, int regid, void *value);
typedef int (*reg_write_fn)(void *uc, int regid, const void *value);

#define MAX_LEAVES 16

typedef struct {
    uint32_t leaf, eax, ebx, ecx, edx;
} leaf_t;

typedef struct {
    reg_read_fn reg_read;    /* uc_reg_read */
    reg_write_fn reg_write;  /* uc_reg_write */
    int32_t eax_reg, ebx_reg, ecx_reg, edx_reg;   /* UC_X86_REG_* */
    uint32_t count;          /* leaves in use */
    uint32_t pad;
    uint64_t answered;       /* cpuid instructions answered here */
    leaf_t fallback;         /* any leaf not in the table */
    leaf_t leaves[MAX_LEAVES];
} cpuid_table_t;

size_t cpuid_table_sizeof(void) { return sizeof(cpuid_table_t); }

/* UC_HOOK_INSN (UC_X86_INS_CPUID): returning 1 tells the engine the instruction was handled. */
int cpuid_hook(void *uc, void *user_data) {
    cpuid_table_t *t = (cpuid_table_t *)user_data;
    uint64_t eax = 0;
    t->reg_read(uc, t->eax_reg, &eax);
    const leaf_t *e = &t->fallback;
    for (uint32_t i = 0; i < t->count && i < MAX_LEAVES; i++) {
        if (t->leaves[i].leaf == (uint32_t)eax) {
            e = &t->leaves[i];
            break;
        }
    }
    uint64_t v;
    v = e->eax; t->reg_write(uc, t->eax_reg, &v);
    v = e->ebx; t->reg_write(uc, t->ebx_reg, &v);
    v = e->ecx; t->reg_write(uc, t->ecx_reg, &v);
    v = e->edx; t->reg_write(uc, t->edx_reg, &v);
    t->answered++;
    return 1;
}

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cpuid", NULL, -1, NULL};

PyMODINIT_FUNC PyInit__cpuid(void) { return PyModule_Create(&module); }
