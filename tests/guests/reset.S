# description: the guest asks for a reset; QEMU with -no-reboot powers off there, cpuvirt ends the run
# with outcome `reset`, status 125 (machine/reset.py). CASE picks how:
#   1: port 0x92 bit 0 (fast reset)   2: 0xCF9 bit 2 (PIIX3 reset control)   3: the 8042's 0xFE pulse
#   4: the 8042's output port (0xD1) with bit 0 clear
#include "kernel.inc"
#ifndef CASE
#define CASE 1
#endif
.text
main:
    in al, 0x92
    movzx eax, al
    CHECK_EQ("port 0x92 as SeaBIOS leaves it", eax, 2)
    mov al, 0xD0
    out 0x64, al
    in al, 0x60
    movzx eax, al
    CHECK_EQ("the 8042 output port", eax, 0xCF)
    mov dx, 0xCF9
    in al, dx
    movzx eax, al
    CHECK_EQ("the reset control register", eax, 0)
#if CASE == 1
    mov al, 2
    out 0x92, al
    mov al, 3
    out 0x92, al
#elif CASE == 2
    mov dx, 0xCF9
    mov al, 2
    out dx, al
    mov al, 6
    out dx, al
#elif CASE == 3
    mov al, 0xFE
    out 0x64, al
#elif CASE == 4
    mov al, 0xD1
    out 0x64, al
    mov al, 0x4E
    out 0x60, al
#endif
    FAIL("reset", "the machine went on after the reset request")
    ret
