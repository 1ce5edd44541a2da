# description: para-mode security test: iretd with EFLAGS.VM = 1 from the ring-1 kernel must not enter virtual-8086 mode (VM is honoured only at CPL 0), and a call gate or TSS never works
#include "pv_rt.inc"
.text
main:
    mov ebx, trap_table
    HC(0)
    # iretd with VM = 1 in the image: as a V86 frame it would also pop ESP, SS, ES, DS, FS, GS and
    # run `back` as 16-bit code at linear (CS << 4) + back. Ignored at CPL 1: a same-ring return.
    push 0                              # GS
    push 0                              # FS
    push 0                              # DS
    push 0                              # ES
    push ss
    push esp
    pushfd
    or dword ptr [esp], 0x20000         # VM
    push cs                             # the kernel's own CS (RPL 1)
    push back
    iretd
back:
    add esp, 24                         # the six V86-only slots the protected-mode iret left
    mov eax, 0x12345678                 # as 16-bit code this would be mov ax, 0x5678 + garbage
    EXPECT(0x12345678, n_prot)
    pushfd
    pop eax
    and eax, 0x20000
    EXPECT(0, n_vm)
    mov ebx, 0
    HC(17)                              # still the kernel: xen_version answers
    EXPECT(0x00040011, n_version)
    xor eax, eax
    ret

.data
.align 8
trap_table:
    .long 0, 0, 0, 0
n_prot: .ascii "iretd with VM=1 at CPL 1 returns in protected mode"
.byte 0
n_vm: .ascii "EFLAGS.VM stays clear"
.byte 0
n_version: .ascii "hypercalls still answer the ring-1 kernel"
.byte 0
