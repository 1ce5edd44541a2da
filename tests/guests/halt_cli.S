# description: halts with interrupts disabled (nothing can ever wake it)
#include "kernel.inc"
.text
main:
    cli
    hlt
    ret
