# description: loads an empty IDT, then faults: #UD -> #GP (IDT limit) -> #DF -> triple fault
#include "kernel.inc"
.text
main:
    lidt [empty_idtr]
    ud2
    ret
.data
empty_idtr:
    .word 0
    .long 0
