# description: port I/O of every form hw's quick I/O exit meets (imm and dx ports, 1/2/4 bytes, the I/O-bitmap
# boundary at 0x7FFF/0x8000, a 4-byte access at 0xFFFF that wraps to port 2, ports with no device, the PIT's
# counter, which reads virtual time), with rep string I/O in the same blocks; a checksum of what was read
#
# Every value read goes into the checksum the guest prints, so a difference in a device's answer, in the
# virtual time a port access spends (the PIT counter, rdtsc) or in which accesses exit shows on the console.
#include "kernel.inc"

ITERATIONS = 300

.text
main:
    push ebx
    push esi
    push edi
    push ebp
    xor ebp, ebp                        # checksum
    mov ebx, ITERATIONS
qio_loop:
    in al, POST_PORT                    # imm port, 1 byte (the POST port reads 0xFF)
    movzx eax, al
    add ebp, eax
    mov dx, POST_PORT
    out dx, al                          # dx port
    mov dx, 0x7FFF                      # 2 bytes at 0x7FFF: ports 0x7FFF (bitmap A) and 0x8000 (bitmap B)
    in ax, dx
    movzx eax, ax
    add ebp, eax
    out dx, ax
    mov dx, 0xFFFF                      # 4 bytes at 0xFFFF: ports 0xFFFF, 0, 1, 2 (the port space wraps)
    in eax, dx
    xor ebp, eax
    out dx, eax
    mov dx, 0x1234                      # no device: all-ones, writes ignored
    in al, dx
    rol ebp, 1
    xor ebp, eax
    out dx, al
    in eax, 0xE0                        # no device either, imm form, 4 bytes
    xor ebp, eax
    xor al, al                          # PIT channel 0: latch, then read the count (virtual time)
    out PIT_CMD, al
    in al, PIT_CH0
    mov cl, al
    in al, PIT_CH0
    mov ch, al
    movzx eax, cx
    rol ebp, 3
    xor ebp, eax
    in al, PIC1_DATA              # the PIC's mask register
    movzx eax, al
    add ebp, eax
    mov esi, qio_out_data               # rep outsb, in the same block as in/out around it
    mov ecx, 3
    mov dx, POST_PORT
    rep outsb
    mov edi, qio_in_data                # rep insb from a port with no device
    mov ecx, 2
    mov dx, 0x1234
    rep insb
    mov eax, dword ptr [qio_in_data]
    xor ebp, eax
    in al, POST_PORT                    # an in/out after the string I/O, same block
    out POST_PORT, al
    rdtsc                               # virtual time, every access's share of it included
    xor ebp, eax
    dec ebx
    jnz qio_loop
    mov eax, ebp
    call print_hex32
    mov al, 10
    call putc
    PASS("port I/O checksum printed")
    pop ebp
    pop edi
    pop esi
    pop ebx
    ret

.data
qio_out_data: .byte 1, 2, 3
.align 4
qio_in_data: .long 0
