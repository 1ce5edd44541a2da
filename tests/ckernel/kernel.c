/* A small freestanding C kernel, as the OS-development tutorials build them: prints over COM1,
 * checks the Multiboot hand-off, computes something, and exits through isa-debug-exit. */
#include <stdint.h>

static inline void outb(uint16_t port, uint8_t v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline uint8_t inb(uint16_t port) { uint8_t v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }

static void putc(char c) { while (!(inb(0x3FD) & 0x20)) {} outb(0x3F8, (uint8_t)c); }
static void puts(const char *s) { while (*s) putc(*s++); }
static void putu(uint32_t v) { char b[11]; int i = 10; b[i] = 0; do { b[--i] = '0' + v % 10; v /= 10; } while (v); puts(b + i); }

struct multiboot_info { uint32_t flags, mem_lower, mem_upper; };

static uint32_t fib(uint32_t n) { return n < 2 ? n : fib(n - 1) + fib(n - 2); }
static uint8_t sieve[10000];

void kmain(uint32_t magic, struct multiboot_info *mbi) {
    puts("C kernel: ");
    puts(magic == 0x2BADB002 ? "booted by Multiboot\n" : "FAIL bad magic\n");
    puts((mbi->flags & 1) && mbi->mem_lower == 639 ? "PASS mem_lower\n" : "FAIL mem_lower\n");
    puts("fib(20) = "); putu(fib(20)); puts("\n");
    uint32_t primes = 0;
    for (uint32_t i = 2; i < sizeof sieve; i++) {
        if (sieve[i]) continue;
        primes++;
        for (uint32_t j = i * 2; j < sizeof sieve; j += i) sieve[j] = 1;
    }
    puts("primes below 10000: "); putu(primes); puts("\n");
    outb(0xF4, primes == 1229 ? 0 : 1);
}
