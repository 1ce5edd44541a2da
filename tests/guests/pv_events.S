# description: para-mode test: event channels: VIRQ_TIMER from set_timer_op, sched_op block, upcall frames, masking by shared-info writes (polled and forced with a hypercall), event_channel_op errors
#include "pv_rt.inc"
#define MASK 1
#define PENDING 0
.text
main:
    call rt_init_iret
    mov ebx, 0x19
    mov ecx, upcall
    xor edx, edx
    xor esi, esi
    HC(4)
    EXPECT(0, n_cb)
    # bind VIRQ_TIMER: port 2 (port 1 is the console)
    mov ebx, 1
    mov ecx, bind_arg
    HC(32)
    EXPECT(0, n_bind)
    mov eax, dword ptr [bind_arg + 8]
    EXPECT(2, n_port)
    mov ebx, 1
    mov ecx, bind_arg
    HC(32)
    EXPECT(-17, n_bind2)

    # one-shot timer 100 us ahead, then block: exactly one upcall, events unmasked afterwards
    call timer_soon
    mov ebx, 1
    xor ecx, ecx
    HC(29)
    EXPECT(0, n_block)
    mov eax, dword ptr [ticks]
    EXPECT(1, n_tick1)
    mov eax, dword ptr [saved_if]
    EXPECT(0x200, n_savedif)
    mov eax, dword ptr [in_mask]
    EXPECT(1, n_inmask)
    mov eax, dword ptr [shared_info]
    movzx eax, byte ptr [eax + MASK]
    EXPECT(0, n_unmasked)

    # masked: the event stays pending and no upcall runs
    mov eax, dword ptr [shared_info]
    mov byte ptr [eax + MASK], 1
    call timer_soon
wait_pending:
    cmp byte ptr [eax + PENDING], 0
    je wait_pending
    mov eax, dword ptr [ticks]
    EXPECT(1, n_masked)
    # unmask with a plain write: delivered right after the store, without a hypercall
    mov eax, dword ptr [shared_info]
    xor ecx, ecx
    mov byte ptr [eax + MASK], 0
spin:
    cmp dword ptr [ticks], 2
    je spin_done
    inc ecx
    cmp ecx, 100000
    jne spin
spin_done:
    mov eax, dword ptr [ticks]
    EXPECT(2, n_polled)
    mov eax, ecx                        # spin iterations before the upcall ran: none
    EXPECT(0, n_prompt)

    # forced: mask, wait pending, unmask, any hypercall delivers before it returns
    mov eax, dword ptr [shared_info]
    mov byte ptr [eax + MASK], 1
    call timer_soon
    mov eax, dword ptr [shared_info]
wait_pending2:
    cmp byte ptr [eax + PENDING], 0
    je wait_pending2
    mov byte ptr [eax + MASK], 0
    mov ebx, 0
    HC(17)
    mov eax, dword ptr [ticks]
    EXPECT(3, n_forced)

    # a timeout already past fires at once
    mov ebx, 1
    xor ecx, ecx
    HC(15)
    mov eax, dword ptr [ticks]
    EXPECT(4, n_past)

    # event_channel_op send: the console port is fine, a VIRQ port is -EINVAL
    mov dword ptr [port_arg], 1
    mov ebx, 4
    mov ecx, port_arg
    HC(32)
    EXPECT(0, n_send1)
    mov dword ptr [port_arg], 2
    mov ebx, 4
    mov ecx, port_arg
    HC(32)
    EXPECT(-EINVAL, n_send2)
    # an upcall while ring 3 runs: onto the stack_switch stack, frame with the user SS:ESP, and
    # the iret hypercall back to ring 3
    mov ebx, trap_table
    HC(0)
    mov ebx, 0x21
    mov ecx, kstack_top
    HC(3)
    mov dword ptr [kesp], esp
    mov dword ptr [upcall_cs], 0
    call timer_soon
    push 0x33
    push ustack_top
    push 0x202
    push 0x2B
    push user_spin
    IRET
back_from_user:
    mov eax, dword ptr [upcall_cs]
    and eax, 0xFFFF
    EXPECT(0x2B, n_u_upcall)
    mov eax, dword ptr [upcall_ss]
    EXPECT(0x33, n_u_ss)
    mov eax, dword ptr [ticks]
    EXPECT(5, n_u_ticks)
    xor eax, eax
    ret

user_spin:
    cmp dword ptr [ticks], 5
    jne user_spin
    int 0x80
user_stuck:
    jmp user_stuck

syscall_handler:
    mov esp, dword ptr [kesp]
    jmp back_from_user

# timer_soon: set_timer_op(rdtsc + 100000). Preserves everything.
timer_soon:
    pushad
    rdtsc
    add eax, 100000
    adc edx, 0
    mov ebx, eax
    mov ecx, edx
    HC(15)
    popad
    ret

# The event callback: count, note the frame's saved IF and the mask, acknowledge, iret.
upcall:
    push eax
    push ebx
    inc dword ptr [ticks]
    mov eax, dword ptr [esp + 12]
    mov dword ptr [upcall_cs], eax
    mov eax, dword ptr [esp + 24]
    mov dword ptr [upcall_ss], eax
    mov eax, dword ptr [esp + 16]
    and eax, 0x200
    mov dword ptr [saved_if], eax
    mov ebx, dword ptr [shared_info]
    movzx eax, byte ptr [ebx + MASK]
    mov dword ptr [in_mask], eax
    mov byte ptr [ebx + PENDING], 0
    xor eax, eax
    xchg dword ptr [ebx + 4], eax
    xor eax, eax
    xchg dword ptr [ebx + 2048], eax
    pop ebx
    pop eax
    IRET

.data
.align 4
trap_table:
    .byte 0x80, 3
    .word 0x19
    .long syscall_handler
    .long 0, 0
kesp: .long 0
upcall_cs: .long 0
upcall_ss: .long 0
bind_arg: .long 0, 0, 0
port_arg: .long 0
ticks: .long 0
saved_if: .long 0
in_mask: .long 0
n_cb: .ascii "set_callbacks"
.byte 0
n_bind: .ascii "bind_virq VIRQ_TIMER"
.byte 0
n_port: .ascii "VIRQ_TIMER is port 2"
.byte 0
n_bind2: .ascii "binding it twice is -EEXIST"
.byte 0
n_block: .ascii "sched_op block returns 0"
.byte 0
n_tick1: .ascii "one upcall after block"
.byte 0
n_savedif: .ascii "upcall frame: saved IF set (events were unmasked)"
.byte 0
n_inmask: .ascii "events masked inside the callback"
.byte 0
n_unmasked: .ascii "iret restored the mask from the saved IF"
.byte 0
n_masked: .ascii "no upcall while masked"
.byte 0
n_polled: .ascii "unmask by a plain write: upcall delivered"
.byte 0
n_prompt: .ascii "right after the store that cleared the mask (no spin iteration first)"
.byte 0
n_forced: .ascii "unmask then hypercall: delivered at once"
.byte 0
n_past: .ascii "timeout in the past fires at once"
.byte 0
n_send1: .ascii "send on the console port"
.byte 0
n_send2: .ascii "send on a VIRQ port is -EINVAL"
.byte 0
n_u_upcall: .ascii "upcall from ring 3: saved CS is the user's"
.byte 0
n_u_ss: .ascii "upcall from ring 3: saved SS is the user's"
.byte 0
n_u_ticks: .ascii "upcall from ring 3 delivered"
.byte 0
.bss
.align 16
kstack: .zero 4096
kstack_top:
ustack: .zero 4096
ustack_top:
