/*
 * The local APIC's ID register read in C (machine/apicmmio.py).
 *
 * A kernel that finds its CPU by the APIC ID (xv6's mycpu(), on every pushcli) reads 0xFEE00020
 * tens of millions of times; each read was the engine's MMIO callback into Python. The model's read
 * (machine/apic.py LocalApic.read) first catches the timer up with virtual time, which has an effect
 * only once the next zero crossing is due: before then a 4-byte read of the ID register returns
 * id << 24 and changes nothing. That is all this callback answers; everything else (another
 * register, another width, a due timer, a trace being written) is the Python callback's, unchanged.
 * Python keeps `id_value` and `fire_at` equal to the model's after every change of either
 * (LocalApic.on_registers), and folds `reads` into the run's `mmio` event count.
 *
 * Built as a Python extension only so that setuptools compiles it; loaded with ctypes.
 */
#include <Python.h>
#include <stdint.h>
#include "../engine/_vclock.h"   /* the clock's time */

typedef uint64_t (*mmio_read_fn)(void *uc, uint64_t offset, unsigned size, void *user_data);
typedef void (*mmio_write_fn)(void *uc, uint64_t offset, unsigned size, uint64_t value, void *user_data);

typedef struct {
    const vclock_time_t *now;  /* the virtual clock's time (engine/_vclock.h) */
    uint64_t fire_at;          /* virtual time of the timer's next zero crossing (UINT64_MAX: none) */
    uint64_t reads;            /* ID reads answered here (counted as `mmio` events by Python) */
    mmio_read_fn python_read;  /* the model's read, guarded by the binding's callback wrapper */
    mmio_write_fn python_write;
    uint32_t id_value;         /* LocalApic.id << 24 */
    uint32_t enabled;          /* 0: every read is Python's (a trace is written, or not installed) */
} apicmmio_t;

size_t apicmmio_sizeof(void) { return sizeof(apicmmio_t); }

#define APIC_ID 0x20

uint64_t apicmmio_read(void *uc, uint64_t offset, unsigned size, void *user_data) {
    apicmmio_t *s = (apicmmio_t *)user_data;
    if (s->enabled && size == 4 && (offset & 0xFF0) == APIC_ID && vclock_now(s->now) < s->fire_at) {
        s->reads++;
        return s->id_value;
    }
    return s->python_read(uc, offset, size, NULL);
}

void apicmmio_write(void *uc, uint64_t offset, unsigned size, uint64_t value, void *user_data) {
    apicmmio_t *s = (apicmmio_t *)user_data;
    s->python_write(uc, offset, size, value, NULL);
}

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_apicmmio", NULL, -1, NULL};

PyMODINIT_FUNC PyInit__apicmmio(void) { return PyModule_Create(&module); }
