# description: the I/O permission check: a TSS I/O bitmap grants ring 3 ports 0x80 and 0x3FD only; reserved CR4 bits fault
#
# The engine performs every in/out whatever CPL, IOPL and the bitmap say; cpuvirt must check them
# (cpu/ioperm.py) in every mode, and refuse CR4 bits the CPU model does not have (#GP).
#include "kernel.inc"
#include "user.inc"
#define IO_TSS_SEL 0x38
#define MAP_BASE   104
#define IO_TSS_LIMIT (MAP_BASE + 0x400 / 8)     // the map covers ports 0-0x3FF, then a 0xFF byte

.text
main:
    call user_init
    mov esi, gdt
    mov edi, big_gdt
    mov ecx, 14
    rep movsd
    lea edi, [big_gdt + 7 * 8]
    mov eax, io_tss
    mov ecx, IO_TSS_LIMIT
    mov dl, 0x89
    call set_system_descriptor
    lgdt [big_gdtr]
    mov dword ptr [io_tss + 8], KERNEL_DS
    mov word ptr [io_tss + 0x66], MAP_BASE
    mov edi, io_tss + MAP_BASE                  # every port denied ...
    mov al, 0xFF
    mov ecx, 0x400 / 8 + 1
    rep stosb
    and byte ptr [io_tss + MAP_BASE + 0x80 / 8], 0xFE   # ... but 0x80
    and byte ptr [io_tss + MAP_BASE + 0x7F], 0xDF       # ... and 0x3FD, COM1 LSR (byte 0x7F, bit 5)
    mov ax, IO_TSS_SEL
    ltr ax

    mov eax, user_in80
    call run_user_io
    CHECK_EQ("ring 3, IOPL 0: in from a port the TSS bitmap grants works", eax, 5)
    mov eax, user_in_lsr
    call run_user_io
    CHECK_EQ("ring 3, IOPL 0: in from COM1's LSR (granted) reads the UART (THR empty)", eax, 0x60)
    mov eax, user_out_com1
    call run_user_io
    CHECK_EQ("ring 3, IOPL 0: out to a port the bitmap denies raises #GP", eax, USER_KILLED | VEC_GP)
    mov eax, user_out_insn
    CHECK_EQ("that #GP is a fault: saved EIP is the out", dword ptr [user_fault_eip], eax)
    mov eax, user_in81
    call run_user_io
    CHECK_EQ("ring 3, IOPL 0: in from the next port (denied) raises #GP", eax, USER_KILLED | VEC_GP)

    mov eax, user_mov_cr0
    call run_user_io
    CHECK_EQ("ring 3: mov from cr0 raises #GP (no exit, no emulation)", eax, USER_KILLED | VEC_GP)
    mov eax, user_hlt
    call run_user_io
    CHECK_EQ("ring 3: hlt raises #GP", eax, USER_KILLED | VEC_GP)

    SET_HANDLER(VEC_GP, cr4_gp)
    mov eax, cr4
    mov dword ptr [cr4_before], eax
    or eax, 1 << 12                             # LA57: not in this CPU model
    mov dword ptr [cr4_gps], 0
    mov cr4, eax
    CHECK_EQ("mov to CR4 with LA57 (not offered by CPUID) raises #GP", dword ptr [cr4_gps], 1)
    mov eax, cr4
    CHECK_EQ("and CR4 is unchanged", eax, dword ptr [cr4_before])
    SET_HANDLER(VEC_GP, user_fault_handler)
    ret

run_user_io:
    mov edx, user_stack_top
    push ebx
    push esi
    push edi
    push ebp
    mov dword ptr [user_saved_esp], esp
    mov dword ptr [io_tss + 4], esp
    mov cx, USER_DS
    mov ds, cx
    mov es, cx
    mov fs, cx
    mov gs, cx
    push USER_DS
    push edx
    push EFLAGS_FIXED
    push USER_CS
    push eax
    iretd

cr4_gp:
    inc dword ptr [cr4_gps]
    add dword ptr [ebx + FRAME_EIP], 3          # skip the mov cr4, eax (0F 22 E0)
    ret

user_in80:
    in al, 0x80
    mov eax, SYS_EXIT
    mov ebx, 5
    int 0x80
user_in_lsr:
    mov dx, COM1_LSR
    in al, dx
    movzx ebx, al
    mov eax, SYS_EXIT
    int 0x80
user_out_com1:
    mov dx, COM1
    mov al, 'X'
user_out_insn:
    out dx, al
    mov eax, SYS_EXIT
    mov ebx, 6
    int 0x80
user_mov_cr0:
    mov eax, cr0
    mov eax, SYS_EXIT
    mov ebx, 9
    int 0x80
user_hlt:
    hlt
    mov eax, SYS_EXIT
    mov ebx, 10
    int 0x80
user_in81:
    in al, 0x81
    mov eax, SYS_EXIT
    mov ebx, 7
    int 0x80

.data
.align 8
big_gdt:
    .zero 8 * 8
big_gdt_end:
.align 4
    .word 0
big_gdtr:
    .word big_gdt_end - big_gdt - 1
    .long big_gdt
cr4_before: .long 0
cr4_gps: .long 0
.bss
.align 16
io_tss:
    .zero MAP_BASE + 0x400 / 8 + 1
