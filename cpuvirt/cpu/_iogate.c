/*
 * The I/O gate's common case in C, for the deprivileging modes (trap, para): a one-address code hook in
 * front of each intercepted in/out/ins/outs (cpu/iosites.py). The engine never checks I/O permission
 * (SDM Vol. 1 19.5), so cpuvirt hooks every I/O instruction; where the CPU would allow the access
 * without looking at the TSS bitmap (CPL <= the gate's `max_cpl`, outside virtual-8086 mode) Python's
 * gate does nothing, and so does this hook: it leaves the instruction to the engine and its device hook,
 * after the interrupt-window look of the intercept's caller (Vcpu.enable_intercepts, `hit`). `max_cpl`
 * is what stands for "CPL <= IOPL": trap and full 2 (the deprivileged kernel at real ring 1 or 2 is
 * virtual ring 0), para the IOPL the guest was granted by physdev_op(set_iopl). Everything else (CPL 3,
 * V86 mode, the instruction's bytes changed since they were decoded, or no host pointer to them) goes
 * to the Python hook (Intercepts._hit), which checks IOPL and the bitmap and delivers #GP.
 *
 * Built as a Python extension module only so that setuptools compiles it; Python talks to it through
 * ctypes (cpu/iosites.py mirrors the structures).
 */
#include <Python.h>
#include <stdint.h>
#include <string.h>

typedef int (*reg_read_fn)(void *uc, int regid, void *value);
typedef void (*code_fn)(void *uc, uint64_t address, uint32_t size, void *user_data);

#define EFLAGS_VM 0x20000u

/* One per vCPU: what every site's hook shares. */
typedef struct {
    uint32_t *clock_watch_if;   /* the clock's watch_if and check_if (engine/_vclock.c) */
    uint32_t *clock_check_if;
    reg_read_fn reg_read;       /* uc_reg_read */
    int32_t cs_reg, eflags_reg; /* UC_X86_REG_CS, UC_X86_REG_EFLAGS */
    uint32_t max_cpl;           /* the highest real CPL whose I/O needs no check (above) */
    uint32_t pad;
} iogate_t;

/* One per intercepted I/O instruction. */
typedef struct {
    iogate_t *gate;
    code_fn python;             /* Intercepts._hit, guarded */
    const uint8_t *code;        /* where the instruction's bytes are in host memory (NULL: Python) */
    uint32_t size;              /* 0: always Python */
    uint32_t pad;
    uint64_t passed;            /* times the common case was answered here */
    uint8_t bytes[16];          /* the bytes it was decoded from */
} iosite_t;

size_t iogate_sizeof(void) { return sizeof(iogate_t); }
size_t iogate_site_sizeof(void) { return sizeof(iosite_t); }

void iogate_site_hook(void *uc, uint64_t address, uint32_t size, void *user_data) {
    iosite_t *site = (iosite_t *)user_data;
    iogate_t *g = site->gate;
    uint64_t cs = 0, eflags = 0;
    if (site->code == NULL || size != site->size || size > 16 || memcmp(site->code, site->bytes, size))
        goto python;
    if (g->reg_read(uc, g->cs_reg, &cs) || g->reg_read(uc, g->eflags_reg, &eflags)) goto python;
    if ((cs & 3) > g->max_cpl || (eflags & EFLAGS_VM)) goto python;
    if (*g->clock_watch_if && !*g->clock_check_if) *g->clock_check_if = 1;   /* VirtualClock.if_may_have_changed */
    site->passed++;
    return;
python:
    site->python(uc, address, size, NULL);
}

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_iogate", NULL, -1, NULL};

PyMODINIT_FUNC PyInit__iogate(void) { return PyModule_Create(&module); }
