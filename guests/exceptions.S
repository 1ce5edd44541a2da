# description: #DE, int3 and #UD: each handler runs, sees fault vs trap EIP, and execution resumes
#
# Faults report the address OF the faulting instruction (so it can be restarted); traps report
# the address of the NEXT instruction. Each handler records what it saw in the trap frame;
# the #DE and #UD handlers then skip the faulting instruction by advancing the saved EIP.
#if PV
#define PARAVIRT 1                      // this guest has a paravirtualized build (guests/include/pvops.inc)
#endif
#include "kernel.inc"

#define MARK 0x5A5A1234                 // a value that must survive the exception in esi

.text
main:
    SET_HANDLER(VEC_DE, de_handler)
    SET_HANDLER(VEC_BP, bp_handler)
    SET_HANDLER(VEC_UD, ud_handler)

    # --- #DE: divide by zero --------------------------------------------------------------
    mov dword ptr [resumed], 0
    mov esi, MARK
    mov eax, 100
    xor edx, edx
    xor ecx, ecx
de_zero_insn:
    div ecx                             # F7 F1: 2 bytes, skipped by the handler
    mov dword ptr [resumed], 1
    CHECK_EQ("divide by zero raises #DE on vector 0", dword ptr [de_count], 1)
    mov eax, de_zero_insn
    CHECK_EQ("#DE is a fault: saved EIP is the div itself", dword ptr [de_eip], eax)
    CHECK_EQ("#DE handler advanced EIP: execution resumed after the div", dword ptr [resumed], 1)
    CHECK_EQ("registers survive the #DE round trip", esi, MARK)

    # --- #DE: quotient too large (0x100000000 / 1 does not fit in 32 bits) ------------------
    mov dword ptr [resumed], 0
    mov edx, 1
    xor eax, eax
    mov ecx, 1
de_overflow_insn:
    div ecx
    mov dword ptr [resumed], 1
    CHECK_EQ("quotient overflow raises #DE too", dword ptr [de_count], 2)
    mov eax, de_overflow_insn
    CHECK_EQ("overflow #DE saved EIP is the div", dword ptr [de_eip], eax)
    CHECK_EQ("execution resumed after the overflowing div", dword ptr [resumed], 1)

    # --- int3: breakpoint trap ------------------------------------------------------------------
    mov dword ptr [resumed], 0
    mov esi, MARK
    int3                                # CC: 1 byte
bp_after:
    mov dword ptr [resumed], 1
    CHECK_EQ("int3 raises #BP on vector 3", dword ptr [bp_count], 1)
    mov eax, bp_after
    CHECK_EQ("#BP is a trap: saved EIP is the next instruction", dword ptr [bp_eip], eax)
    CHECK_EQ("execution resumed after int3 without help", dword ptr [resumed], 1)
    CHECK_EQ("registers survive the #BP round trip", esi, MARK)

    # --- ud2: invalid opcode ----------------------------------------------------------------------
    mov dword ptr [resumed], 0
    mov esi, MARK
ud_insn:
    ud2                                 # 0F 0B: 2 bytes, skipped by the handler
    mov dword ptr [resumed], 1
    CHECK_EQ("ud2 raises #UD on vector 6", dword ptr [ud_count], 1)
    mov eax, ud_insn
    CHECK_EQ("#UD is a fault: saved EIP is the ud2 itself", dword ptr [ud_eip], eax)
    CHECK_EQ("#UD handler advanced EIP: execution resumed after ud2", dword ptr [resumed], 1)
    CHECK_EQ("registers survive the #UD round trip", esi, MARK)

    # --- exceptions are delivered through interrupt gates: IF = 0 in every handler -------------
    CHECK_EQ("handlers ran with IF = 0 (interrupt gates)", dword ptr [handler_if], 0)
    ret

# Handlers: ebx = trap frame.
de_handler:
    inc dword ptr [de_count]
    mov eax, dword ptr [ebx + FRAME_EIP]
    mov dword ptr [de_eip], eax
    add dword ptr [ebx + FRAME_EIP], 2  # skip the 2-byte div
    jmp note_if

bp_handler:
    inc dword ptr [bp_count]
    mov eax, dword ptr [ebx + FRAME_EIP]
    mov dword ptr [bp_eip], eax         # a trap: nothing to skip
    jmp note_if

ud_handler:
    inc dword ptr [ud_count]
    mov eax, dword ptr [ebx + FRAME_EIP]
    mov dword ptr [ud_eip], eax
    add dword ptr [ebx + FRAME_EIP], 2  # skip the 2-byte ud2
    jmp note_if

# (shared tail) accumulate EFLAGS.IF as seen inside handlers.
note_if:
    SAVE_FL                             # PV: IF is the virtual one (evtchn_upcall_mask)
    and eax, EFLAGS_IF
    or dword ptr [handler_if], eax
    ret

.data
.align 4
resumed:    .long 0
de_count:   .long 0
de_eip:     .long 0
bp_count:   .long 0
bp_eip:     .long 0
ud_count:   .long 0
ud_eip:     .long 0
handler_if: .long 0
