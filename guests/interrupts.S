# description: 8259A remapped to 0x20-0x2F, 8254 PIT at 100 Hz: IRQ 0 ticks with EOI, IMR/ISR/IRR reads (PV: VIRQ_TIMER upcalls, event channels)
#
# kernel.inc's pic_init has remapped both 8259As (ICW1-ICW4, vectors 0x20-0x2F) and masked all
# lines. Here we unmask IRQ 0 only, program PIT channel 0 for 100 Hz (mode 2, lobyte/hibyte),
# and wait with `sti; hlt` until the IRQ 0 handler, which acknowledges each tick with an EOI,
# has counted 5 ticks. Nothing printed depends on timing.
#
# The paravirtualized build (`--mode para`, docs/pv-abi.md) owns no 8259 or 8254: the same steps
# are done with their Xen-style counterparts, and its check lines name those (tests/test_pv_guests.py
# lists the lines that differ from the native build's):
#     8259 IRQ 0 unmasked (IMR)    EVTCHNOP_bind_virq(VIRQ_TIMER): an event-channel port, unmasked
#     PIT channel 0, 100 Hz        set_timer_op: a one-shot deadline 10 ms ahead, re-armed by the handler
#     IDT vector 0x20              set_callbacks: the event callback (the upcall), which scans
#                                  evtchn_pending_sel / evtchn_pending for the port
#     sti; hlt                     sched_op(SCHEDOP_block): unmasks events and sleeps, in one call
#     IF = 0 in the handler        evtchn_upcall_mask = 1 during the upcall
#     ISR bit, EOI (OCW2)          the port's evtchn_pending bit, cleared by the handler
#     IMR masks, IRR latches       evtchn_mask bit: the port latches pending, no upcall; then
#                                  EVTCHNOP_unmask delivers it
#if PV
#define PARAVIRT 1
#endif
#include "kernel.inc"

#define TICKS_WANTED 5
#define TIMER_HZ 100

#if PARAVIRT
#define TIMER_PERIOD_NS (1000000000 / TIMER_HZ)    // 10 ms of system time (ns = TSC, pv-abi.md 2.2)
#define LATCH_DELAY_NS 100000                      // 100 us ahead, for the masked-port check
#define PENDING_POLL_LIMIT 2000000
#define VEC_UPCALL 0x30                 // the upcall's vector number in isr_common's frame (not a gate)
#define SLOT_RET_OFFSET 7               // a hypercall slot is `mov eax, nr; int 0x82; ret`: ret at +7

.text
main:
    SET_HANDLER(VEC_UPCALL, timer_handler)
    mov ebx, KERNEL_CS                  # set_callbacks: the event callback (and the failsafe one)
    mov ecx, upcall_entry
    mov edx, KERNEL_CS
    mov esi, upcall_entry
    HYPERCALL(__HYPERVISOR_set_callbacks)
    test eax, eax
    jz callbacks_set
    FAIL("set_callbacks", "the hypervisor refused the event callback")
    ret
callbacks_set:
    mov ebx, EVTCHNOP_bind_virq         # bind VIRQ_TIMER (vcpu 0) to a port: the PV "unmask IRQ 0"
    mov ecx, bind_virq_op
    HYPERCALL(__HYPERVISOR_event_channel_op)
    mov ecx, dword ptr [bind_virq_op + 8]
    mov dword ptr [timer_port], ecx
    mov esi, dword ptr [pv_shared_info]
    xor edx, edx                        # edx = 1 when: result 0, port >= 2 (0 is invalid, 1 the
    test eax, eax                       # console), and the port's evtchn_mask bit clear
    jnz bind_checked
    cmp ecx, 2
    jb bind_checked
    bt dword ptr [esi + SH_EVTCHN_MASK], ecx
    jc bind_checked
    inc edx
bind_checked:
    CHECK_EQ("EVTCHNOP_bind_virq gives VIRQ_TIMER a port, unmasked in evtchn_mask", edx, 1)
    xor edx, edx                        # nothing pending yet: neither the port nor the vCPU
    bt dword ptr [esi + SH_EVTCHN_PENDING], ecx
    adc edx, 0
    movzx eax, byte ptr [esi + VCPU_UPCALL_PENDING]
    add edx, eax
    CHECK_EQ("no event is pending before the timer is set", edx, 0)

    rdtsc                               # system time (ns); the first deadline one period ahead
    mov dword ptr [start_time], eax
    mov dword ptr [start_time + 4], edx
    mov dword ptr [deadline], eax
    mov dword ptr [deadline + 4], edx
    call timer_rearm
timer_wait:
    HALT                                # sched_op(SCHEDOP_block): the PV `sti; hlt`, atomic by design
timer_woke:
    IRQ_DISABLE
    cmp dword ptr [ticks], TICKS_WANTED
    jb timer_wait                       # the handler stopped re-arming at tick 5: no timer is left

    mov eax, dword ptr [ticks]
    cmp eax, TICKS_WANTED
    setae al
    movzx eax, al
    CHECK_EQ("VIRQ_TIMER from set_timer_op reaches the kernel: 5 upcalls counted", eax, 1)
    mov eax, dword ptr [last_tick_time] # 5 periods of 10 ms: 50 ms of system time, not 60
    mov edx, dword ptr [last_tick_time + 4]
    sub eax, dword ptr [start_time]
    sbb edx, dword ptr [start_time + 4]
    xor ecx, ecx
    test edx, edx
    jnz elapsed_checked
    cmp eax, TICKS_WANTED * TIMER_PERIOD_NS
    jb elapsed_checked
    cmp eax, (TICKS_WANTED + 1) * TIMER_PERIOD_NS
    jae elapsed_checked
    inc ecx
elapsed_checked:
    CHECK_EQ("the 5th upcall comes 50 ms of system time after the timer was first set", ecx, 1)
    mov eax, dword ptr [first_port]
    cmp dword ptr [stray_events], 0
    je port_checked
    mov eax, 0xFFFFFFFF                 # an event on another port as well: not the timer's alone
port_checked:
    CHECK_EQ("the upcall finds VIRQ_TIMER's port in evtchn_pending_sel and evtchn_pending", eax, dword ptr [timer_port])
    CHECK_EQ("the upcall masked events in the handler (evtchn_upcall_mask = 1: IF = 0)", dword ptr [handler_if], 0)
    CHECK_EQ("the saved state has events enabled (EFLAGS.IF = 1, saved upcall mask 0)", dword ptr [saved_if], EFLAGS_IF)
    CHECK_EQ("an upcall in sched_op(SCHEDOP_block) returns to the instruction after its int 0x82", dword ptr [eip_mismatches], 0)
    CHECK_EQ("the port's evtchn_pending bit is set inside the handler", dword ptr [pending_before_eoi], 1)
    CHECK_EQ("the handler clears it from evtchn_pending (the PV EOI)", dword ptr [pending_after_eoi], 0)

    # A masked port still latches in evtchn_pending; with its evtchn_mask bit set nothing is
    # delivered, although the vCPU's events are enabled (evtchn_upcall_mask = 0).
    mov esi, dword ptr [pv_shared_info]
    mov ecx, dword ptr [timer_port]
    lock bts dword ptr [esi + SH_EVTCHN_MASK], ecx
    IRQ_ENABLE
    rdtsc
    add eax, LATCH_DELAY_NS
    adc edx, 0
    mov ebx, eax
    mov ecx, edx
    HYPERCALL(__HYPERVISOR_set_timer_op)
    mov ecx, dword ptr [timer_port]
    mov edx, PENDING_POLL_LIMIT
pending_poll:
    bt dword ptr [esi + SH_EVTCHN_PENDING], ecx
    jc pending_seen
    dec edx
    jnz pending_poll
pending_seen:
    setc al
    movzx eax, al
    CHECK_EQ("evtchn_pending latches VIRQ_TIMER while its port is masked (evtchn_mask)", eax, 1)
    mov eax, dword ptr [ticks]
    sub eax, dword ptr [ticks_at_end]
    movzx edx, byte ptr [esi + VCPU_UPCALL_PENDING]
    add eax, edx
    CHECK_EQ("a masked port raises no upcall", eax, 0)
    mov edx, dword ptr [ticks]
    mov ebx, EVTCHNOP_unmask            # unmask: the hypervisor re-raises the latched event and
    mov ecx, timer_port                 # delivers the upcall before the hypercall returns
    HYPERCALL(__HYPERVISOR_event_channel_op)
    mov eax, dword ptr [ticks]
    sub eax, edx
    CHECK_EQ("EVTCHNOP_unmask delivers the latched event at once", eax, 1)
    IRQ_DISABLE
    ret

# timer_rearm: deadline += 10 ms; set_timer_op(deadline) (one-shot: the handler re-arms it).
timer_rearm:
    pushad
    add dword ptr [deadline], TIMER_PERIOD_NS
    adc dword ptr [deadline + 4], 0
    mov ebx, dword ptr [deadline]
    mov ecx, dword ptr [deadline + 4]
    HYPERCALL(__HYPERVISOR_set_timer_op)
    popad
    ret

# The event callback (set_callbacks): the hypervisor pushed EIP, CS (bits 16-23: the saved upcall
# mask) and EFLAGS (IF = the events enabled then) and masked events. isr_common saves the rest,
# calls timer_handler, and returns with pv_iret_from_event (the mask restored from the saved IF).
upcall_entry:
    push 0
    push VEC_UPCALL
    jmp isr_common

# timer_handler: ebx = frame. Xen's callback loop: clear evtchn_upcall_pending, take the words
# of evtchn_pending_sel, and for each pending, unmasked port clear its bit (the EOI) and handle it.
timer_handler:
    mov edi, ebx
    mov esi, dword ptr [pv_shared_info]
    cmp dword ptr [first_port], 0xFFFFFFFF
    jne upcall_first_done
    SAVE_FL                             # first upcall: record what the frame and vcpu_info show
    and eax, EFLAGS_IF
    mov dword ptr [handler_if], eax
    mov eax, dword ptr [edi + FRAME_EFLAGS]
    and eax, EFLAGS_IF
    mov edx, dword ptr [edi + FRAME_CS]
    shr edx, 16
    and edx, 0xFF                       # the saved upcall mask: 0 expected
    or eax, edx
    mov dword ptr [saved_if], eax
upcall_first_done:
    mov byte ptr [esi + VCPU_UPCALL_PENDING], 0
    xor eax, eax
    xchg dword ptr [esi + VCPU_PENDING_SEL], eax
upcall_word:
    bsf ecx, eax                        # ecx = word index
    jz upcall_done
    btr eax, ecx
    push eax
    mov edx, dword ptr [esi + SH_EVTCHN_PENDING + 4 * ecx]
    and edx, dword ptr [esi + SH_EVTCHN_MASK + 4 * ecx]
    xor edx, dword ptr [esi + SH_EVTCHN_PENDING + 4 * ecx]    # pending & ~mask
    shl ecx, 5
upcall_port:
    bsf eax, edx
    jz upcall_word_done
    btr edx, eax
    add eax, ecx                        # eax = port
    push ecx
    push edx
    call upcall_port_event
    pop edx
    pop ecx
    jmp upcall_port
upcall_word_done:
    pop eax
    jmp upcall_word
upcall_done:
    ret

# upcall_port_event: eax = a pending port, edi = frame, esi = shared_info.
upcall_port_event:
    cmp dword ptr [first_port], 0xFFFFFFFF
    jne upcall_port_known
    mov dword ptr [first_port], eax
upcall_port_known:
    cmp eax, dword ptr [timer_port]
    jne upcall_stray
    inc dword ptr [ticks]
    cmp dword ptr [ticks], TICKS_WANTED
    ja upcall_eip_ok                    # the unmask's delivery returns into event_channel_op
    mov edx, dword ptr [pv_hypercall_page]
    add edx, 32 * __HYPERVISOR_sched_op + SLOT_RET_OFFSET
    cmp dword ptr [edi + FRAME_EIP], edx
    je upcall_eip_ok
    inc dword ptr [eip_mismatches]
upcall_eip_ok:
    cmp dword ptr [ticks], 1
    jne upcall_eoi
    bt dword ptr [esi + SH_EVTCHN_PENDING], eax
    setc dl
    movzx edx, dl
    mov dword ptr [pending_before_eoi], edx
upcall_eoi:
    lock btr dword ptr [esi + SH_EVTCHN_PENDING], eax   # the PV EOI: the port may be raised again
    cmp dword ptr [ticks], 1
    jne upcall_rearm
    bt dword ptr [esi + SH_EVTCHN_PENDING], eax
    setc dl
    movzx edx, dl
    mov dword ptr [pending_after_eoi], edx
upcall_rearm:
    cmp dword ptr [ticks], TICKS_WANTED
    jne upcall_not_last
    rdtsc
    mov dword ptr [last_tick_time], eax
    mov dword ptr [last_tick_time + 4], edx
upcall_not_last:
    jae upcall_timer_done               # (flags of the cmp: rdtsc and mov keep them)
    call timer_rearm
upcall_timer_done:
    mov eax, dword ptr [ticks]
    mov dword ptr [ticks_at_end], eax
    ret
upcall_stray:
    lock btr dword ptr [esi + SH_EVTCHN_PENDING], eax
    inc dword ptr [stray_events]
    ret

.data
.align 4
bind_virq_op:   .long VIRQ_TIMER, 0, 0  # struct evtchn_bind_virq: virq, vcpu, port (out)
timer_port:     .long 0
start_time:     .long 0, 0
deadline:       .long 0, 0
last_tick_time: .long 0, 0
ticks:          .long 0
ticks_at_end:   .long 0
first_port:     .long 0xFFFFFFFF
handler_if:     .long 0xFFFFFFFF
saved_if:       .long 0xFFFFFFFF
pending_before_eoi: .long 0xFFFFFFFF
pending_after_eoi:  .long 0xFFFFFFFF
eip_mismatches: .long 0
stray_events:   .long 0

#else
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
#endif
