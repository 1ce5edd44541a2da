/*
 * The I/O gate's common case in C, for the deprivileging modes (trap, para): a one-address code hook in
 * front of each intercepted in/out/ins/outs (cpu/iosites.py). The engine never checks I/O permission
 * (SDM Vol. 1 19.5), so cpuvirt hooks every I/O instruction; where the CPU would allow the access
 * without looking at the TSS bitmap (CPL <= the gate's `max_cpl`, outside virtual-8086 mode) Python's
 * gate does nothing, and so does this hook: it leaves the instruction to the engine and its device hook,
 * after the interrupt-window look of the intercept's caller (Vcpu.enable_intercepts, `hit`). The gate's
 * `site_cpls` (a mask: bit n for real CPL n) is what stands for "CPL <= IOPL": trap rings 0-2 (its
 * deprivileged kernel at real ring 1 is virtual ring 0, and its gate checks only ring 3), para rings
 * 0 to the IOPL the guest was granted by physdev_op(set_iopl) (none for IOPL 0). Everything else (CPL 3,
 * V86 mode, the instruction's bytes changed since they were decoded, or no host pointer to them) goes
 * to the Python hook (Intercepts._hit), which checks IOPL and the bitmap and delivers #GP.
 *
 * The port access itself (the IN/OUT instruction hooks, iogate_in_hook/iogate_out_hook), while no trace
 * is written: at a real CPL in `port_cpls` outside V86 mode (trap: ring 1, the kernel's accesses, each a
 * trap event; para: as site_cpls) the access's virtual time is spent here and the device is called
 * through `fast_in`/`fast_out` (Python: the counters, the device bus); any other access goes to the mode's
 * Python hook (`slow_in`/`slow_out`) unchanged, which spends the time itself (or refuses the access).
 *
 * Built as a Python extension module only so that setuptools compiles it; Python talks to it through
 * ctypes (cpu/iosites.py mirrors the structures).
 */
#include <Python.h>
#include <stdint.h>
#include <string.h>
#include "../engine/_vclock.h"   /* the clock's interrupt-window look (its stubs' limit) */

typedef int (*reg_read_fn)(void *uc, int regid, void *value);
typedef void (*code_fn)(void *uc, uint64_t address, uint32_t size, void *user_data);

#define EFLAGS_VM 0x20000u

/* One per vCPU: what every site's hook shares. */
typedef struct {
    uint32_t *clock_watch_if;   /* the clock's watch_if and check_if (engine/_vclock.c) */
    uint32_t *clock_check_if;
    reg_read_fn reg_read;       /* uc_reg_read */
    int32_t cs_reg, eflags_reg; /* UC_X86_REG_CS, UC_X86_REG_EFLAGS */
    uint32_t site_cpls;         /* bit n: at real CPL n the site needs no check (above) */
    uint32_t port_cpls;         /* bit n: at real CPL n the access takes the fast path (above) */
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

typedef uint32_t (*port_in_fn)(uint32_t port, uint32_t size);
typedef void (*port_out_fn)(uint32_t port, uint32_t size, uint32_t value);

/* The IN/OUT hooks' state. */
typedef struct {
    iogate_t *gate;
    vclock_time_t *clock_now;   /* the clock's time (engine/_vclock.h), and its extra */
    uint64_t *clock_extra;
    uint64_t cycles;            /* the virtual time of one port access (Vcpu's IO_CYCLES) */
    port_in_fn fast_in, slow_in;
    port_out_fn fast_out, slow_out;
    uint64_t fast;              /* accesses that took the fast path */
} ioport_t;

size_t iogate_sizeof(void) { return sizeof(iogate_t); }
size_t iogate_site_sizeof(void) { return sizeof(iosite_t); }
size_t iogate_port_sizeof(void) { return sizeof(ioport_t); }

/* Is the real CPL one of `cpls` (bit n: CPL n), outside virtual-8086 mode? */
static int at_cpls(iogate_t *g, void *uc, uint32_t cpls) {
    uint64_t cs = 0, eflags = 0;
    if (g->reg_read(uc, g->cs_reg, &cs) || g->reg_read(uc, g->eflags_reg, &eflags)) return 0;
    return !(eflags & EFLAGS_VM) && (cpls >> (cs & 3) & 1);
}

void iogate_site_hook(void *uc, uint64_t address, uint32_t size, void *user_data) {
    iosite_t *site = (iosite_t *)user_data;
    iogate_t *g = site->gate;
    if (site->code == NULL || size != site->size || size > 16 || memcmp(site->code, site->bytes, size))
        goto python;
    if (!at_cpls(g, uc, g->site_cpls)) goto python;
    vclock_look_at_if(g->clock_watch_if, g->clock_check_if);   /* VirtualClock.if_may_have_changed */
    site->passed++;
    return;
python:
    site->python(uc, address, size, NULL);
}

uint32_t iogate_in_hook(void *uc, uint32_t port, int size, void *user_data) {
    ioport_t *p = (ioport_t *)user_data;
    if (!at_cpls(p->gate, uc, p->gate->port_cpls)) return p->slow_in(port, (uint32_t)size);
    vclock_advance(p->clock_now, p->clock_extra, p->cycles);
    p->fast++;
    return p->fast_in(port, (uint32_t)size);
}

void iogate_out_hook(void *uc, uint32_t port, int size, uint32_t value, void *user_data) {
    ioport_t *p = (ioport_t *)user_data;
    if (!at_cpls(p->gate, uc, p->gate->port_cpls)) {
        p->slow_out(port, (uint32_t)size, value);
        return;
    }
    vclock_advance(p->clock_now, p->clock_extra, p->cycles);
    p->fast++;
    p->fast_out(port, (uint32_t)size, value);
}

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_iogate", NULL, -1, NULL};

PyMODINIT_FUNC PyInit__iogate(void) { return PyModule_Create(&module); }
