# description: executes once each instruction a VMCS control can intercept (hw-mode exit tests)
# Every check here must PASS whatever the controls say: exits are the hypervisor's business, and the
# guest must not be able to tell (except through timing, which it never prints).
#include "kernel.inc"
#include "paging.inc"

#define PROBE_PAGE 0x003FF000

.text
main:
    SET_HANDLER(3, ve_bp)
    SET_HANDLER(6, ve_ud)
    SET_HANDLER(14, ve_pf)
    SET_HANDLER(0x20, ve_tick)

    xor eax, eax                        # CPUID: always exits
    cpuid
    rdtsc                               # RDTSC: exits with rdtsc_exiting
    mov dword ptr [tsc_low], eax

    mov eax, 11                         # VMCALL: KVM_HC_SCHED_YIELD -> 0
    vmcall
    mov dword ptr [hc_yield], eax
    mov eax, 0x1234                     # an unknown hypercall -> -KVM_ENOSYS
    vmcall
    mov dword ptr [hc_unknown], eax
    CHECK_EQ("KVM_HC_SCHED_YIELD returns 0", dword ptr [hc_yield], 0)
    CHECK_EQ("an unknown hypercall returns -KVM_ENOSYS", dword ptr [hc_unknown], -1000)

    mov eax, cr3                        # CR_ACCESS: cr3_store_exiting / cr3_load_exiting
    mov cr3, eax
    mov eax, cr4                        # CR4.PSE is host-owned in the default mask: exits
    or eax, 0x10
    mov cr4, eax
    mov ebx, cr4
    CHECK_EQ("the guest reads back the CR4 it wrote", ebx, eax)
    mov eax, cr0
    and eax, 0xFFFF
    mov dword ptr [cr0_seen], eax
    xor ecx, ecx
    smsw ecx                            # the machine status word: CR0 bits 15:0
    CHECK_EQ("smsw agrees with mov from CR0", ecx, dword ptr [cr0_seen])

    invlpg [0x1000]                     # INVLPG: invlpg_exiting
    mov eax, dr7                        # DR_ACCESS: mov_dr_exiting
    mov dr7, eax

    mov ecx, 0x174                      # MSR_READ / MSR_WRITE: IA32_SYSENTER_CS
    mov eax, 0x8
    xor edx, edx
    wrmsr
    xor eax, eax
    rdmsr
    CHECK_EQ("IA32_SYSENTER_CS reads back", eax, 0x8)

    sgdt [gdt_save]                     # GDTR_IDTR / LDTR_TR: descriptor_table_exiting
    lgdt [gdt_save]
    str ax
    sldt ax

    mov al, 0x55                        # IO_INSTRUCTION: port 0x80 immediate, and dx form
    out 0x80, al
    mov dx, 0x80
    in al, dx
    CHECK_EQ("POST port reads 0xff", eax, 0xFF)

    int3                                # EXCEPTION_NMI with exception_bitmap bit 3
    CHECK_EQ("int3 handler ran once", dword ptr [bp_count], 1)
    vmlaunch                            # VMLAUNCH exit; the hypervisor injects #UD
    CHECK_EQ("vmlaunch in the guest raised #UD", dword ptr [ud_count], 1)

    # A page fault: paging on, PROBE_PAGE not present, the handler maps it and the load retries.
    mov edi, page_dir
    mov esi, page_table_low
    mov eax, PTE_P | PTE_W
    call paging_identity_4m
    mov dword ptr [page_table_low + 4 * (PROBE_PAGE >> 12)], 0
    mov eax, page_dir
    call paging_enable
    mov eax, dword ptr [PROBE_PAGE + 0x10]
    CHECK_EQ("#PF handler ran once", dword ptr [pf_count], 1)
    CHECK_EQ("#PF CR2 is the faulting address", dword ptr [pf_cr2], PROBE_PAGE + 0x10)
    call paging_disable

    # HLT and EXTERNAL_INTERRUPT: one PIT tick wakes the CPU.
    mov ax, PIT_DIVISOR(1000)
    call pit_start_periodic
    mov al, 0xFE
    out PIC1_DATA, al
    sti
    hlt
    cli
    CHECK_EQ("one timer tick woke hlt", dword ptr [tick_count], 1)
    mov al, 0xFF
    out PIC1_DATA, al
    ret

ve_bp:
    inc dword ptr [bp_count]
    ret
ve_ud:
    inc dword ptr [ud_count]
    add dword ptr [ebx + FRAME_EIP], 3  # vmlaunch is 3 bytes
    ret
ve_pf:
    inc dword ptr [pf_count]
    mov eax, cr2
    mov dword ptr [pf_cr2], eax
    mov dword ptr [page_table_low + 4 * (PROBE_PAGE >> 12)], PROBE_PAGE | PTE_P | PTE_W
    invlpg [PROBE_PAGE]
    ret
ve_tick:
    inc dword ptr [tick_count]
    mov al, 0x20
    out PIC1_CMD, al
    ret

.data
tsc_low:    .long 0
hc_yield:   .long 1
hc_unknown: .long 0
cr0_seen:   .long 0
bp_count:   .long 0
ud_count:   .long 0
pf_count:   .long 0
pf_cr2:     .long 0
tick_count: .long 0
gdt_save:   .word 0
            .long 0
