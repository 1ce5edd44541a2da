/*
 * The APIC-access page of the simulated VT-x processor, in C: the engine's MMIO callbacks for the host
 * page that EPT maps the guest's local APIC to (SDM Vol. 3C 29.4, "Virtualizing Memory-Mapped APIC
 * Accesses"). A guest access that the SDM lets the processor virtualize is served here from the
 * virtual-APIC page, with no VM exit and no Python: a read returns the page's bytes (29.4.2); a write
 * goes into the page and APIC-write emulation follows (29.4.3.2). Everything else calls back into the
 * simulated processor (modes/hw/apicv.py), which performs the VM exit: APIC_ACCESS (44) for an access
 * that is not virtualized, APIC_WRITE (56) or TPR_BELOW_THRESHOLD (43) after a virtualized write.
 *
 * The rules, by the controls (virtual-interrupt delivery is not simulated, so it is 0 here):
 * - reads (29.4.2): an exit if "use TPR shadow" is 0, the access is wider than 4 bytes, or it is not
 *   inside the low 4 bytes of a 16-byte register; else virtualized if its offset is in TPR (080H-083H),
 *   or, with "APIC-register virtualization", in one of the registers READ_VIRTUALIZED lists.
 * - writes (29.4.3.1): TPR only (offset 080H), or, with APIC-register virtualization, entirely within
 *   one of the registers WRITE_VIRTUALIZED lists; else an exit.
 * - APIC-write emulation (29.4.3.2): 080H clears bytes 3:1 of VTPR, then TPR virtualization (29.1.2:
 *   TPR_BELOW_THRESHOLD when VTPR[7:4] < TPR threshold[3:0]); 310H-313H clears bytes 2:0 of VICR_HI,
 *   nothing else; any other offset (EOI and ICR low too, without virtual-interrupt delivery): APIC_WRITE
 *   with the offset as qualification.
 *
 * Built as a Python extension only so that setuptools compiles it; apicv.py loads it with ctypes and
 * hands it its state (apicv_t) as the regions' user data.
 */
#include <Python.h>
#include <stdint.h>
#include <string.h>

/* What the simulated processor is asked to do: kind, page offset, access size, value written. */
enum { APIC_ACCESS_READ = 0, APIC_ACCESS_WRITE = 1, APIC_WRITE_EXIT = 2, TPR_BELOW = 3 };
typedef uint64_t (*exit_fn)(uint32_t kind, uint32_t offset, uint32_t size, uint64_t value);

typedef struct {
    uint8_t *vapic;              /* the virtual-APIC page (4 KiB in hypervisor memory) */
    exit_fn on_exit;
    uint32_t tpr_shadow;         /* "use TPR shadow" */
    uint32_t register_virt;      /* "APIC-register virtualization" */
    uint32_t tpr_threshold;      /* TPR_THRESHOLD bits 3:0 */
    uint32_t pad;
    uint64_t reads, writes;      /* accesses virtualized with no VM exit */
} apicv_t;

size_t apicv_sizeof(void) { return sizeof(apicv_t); }

/* Registers (offset >> 4) whose low 4 bytes a read may be served from the virtual-APIC page with
 * APIC-register virtualization (SDM 29.4.2): ID, version, TPR, EOI, LDR, DFR, SVR, ISR, TMR, IRR,
 * ESR, ICR low/high, the six LVT entries, initial count, divide configuration. Not APR, PPR, RRD nor
 * the current count (0x390), which always exit. */
static int read_virtualized(uint32_t reg) {
    switch (reg) {
    case 0x02: case 0x03: case 0x08: case 0x0B: case 0x0D: case 0x0E: case 0x0F:
    case 0x28: case 0x30: case 0x31: case 0x38: case 0x3E:
        return 1;
    default:
        return (reg >= 0x10 && reg <= 0x27) || (reg >= 0x32 && reg <= 0x37);
    }
}

/* Registers a write may go to with APIC-register virtualization (SDM 29.4.3.1): ID, TPR, EOI, LDR,
 * DFR, SVR, ESR, ICR low/high, the LVT entries, initial count, divide configuration. */
static int write_virtualized(uint32_t reg) {
    switch (reg) {
    case 0x02: case 0x08: case 0x0B: case 0x0D: case 0x0E: case 0x0F:
    case 0x28: case 0x30: case 0x31: case 0x38: case 0x3E:
        return 1;
    default:
        return reg >= 0x32 && reg <= 0x37;
    }
}

/* Inside the low 4 bytes of one 16-byte register, and at most 4 bytes wide. */
static inline int in_low_dword(uint64_t offset, unsigned size) {
    return size <= 4 && (offset & 0xF) + size <= 4;
}

uint64_t apicv_read(void *uc, uint64_t offset, unsigned size, void *user_data) {
    apicv_t *s = (apicv_t *)user_data;
    uint32_t reg = (uint32_t)(offset >> 4) & 0xFF;
    (void)uc;
    if (s->tpr_shadow && in_low_dword(offset, size) &&
        (reg == 0x08 || (s->register_virt && read_virtualized(reg)))) {
        uint64_t value = 0;
        memcpy(&value, s->vapic + offset, size);
        s->reads++;
        return value;
    }
    return s->on_exit(APIC_ACCESS_READ, (uint32_t)offset, size, 0);
}

void apicv_write(void *uc, uint64_t offset, unsigned size, uint64_t value, void *user_data) {
    apicv_t *s = (apicv_t *)user_data;
    uint32_t reg = (uint32_t)(offset >> 4) & 0xFF;
    int virtualized;
    (void)uc;
    if (!s->tpr_shadow || size > 4)
        virtualized = 0;
    else if (s->register_virt)
        virtualized = in_low_dword(offset, size) && write_virtualized(reg);
    else
        virtualized = offset == 0x80;
    if (!virtualized) {
        s->on_exit(APIC_ACCESS_WRITE, (uint32_t)offset, size, value);
        return;
    }
    memcpy(s->vapic + offset, &value, size);
    s->writes++;
    /* APIC-write emulation, after the write (29.4.3.2). */
    if (reg == 0x08) {
        memset(s->vapic + 0x81, 0, 3);
        if ((uint32_t)(s->vapic[0x80] >> 4) < (s->tpr_threshold & 0xF))
            s->on_exit(TPR_BELOW, 0x80, size, 0);
    } else if (reg == 0x31) {
        memset(s->vapic + 0x310, 0, 3);
    } else {
        s->on_exit(APIC_WRITE_EXIT, (uint32_t)offset, size, value);
    }
}

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_apicv", NULL, -1, NULL};

PyMODINIT_FUNC PyInit__apicv(void) { return PyModule_Create(&module); }
