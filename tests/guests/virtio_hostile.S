# description: a hostile virtio-net driver: broken rings one after the other, the status read after each
#
# The NIC must be at 00:02.0 (--device virtio-net). Each case resets the device, sets it up with
# queue 1 (transmit) at `ring`, breaks one rule, kicks, and prints the device status (64 =
# DEVICE_NEEDS_RESET). The device must survive every case and the run end normally.
#include "kernel.inc"

#define STATUS 18
#define NOTIFY 16
#define QSEL   14
#define QPFN   8

.text
main:
    mov eax, 0x80001010                 # 00:02.0 BAR0
    mov dx, 0xCF8
    out dx, eax
    mov dx, 0xCFC
    in eax, dx
    and eax, 0xFFFC
    mov dword ptr [iobase], eax
    mov eax, 0x80001004                 # command: I/O, memory, bus master
    mov dx, 0xCF8
    out dx, eax
    mov dx, 0xCFC
    mov eax, 7
    out dx, eax

    # 1. a descriptor pointing at the local APIC's page
    call setup
    mov dword ptr [ring], 0xFEE00000
    mov dword ptr [ring + 8], 64
    call publish_and_kick
    mov esi, t_apic
    call report
    # 2. a chain that loops: 0 -> 1 -> 0
    call setup
    mov dword ptr [ring], buf
    mov dword ptr [ring + 8], 16
    mov dword ptr [ring + 12], 0x00010001
    mov dword ptr [ring + 16], buf
    mov dword ptr [ring + 24], 16
    mov dword ptr [ring + 28], 0x00000001
    call publish_and_kick
    mov esi, t_loop
    call report
    # 3. the available index far ahead of the ring
    call setup
    mov word ptr [ring + 4096 + 2], 0x8000
    mov ecx, NOTIFY
    mov ax, 1
    call vout16
    mov esi, t_ahead
    call report
    # 4. a buffer running past the end of RAM (run with 32 MiB)
    call setup
    mov dword ptr [ring], 0x2000000 - 8
    mov dword ptr [ring + 8], 64
    call publish_and_kick
    mov esi, t_past
    call report
    # 5. a queue PFN beyond RAM
    call reset_ack
    mov ecx, QSEL
    mov ax, 1
    call vout16
    mov ecx, QPFN
    mov eax, 0x000FFFF0
    call vout32
    mov esi, t_pfn
    call report
    # 6. a kick of a queue never set up (not an error: ignored)
    call reset_ack
    mov al, 7
    mov ecx, STATUS
    call vout8
    mov ecx, NOTIFY
    mov ax, 1
    call vout16
    mov esi, t_unset
    call report
    # 7. DRIVER_OK straight after reset
    mov al, 0
    mov ecx, STATUS
    call vout8
    mov al, 4
    call vout8
    mov esi, t_order
    call report
    PASS("the device survived every broken ring")
    ret

reset_ack:
    mov al, 0
    mov ecx, STATUS
    call vout8
    mov al, 1
    call vout8
    mov al, 3
    call vout8
    ret

# setup: reset, ACK, DRIVER, queue 1 at `ring` (cleared), DRIVER_OK
setup:
    call reset_ack
    mov edi, ring
    mov ecx, 3 * 4096
    xor eax, eax
    rep stosb
    mov ecx, QSEL
    mov ax, 1
    call vout16
    mov ecx, QPFN
    mov eax, ring
    shr eax, 12
    call vout32
    mov al, 7
    mov ecx, STATUS
    call vout8
    ret

publish_and_kick:
    mov word ptr [ring + 4096 + 4], 0   # avail.ring[0] = descriptor 0
    mov word ptr [ring + 4096 + 2], 1   # avail.idx = 1
    mov ecx, NOTIFY
    mov ax, 1
    call vout16
    ret

# report: esi = case name; prints "<name>: status 0x.."
report:
    call puts
    mov esi, status_text
    call puts
    mov edx, dword ptr [iobase]
    add edx, STATUS
    in al, dx
    call print_hex8
    call newline
    ret

vout8:
    mov edx, dword ptr [iobase]
    add edx, ecx
    out dx, al
    ret
vout16:
    mov edx, dword ptr [iobase]
    add edx, ecx
    out dx, ax
    ret
vout32:
    mov edx, dword ptr [iobase]
    add edx, ecx
    out dx, eax
    ret

.data
t_apic:  .asciz "descriptor at the APIC page"
t_loop:  .asciz "looping chain"
t_ahead: .asciz "available index ahead"
t_past:  .asciz "buffer past the end of RAM"
t_pfn:   .asciz "queue PFN beyond RAM"
t_unset: .asciz "kick of a queue never set up"
t_order: .asciz "DRIVER_OK right after reset"
status_text: .asciz ": status 0x"
.align 4
iobase: .long 0

.bss
.align 4096
ring: .zero 12288
buf:  .zero 64
