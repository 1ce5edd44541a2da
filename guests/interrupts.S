# description: 8259A remapped to 0x20-0x2F, 8254 PIT at 100 Hz: IRQ 0 ticks with EOI, IMR/ISR/IRR reads
#
# kernel.inc's pic_init has remapped both 8259As (ICW1-ICW4, vectors 0x20-0x2F) and masked all
# lines. Here we unmask IRQ 0 only, program PIT channel 0 for 100 Hz (mode 2, lobyte/hibyte),
# and wait with `sti; hlt` until the IRQ 0 handler, which acknowledges each tick with an EOI,
# has counted 5 ticks. Nothing printed depends on timing.
#include "kernel.inc"

#define TICKS_WANTED 5
#define TIMER_HZ 100
#define FAST_DIVISOR 64                 // ~18.6 kHz, for the masked-IRR check
#define IRR_POLL_LIMIT 2000000

.text
main:
    SET_HANDLER(VEC_IRQ0, timer_handler)
    SET_HANDLER(VEC_SPURIOUS_MASTER, spurious_handler)  # a spurious IRQ 7/15 needs no EOI
    SET_HANDLER(VEC_SPURIOUS_SLAVE, spurious_handler)

    mov ax, 0xFFFE                      # slave: all masked; master: only IRQ 0 open
    call pic_set_mask
    call pic_get_mask
    movzx eax, ax
    CHECK_EQ("IMR (OCW1) reads back: only IRQ 0 unmasked", eax, 0xFFFE)
    call pic_read_isr
    movzx eax, ax
    CHECK_EQ("ISR is empty after ICW1 re-initialisation", eax, 0)

    mov ax, PIT_DIVISOR(TIMER_HZ)
    call pit_start_periodic
timer_wait:
    sti
    hlt                                 # sti's interrupt shadow covers hlt: no wake-up is lost
timer_woke:
    cli
    cmp dword ptr [ticks], TICKS_WANTED
    jb timer_wait
    mov ax, 0xFFFF                      # mask IRQ 0 again
    call pic_set_mask

    mov eax, dword ptr [ticks]
    cmp eax, TICKS_WANTED
    setae al
    movzx eax, al
    CHECK_EQ("IRQ 0 from the PIT reaches the CPU: 5 ticks counted", eax, 1)
    CHECK_EQ("IRQ 0 arrives on the remapped vector 0x20", dword ptr [first_vector], VEC_IRQ0)
    CHECK_EQ("the interrupt gate cleared IF in the handler", dword ptr [handler_if], 0)
    CHECK_EQ("the saved EFLAGS has IF = 1 (interrupts were enabled)", dword ptr [saved_if], EFLAGS_IF)
    CHECK_EQ("an interrupt in hlt returns to the instruction after hlt", dword ptr [eip_mismatches], 0)
    CHECK_EQ("ISR (OCW3) shows IRQ 0 in service inside the handler", dword ptr [isr_before_eoi], 0x0001)
    CHECK_EQ("EOI (OCW2) clears IRQ 0 from the ISR", dword ptr [isr_after_eoi], 0)

    # A masked line is still latched in the IRR; with IF = 0 nothing is delivered.
    mov ax, FAST_DIVISOR
    call pit_start_periodic
    mov ecx, IRR_POLL_LIMIT
irr_poll:
    call pic_read_irr
    test al, 1
    jnz irr_seen
    dec ecx
    jnz irr_poll
irr_seen:
    movzx eax, al
    and eax, 1
    CHECK_EQ("IRR (OCW3) latches IRQ 0 while it is masked", eax, 1)
    mov eax, dword ptr [ticks]
    sub eax, dword ptr [ticks_at_end]
    CHECK_EQ("a masked IRQ is not delivered", eax, 0)
    ret                                 # the PIT keeps running, masked at the PIC

# IRQ 0 handler: ebx = trap frame.
timer_handler:
    inc dword ptr [ticks]
    mov eax, dword ptr [ebx + FRAME_EIP]
    cmp eax, timer_woke
    je timer_eip_ok
    inc dword ptr [eip_mismatches]
timer_eip_ok:
    cmp dword ptr [ticks], 1
    jne timer_eoi
    mov eax, dword ptr [ebx + FRAME_VECTOR]     # first tick: record what the CPU and the PIC show
    mov dword ptr [first_vector], eax
    pushfd
    pop eax
    and eax, EFLAGS_IF
    mov dword ptr [handler_if], eax
    mov eax, dword ptr [ebx + FRAME_EFLAGS]
    and eax, EFLAGS_IF
    mov dword ptr [saved_if], eax
    call pic_read_isr
    movzx eax, ax
    mov dword ptr [isr_before_eoi], eax
timer_eoi:
    xor al, al                          # IRQ 0
    call pic_eoi
    cmp dword ptr [ticks], 1
    jne timer_done
    call pic_read_isr
    movzx eax, ax
    mov dword ptr [isr_after_eoi], eax
timer_done:
    mov eax, dword ptr [ticks]
    mov dword ptr [ticks_at_end], eax
    ret

spurious_handler:
    inc dword ptr [spurious]
    ret

.data
.align 4
ticks:          .long 0
ticks_at_end:   .long 0
first_vector:   .long 0xFFFFFFFF
handler_if:     .long 0xFFFFFFFF
saved_if:       .long 0xFFFFFFFF
isr_before_eoi: .long 0xFFFFFFFF
isr_after_eoi:  .long 0xFFFFFFFF
eip_mismatches: .long 0
spurious:       .long 0
