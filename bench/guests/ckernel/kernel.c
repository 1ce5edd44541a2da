/* A compute-bound C kernel for bench/ckernel.py (gcc -m32 -O2 -DROUNDS=n): table-driven CRC-32,
 * a byte sieve, recursive fib and an insertion sort, ROUNDS times, with interrupts disabled
 * throughout (the firmware's PIT raises IRQ 0 after 55 ms of virtual time, and it stays pending).
 * The hot arrays are small and come first in .bss, right after .text: they share its last page.
 * Prints "ckernel ROUNDS=<n> checksum=<hex>" on COM1 and exits through isa-debug-exit (0). */
#include <stdint.h>

#ifndef ROUNDS
#define ROUNDS 10
#endif

static inline void outb(uint16_t port, uint8_t v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline uint8_t inb(uint16_t port) { uint8_t v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static void putc(char c) { while (!(inb(0x3FD) & 0x20)) {} outb(0x3F8, (uint8_t)c); }
static void puts(const char *s) { while (*s) putc(*s++); }
static void putx(uint32_t v) { for (int i = 28; i >= 0; i -= 4) putc("0123456789abcdef"[(v >> i) & 15]); }
static void putu(uint32_t v) { char b[11]; int i = 10; b[i] = 0; do { b[--i] = '0' + v % 10; v /= 10; } while (v); puts(b + i); }

uint32_t crc_table[256];
uint8_t sieve[2048];
uint32_t sortbuf[96];
uint8_t data[4096];

static void crc_init(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = c & 1 ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        crc_table[i] = c;
    }
}

static uint32_t crc32(const uint8_t *p, uint32_t n, uint32_t c) {
    c = ~c;
    while (n--) c = crc_table[(c ^ *p++) & 0xFF] ^ (c >> 8);
    return ~c;
}

static uint32_t count_primes(void) {
    uint32_t primes = 0;
    for (uint32_t i = 0; i < sizeof sieve; i++) sieve[i] = 0;
    for (uint32_t i = 2; i < sizeof sieve; i++) {
        if (sieve[i]) continue;
        primes++;
        for (uint32_t j = i * 2; j < sizeof sieve; j += i) sieve[j] = 1;
    }
    return primes;
}

__attribute__((noinline)) static uint32_t fib(uint32_t n) { return n < 2 ? n : fib(n - 1) + fib(n - 2); }

static uint32_t sort(uint32_t seed) {
    for (uint32_t i = 0; i < 96; i++) { seed = seed * 1103515245u + 12345u; sortbuf[i] = seed >> 8; }
    for (uint32_t i = 1; i < 96; i++) {
        uint32_t v = sortbuf[i], j = i;
        while (j && sortbuf[j - 1] > v) { sortbuf[j] = sortbuf[j - 1]; j--; }
        sortbuf[j] = v;
    }
    return sortbuf[0] ^ sortbuf[95];
}

void kmain(void) {
    uint32_t sum = 0;
    crc_init();
    for (uint32_t i = 0; i < sizeof data; i++) data[i] = (uint8_t)(i * 7 + 3);
    for (uint32_t r = 0; r < ROUNDS; r++) {
        sum = crc32(data, sizeof data, sum);
        sum += count_primes();
        sum += fib(16);
        sum ^= sort(sum);
        data[r & 4095] ^= (uint8_t)sum;
    }
    puts("ckernel ROUNDS="); putu(ROUNDS); puts(" checksum="); putx(sum); puts("\n");
    outb(0xF4, 0);
}
