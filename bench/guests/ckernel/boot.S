/* Multiboot v1 header and entry (GNU as). Interrupts stay disabled from here to the exit. */
    .section .multiboot, "a"
    .align 4
    .long 0x1BADB002
    .long 0x00000003
    .long -(0x1BADB002 + 0x00000003)

    .section .text
    .global _start
_start:
    mov $stack_top, %esp
    call kmain
1:  hlt
    jmp 1b

    .section .bss
    .align 16
    .skip 8192
stack_top:
