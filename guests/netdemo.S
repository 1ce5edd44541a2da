# description: a legacy virtio-net driver: PCI scan, init, ARP, ping 10.0.2.2, chained/indirect frames, a burst past the ring
#
# Finds the virtio-net function on PCI bus 0 (configuration mechanism #1), reads its BARs and
# interrupt line (never assumed), resets and initialises the device step by step (ACKNOWLEDGE,
# DRIVER, features MAC|STATUS|INDIRECT_DESC|EVENT_IDX, queues 0 rx and 1 tx at page frames of its own
# memory, DRIVER_OK), posts receive buffers, then sends: an ARP request for 10.0.2.2, an ICMP echo
# request to it, a frame split over a chain of three descriptors, one through an indirect table,
# and a burst of BURST frames, more than the 256-entry ring holds (the indices wrap). It waits for
# receive interrupts with `sti; hlt` (INTx through the 8259 by default, MSI-X through the local
# APIC with `msix` on the kernel command line), prints a line per frame (length, checksum), then
# PASS/FAIL lines. The peer decides what comes back: QEMU's user network (and cpuvirt's
# peer=user) answers ARP and the ping; a loopback peer returns every frame unchanged. `quiet` on the
# command line leaves out the burst's per-frame lines. `role=ping` / `role=answer` make two netdemo
# guests on one switch talk to each other instead (include/netpeer.inc).
#
# Ring options (net-bench): `fixed` is DPDK's fixed available-ring mapping (slot i holds descriptor
# i from the start, so a single-descriptor send writes only avail.idx; implies `single`), `single`
# leaves out the chained and indirect frames, `noevent` does not negotiate EVENT_IDX, `burst=N`
# sends N burst frames instead of BURST.
#
# For bench/virtio.py: `bench` sends the same frames printing nothing after initialisation (no frame
# lines, no checks); `bench com1` writes the same frames' bytes through COM1 instead (polled, a byte at
# a time: the ISA way); `bench noframes` stops after initialisation (the baseline both are measured
# against).
#
# PV build (--mode para): the kernel gets its ports with physdev_op(set_iopl 1) and does its PCI and
# virtio register accesses directly, as Xen's dom0 does; para delivers no device interrupts to a PV
# guest (docs/pv-abi.md 7), so it polls the used ring instead, and says so in the two lines about
# interrupts (everything else is printed as natively).
#if PV
#define PARAVIRT 1
#endif
#include "kernel.inc"

#define QSZ         256                 // entries per queue (the device says; checked)
#define BUF         2048                // bytes per buffer slot
#define HDR         10                  // legacy virtio_net_hdr
#define BURST       300                 // frames in the burst: more than QSZ
#define BURST_LEN   60
#define CHAIN_LEN   1514
#define CHAIN_SPLIT 700
#define PING_DATA   56

// legacy virtio-pci registers (offsets in BAR0)
#define VIRTIO_HOST_FEATURES  0
#define VIRTIO_GUEST_FEATURES 4
#define VIRTIO_QUEUE_PFN      8
#define VIRTIO_QUEUE_NUM      12
#define VIRTIO_QUEUE_SEL      14
#define VIRTIO_QUEUE_NOTIFY   16
#define VIRTIO_STATUS         18
#define VIRTIO_ISR            19
#define VIRTIO_MSI_CONFIG     20
#define VIRTIO_MSI_QUEUE      22
#define ST_ACK      1
#define ST_DRIVER   2
#define ST_DRIVER_OK 4
#define WANTED_FEATURES 0x30010020      // MAC(5) STATUS(16) INDIRECT_DESC(28) EVENT_IDX(29)
#define F_INDIRECT  0x10000000
#define F_EVENT_IDX 0x20000000

// split ring layout for QSZ = 256 (legacy: used ring on the next 4096 boundary)
#define AVAIL_FLAGS 4096
#define AVAIL_IDX   4098
#define AVAIL_RING  4100
#define USED_EVENT  4612
#define USED_IDX    8194
#define USED_RING   8196
#define AVAIL_EVENT 10244
#define DESC_NEXT   1
#define DESC_WRITE  2
#define DESC_INDIRECT 4

#define MSIX_VEC_RX 0x2D                // CPU vector for MSI-X receive interrupts (8259 IRQ 13's, masked)
#define APIC_EOI    0xFEE000B0

.text
main:
#if PARAVIRT
    mov eax, 1                          # PV: an I/O grant for the PCI and virtio ports
    call pv_set_iopl
#endif
    call parse_cmdline
    call pci_find_virtio_net
    test eax, eax
    jnz main_found
#if !PARAVIRT
    call e1000_main                     # no virtio-net: an e1000 instead? (e1000.inc drives it)
    test eax, eax
    jnz main_done
#endif
    FAIL("virtio-net on PCI bus 0", "no function with vendor 0x1af4 device 0x1000")
    ret
main_found:
    PASS("virtio-net found on PCI bus 0: 1af4:1000, subsystem 1af4:0001, class 020000")
    call virtio_setup
    cmp dword ptr [fail_count], 0
    jne main_done
    call post_rx_buffers
    cmp dword ptr [noframes], 0
    jne main_done
    cmp dword ptr [role], 0
    jne main_peer
    call send_arp
    call send_ping
    cmp dword ptr [single], 0           # `single` (and `fixed`): single-descriptor frames only
    jne main_single
    cmp dword ptr [fixed], 0
    jne main_single
    call send_chained
    call send_indirect
main_single:
    call send_burst
    cmp dword ptr [bench], 0
    jne main_done
    call wait_loopback_echoes
    call report
main_done:
    ret
main_peer:
    call peer_main                      # role=ping / role=answer (include/netpeer.inc)
    ret

# ---------------------------------------------------------------------------------------------
# Kernel command line: "msix" selects MSI-X, "quiet" drops the burst's per-frame lines; role=, ip=,
# peer= are the peer roles' (include/netpeer.inc).
parse_cmdline:
    pushad
    mov ebx, dword ptr [boot_info]
    test dword ptr [ebx], 4
    jz parse_cmdline_done
    mov esi, dword ptr [ebx + 16]
parse_cmdline_loop:
    mov eax, dword ptr [esi]
    test al, al
    jz parse_cmdline_done
    cmp eax, 0x7869736D                 # "msix"
    jne parse_cmdline_quiet
    mov dword ptr [use_msix], 1
parse_cmdline_quiet:
    cmp eax, 0x65697571                 # "quie"
    jne parse_cmdline_bench
    mov dword ptr [quiet], 1
parse_cmdline_bench:
    cmp eax, 0x636E6562                 # "benc"
    jne parse_cmdline_com1
    mov dword ptr [bench], 1
parse_cmdline_com1:
    cmp eax, 0x316D6F63                 # "com1"
    jne parse_cmdline_noframes
    mov dword ptr [com1], 1
parse_cmdline_noframes:
    cmp eax, 0x72666F6E                 # "nofr"
    jne parse_cmdline_fixed
    mov dword ptr [noframes], 1
parse_cmdline_fixed:
    cmp eax, 0x65786966                 # "fixe"
    jne parse_cmdline_noevent
    mov dword ptr [fixed], 1
parse_cmdline_noevent:
    cmp eax, 0x76656F6E                 # "noev"
    jne parse_cmdline_single
    mov dword ptr [noevent], 1
parse_cmdline_single:
    cmp eax, 0x676E6973                 # "sing"
    jne parse_cmdline_burst
    mov dword ptr [single], 1
parse_cmdline_burst:
    cmp eax, 0x73727562                 # "burst=N": frames in the burst (default BURST)
    jne parse_cmdline_next
    cmp byte ptr [esi + 5], '='
    jne parse_cmdline_next
    push esi
    add esi, 6
    xor ecx, ecx
parse_cmdline_burst_digit:
    movzx eax, byte ptr [esi]
    sub eax, '0'
    cmp eax, 9
    ja parse_cmdline_burst_end
    imul ecx, ecx, 10
    add ecx, eax
    inc esi
    jmp parse_cmdline_burst_digit
parse_cmdline_burst_end:
    pop esi
    test ecx, ecx
    jz parse_cmdline_next
    mov dword ptr [burst_n], ecx
parse_cmdline_next:
    call peer_parse_option              # role=, ip=, peer= (include/netpeer.inc)
    inc esi
    jmp parse_cmdline_loop
parse_cmdline_done:
    popad
    ret

# ---------------------------------------------------------------------------------------------
# PCI configuration mechanism #1. pci_read: eax = offset -> eax = dword at [slot]:offset.
pci_read:
    push edx
    and eax, 0xFC
    or eax, dword ptr [pci_slot_bits]
    mov dx, 0xCF8
    out dx, eax
    mov dx, 0xCFC
    in eax, dx
    pop edx
    ret

# pci_write: eax = offset, ecx = value.
pci_write:
    push edx
    push eax
    and eax, 0xFC
    or eax, dword ptr [pci_slot_bits]
    mov dx, 0xCF8
    out dx, eax
    mov dx, 0xCFC
    mov eax, ecx
    out dx, eax
    pop eax
    pop edx
    ret

# pci_find_virtio_net: scan slots 0-31, function 0; eax = 1 when found ([pci_slot_bits] set).
pci_find_virtio_net:
    push ecx
    xor ecx, ecx
pci_find_loop:
    mov eax, ecx
    shl eax, 11
    or eax, 0x80000000
    mov dword ptr [pci_slot_bits], eax
    xor eax, eax
    call pci_read
    cmp eax, 0x10001AF4
    je pci_find_match
    inc ecx
    cmp ecx, 32
    jb pci_find_loop
    xor eax, eax
    pop ecx
    ret
pci_find_match:
    mov dword ptr [pci_slot], ecx
    mov eax, 0x2C
    call pci_read
    cmp eax, 0x00011AF4                 # subsystem: virtio device type 1, network
    jne pci_find_no
    mov eax, 8
    call pci_read
    shr eax, 8
    cmp eax, 0x020000
    jne pci_find_no
    mov eax, 1
    pop ecx
    ret
pci_find_no:
    xor eax, eax
    pop ecx
    ret

# ---------------------------------------------------------------------------------------------
virtio_setup:
    pushad
    mov esi, found_text                 # "virtio-net at 00:"
    call puts
    mov eax, dword ptr [pci_slot]
    call print_hex8
    mov esi, found_text2
    call puts
    # BAR0: the legacy register block in I/O space; BAR1: the MSI-X table (memory)
    mov eax, 0x10
    call pci_read
    mov ebx, eax
    and ebx, 1
    CHECK_EQ("BAR0 is an I/O BAR (bit 0 set)", ebx, 1)
    and eax, 0xFFFC
    mov dword ptr [iobase], eax
    mov eax, 0x14
    call pci_read
    and eax, 0xFFFFFFF0
    mov dword ptr [msix_bar], eax
    # BAR sizing: write all ones, read the mask back, restore (PCI 3.0 6.2.5.1)
    mov eax, 0x10
    mov ecx, 0xFFFFFFFF
    call pci_write
    call pci_read
    not eax
    or eax, 3
    inc eax
    mov dword ptr [iosize], eax
    mov ecx, dword ptr [iobase]
    or ecx, 1
    mov eax, 0x10
    call pci_write
    mov eax, dword ptr [iosize]
    cmp eax, 24                         # the legacy registers + MSI-X vectors fit
    setae al
    movzx eax, al
    CHECK_EQ("BAR0 sizing: the register block is at least 24 bytes", eax, 1)
    # command register: I/O decoding is on (firmware), turn on bus mastering for the rings
    mov eax, 4
    call pci_read
    mov ecx, eax
    and ecx, 0xFFFF
    or ecx, 7                           # I/O, memory, bus master
    mov eax, 4
    call pci_write
    # interrupt pin A, line as the firmware routed it
    mov eax, 0x3C
    call pci_read
    movzx ebx, ah
    CHECK_EQ("interrupt pin is INTA#", ebx, 1)
    movzx eax, al
    mov dword ptr [irq], eax
    # the capability list must hold MSI-X (id 0x11)
    mov eax, 0x34
    call pci_read
    and eax, 0xFC
    xor ebx, ebx
virtio_cap_loop:
    test eax, eax
    jz virtio_cap_done
    mov edx, eax
    call pci_read
    cmp al, 0x11
    jne virtio_cap_next
    mov dword ptr [msix_cap], edx
    mov ebx, 1
virtio_cap_next:
    movzx eax, ah
    and eax, 0xFC
    jmp virtio_cap_loop
virtio_cap_done:
    CHECK_EQ("capability list holds MSI-X (id 0x11)", ebx, 1)

    # 1. reset
    mov al, 0
    mov ecx, VIRTIO_STATUS
    call vio_out8
    call vio_in8_status
    movzx eax, al
    CHECK_EQ("device status reads 0 after reset", eax, 0)
    # 2. ACKNOWLEDGE, 3. DRIVER
    mov al, ST_ACK
    mov ecx, VIRTIO_STATUS
    call vio_out8
    mov al, ST_ACK | ST_DRIVER
    call vio_out8
    # 4. features
    mov ecx, VIRTIO_HOST_FEATURES
    call vio_in32
    mov ebx, eax
    and ebx, WANTED_FEATURES
    mov eax, ebx
    cmp dword ptr [noevent], 0          # `noevent`: notifications and interrupts without EVENT_IDX
    je virtio_features_write
    and eax, ~F_EVENT_IDX
virtio_features_write:
    mov dword ptr [features], eax
    mov ecx, VIRTIO_GUEST_FEATURES
    call vio_out32
    mov esi, features_text
    call puts
    call print_hex32
    call newline
    CHECK_EQ("device offers MAC, STATUS, INDIRECT_DESC and EVENT_IDX", ebx, WANTED_FEATURES)
    # MSI-X: enable it in the capability before the vector registers exist (the config moves to 24)
    mov dword ptr [cfg_off], 20
#if PARAVIRT
    mov dword ptr [use_msix], 0         # PV: the MSI-X table is MMIO, which a PV kernel cannot map
#endif
    cmp dword ptr [use_msix], 0
    je virtio_no_msix
    call msix_setup
    mov dword ptr [cfg_off], 24
virtio_no_msix:
    # 5. queues: select, size, PFN, vector
    xor edx, edx                        # queue 0 (rx)
    mov edi, rxq
    call setup_queue
    mov edx, 1
    mov edi, txq
    call setup_queue
    mov ax, 3                           # 0 rx, 1 tx, 2 control: there is no queue 3
    mov ecx, VIRTIO_QUEUE_SEL
    call vio_out16
    mov ecx, VIRTIO_QUEUE_NUM
    call vio_in16
    movzx eax, ax
    CHECK_EQ("queue 3 does not exist: its size reads 0", eax, 0)
    # the MAC and link status from the device configuration
    mov esi, mac_text
    call puts
    xor ebx, ebx
virtio_mac_loop:
    mov ecx, dword ptr [cfg_off]
    add ecx, ebx
    call vio_in8
    mov byte ptr [my_mac + ebx], al
    call print_hex8
    inc ebx
    cmp ebx, 6
    je virtio_mac_done
    mov al, ':'
    call putc
    jmp virtio_mac_loop
virtio_mac_done:
    call newline
    mov ecx, dword ptr [cfg_off]
    add ecx, 6
    call vio_in16
    movzx eax, ax
    and eax, 1
    CHECK_EQ("link is up (config status bit 0)", eax, 1)
    # interrupts: INTx through the 8259 (the IRQ the firmware wrote), or MSI-X
#if PARAVIRT
    mov esi, pv_poll_text
    call puts
    jmp virtio_irq_done
#endif
    cmp dword ptr [use_msix], 0
    jne virtio_irq_done
    mov eax, dword ptr [irq]
    add eax, IRQ_BASE
    mov dword ptr [isr_handlers + 4 * eax], intx_handler
    mov ecx, dword ptr [irq]
    mov eax, 0xFFFF
    btr eax, ecx
    btr eax, 2                          # the cascade
#if !PARAVIRT
    call pic_set_mask
#endif
    mov esi, intx_text
    call puts
    mov eax, dword ptr [irq]
    call print_dec
    call newline
virtio_irq_done:
    # 6. DRIVER_OK
    mov al, ST_ACK | ST_DRIVER | ST_DRIVER_OK
    mov ecx, VIRTIO_STATUS
    call vio_out8
    call vio_in8_status
    movzx eax, al
    CHECK_EQ("device status reads ACKNOWLEDGE|DRIVER|DRIVER_OK", eax, 7)
#if !PARAVIRT
    sti
#endif
    popad
    ret

# setup_queue: edx = queue index, edi = its page-aligned memory.
setup_queue:
    pushad
    mov eax, edx
    mov ecx, VIRTIO_QUEUE_SEL
    call vio_out16
    mov ecx, VIRTIO_QUEUE_NUM
    call vio_in16
    movzx eax, ax
    mov esi, queue_text
    call puts
    push eax
    mov eax, edx
    call print_dec
    mov esi, queue_size_text
    call puts
    pop eax
    call print_dec
    call newline
    cmp eax, QSZ
    je setup_queue_size_ok
    FAIL("queue size", "the device's queue is not 256 entries (the driver's ring layout)")
    popad
    ret
setup_queue_size_ok:
    mov eax, edi
    shr eax, 12
    mov ecx, VIRTIO_QUEUE_PFN
    call vio_out32
    cmp dword ptr [use_msix], 0
    je setup_queue_done
    mov ax, 0                           # rx: MSI-X table entry 0; tx: none
    cmp edx, 0
    je setup_queue_vec
    mov ax, 0xFFFF
setup_queue_vec:
    mov ecx, VIRTIO_MSI_QUEUE
    call vio_out16
    mov ecx, VIRTIO_MSI_QUEUE
    call vio_in16
    cmp edx, 0
    jne setup_queue_done
    movzx eax, ax
    CHECK_EQ("the receive queue accepted MSI-X vector 0", eax, 0)
setup_queue_done:
    popad
    ret

# msix_setup: table entry 0 -> local APIC 0, vector MSIX_VEC_RX; enable MSI-X in the capability.
msix_setup:
    pushad
    mov ebx, dword ptr [msix_bar]
    mov eax, dword ptr [msix_cap]
    add eax, 4
    call pci_read                       # table offset / BIR
    mov ecx, eax
    and ecx, 7
    CHECK_EQ("MSI-X table is in BAR1", ecx, 1)
    and eax, 0xFFFFFFF8
    add ebx, eax
    mov dword ptr [ebx], 0xFEE00000     # message address: APIC ID 0
    mov dword ptr [ebx + 4], 0
    mov dword ptr [ebx + 8], MSIX_VEC_RX  # fixed delivery, edge
    mov dword ptr [ebx + 12], 0         # unmasked
    mov dword ptr [isr_handlers + 4 * MSIX_VEC_RX], msix_handler
    mov eax, dword ptr [msix_cap]
    call pci_read
    mov ecx, eax
    or ecx, 0x80000000                  # message control bit 15: MSI-X enable
    and ecx, 0xBFFFFFFF                 # function mask off
    mov eax, dword ptr [msix_cap]
    call pci_write
    mov esi, msix_text
    call puts
    mov eax, MSIX_VEC_RX
    call print_hex8
    call newline
    popad
    ret

# ---------------------------------------------------------------------------------------------
# Register access: ecx = register offset in BAR0; values in al/ax/eax.
vio_out8:
    push edx
    mov edx, dword ptr [iobase]
    add edx, ecx
    out dx, al
    pop edx
    ret
vio_out16:
    push edx
    mov edx, dword ptr [iobase]
    add edx, ecx
    out dx, ax
    pop edx
    ret
vio_out32:
    push edx
    mov edx, dword ptr [iobase]
    add edx, ecx
    out dx, eax
    pop edx
    ret
vio_in8:
    push edx
    mov edx, dword ptr [iobase]
    add edx, ecx
    in al, dx
    pop edx
    ret
vio_in8_status:
    push ecx
    mov ecx, VIRTIO_STATUS
    call vio_in8
    pop ecx
    ret
vio_in16:
    push edx
    mov edx, dword ptr [iobase]
    add edx, ecx
    in ax, dx
    pop edx
    ret
vio_in32:
    push edx
    mov edx, dword ptr [iobase]
    add edx, ecx
    in eax, dx
    pop edx
    ret

# ---------------------------------------------------------------------------------------------
# Interrupt handlers. INTx: reading the ISR clears it and lowers the (level) line, then EOI.
intx_handler:
    push edx
    mov edx, dword ptr [iobase]
    add edx, VIRTIO_ISR
    in al, dx
    test al, 2                          # ISR bit 1: the configuration changed (link status)
    jz intx_handler_queue
    mov dword ptr [config_changed], 1
intx_handler_queue:
    inc dword ptr [interrupts]
    mov al, PIC_EOI
    cmp dword ptr [irq], 8
    jb intx_handler_master
    out PIC2_CMD, al
intx_handler_master:
    out PIC1_CMD, al
    pop edx
    ret

msix_handler:
    inc dword ptr [interrupts]
    mov dword ptr [APIC_EOI], 0
    ret

# ---------------------------------------------------------------------------------------------
# Receive: every descriptor i of queue 0 is buffer i (BUF bytes, device-writable), posted once
# and re-posted after its frame was handled.
post_rx_buffers:
    pushad
    xor ecx, ecx
post_rx_loop:
    mov eax, ecx
    shl eax, 11                         # * BUF
    add eax, rxbufs
    mov edx, ecx
    shl edx, 4                          # 16 bytes per descriptor
    mov dword ptr [rxq + edx], eax
    mov dword ptr [rxq + edx + 4], 0
    mov dword ptr [rxq + edx + 8], BUF
    mov word ptr [rxq + edx + 12], DESC_WRITE
    mov word ptr [rxq + edx + 14], 0
    mov word ptr [rxq + AVAIL_RING + 2 * ecx], cx
    mov word ptr [txq + AVAIL_RING + 2 * ecx], cx   # (the transmit ring's slots too: `fixed` relies on it)
    inc ecx
    cmp ecx, QSZ
    jb post_rx_loop
    mov word ptr [rxq + USED_EVENT], 0  # interrupt at the first used entry
    mov word ptr [rxq + AVAIL_IDX], QSZ
    mov dword ptr [rx_avail], QSZ
    mov dword ptr [rx_kicked], 0
    call kick_rx
    popad
    ret

# kick_rx / kick_tx: notify the device unless EVENT_IDX says it will look anyway (spec 2.7.10).
kick_rx:
    pushad
    mov ebx, rxq
    mov esi, rx_kicked
    mov edi, dword ptr [rx_avail]
    xor edx, edx
    jmp kick_common
kick_tx:
    cmp dword ptr [com1], 0             # bench com1: nothing in the ring to kick for
    jne kick_tx_none
    pushad
    mov ebx, txq
    mov esi, tx_kicked
    mov edi, dword ptr [tx_avail]
    mov edx, 1
kick_common:
    mov eax, dword ptr [esi]            # old
    mov dword ptr [esi], edi            # new
    test dword ptr [features], F_EVENT_IDX
    jz kick_flags
    # (u16)(new - event - 1) < (u16)(new - old)
    movzx ecx, word ptr [ebx + AVAIL_EVENT]
    mov ebp, edi
    sub ebp, ecx
    dec ebp
    and ebp, 0xFFFF
    sub edi, eax
    and edi, 0xFFFF
    cmp ebp, edi
    jae kick_none
    jmp kick_now
kick_flags:
    test word ptr [ebx + 8192], 1       # used.flags NO_NOTIFY
    jnz kick_none
kick_now:
    mov eax, edx
    mov ecx, VIRTIO_QUEUE_NOTIFY
    call vio_out16
    inc dword ptr [notifies]
kick_none:
    popad
kick_tx_none:
    ret

# wait_rx: handle every frame the device has returned; if none, sleep until an interrupt.
# (The driver runs with interrupts on from DRIVER_OK: the handlers only acknowledge.)
wait_rx:
    pushad
wait_rx_check:
#if PARAVIRT
    movzx eax, word ptr [rxq + USED_IDX] # PV: no device interrupts: poll the used ring
    cmp ax, word ptr [rx_seen]
    jne wait_rx_take
    pause
    jmp wait_rx_check
wait_rx_take:
#else
    cli
    movzx eax, word ptr [rxq + USED_IDX]
    cmp ax, word ptr [rx_seen]
    jne wait_rx_take
    cmp dword ptr [config_changed], 0
    jne wait_rx_config
    sti
    hlt                                 # sti's shadow covers hlt: an interrupt cannot be lost
    jmp wait_rx_check
wait_rx_config:
    sti
    mov dword ptr [config_changed], 0   # a configuration interrupt: is the link still up?
    mov ecx, dword ptr [cfg_off]
    add ecx, 6
    call vio_in16
    test al, 1
    jnz wait_rx_check
    FAIL("link", "the device reports link down (config status bit 0 clear): no reply can come")
    jmp kernel_exit
wait_rx_take:
    sti
#endif
    call handle_rx
    popad
    ret

# handle_rx: each new used entry: classify and print the frame, re-post its buffer.
handle_rx:
    pushad
handle_rx_next:
    movzx eax, word ptr [rxq + USED_IDX]
    movzx ecx, word ptr [rx_seen]
    cmp ax, cx
    je handle_rx_done
    and ecx, QSZ - 1
    mov ebx, dword ptr [rxq + USED_RING + 8 * ecx]       # id = descriptor = buffer index
    mov ecx, dword ptr [rxq + USED_RING + 8 * ecx + 4]   # bytes written
    sub ecx, HDR
    mov esi, ebx
    shl esi, 11
    add esi, rxbufs + HDR
    call rx_frame
    mov eax, dword ptr [rx_avail]       # re-post buffer ebx
    and eax, QSZ - 1
    cmp dword ptr [fixed], 0            # DPDK's fixed mapping: slot i holds buffer i already
    je handle_rx_post
    cmp word ptr [rxq + AVAIL_RING + 2 * eax], bx
    je handle_rx_posted
handle_rx_post:
    mov word ptr [rxq + AVAIL_RING + 2 * eax], bx
handle_rx_posted:
    inc dword ptr [rx_avail]
    mov eax, dword ptr [rx_avail]
    mov word ptr [rxq + AVAIL_IDX], ax
    inc word ptr [rx_seen]
    mov ax, word ptr [rx_seen]
    mov word ptr [rxq + USED_EVENT], ax # interrupt me at the next one
    jmp handle_rx_next
handle_rx_done:
    call kick_rx
    popad
    ret

# rx_frame: esi = frame, ecx = length. Print it and recognise it.
rx_frame:
    cmp dword ptr [role], 0
    jne peer_rx_frame                   # a peer role classifies and answers frames itself
    pushad
    inc dword ptr [rx_count]
    mov dword ptr [rx_last_len], ecx
    mov dword ptr [rx_last_ptr], esi
    # an echo of what we sent (loopback)?
    cmp ecx, dword ptr [tx_last_len]
    jne rx_frame_classify
    mov edi, dword ptr [tx_last_ptr]
    push ecx
    push esi
    repe cmpsb
    pop esi
    pop ecx
    jne rx_frame_classify
    inc dword ptr [rx_echoes]
    cmp dword ptr [quiet], 0
    je rx_frame_echo_print
    cmp dword ptr [in_burst], 0
    jne rx_frame_done
rx_frame_echo_print:
    mov edi, rx_echo_text
    call print_frame_line
    jmp rx_frame_done
rx_frame_classify:
    cmp word ptr [esi + 12], 0x0608     # ARP (network order)
    jne rx_frame_ip
    cmp word ptr [esi + 20], 0x0200     # reply
    jne rx_frame_other
    mov eax, dword ptr [esi + 28]
    cmp eax, dword ptr [peer_ip]
    jne rx_frame_other
    mov eax, dword ptr [esi + 22]       # the peer's MAC
    mov dword ptr [peer_mac], eax
    mov ax, word ptr [esi + 26]
    mov word ptr [peer_mac + 4], ax
    mov dword ptr [arp_answered], 1
    mov edi, rx_arp_text
    call print_frame_line
    cmp dword ptr [bench], 0
    jne rx_frame_done
    mov esi, is_at_text
    call puts
    mov esi, peer_mac
    call print_mac
    call newline
    jmp rx_frame_done
rx_frame_ip:
    cmp word ptr [esi + 12], 0x0008     # IPv4
    jne rx_frame_other
    cmp byte ptr [esi + 23], 1          # ICMP
    jne rx_frame_other
    cmp byte ptr [esi + 34], 0          # echo reply
    jne rx_frame_other
    mov eax, dword ptr [esi + 26]
    cmp eax, dword ptr [peer_ip]
    jne rx_frame_other
    # the ICMP message (type .. data) is the peer-independent part: check its checksum and data
    push esi
    push ecx
    add esi, 34
    mov ecx, 8 + PING_DATA
    call inet_checksum
    mov dword ptr [ping_icmp_sum], eax
    pop ecx
    pop esi
    mov edi, rx_ping_text
    call print_frame_line_icmp
    cmp dword ptr [ping_icmp_sum], 0
    jne rx_frame_done
    mov eax, dword ptr [esi + 38]       # id, seq
    cmp eax, 0x0100444E                 # id 0x4e44 ("ND"), seq 1, in network order
    jne rx_frame_done
    push esi
    lea esi, [esi + 42]
    mov edi, ping_data
    mov ecx, PING_DATA
    repe cmpsb
    pop esi
    jne rx_frame_done
    mov dword ptr [ping_answered], 1
    jmp rx_frame_done
rx_frame_other:
    inc dword ptr [rx_other]
rx_frame_done:
    popad
    ret

# print_frame_line: "rx <len> bytes, sum 0x<inet checksum of the frame>: <text at edi>"
print_frame_line:
    cmp dword ptr [bench], 0          # bench: nothing printed after init
    jne print_frame_line_skip
    pushad
    mov ebx, esi
    mov edx, ecx
    mov esi, rx_text
    call puts
    mov eax, edx
    call print_dec
    mov esi, bytes_sum_text
    call puts
    mov esi, ebx
    mov ecx, edx
    call inet_checksum
    call print_hex16
    mov esi, colon_text
    call puts
    mov esi, edi
    call puts
    call newline
    popad
print_frame_line_skip:
    ret

# print_frame_line_icmp: as above, but the sum is over the ICMP message only (QEMU's IP id varies).
print_frame_line_icmp:
    cmp dword ptr [bench], 0          # bench: nothing printed after init
    jne print_frame_line_icmp_skip
    pushad
    mov ebx, esi
    mov edx, ecx
    mov esi, rx_text
    call puts
    mov eax, edx
    call print_dec
    mov esi, icmp_sum_text
    call puts
    lea esi, [ebx + 34]
    mov ecx, 8 + PING_DATA
    call data_sum
    call print_hex16
    mov esi, colon_text
    call puts
    mov esi, edi
    call puts
    call newline
    popad
print_frame_line_icmp_skip:
    ret

# ---------------------------------------------------------------------------------------------
# Transmit. Descriptors are taken round-robin; the device returns them in order, so a count of
# free ones is enough: chain_len[head] says how many a returned chain gives back.
# tx_reserve: ecx = descriptors needed; kicks and waits for the device until they are free.
tx_reserve:
    pushad
tx_reserve_check:
    call tx_reclaim
    cmp dword ptr [desc_free], ecx
    jae tx_reserve_done
    call kick_tx
    pause
    jmp tx_reserve_check
tx_reserve_done:
    popad
    ret

tx_reclaim:
    pushad
tx_reclaim_next:
    movzx eax, word ptr [txq + USED_IDX]
    movzx ecx, word ptr [tx_seen]
    cmp ax, cx
    je tx_reclaim_done
    and ecx, QSZ - 1
    mov ebx, dword ptr [txq + USED_RING + 8 * ecx]
    and ebx, QSZ - 1
    movzx eax, byte ptr [chain_len + ebx]
    add dword ptr [desc_free], eax
    inc word ptr [tx_seen]
    inc dword ptr [tx_done]
    jmp tx_reclaim_next
tx_reclaim_done:
    popad
    ret

# tx_desc: eax = buffer address, ecx = length, dx = flags -> ebx = descriptor index used.
tx_desc:
    push eax
    mov ebx, dword ptr [desc_next]
    and ebx, QSZ - 1
    inc dword ptr [desc_next]
    dec dword ptr [desc_free]
    shl ebx, 4
    mov dword ptr [txq + ebx], eax
    mov dword ptr [txq + ebx + 4], 0
    mov dword ptr [txq + ebx + 8], ecx
    mov word ptr [txq + ebx + 12], dx
    mov eax, dword ptr [desc_next]      # next = the following slot (used when NEXT is set)
    and eax, QSZ - 1
    mov word ptr [txq + ebx + 14], ax
    shr ebx, 4
    pop eax
    ret

# tx_publish: ebx = chain head, eax = descriptors in it: put it in the available ring.
tx_publish:
    push ecx
    mov byte ptr [chain_len + ebx], al
    mov ecx, dword ptr [tx_avail]
    and ecx, QSZ - 1
    cmp dword ptr [fixed], 0            # DPDK's fixed mapping: slot i holds descriptor i already,
    je tx_publish_write                 # so a single-descriptor send writes only the index
    cmp word ptr [txq + AVAIL_RING + 2 * ecx], bx
    je tx_publish_written
tx_publish_write:
    mov word ptr [txq + AVAIL_RING + 2 * ecx], bx
tx_publish_written:
    inc dword ptr [tx_avail]
    mov ecx, dword ptr [tx_avail]
    mov word ptr [txq + AVAIL_IDX], cx  # (x86 keeps stores in order: the entry is visible first)
    inc dword ptr [tx_count]
    pop ecx
    ret

# tx_buffer: ebx = descriptor index -> edi = its BUF-byte buffer.
tx_buffer:
    mov edi, ebx
    shl edi, 11
    add edi, txbufs
    ret

# send_simple: esi = frame, ecx = length; one descriptor holding header + frame. No kick.
send_simple:
    cmp dword ptr [com1], 0
    jne com1_frame
    pushad
    mov dword ptr [tx_last_ptr], esi
    mov dword ptr [tx_last_len], ecx
    push ecx
    mov ecx, 1
    call tx_reserve
    pop ecx
    mov ebx, dword ptr [desc_next]
    and ebx, QSZ - 1
    call tx_buffer
    push edi
    push ecx
    push edi
    mov ecx, HDR
    xor eax, eax
    rep stosb                           # virtio_net_hdr: no offloads
    pop edi
    pop ecx
    add edi, HDR
    rep movsb
    pop eax                             # buffer
    mov ecx, dword ptr [tx_last_len]
    add ecx, HDR
    xor edx, edx
    call tx_desc
    mov eax, 1
    call tx_publish
    popad
    ret

# print_tx_line: esi = frame, ecx = length, edi = text.
print_tx_line:
    cmp dword ptr [bench], 0          # bench: nothing printed after init
    jne print_tx_line_skip
    pushad
    mov ebx, esi
    mov edx, ecx
    mov esi, tx_text
    call puts
    mov eax, edx
    call print_dec
    mov esi, bytes_sum_text
    call puts
    mov esi, ebx
    mov ecx, edx
    call inet_checksum
    call print_hex16
    mov esi, colon_text
    call puts
    mov esi, edi
    call puts
    call newline
    popad
print_tx_line_skip:
    ret

send_arp:
    pushad
    mov esi, my_mac                     # Ethernet source and ARP sender: our MAC
    mov edi, arp_frame + 6
    mov ecx, 6
    rep movsb
    mov esi, my_mac
    mov edi, arp_frame + 22
    mov ecx, 6
    rep movsb
    mov esi, arp_frame
    mov ecx, 42
    mov edi, tx_arp_text
    call print_tx_line
    call send_simple
    cmp dword ptr [com1], 0
    jne send_arp_done
    call kick_tx
    call wait_rx
    cmp dword ptr [bench], 0
    jne send_arp_done
    CHECK_EQ("the ARP request for 10.0.2.2 was answered (a reply, or the frame itself from a loopback peer)", dword ptr [rx_count], 1)
send_arp_done:
    popad
    ret

send_ping:
    pushad
    mov eax, dword ptr [arp_answered]   # a loopback peer echoes: address our own MAC then
    mov esi, peer_mac
    test eax, eax
    jnz send_ping_mac
    mov esi, my_mac
send_ping_mac:
    mov edi, ping_frame
    mov ecx, 6
    rep movsb
    mov esi, my_mac
    mov edi, ping_frame + 6
    mov ecx, 6
    rep movsb
    mov esi, ping_data                  # payload, then the IP and ICMP checksums
    mov edi, ping_frame + 42
    mov ecx, PING_DATA
    rep movsb
    mov esi, ping_frame + 14
    mov ecx, 20
    call inet_checksum
    mov word ptr [ping_frame + 24], ax
    mov esi, ping_frame + 34
    mov ecx, 8 + PING_DATA
    call inet_checksum
    mov word ptr [ping_frame + 36], ax
    mov esi, ping_frame
    mov ecx, 42 + PING_DATA
    mov edi, tx_ping_text
    call print_tx_line
    call send_simple
    cmp dword ptr [com1], 0
    jne send_ping_done
    call kick_tx
    call wait_rx
    cmp dword ptr [bench], 0
    jne send_ping_done
    mov eax, dword ptr [ping_answered]
    or eax, dword ptr [rx_echoes]
    setnz al
    movzx eax, al
    CHECK_EQ("the ICMP echo request to 10.0.2.2 was answered (a valid echo reply, or the frame itself)", eax, 1)
send_ping_done:
    popad
    ret

# make_test_frame: edi = buffer, ecx = length, eax = sequence number: an Ethernet frame of type
# 0x88b5 (local experimental: nobody answers it) from us to the broadcast address, bytes = f(seq, i).
make_test_frame:
    pushad
    mov ebx, eax
    mov edx, ecx
    push edi
    mov eax, dword ptr [test_dst]       # broadcast, or the peer's MAC (role=ping)
    stosd
    mov ax, word ptr [test_dst + 4]
    stosw
    mov esi, my_mac
    movsd
    movsw
    mov word ptr [edi], 0xB588
    add edi, 2
    sub edx, 14
make_test_frame_loop:
    mov eax, edx
    add eax, ebx
    imul eax, eax, 167
    stosb
    dec edx
    jnz make_test_frame_loop
    pop edi
    popad
    ret

# send_chained: one frame of CHAIN_LEN bytes over three descriptors: header, part 1, part 2.
send_chained:
    pushad
    mov edi, scratch
    mov ecx, CHAIN_LEN
    mov eax, 1000
    call make_test_frame
    mov esi, scratch
    mov edi, tx_chain_text
    call print_tx_line
    cmp dword ptr [com1], 0
    je send_chained_ring
    call com1_frame
    popad
    ret
send_chained_ring:
    mov dword ptr [tx_last_ptr], esi
    mov dword ptr [tx_last_len], ecx
    mov ecx, 3
    call tx_reserve
    mov ebx, dword ptr [desc_next]      # header in the first descriptor's buffer
    and ebx, QSZ - 1
    call tx_buffer
    push edi
    mov ecx, HDR
    xor eax, eax
    rep stosb
    pop eax
    mov ecx, HDR
    mov edx, DESC_NEXT
    call tx_desc
    mov ebp, ebx                        # the head
    call tx_buffer_next                 # part 1
    mov esi, scratch
    mov ecx, CHAIN_SPLIT
    push edi
    rep movsb
    pop eax
    mov ecx, CHAIN_SPLIT
    mov edx, DESC_NEXT
    call tx_desc
    call tx_buffer_next                 # part 2
    mov ecx, CHAIN_LEN - CHAIN_SPLIT
    push edi
    rep movsb
    pop eax
    mov ecx, CHAIN_LEN - CHAIN_SPLIT
    xor edx, edx
    call tx_desc
    mov ebx, ebp
    mov eax, 3
    call tx_publish
    call kick_tx
    call wait_echo_if_loopback
    popad
    ret

# tx_buffer_next: edi = the buffer of the next descriptor tx_desc will take.
tx_buffer_next:
    push ebx
    mov ebx, dword ptr [desc_next]
    and ebx, QSZ - 1
    call tx_buffer
    pop ebx
    ret

# send_indirect: one frame whose chain lives in an indirect table (VIRTIO_F_INDIRECT_DESC):
# the ring descriptor points at a 2-entry table: header, then the frame.
send_indirect:
    pushad
    test dword ptr [features], F_INDIRECT
    jz send_indirect_done
    mov edi, scratch
    mov ecx, 200
    mov eax, 2000
    call make_test_frame
    mov esi, scratch
    mov edi, tx_indirect_text
    call print_tx_line
    cmp dword ptr [com1], 0
    je send_indirect_ring
    call com1_frame
    jmp send_indirect_done
send_indirect_ring:
    mov dword ptr [tx_last_ptr], esi
    mov dword ptr [tx_last_len], ecx
    mov ecx, 1
    call tx_reserve
    call tx_buffer_next                 # the buffer: [0, HDR) header, [16, 16 + 200) frame
    mov ebx, edi
    push edi
    mov ecx, HDR
    xor eax, eax
    rep stosb
    pop edi
    add edi, 16
    mov esi, scratch
    mov ecx, 200
    rep movsb
    mov dword ptr [indirect_table], ebx
    mov dword ptr [indirect_table + 4], 0
    mov dword ptr [indirect_table + 8], HDR
    mov dword ptr [indirect_table + 12], 0x00010000 | DESC_NEXT   # flags NEXT, next 1
    lea eax, [ebx + 16]
    mov dword ptr [indirect_table + 16], eax
    mov dword ptr [indirect_table + 20], 0
    mov dword ptr [indirect_table + 24], 200
    mov dword ptr [indirect_table + 28], 0
    mov eax, indirect_table
    mov ecx, 32
    mov edx, DESC_INDIRECT
    call tx_desc
    mov eax, 1
    call tx_publish
    call kick_tx
    call wait_echo_if_loopback
send_indirect_done:
    popad
    ret

# wait_echo_if_loopback: with a loopback peer (it echoed the ARP request) the frame comes back.
wait_echo_if_loopback:
    cmp dword ptr [arp_answered], 0
    jne wait_echo_done
    call wait_rx
wait_echo_done:
    ret

# send_burst: BURST frames, queued without a kick until the ring is full, then kick and wait for
# descriptors: the available and used indices wrap past the queue size.
send_burst:
    pushad
    mov dword ptr [in_burst], 1
    xor ebp, ebp
send_burst_loop:
    mov edi, scratch
    mov ecx, BURST_LEN
    mov eax, ebp
    call make_test_frame
    mov esi, scratch
    cmp dword ptr [quiet], 0
    jne send_burst_quiet
    mov edi, tx_burst_text
    call print_tx_line
send_burst_quiet:
    call send_simple                    # (waits for a free descriptor, kicking, when the ring is full)
    cmp dword ptr [arp_answered], 0
    jne send_burst_next
    call kick_tx                        # loopback: each echo needs a posted receive buffer
    call handle_rx
send_burst_next:
    inc ebp
    cmp ebp, dword ptr [burst_n]
    jb send_burst_loop
    call kick_tx
send_burst_drain:
    call tx_reclaim
    mov eax, dword ptr [tx_done]
    cmp eax, dword ptr [tx_count]
    je send_burst_done
    call kick_tx
    pause
    jmp send_burst_drain
send_burst_done:
    mov dword ptr [in_burst], 0
    cmp dword ptr [bench], 0
    jne send_burst_silent
    mov esi, burst_text
    call puts
    mov eax, dword ptr [burst_n]
    call print_dec
    mov esi, burst_text2
    call puts
    mov eax, dword ptr [desc_next]
    call print_dec
    call newline
send_burst_silent:
    popad
    ret

# com1_frame: esi = frame, ecx = length: the frame's bytes through COM1, polled (bench com1).
com1_frame:
    pushad
com1_frame_loop:
    mov al, byte ptr [esi]
    call putc
    inc esi
    dec ecx
    jnz com1_frame_loop
    popad
    ret

wait_loopback_echoes:
    cmp dword ptr [arp_answered], 0
    jne wait_loopback_done
wait_loopback_more:
    mov eax, dword ptr [rx_count]
    cmp eax, dword ptr [tx_count]
    jae wait_loopback_done
    call wait_rx
    jmp wait_loopback_more
wait_loopback_done:
    ret

report:
    mov eax, dword ptr [tx_done]
    CHECK_EQ("the device returned every transmitted frame in the used ring", eax, dword ptr [tx_count])
    mov eax, dword ptr [tx_avail]
    cmp eax, QSZ
    seta al
    movzx eax, al
    CHECK_EQ("the transmit ring's indices wrapped past the queue size", eax, 1)
#if PARAVIRT
    mov eax, dword ptr [rx_count]
    test eax, eax
    setnz al
    movzx eax, al
    CHECK_EQ("receive completions were seen by polling the used ring (para: no device interrupts)", eax, 1)
#else
    mov eax, dword ptr [interrupts]
    test eax, eax
    setnz al
    movzx eax, al
    CHECK_EQ("receive interrupts were delivered", eax, 1)
#endif
    cmp dword ptr [arp_answered], 0
    je report_loopback
    CHECK_EQ("the peer answered the ping with a valid echo reply (checksum, id, seq, data)", dword ptr [ping_answered], 1)
    ret
report_loopback:
    mov eax, dword ptr [rx_echoes]
    CHECK_EQ("loopback peer: every frame came back unchanged", eax, dword ptr [tx_count])
    ret

# ---------------------------------------------------------------------------------------------
# inet_checksum: esi = data, ecx = length -> eax = RFC 1071 checksum, ready to store (little-endian
# loads give the byte-swapped sum, which stored back little-endian is the right bytes).
inet_checksum:
    call data_sum
    not eax
    and eax, 0xFFFF
    ret

# data_sum: esi, ecx -> eax = ones' complement sum of the 16-bit words (folded, not inverted).
data_sum:
    push esi
    push ecx
    push edx
    xor eax, eax
    xor edx, edx
data_sum_loop:
    cmp ecx, 2
    jb data_sum_tail
    mov dx, word ptr [esi]
    add eax, edx
    add esi, 2
    sub ecx, 2
    jmp data_sum_loop
data_sum_tail:
    test ecx, ecx
    jz data_sum_fold
    movzx edx, byte ptr [esi]
    add eax, edx
data_sum_fold:
    mov edx, eax
    shr edx, 16
    and eax, 0xFFFF
    add eax, edx
    cmp eax, 0xFFFF
    ja data_sum_fold
    pop edx
    pop ecx
    pop esi
    ret

# print_hex16: ax as 0x + 4 hex digits.
print_hex16:
    push eax
    push eax
    mov al, '0'
    call putc
    mov al, 'x'
    call putc
    pop eax
    push eax
    mov al, ah
    call print_hex8
    pop eax
    call print_hex8
    pop eax
    ret

# print_mac: esi = 6 bytes.
print_mac:
    pushad
    mov ecx, 6
print_mac_loop:
    mov al, byte ptr [esi]
    call print_hex8
    inc esi
    dec ecx
    jz print_mac_done
    mov al, ':'
    call putc
    jmp print_mac_loop
print_mac_done:
    popad
    ret

#include "netpeer.inc"

.data
found_text:      .asciz "netdemo: virtio-net at 00:"
found_text2:     .asciz ".0\n"
features_text:   .asciz "features negotiated: "
mac_text:        .asciz "mac "
queue_text:      .asciz "queue "
queue_size_text: .asciz " size "
intx_text:       .asciz "interrupts: INTx through the 8259, IRQ "
msix_text:       .asciz "interrupts: MSI-X through the local APIC, vector 0x"
pv_poll_text:    .asciz "interrupts: none (para delivers no device interrupts): the driver polls the used ring\n"
tx_text:         .asciz "tx "
rx_text:         .asciz "rx "
bytes_sum_text:  .asciz " bytes, sum "
icmp_sum_text:   .asciz " bytes, icmp sum "
colon_text:      .asciz ": "
tx_arp_text:     .asciz "ARP request: who has 10.0.2.2? tell 10.0.2.15"
tx_ping_text:    .asciz "ICMP echo request to 10.0.2.2, id 0x4e44, seq 1"
tx_chain_text:   .asciz "frame in a chain of 3 descriptors (header, 700, 814 bytes)"
tx_indirect_text: .asciz "frame through an indirect descriptor table"
tx_burst_text:   .asciz "burst frame"
rx_echo_text:    .asciz "our own frame, unchanged (loopback peer)"
rx_arp_text:     .asciz "ARP reply from 10.0.2.2"
is_at_text:      .asciz "peer: 10.0.2.2 is at "
rx_ping_text:    .asciz "ICMP echo reply from 10.0.2.2"
burst_text:      .asciz "burst: "
burst_text2:     .asciz " frames sent and returned; descriptors used in all: "
.align 4
peer_ip:         .byte 10, 0, 2, 2
test_dst:        .byte 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0
arp_frame:
    .byte 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0x08, 0x06
    .byte 0, 1, 0x08, 0, 6, 4, 0, 1
    .byte 0, 0, 0, 0, 0, 0, 10, 0, 2, 15
    .byte 0, 0, 0, 0, 0, 0, 10, 0, 2, 2
ping_frame:
    .byte 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x08, 0x00
    .byte 0x45, 0, 0, 84, 0, 1, 0, 0, 64, 1, 0, 0, 10, 0, 2, 15, 10, 0, 2, 2
    .byte 8, 0, 0, 0, 0x4e, 0x44, 0, 1
    .zero PING_DATA
ping_data:
    .ascii "netdemo ping: the payload comes back unchanged 0123456"
    .byte 0, 0
.align 4
desc_free:       .long QSZ
burst_n:         .long BURST

.bss
.align 4096
rxq:             .zero 12288
txq:             .zero 12288
indirect_table:  .zero 64
rxbufs:          .zero 524288
txbufs:          .zero 524288
scratch:         .zero 2048
chain_len:       .zero QSZ
my_mac:          .zero 8
peer_mac:        .zero 8
.align 4
use_msix:        .zero 4
quiet:           .zero 4
pci_slot:        .zero 4
pci_slot_bits:   .zero 4
iobase:          .zero 4
iosize:          .zero 4
msix_bar:        .zero 4
msix_cap:        .zero 4
irq:             .zero 4
features:        .zero 4
cfg_off:         .zero 4
interrupts:      .zero 4
notifies:        .zero 4
rx_avail:        .zero 4
rx_kicked:       .zero 4
rx_seen:         .zero 4
config_changed:  .zero 4
rx_count:        .zero 4
rx_echoes:       .zero 4
rx_other:        .zero 4
rx_last_len:     .zero 4
rx_last_ptr:     .zero 4
tx_avail:        .zero 4
tx_kicked:       .zero 4
tx_seen:         .zero 4
tx_done:         .zero 4
tx_count:        .zero 4
tx_last_len:     .zero 4
tx_last_ptr:     .zero 4
desc_next:       .zero 4
arp_answered:    .zero 4
ping_answered:   .zero 4
ping_icmp_sum:   .zero 4
in_burst:        .zero 4
bench:           .zero 4
com1:            .zero 4
noframes:        .zero 4
fixed:           .zero 4
noevent:         .zero 4
single:          .zero 4

#include "e1000.inc"                     // the second driver: an Intel 82540EM
