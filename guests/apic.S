# description: local APIC (timer one-shot/periodic, TPR, self-IPI, NMI, EOI), fw_cfg, Multiboot modules and command line
#
# The PC's second interrupt path, with the 8259 left masked: the local APIC at 0xFEE00000 is
# software-enabled and its timer, self-IPIs and task priority are checked against the SDM
# (chapter 10); fw_cfg (ports 0x510/0x511) is read as QEMU documents it; the kernel's command
# line and first module come from multiboot_info. Run it with a module and a command line, e.g.
#     cpuvirt run apic --module guests/apic.module,'mod-arg' --append 'apic.test=1'
#     qemu-system-i386 ... -kernel apic.bin -initrd 'guests/apic.module mod-arg' -append 'apic.test=1'
# Nothing printed depends on time or on the paths given: the first word of each command line (the
# kernel's or module's file name) is skipped, and fw_cfg's file directory is checked, not printed
# (QEMU lists some 14 files there, cpuvirt none).
#include "kernel.inc"

#define APIC            0xFEE00000
#define APIC_ID         (APIC + 0x20)
#define APIC_VERSION    (APIC + 0x30)
#define APIC_TPR        (APIC + 0x80)
#define APIC_PPR        (APIC + 0xA0)
#define APIC_EOI        (APIC + 0xB0)
#define APIC_SPIV       (APIC + 0xF0)
#define APIC_ISR        (APIC + 0x100)  // 8 registers, 16 bytes apart: vector v is bit v%32 of ISR[v/32]
#define APIC_IRR        (APIC + 0x200)
#define APIC_ICR_LO     (APIC + 0x300)
#define APIC_ICR_HI     (APIC + 0x310)
#define APIC_LVT_TIMER  (APIC + 0x320)
#define APIC_LVT_LINT0  (APIC + 0x350)
#define APIC_TIMER_INIT (APIC + 0x380)
#define APIC_TIMER_CUR  (APIC + 0x390)
#define APIC_TIMER_DIV  (APIC + 0x3E0)

#define SPIV_ENABLE     0x100
#define LVT_MASKED      0x10000
#define LVT_PERIODIC    0x20000
#define ICR_SELF        0x40000         // destination shorthand 01: self
#define ICR_ALL_BUT_SELF 0xC0000        // destination shorthand 11
#define ICR_NMI         0x400           // delivery mode 100
#define ICR_INIT        0x500
#define ICR_SIPI        0x600
#define ICR_ASSERT      0x4000
#define ICR_PENDING     0x1000          // delivery status
#define DIVIDE_BY_16    0x3

#define VEC_TIMER       64              // 0x40, priority class 4
#define VEC_LOW         65              // 0x41, class 4
#define VEC_HIGH        97              // 0x61, class 6
#define VEC_SPURIOUS    255
#define VEC_NMI         2

#define FW_CFG_SEL      0x510
#define FW_CFG_DATA     0x511
#define WAIT_LIMIT      2000000         // loop iterations to wait for an interrupt that must come
#define QUIET_LOOPS     200000          // loop iterations during which one must not

# Multiboot information (spec 3.3)
#define MBI_FLAGS       0
#define MBI_MEM_UPPER   8
#define MBI_CMDLINE     16
#define MBI_MODS_COUNT  20
#define MBI_MODS_ADDR   24
#define MBI_HAS_CMDLINE 0x4
#define MBI_HAS_MODS    0x8

.text
ISR_NOERR(64)
ISR_NOERR(65)
ISR_NOERR(97)
ISR_NOERR(255)

main:
    call apic_gates
    call check_cpuid
    call check_fw_cfg
    call check_multiboot
    call check_apic_registers
    call check_self_ipi
    call check_tpr
    call check_priority_order
    call check_nmi
    call check_init_sipi
    call check_timer_one_shot
    call check_timer_periodic
    call check_timer_masked
    mov dword ptr [APIC_LVT_TIMER], LVT_MASKED | VEC_TIMER
    mov dword ptr [APIC_TIMER_INIT], 0
    ret

# apic_gates: interrupt gates for the APIC's vectors, and their handlers.
apic_gates:
    mov eax, VEC_TIMER
    mov edx, isr_stub_64
    mov cl, 0x8E
    call idt_set_gate
    mov eax, VEC_LOW
    mov edx, isr_stub_65
    call idt_set_gate
    mov eax, VEC_HIGH
    mov edx, isr_stub_97
    call idt_set_gate
    mov eax, VEC_SPURIOUS
    mov edx, isr_stub_255
    call idt_set_gate
    SET_HANDLER(VEC_TIMER, timer_handler)
    SET_HANDLER(VEC_LOW, ipi_handler)
    SET_HANDLER(VEC_HIGH, ipi_handler)
    SET_HANDLER(VEC_SPURIOUS, spurious_handler)
    SET_HANDLER(VEC_NMI, nmi_handler)
    ret

# --- CPUID -------------------------------------------------------------------------------------
check_cpuid:
    mov eax, 1
    cpuid
    shr edx, 9
    and edx, 1
    CHECK_EQ("CPUID.1:EDX.APIC[bit 9] = 1: a local APIC is present", edx, 1)
    ret

# --- fw_cfg ------------------------------------------------------------------------------------
# fw_select: ax = key. fw_read32: eax = the next 4 data bytes, little-endian.
fw_select:
    push edx
    mov dx, FW_CFG_SEL
    out dx, ax
    pop edx
    ret
fw_read32:
    push ecx
    push edx
    mov dx, FW_CFG_DATA
    mov ecx, 4
fw_read32_loop:
    in al, dx
    ror eax, 8
    dec ecx
    jnz fw_read32_loop
    pop edx
    pop ecx
    ret

check_fw_cfg:
    mov ax, 0x0000
    call fw_select
    call fw_read32
    CHECK_EQ("fw_cfg signature (key 0x00) reads QEMU", eax, 0x554D4551)
    mov ax, 0x0001
    call fw_select
    call fw_read32
    and eax, 1
    CHECK_EQ("fw_cfg id (key 0x01) has the traditional interface (bit 0)", eax, 1)
    mov ax, 0x0005
    call fw_select
    call fw_read32
    CHECK_EQ("fw_cfg CPU count (key 0x05, 16 bits, then zeros past the end) is 1", eax, 1)
    mov ax, 0x0003
    call fw_select
    call fw_read32
    mov ecx, eax
    call fw_read32
    CHECK_EQ("fw_cfg RAM size (key 0x03) high dword is 0", eax, 0)
    # QEMU's mem_upper leaves out 1 MiB and the 128 KiB SeaBIOS keeps at the top of RAM
    mov ebx, dword ptr [boot_info]
    mov eax, dword ptr [ebx + MBI_MEM_UPPER]
    shl eax, 10
    add eax, 0x100000 + 0x20000
    CHECK_EQ("fw_cfg RAM size agrees with multiboot mem_upper", ecx, eax)
    mov ax, 0x1234
    call fw_select
    call fw_read32
    CHECK_EQ("fw_cfg key 0x1234 (no such item) reads zeros", eax, 0)
    mov ax, 0x4000
    call fw_select
    call fw_read32
    CHECK_EQ("fw_cfg ignores selector bit 14 (key 0x4000 is the signature)", eax, 0x554D4551)
    # The file directory (key 0x19): a big-endian count, then 64-byte entries (size, select,
    # reserved, name[56]), each naming an item at key 0x20 or above with a NUL-terminated name.
    mov ax, 0x0019
    call fw_select
    call fw_read32
    bswap eax
    mov esi, eax
    xor edi, edi                        # malformed entries
    cmp esi, 0x1000
    jb fw_dir_loop
    inc edi
    xor esi, esi
fw_dir_loop:
    test esi, esi
    jz fw_dir_done
    call fw_read32                      # size
    call fw_read32                      # select (big-endian) and reserved
    bswap eax
    shr eax, 16
    cmp eax, 0x20
    jae fw_dir_select_ok
    inc edi
fw_dir_select_ok:
    mov ecx, 56
    xor ebx, ebx                        # NULs seen in the name
fw_dir_name:
    push edx
    mov dx, FW_CFG_DATA
    in al, dx
    pop edx
    test al, al
    jnz fw_dir_name_next
    inc ebx
fw_dir_name_next:
    dec ecx
    jnz fw_dir_name
    test ebx, ebx
    jnz fw_dir_name_ok
    inc edi
fw_dir_name_ok:
    dec esi
    jmp fw_dir_loop
fw_dir_done:
    CHECK_EQ("fw_cfg file directory (key 0x19) is well formed", edi, 0)
    ret

# --- Multiboot command line and modules --------------------------------------------------------
# print_args: esi = a command line "first-word rest": print "rest" (or "(none)"), then a newline.
print_args:
    push eax
    push esi
print_args_skip:
    mov al, byte ptr [esi]
    test al, al
    jz print_args_none
    inc esi
    cmp al, ' '
    jne print_args_skip
    cmp byte ptr [esi], 0
    je print_args_none
    call puts
    jmp print_args_done
print_args_none:
    mov esi, none_text
    call puts
print_args_done:
    call newline
    pop esi
    pop eax
    ret

check_multiboot:
    mov ebx, dword ptr [boot_info]
    mov eax, dword ptr [ebx + MBI_FLAGS]
    and eax, MBI_HAS_CMDLINE | MBI_HAS_MODS
    CHECK_EQ("multiboot_info has a command line and a module list (flags bits 2, 3)", eax, MBI_HAS_CMDLINE | MBI_HAS_MODS)
    mov esi, dword ptr [ebx + MBI_CMDLINE]
    cmp esi, __bss_end
    setae al
    movzx eax, al
    CHECK_EQ("the command line lies above the kernel image", eax, 1)
    mov esi, cmdline_text
    call puts
    mov esi, dword ptr [ebx + MBI_CMDLINE]
    call print_args
    mov esi, mods_text
    call puts
    mov eax, dword ptr [ebx + MBI_MODS_COUNT]
    call print_dec
    call newline
    cmp dword ptr [ebx + MBI_MODS_COUNT], 0
    je check_multiboot_done
    mov edi, dword ptr [ebx + MBI_MODS_ADDR]
    mov esi, mod_args_text
    call puts
    mov esi, dword ptr [edi + 8]
    call print_args
    mov eax, dword ptr [edi]
    and eax, 0xFFF
    CHECK_EQ("module 0 starts on a page boundary", eax, 0)
    mov eax, dword ptr [edi]
    cmp eax, __bss_end
    setae al
    movzx eax, al
    CHECK_EQ("module 0 lies above the kernel image", eax, 1)
    # its first line, at most 64 bytes
    mov esi, mod_line_text
    call puts
    mov esi, dword ptr [edi]
    mov ecx, dword ptr [edi + 4]
    sub ecx, esi
    cmp ecx, 64
    jbe check_multiboot_line
    mov ecx, 64
check_multiboot_line:
    test ecx, ecx
    jz check_multiboot_line_end
    mov al, byte ptr [esi]
    cmp al, 10
    je check_multiboot_line_end
    call putc
    inc esi
    dec ecx
    jmp check_multiboot_line
check_multiboot_line_end:
    call newline
check_multiboot_done:
    ret

# --- registers -----------------------------------------------------------------------------------
check_apic_registers:
    mov eax, dword ptr [APIC_ID]
    CHECK_EQ("APIC ID (0x20) of the boot CPU is 0", eax, 0)
    mov eax, dword ptr [APIC_VERSION]
    CHECK_EQ("APIC version (0x30): integrated APIC 0x14, 6 LVT entries", eax, 0x00050014)
    mov eax, dword ptr [APIC_LVT_LINT0]
    and eax, LVT_MASKED | 0x700
    CHECK_EQ("LVT LINT0 is unmasked ExtINT: the 8259 reaches the CPU through the APIC", eax, 0x700)
    mov dword ptr [APIC_SPIV], SPIV_ENABLE | VEC_SPURIOUS
    mov eax, dword ptr [APIC_SPIV]
    CHECK_EQ("SPIV (0xF0) software-enables the APIC with spurious vector 0xFF", eax, SPIV_ENABLE | VEC_SPURIOUS)
    mov dword ptr [APIC_TPR], 0x20
    mov eax, dword ptr [APIC_TPR]
    CHECK_EQ("TPR (0x80) reads back", eax, 0x20)
    mov eax, dword ptr [APIC_PPR]
    CHECK_EQ("PPR (0xA0) = TPR while nothing is in service", eax, 0x20)
    mov dword ptr [APIC_TPR], 0
    mov dword ptr [APIC_TIMER_DIV], 0xB
    mov eax, dword ptr [APIC_TIMER_DIV]
    CHECK_EQ("divide configuration (0x3E0) reads back (0xB: divide by 1)", eax, 0xB)
    ret

# wait_for: edi = address of a counter; wait (interrupts as they are) until it is nonzero or the
# limit runs out. Returns the counter in eax.
wait_for:
    push ecx
    mov ecx, WAIT_LIMIT
wait_for_loop:
    mov eax, dword ptr [edi]
    test eax, eax
    jnz wait_for_done
    dec ecx
    jnz wait_for_loop
wait_for_done:
    pop ecx
    ret

# quiet: spin QUIET_LOOPS iterations.
quiet:
    push ecx
    mov ecx, QUIET_LOOPS
quiet_loop:
    dec ecx
    jnz quiet_loop
    pop ecx
    ret

# --- self-IPI ------------------------------------------------------------------------------------
check_self_ipi:
    cli
    mov dword ptr [ipi_count], 0
    mov dword ptr [APIC_ICR_HI], 0
    mov dword ptr [APIC_ICR_LO], ICR_SELF | VEC_HIGH
    mov eax, dword ptr [APIC_ICR_LO]
    and eax, ICR_PENDING
    CHECK_EQ("ICR delivery status reads idle (the IPI was sent)", eax, 0)
    mov eax, dword ptr [APIC_IRR + 0x30]            # vector 0x61: IRR[3] bit 1
    and eax, 2
    CHECK_EQ("a fixed self-IPI waits in the IRR while IF = 0", eax, 2)
    sti
    mov edi, ipi_count
    call wait_for
    cli
    CHECK_EQ("the self-IPI is delivered once IF = 1", eax, 1)
    CHECK_EQ("it arrives on its vector (0x61)", dword ptr [ipi_vectors], VEC_HIGH)
    CHECK_EQ("ISR shows it in service inside the handler", dword ptr [ipi_isr_bit], 1)
    CHECK_EQ("PPR is the in-service class inside the handler (0x60)", dword ptr [ipi_ppr], 0x60)
    mov eax, dword ptr [APIC_ISR + 0x30]
    CHECK_EQ("EOI (0xB0) cleared it from the ISR", eax, 0)
    ret

# --- task priority --------------------------------------------------------------------------------
check_tpr:
    cli
    mov dword ptr [ipi_count], 0
    mov dword ptr [APIC_TPR], 0x50
    mov dword ptr [APIC_ICR_LO], ICR_SELF | VEC_LOW
    sti
    call quiet
    cli
    CHECK_EQ("TPR 0x50 holds back vector 0x41 (class 4 <= 5) with IF = 1", dword ptr [ipi_count], 0)
    mov eax, dword ptr [APIC_IRR + 0x20]            # vector 0x41: IRR[2] bit 1
    and eax, 2
    CHECK_EQ("the held-back vector stays in the IRR", eax, 2)
    mov eax, dword ptr [APIC_PPR]
    CHECK_EQ("PPR = TPR (0x50)", eax, 0x50)
    mov dword ptr [APIC_TPR], 0x30
    sti
    mov edi, ipi_count
    call wait_for
    cli
    CHECK_EQ("lowering TPR to 0x30 lets vector 0x41 through", eax, 1)
    CHECK_EQ("it arrives on vector 0x41", dword ptr [ipi_vectors], VEC_LOW)
    mov dword ptr [APIC_TPR], 0
    ret

# --- two requests: the higher class first, the lower one after the EOI -----------------------------
check_priority_order:
    cli
    mov dword ptr [ipi_count], 0
    mov dword ptr [APIC_ICR_LO], ICR_SELF | VEC_LOW
    mov dword ptr [APIC_ICR_LO], ICR_SELF | VEC_HIGH
    sti
    mov ecx, WAIT_LIMIT
priority_wait:
    cmp dword ptr [ipi_count], 2
    jae priority_done
    dec ecx
    jnz priority_wait
priority_done:
    cli
    CHECK_EQ("two pending self-IPIs are both delivered", dword ptr [ipi_count], 2)
    CHECK_EQ("the higher priority class (0x61) goes first", dword ptr [ipi_vectors], VEC_HIGH)
    CHECK_EQ("the lower one (0x41) follows its EOI", dword ptr [ipi_vectors + 4], VEC_LOW)
    ret

# --- NMI to self --------------------------------------------------------------------------------------
check_nmi:
    cli
    mov dword ptr [nmi_count], 0
    mov dword ptr [APIC_ICR_LO], ICR_SELF | ICR_NMI
    mov edi, nmi_count
    call wait_for
    CHECK_EQ("a self-NMI through the ICR is delivered on vector 2 even with IF = 0", eax, 1)
    ret

# --- INIT and SIPI to the (absent) other CPUs ----------------------------------------------------------
check_init_sipi:
    cli
    mov dword ptr [ipi_count], 0
    mov dword ptr [nmi_count], 0
    mov dword ptr [APIC_ICR_LO], ICR_ALL_BUT_SELF | ICR_ASSERT | ICR_INIT
    mov dword ptr [APIC_ICR_LO], ICR_ALL_BUT_SELF | ICR_ASSERT | ICR_SIPI | 0x10
    mov eax, dword ptr [APIC_ICR_LO]
    and eax, ICR_PENDING
    CHECK_EQ("INIT and SIPI to all-but-self are accepted (delivery status idle)", eax, 0)
    sti
    call quiet
    cli
    mov eax, dword ptr [ipi_count]
    add eax, dword ptr [nmi_count]
    CHECK_EQ("and do nothing to this CPU", eax, 0)
    ret

# --- timer: one-shot ---------------------------------------------------------------------------------
check_timer_one_shot:
    cli
    mov dword ptr [ticks], 0
    mov dword ptr [APIC_TIMER_DIV], DIVIDE_BY_16
    mov dword ptr [APIC_LVT_TIMER], VEC_TIMER
    # a count that takes minutes, so that even a stalled host reads it still running
    mov dword ptr [APIC_TIMER_INIT], 0xFFFFFFFF
    mov eax, dword ptr [APIC_TIMER_CUR]
    mov ecx, dword ptr [APIC_TIMER_CUR]
    cmp eax, 0
    setne bl
    cmp ecx, eax
    setbe bh
    and bl, bh
    movzx eax, bl
    CHECK_EQ("one-shot: the current count (0x390) runs down from the initial count", eax, 1)
    mov dword ptr [APIC_TIMER_INIT], 1000000       // rewriting restarts it: 16 ms at 1 GHz / 16
one_shot_wait:
    sti
    hlt
    cli
    cmp dword ptr [ticks], 0
    je one_shot_wait
    sti
    call quiet
    cli
    CHECK_EQ("one-shot: exactly one timer interrupt", dword ptr [ticks], 1)
    CHECK_EQ("the timer interrupt arrives on the LVT timer's vector (0x40)", dword ptr [tick_vector], VEC_TIMER)
    mov eax, dword ptr [APIC_TIMER_CUR]
    CHECK_EQ("one-shot: the current count stays at 0", eax, 0)
    CHECK_EQ("the timer interrupt is in service in its handler (ISR bit 0x40)", dword ptr [tick_isr_bit], 1)
    ret

# --- timer: periodic -----------------------------------------------------------------------------------
check_timer_periodic:
    cli
    mov dword ptr [ticks], 0
    mov dword ptr [APIC_LVT_TIMER], LVT_PERIODIC | VEC_TIMER
    mov dword ptr [APIC_TIMER_INIT], 12500         // 200 us at 1 GHz / 16
periodic_wait:
    sti
    hlt
    cli
    cmp dword ptr [ticks], 5
    jb periodic_wait
    mov dword ptr [APIC_LVT_TIMER], LVT_MASKED | LVT_PERIODIC | VEC_TIMER
    mov dword ptr [APIC_TIMER_INIT], 0
    mov eax, dword ptr [ticks]
    cmp eax, 5
    setae al
    movzx eax, al
    CHECK_EQ("periodic: the timer keeps firing (5 interrupts counted)", eax, 1)
    mov eax, dword ptr [tick_count_in_handler]
    test eax, eax
    setnz bl
    cmp eax, 12500
    setbe bh
    and bl, bh
    movzx eax, bl
    CHECK_EQ("periodic: the count reloads from the initial count", eax, 1)
    mov eax, dword ptr [APIC_TIMER_CUR]
    CHECK_EQ("writing initial count 0 stops the timer", eax, 0)
    ret

# --- timer: masked -----------------------------------------------------------------------------------
check_timer_masked:
    cli
    mov dword ptr [ticks], 0
    mov dword ptr [APIC_TIMER_DIV], 0xB             // divide by 1
    mov dword ptr [APIC_LVT_TIMER], LVT_MASKED | VEC_TIMER
    mov dword ptr [APIC_TIMER_INIT], 2000
    sti
    mov ecx, WAIT_LIMIT
masked_wait:
    mov eax, dword ptr [APIC_TIMER_CUR]
    test eax, eax
    jz masked_done
    dec ecx
    jnz masked_wait
masked_done:
    cli
    CHECK_EQ("a masked LVT timer still counts down to 0", eax, 0)
    CHECK_EQ("but raises no interrupt", dword ptr [ticks], 0)
    mov eax, dword ptr [APIC_IRR + 0x20]            // vector 0x40: IRR[2] bit 0
    and eax, 1
    CHECK_EQ("and sets no IRR bit", eax, 0)
    ret

# --- handlers (ebx = trap frame) ------------------------------------------------------------------------
ipi_handler:
    mov eax, dword ptr [ipi_count]
    mov ecx, dword ptr [ebx + FRAME_VECTOR]
    cmp eax, 4
    jae ipi_handler_counted
    mov dword ptr [ipi_vectors + 4 * eax], ecx
ipi_handler_counted:
    inc dword ptr [ipi_count]
    cmp ecx, VEC_HIGH
    jne ipi_handler_eoi
    mov eax, dword ptr [APIC_ISR + 0x30]            # vector 0x61: ISR[3] bit 1
    shr eax, 1
    and eax, 1
    mov dword ptr [ipi_isr_bit], eax
    mov eax, dword ptr [APIC_PPR]
    mov dword ptr [ipi_ppr], eax
ipi_handler_eoi:
    mov dword ptr [APIC_EOI], 0
    ret

timer_handler:
    inc dword ptr [ticks]
    mov eax, dword ptr [ebx + FRAME_VECTOR]
    mov dword ptr [tick_vector], eax
    mov eax, dword ptr [APIC_ISR + 0x20]            # vector 0x40: ISR[2] bit 0
    and eax, 1
    mov dword ptr [tick_isr_bit], eax
    mov eax, dword ptr [APIC_TIMER_CUR]
    mov dword ptr [tick_count_in_handler], eax
    mov dword ptr [APIC_EOI], 0
    ret

nmi_handler:
    inc dword ptr [nmi_count]
    ret

spurious_handler:                       # a spurious interrupt needs no EOI (SDM 10.9)
    inc dword ptr [spurious_count]
    ret

.data
cmdline_text:  .asciz "kernel command line (after the kernel's name): "
mods_text:     .asciz "modules: "
mod_args_text: .asciz "module 0 command line (after its file name): "
mod_line_text: .asciz "module 0 first line: "
none_text:     .asciz "(none)"
.align 4
ipi_count:      .long 0
ipi_vectors:    .long 0, 0, 0, 0
ipi_isr_bit:    .long 0xFFFFFFFF
ipi_ppr:        .long 0xFFFFFFFF
nmi_count:      .long 0
ticks:          .long 0
tick_vector:    .long 0xFFFFFFFF
tick_isr_bit:   .long 0xFFFFFFFF
tick_count_in_handler: .long 0
spurious_count: .long 0
