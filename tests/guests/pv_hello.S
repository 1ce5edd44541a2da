# description: para-mode test: console_io hello, xen_version, an unknown hypercall, shutdown
#include "pv_rt.inc"
.text
main:
    mov esi, msg
    call print
    mov ebx, 0
    HC(17)
    mov ebx, 0x00040011
    mov esi, n_version
    call expect
    HC(99)
    mov ebx, -ENOSYS
    mov esi, n_enosys
    call expect
    xor eax, eax
    ret
.data
msg: .ascii "hello from a PV guest"
.byte 10, 0
n_version: .ascii "xen_version"
.byte 0
n_enosys: .ascii "unknown hypercall"
.byte 0
