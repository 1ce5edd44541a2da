# description: spins forever with interrupts off (the instruction budget must end it)
#include "kernel.inc"
.text
main:
spin_forever:
    jmp spin_forever
