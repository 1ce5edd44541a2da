# description: para-mode test: console_io hello, xen_version, an unknown hypercall, shutdown
#include "pv_rt.inc"
.text
main:
    mov esi, msg
    call print
    mov ebx, 0
    HC(17)
    EXPECT(0x00040011, n_version)
    HC(99)
    EXPECT(-ENOSYS, n_enosys)
    xor eax, eax
    ret
.data
msg: .ascii "hello from a PV guest"
.byte 10, 0
n_version: .ascii "xen_version"
.byte 0
n_enosys: .ascii "unknown hypercall"
.byte 0
