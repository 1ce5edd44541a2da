/*
 * Finding and writing an entry of a loaded library's GOT (the slot its PLT jumps through for an imported
 * or interposable symbol). libunicorn 2.1.3 is bound lazily and calls even its own exported functions
 * through its PLT, so one slot redirects every such call: engine/_vclock.c points gettimeofday at the TLB's
 * clock, memory/_tlbfill.c puts a wrapper in front of cpu_restore_state.
 */
#ifndef CPUVIRT_GOT_H
#define CPUVIRT_GOT_H

#include <elf.h>
#include <link.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>

typedef struct {
    const char *lib, *symbol;
    uintptr_t slot;     /* the GOT entry found */
    int seen;           /* the library was found */
} got_search_t;

static uintptr_t relocated(uintptr_t ptr, uintptr_t base) { return ptr < base ? ptr + base : ptr; }

static int find_got_entry(struct dl_phdr_info *info, size_t size, void *data) {
    got_search_t *g = (got_search_t *)data;
    const ElfW(Dyn) *dyn = NULL;
    const ElfW(Sym) *symtab = NULL;
    const char *strtab = NULL;
    const ElfW(Rela) *tables[2] = {NULL, NULL};
    size_t sizes[2] = {0, 0}, i, k;
    (void)size;
    if (!info->dlpi_name || !strstr(info->dlpi_name, g->lib)) return 0;
    g->seen = 1;
    for (i = 0; i < info->dlpi_phnum; i++)
        if (info->dlpi_phdr[i].p_type == PT_DYNAMIC) dyn = (const ElfW(Dyn) *)(info->dlpi_addr + info->dlpi_phdr[i].p_vaddr);
    if (!dyn) return 1;
    for (; dyn->d_tag != DT_NULL; dyn++) {
        switch (dyn->d_tag) {
        case DT_SYMTAB: symtab = (const ElfW(Sym) *)relocated(dyn->d_un.d_ptr, info->dlpi_addr); break;
        case DT_STRTAB: strtab = (const char *)relocated(dyn->d_un.d_ptr, info->dlpi_addr); break;
        case DT_JMPREL: tables[0] = (const ElfW(Rela) *)relocated(dyn->d_un.d_ptr, info->dlpi_addr); break;
        case DT_PLTRELSZ: sizes[0] = dyn->d_un.d_val; break;
        case DT_RELA: tables[1] = (const ElfW(Rela) *)relocated(dyn->d_un.d_ptr, info->dlpi_addr); break;
        case DT_RELASZ: sizes[1] = dyn->d_un.d_val; break;
        }
    }
    if (!symtab || !strtab) return 1;
    for (k = 0; k < 2; k++) {
        for (i = 0; tables[k] && i < sizes[k] / sizeof(ElfW(Rela)); i++) {
            const ElfW(Rela) *r = &tables[k][i];
            uint32_t type = ELF64_R_TYPE(r->r_info);
            if (type != R_X86_64_JUMP_SLOT && type != R_X86_64_GLOB_DAT) continue;
            if (strcmp(strtab + symtab[ELF64_R_SYM(r->r_info)].st_name, g->symbol) == 0) {
                g->slot = info->dlpi_addr + r->r_offset;
                return 1;
            }
        }
    }
    return 1;
}

/* Write `value` into the GOT slot (its page made writable first): 1 = done. */
static int got_write(uintptr_t slot, void *value) {
    uintptr_t page = slot & ~(uintptr_t)4095;
    if (mprotect((void *)page, 4096 + ((slot + sizeof(void *) > page + 4096) ? 4096 : 0), PROT_READ | PROT_WRITE))
        return 0;
    *(void **)slot = value;
    return 1;
}

#endif
