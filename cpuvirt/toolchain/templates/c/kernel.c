/* @NAME@: a C guest for cpuvirt (and QEMU). Build with `make`, run with
 * `cpuvirt run @NAME@.elf --mode native|trap|full|hw` (C guests have no paravirtualized build). */
#include "guest.h"

static uint32_t fib(uint32_t n) { return n < 2 ? n : fib(n - 1) + fib(n - 2); }

int kmain(uint32_t magic, struct multiboot_info *mbi) {
    check_eq("booted by a Multiboot loader", magic, 0x2BADB002);
    check_eq("the loader reports lower memory (640 KiB - 1 KiB)", (mbi->flags & 1) ? mbi->mem_lower : 0, 639);
    check_eq("fib(20)", fib(20), 6765);
    return 0;
}
