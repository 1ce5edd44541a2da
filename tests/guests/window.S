# description: a timer interrupt arrives while IF = 0; it must be taken as soon as IF = 1
#include "kernel.inc"
.text
main:
    SET_HANDLER(0x20, window_tick)
    mov ax, PIT_DIVISOR(1000)
    call pit_start_periodic
    mov al, 0xFE
    out PIC1_DATA, al
    mov ecx, 1500000                    # about 3 ms of guest time with IF = 0: IRQ 0 is pending
window_spin:
    dec ecx
    jnz window_spin
    CHECK_EQ("no tick while IF = 0", dword ptr [ticks], 0)
    sti
    mov ecx, 2000                       # the pending tick is taken here, with IF = 1
window_open:
    dec ecx
    jnz window_open
    cli
    CHECK_EQ("the pending tick was taken once IF = 1", dword ptr [ticks], 1)
    sti
    hlt                                 # and the next tick wakes hlt
    cli
    CHECK_EQ("the next tick woke hlt", dword ptr [ticks], 2)
    mov al, 0xFF
    out PIC1_DATA, al
    ret
window_tick:
    inc dword ptr [ticks]
    mov al, 0x20
    out PIC1_CMD, al
    ret
.data
ticks: .long 0
