/* A tiny library for C guests: COM1 output, checks that print PASS/FAIL lines, and the exit status
 * through the isa-debug-exit port (0xF4), exactly as the bundled assembler guests do. */
#ifndef GUEST_H
#define GUEST_H
#include <stdint.h>

static inline void outb(uint16_t port, uint8_t v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline uint8_t inb(uint16_t port) { uint8_t v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }

/* COM1 by polling: wait until the transmit holding register is empty (LSR bit 5), then write. */
static inline void putc(char c) { while (!(inb(0x3FD) & 0x20)) {} outb(0x3F8, (uint8_t)c); }
static inline void puts(const char *s) { while (*s) putc(*s++); }
static inline void putu(uint32_t v) {
    char b[11]; int i = 10; b[i] = 0;
    do { b[--i] = (char)('0' + v % 10); v /= 10; } while (v);
    puts(b + i);
}

static int guest_failures;

/* One line per check: "PASS name" or "FAIL name: expected E, got A". */
static inline void check_eq(const char *name, uint32_t actual, uint32_t expected) {
    if (actual == expected) { puts("PASS "); puts(name); puts("\n"); return; }
    guest_failures++;
    puts("FAIL "); puts(name); puts(": expected "); putu(expected); puts(", got "); putu(actual); puts("\n");
}

struct multiboot_info { uint32_t flags, mem_lower, mem_upper, boot_device, cmdline; };

/* Called by boot.S with kmain's return value: 0 if every check passed. QEMU exits with (v << 1) | 1. */
void exit_status(int status) { outb(0xF4, (uint8_t)(status || guest_failures)); }
#endif
