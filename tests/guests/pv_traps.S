# description: para-mode test: trap table, #GP from privileged instructions and port I/O, #PF with CR2 in shared info, int 0x80 from ring 1, #GP for an int through a DPL-0 entry, set_iopl, iret hypercall
#include "pv_rt.inc"
.text
main:
    call rt_init_iret
    mov ebx, trap_table
    HC(0)
    EXPECT(0, n_stt)

    # cli at ring 1: #GP(0), saved EIP = the cli
    mov dword ptr [last_vec], 0xFF
cli_site:
    cli
    mov eax, dword ptr [last_vec]
    EXPECT(13, n_cli_vec)
    mov eax, dword ptr [last_ec]
    EXPECT(0, n_cli_ec)
    mov eax, dword ptr [last_eip]
    EXPECT(cli_site, n_cli_eip)
    # saved CS: ring-1 code selector in the low 16 bits, saved upcall mask (1) in bits 16-23
    mov eax, dword ptr [last_cs]
    EXPECT(0x10019, n_cli_cs)
    # saved EFLAGS.IF = !mask = 0
    mov eax, dword ptr [last_fl]
    and eax, 0x200
    EXPECT(0, n_cli_if)

    # out without I/O privilege: #GP
    mov dword ptr [last_vec], 0xFF
out_site:
    out 0x80, al
    mov eax, dword ptr [last_vec]
    EXPECT(13, n_out)
    mov eax, dword ptr [last_eip]
    EXPECT(out_site, n_out_eip)

    # physdev_op(set_iopl, 1): then in from port 0x80 reads 0xFF (the POST port), no fault
    mov ebx, 6
    mov ecx, iopl_arg
    HC(33)
    EXPECT(0, n_iopl)
    mov dword ptr [last_vec], 0xFF
    xor eax, eax
    in al, 0x80
    EXPECT(0xFF, n_in)
    mov eax, dword ptr [last_vec]
    EXPECT(0xFF, n_in_nofault)

    # #PF beyond RAM: CR2 in vcpu_info.arch.cr2, error code 0 (not present, read, supervisor)
    mov dword ptr [last_vec], 0xFF
pf_site:
    mov eax, dword ptr [0x7000123]
    mov eax, dword ptr [last_vec]
    EXPECT(14, n_pf)
    mov eax, dword ptr [last_cr2]
    EXPECT(0x7000123, n_pf_cr2)
    mov eax, dword ptr [last_ec]
    EXPECT(0, n_pf_ec)

    # write to the hypercall page (read-only): #PF error code 3 (present, write)
    mov dword ptr [last_vec], 0xFF
    mov ebx, dword ptr [hypercall_page]
wp_site:
    mov dword ptr [ebx], 0
    mov eax, dword ptr [last_ec]
    EXPECT(3, n_wp)

    # int 0x80 (entry DPL 3) from ring 1, returning a value in eax through iret
    mov eax, 5
    int 0x80
    EXPECT(0x1234, n_int80)

    # int 0x81 through an entry with DPL 0: #GP(0x81 * 8 + 2)
    mov dword ptr [last_vec], 0xFF
int81_site:
    int 0x81
    mov eax, dword ptr [last_ec]
    EXPECT(0x81 * 8 + 2, n_int81)

    # ud2: #UD
    mov dword ptr [last_vec], 0xFF
    ud2
    mov eax, dword ptr [last_vec]
    EXPECT(6, n_ud)
    xor eax, eax
    ret

# Handlers: record the frame, skip the faulting instruction by the length in skip_len[vector].
gp_handler:
    mov dword ptr [last_vec], 13
    jmp with_ec
pf_handler:
    mov dword ptr [last_vec], 14
    push eax
    mov eax, dword ptr [shared_info]
    mov eax, dword ptr [eax + 8]
    mov dword ptr [last_cr2], eax
    pop eax
    jmp with_ec
ud_handler:
    mov dword ptr [last_vec], 6
    add dword ptr [esp], 2
    IRET
with_ec:
    push eax
    mov eax, dword ptr [esp + 4]
    mov dword ptr [last_ec], eax
    mov eax, dword ptr [esp + 8]
    mov dword ptr [last_eip], eax
    mov eax, dword ptr [esp + 12]
    mov dword ptr [last_cs], eax
    mov eax, dword ptr [esp + 16]
    mov dword ptr [last_fl], eax
    # skip: cli 1, out imm8 2, mov eax,[abs] 5, mov [ebx], imm32 6, int 0x81 2 (a fault: EIP at the int)
    mov eax, dword ptr [esp + 8]
    cmp eax, cli_site
    jne skip_not_cli
    add dword ptr [esp + 8], 1
skip_not_cli:
    cmp eax, out_site
    jne skip_not_out
    add dword ptr [esp + 8], 2
skip_not_out:
    cmp eax, pf_site
    jne skip_not_pf
    add dword ptr [esp + 8], 5
skip_not_pf:
    cmp eax, wp_site
    jne skip_not_wp
    add dword ptr [esp + 8], 6
skip_not_wp:
    cmp eax, int81_site
    jne skip_not_int81
    add dword ptr [esp + 8], 2
skip_not_int81:
    pop eax
    add esp, 4
    IRET
int80_handler:
    mov eax, 0x1234
    IRET
int81_handler:
    mov eax, 0xdead
    IRET

.data
.align 4
trap_table:
    .byte 6, 0
    .word 0x19
    .long ud_handler
    .byte 13, 0
    .word 0x19
    .long gp_handler
    .byte 14, 4
    .word 0x19
    .long pf_handler
    .byte 0x80, 3
    .word 0x19
    .long int80_handler
    .byte 0x81, 0
    .word 0x19
    .long int81_handler
    .long 0, 0
iopl_arg: .long 1
last_vec: .long 0
last_ec: .long 0
last_eip: .long 0
last_cs: .long 0
last_fl: .long 0
last_cr2: .long 0
n_stt: .ascii "set_trap_table"
.byte 0
n_cli_vec: .ascii "cli at ring 1 is #GP"
.byte 0
n_cli_ec: .ascii "#GP error code 0"
.byte 0
n_cli_eip: .ascii "#GP saved EIP is the cli"
.byte 0
n_cli_cs: .ascii "saved CS holds the upcall mask in bits 16-23"
.byte 0
n_cli_if: .ascii "saved EFLAGS.IF is the virtual IF (masked)"
.byte 0
n_out: .ascii "out without IOPL is #GP"
.byte 0
n_out_eip: .ascii "#GP saved EIP is the out"
.byte 0
n_iopl: .ascii "physdev_op set_iopl"
.byte 0
n_in: .ascii "in with IOPL reads the POST port"
.byte 0
n_in_nofault: .ascii "in with IOPL does not fault"
.byte 0
n_pf: .ascii "read beyond RAM is #PF"
.byte 0
n_pf_cr2: .ascii "CR2 in vcpu_info.arch.cr2"
.byte 0
n_pf_ec: .ascii "#PF error code 0"
.byte 0
n_wp: .ascii "write to the hypercall page is #PF(3)"
.byte 0
n_int80: .ascii "int 0x80 through the trap table and back"
.byte 0
n_int81: .ascii "int through a DPL-0 entry is #GP(vector*8+2)"
.byte 0
n_ud: .ascii "ud2 is #UD"
.byte 0
