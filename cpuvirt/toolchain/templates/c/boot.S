/* Multiboot v1 header and entry of @NAME@ (GNU as syntax: this file is built by gcc, not by cpuvirt). */
    .section .multiboot, "a"
    .align 4
    .long 0x1BADB002                  /* magic */
    .long 0x00000003                  /* flags: modules page-aligned, memory information wanted */
    .long -(0x1BADB002 + 0x00000003)  /* checksum */

    .section .bss
    .align 16
stack_bottom:
    .skip 16384
stack_top:

    .section .text
    .global _start
_start:                               /* EAX = 0x2BADB002, EBX = multiboot_info, paging off, IF = 0 */
    mov $stack_top, %esp
    push %ebx
    push %eax
    call kmain
    push %eax                         /* kmain's return value is the exit status */
    call exit_status
1:  cli
    hlt
    jmp 1b
    .section .note.GNU-stack, "", @progbits  /* no executable stack (silences ld) */
