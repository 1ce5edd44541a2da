# description: lists PCI bus 0 as the firmware left it: per function, the header dwords a driver reads
#
# Configuration mechanism #1. For each slot with a function 0: IDs, command/status, class/revision,
# header type, BAR0-BAR5, subsystem, capability pointer and the capability IDs along the list,
# interrupt pin/line; then, for the first virtio-net, BAR0's size mask and BAR1's.
#include "kernel.inc"

.text
main:
    xor ebp, ebp                        # slot
probe_slot:
    mov eax, 0
    call cfg
    cmp ax, 0xFFFF
    je probe_next
    mov esi, dev_text
    call puts
    mov eax, ebp
    call print_dec
    xor edi, edi                        # registers 0x00 .. 0x3C
probe_reg:
    mov al, ' '
    call putc
    mov eax, edi
    call cfg
    call print_hex32
    add edi, 4
    cmp edi, 0x40
    jb probe_reg
    call newline
    mov eax, 0x34                       # the capability list
    call cfg
    and eax, 0xFC
probe_cap:
    test eax, eax
    jz probe_next
    mov edi, eax
    mov esi, cap_text
    call puts
    mov eax, edi
    call print_hex8
    mov al, ' '
    call putc
    mov eax, edi
    call cfg
    call print_hex32
    push eax
    mov eax, edi
    add eax, 4
    call cfg
    mov ebx, eax
    mov al, ' '
    call putc
    mov eax, ebx
    call print_hex32
    mov eax, edi
    add eax, 8
    call cfg
    mov ebx, eax
    mov al, ' '
    call putc
    mov eax, ebx
    call print_hex32
    call newline
    pop eax
    movzx eax, ah
    and eax, 0xFC
    jmp probe_cap
probe_next:
    inc ebp
    cmp ebp, 32
    jb probe_slot
    # BAR sizing on slot 2: all ones, read, restore
    mov ebp, 2
    mov edi, 0x10
probe_size:
    mov eax, edi
    call cfg
    mov ebx, eax
    mov eax, edi
    mov ecx, 0xFFFFFFFF
    call cfg_write
    mov eax, edi
    call cfg
    mov esi, size_text
    call puts
    call print_hex32
    call newline
    mov eax, edi
    mov ecx, ebx
    call cfg_write
    add edi, 4
    cmp edi, 0x18
    jb probe_size
    PASS("pciprobe")
    ret

# cfg: ebp = slot, eax = register -> eax
cfg:
    push edx
    and eax, 0xFC
    mov edx, ebp
    shl edx, 11
    or eax, edx
    or eax, 0x80000000
    mov dx, 0xCF8
    out dx, eax
    mov dx, 0xCFC
    in eax, dx
    pop edx
    ret

# cfg_write: ebp = slot, eax = register, ecx = value
cfg_write:
    push edx
    push eax
    and eax, 0xFC
    mov edx, ebp
    shl edx, 11
    or eax, edx
    or eax, 0x80000000
    mov dx, 0xCF8
    out dx, eax
    mov dx, 0xCFC
    mov eax, ecx
    out dx, eax
    pop eax
    pop edx
    ret

.data
dev_text:  .asciz "dev "
cap_text:  .asciz "  cap at 0x"
size_text: .asciz "slot 2 BAR size mask "
