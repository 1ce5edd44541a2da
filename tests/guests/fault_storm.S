# description: 200 #DE and 200 #GP faults in a row at ring 0, each handled and resumed
# Without the fault-escalation workaround the engine turns the 2nd fault into #DF and ends the
# run silently at the 3rd (unicorn issue #1883).
#include "kernel.inc"
.text
main:
    SET_HANDLER(0, storm_de)
    SET_HANDLER(13, storm_gp)
    mov esi, 200
storm_loop:
    xor ecx, ecx
    xor edx, edx
    mov eax, 1
    div ecx                         # F7 F1: #DE, the handler skips 2 bytes
    mov ax, 0x1234
    .byte 0x8E, 0xD8                # mov ds, eax: #GP(0x1234), the handler skips 2 bytes (keystone adds 0x66 to `mov ds, ax`)
    dec esi
    jnz storm_loop
    mov ax, 0x10
    mov ds, ax
    CHECK_EQ("200 #DE delivered", dword ptr [de_seen], 200)
    CHECK_EQ("200 #GP delivered", dword ptr [gp_seen], 200)
    CHECK_EQ("#GP error code is the selector", dword ptr [gp_error], 0x1234)
    ret
storm_de:
    inc dword ptr [de_seen]
    add dword ptr [ebx + FRAME_EIP], 2
    ret
storm_gp:
    inc dword ptr [gp_seen]
    mov eax, dword ptr [ebx + FRAME_ERROR]
    mov dword ptr [gp_error], eax
    add dword ptr [ebx + FRAME_EIP], 2
    ret
.data
de_seen:  .long 0
gp_seen:  .long 0
gp_error: .long 0
