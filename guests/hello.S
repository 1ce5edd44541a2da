# description: prints a greeting on COM1 and in the VGA text buffer, then PASS hello
#
# The smallest guest: boot, say hello on the serial console and on the screen, exit 0.
#if PV
#define PARAVIRT 1                      // this guest has a paravirtualized build (guests/include/pvops.inc)
#endif
#include "kernel.inc"

#define VGA_ATTR 0x1F00                 // white on blue

.text
main:
    mov esi, greeting
    call puts
    # the VGA text buffer: one 16-bit cell per character, attribute in the high byte
    mov esi, vga_message
    mov edi, VGA_TEXT
hello_vga_loop:
    movzx eax, byte ptr [esi]
    test eax, eax
    jz hello_vga_done
    or eax, VGA_ATTR
    mov word ptr [edi], ax
    inc esi
    add edi, 2
    jmp hello_vga_loop
hello_vga_done:
    PASS("hello")
    ret

.data
greeting:    .asciz "Hello from a cpuvirt guest: 32-bit protected mode, booted by Multiboot.\n"
vga_message: .asciz "Hello, VGA text buffer!"
