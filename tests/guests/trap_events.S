# description: what trap's C path for segment loads must leave to Python: mov/pop of DS ES FS GS in loops (ring-3 system calls, #DE and #PF in the kernel, handlers that reload the data segments), with selectors beyond the GDT limit, a non-present descriptor, an execute-only code segment, RPL 3 over DPL 0, a clear accessed bit, a null DS and a null SS, a descriptor rewritten in place, the GDT's page remapped, another GDT loaded, and a ring-3 load of a kernel selector
#
# Under `--mode trap` every load of a DPL-0 data segment faults at ring 1 and is emulated (segments.py);
# modes/_trapfast.c answers the common ones in C. tests/test_trap_events.py runs this guest with and
# without the C path and compares everything a reader can see. Nothing printed depends on host timing.
#include "kernel.inc"
#include "paging.inc"
#include "user.inc"

#define LOOPS 320
#define BENCH_PAGE 0x00380000           // made not-present for #PF, present again by the handler
#define SEL_MOVING 0x38                 // DPL-0 data, its base rewritten in place (0 or 0x1000)
#define SEL_ABSENT 0x40                 // DPL-0 data, not present: #NP
#define SEL_XONLY 0x48                  // DPL-0 code, execute-only: #GP
#define SEL_UNACC 0x50                  // DPL-0 data whose accessed bit the loop clears
#define SEL_RCODE 0x58                  // DPL-0 code, readable: loadable into DS
#define SEL_BASED 0x60                  // DPL-0 data, base 0x1000
#define SEL_BEYOND 0x68                 // beyond the limit: #GP

.text
main:
    call user_init
    SET_HANDLER(VEC_GP, kernel_fault)
    SET_HANDLER(VEC_PF, kernel_fault)
    SET_HANDLER(11, kernel_fault)       # #NP
    SET_HANDLER(VEC_DE, divzero)
    # Another GDT with more DPL-0 segments (the TSS and LDT descriptors copied: TR stays).
    mov eax, dword ptr [gdt_tss]
    mov dword ptr [gdt2 + 0x28], eax
    mov eax, dword ptr [gdt_tss + 4]
    mov dword ptr [gdt2 + 0x2C], eax
    mov eax, dword ptr [gdt_ldt]
    mov dword ptr [gdt2 + 0x30], eax
    mov eax, dword ptr [gdt_ldt + 4]
    mov dword ptr [gdt2 + 0x34], eax
    lgdt [gdt2r]
    mov ax, KERNEL_DS
    mov ds, ax
    mov es, ax

    mov esi, page_table_low
    mov edi, page_dir
    mov eax, PTE_P | PTE_W | PTE_U
    call paging_identity_4m
    mov eax, page_dir
    call paging_enable
    mov dword ptr [probe], 0x600DF00D

    xor ebp, ebp
    mov edi, LOOPS
hot_loop:
    # The handlers' own loads: ring-3 system calls, #DE and #PF in the kernel.
    mov eax, user_syscalls
    mov edx, user_stack_top
    call run_user
    add ebp, eax
    mov ecx, 0
    div ecx                             # #DE: the handler skips it
    and dword ptr [page_table_low + 4 * (BENCH_PAGE >> 12)], ~PTE_P
    invlpg [BENCH_PAGE]
    mov eax, dword ptr [BENCH_PAGE]     # #PF: the handler makes the page present again
    add ebp, eax
    # Loads of the common case: r16 and r32 forms, pops.
    mov ax, SEL_BASED
    mov fs, ax
    mov eax, dword ptr fs:[probe - 0x1000]
    xor ebp, eax
    rol ebp, 3
    mov eax, KERNEL_DS
    .byte 0x8E, 0xE0                    # mov fs, eax (no operand-size prefix)
    .byte 0x8E, 0xE8                    # mov gs, eax
    push SEL_BASED
    pop gs
    mov eax, dword ptr gs:[probe - 0x1000]
    xor ebp, eax
    push KERNEL_DS
    pop gs
    push SEL_RCODE                      # readable code into DS and ES
    pop es
    mov ax, SEL_RCODE
    mov ds, ax
    mov eax, dword ptr [probe]
    add ebp, eax
    push KERNEL_DS
    pop ds
    push KERNEL_DS
    pop es
    # A descriptor rewritten in place: C reads it again each time.
    mov byte ptr [gdt2 + SEL_MOVING + 3], 0x10      # base 0x1000
    mov ax, SEL_MOVING
    mov fs, ax
    mov eax, dword ptr fs:[probe - 0x1000]
    xor ebp, eax
    rol ebp, 1
    # ... and back, after a CR3 write emptied the hypervisor's TLB: Python loads it (it must know
    # what C loaded last, or it would skip the load as one already done).
    mov byte ptr [gdt2 + SEL_MOVING + 3], 0
    mov eax, cr3
    mov cr3, eax
    mov ax, SEL_MOVING
    mov fs, ax
    mov eax, dword ptr fs:[probe]
    xor ebp, eax
    # The GDT's page mapped to another frame (a copy whose SEL_MOVING has base 0x1000), CR3 reloaded:
    # the load must read the new frame (a stale copy of the hypervisor's TLB in C would not).
    push edi
    mov esi, gdt2
    mov edi, gdt_alt
    mov ecx, 1024
    rep movsd
    pop edi
    mov byte ptr [gdt_alt + SEL_MOVING + 3], 0x10
    mov eax, gdt2
    shr eax, 12
    lea edx, [page_table_low + 4 * eax]
    mov eax, gdt_alt
    or eax, PTE_P | PTE_W | PTE_U
    mov dword ptr [edx], eax
    mov eax, cr3
    mov cr3, eax
    mov ax, SEL_MOVING
    mov fs, ax
    mov eax, dword ptr fs:[probe - 0x1000]
    xor ebp, eax
    rol ebp, 2
    mov eax, gdt2
    or eax, PTE_P | PTE_W | PTE_U
    mov dword ptr [edx], eax
    mov eax, cr3
    mov cr3, eax
    mov ax, SEL_MOVING
    mov fs, ax
    mov eax, dword ptr fs:[probe]
    xor ebp, eax
    # The accessed bit: clear, set by the load.
    and byte ptr [gdt2 + SEL_UNACC + 5], ~1
    mov ax, SEL_UNACC
    mov gs, ax
    movzx eax, byte ptr [gdt2 + SEL_UNACC + 5]
    add ebp, eax
    mov ax, KERNEL_DS
    mov gs, ax
    # iretd to the kernel's own ring: the common case, IF from the image, and CR2 read back.
    pushfd
    or dword ptr [esp], EFLAGS_IF
    push KERNEL_CS
    push iret_back
    iretd
iret_back:
    pushfd
    pop eax
    and eax, EFLAGS_IF
    add ebp, eax
    cli
    mov esi, cr2
    add ebp, esi
    test edi, 15
    jnz hot_next
    # iretd that only Python may do: a frame across a page boundary, a CS descriptor whose accessed
    # bit is clear, a CS other than the one loaded (after a far jump to another code segment).
    mov dword ptr [saved_esp], esp
    mov esp, iret_area + 0x1000 + 4
    pushfd
    push KERNEL_CS
    push iret_cross
    iretd
iret_cross:
    mov esp, dword ptr [saved_esp]
    and byte ptr [gdt2 + KERNEL_CS + 5], ~1
    pushfd
    push KERNEL_CS
    push iret_unaccessed
    iretd
iret_unaccessed:                        # (the accessed bit is not in the checksum: the engine's own
                                        # iretd, native's, leaves it clear, trap's sets it as SDM 3.4.5 says)
    .byte 0xEA                          # jmp SEL_RCODE:iret_far
    .long iret_far
    .word SEL_RCODE
iret_far:
    pushfd
    push KERNEL_CS
    push iret_home
    iretd
iret_home:
    mov eax, cs                         # the real CS (RPL 1 under trap, a hole): the iretd loaded it
    and eax, ~3
    add ebp, eax
    mov eax, cr2
    xor eax, 0x5A5A
    mov cr2, eax                        # a CR2 write: Python's
    mov ecx, cr2
    add ebp, ecx
    # Faults: each resumes at fault_resume with the vector and error code recorded.
    mov dword ptr [fault_resume], f1
    mov ax, SEL_BEYOND
    mov ds, ax
f1: mov dword ptr [fault_resume], f2
    push SEL_ABSENT
    pop es
f2: add esp, 4
    mov dword ptr [fault_resume], f3
    mov ax, SEL_XONLY
    mov fs, ax
f3: mov dword ptr [fault_resume], f4
    mov ax, KERNEL_DS | 3               # RPL 3 over a DPL-0 segment
    mov gs, ax
f4: mov dword ptr [fault_resume], f5
    xor eax, eax
    mov ss, ax                          # null SS: #GP(0)
f5: mov ax, 0                           # a null data selector loads
    mov fs, ax
    mov ax, KERNEL_DS
    mov fs, ax
    # Another GDT, shorter: SEL_BASED is beyond its limit.
    lgdt [gdt2r_short]
    mov dword ptr [fault_resume], f6
    mov ax, SEL_BASED
    mov fs, ax
f6: mov ax, KERNEL_DS
    mov fs, ax
    lgdt [gdt2r]
hot_next:
    dec edi
    jnz hot_loop

    mov eax, ebp
    call print_hex32
    mov al, 10
    call putc
    mov eax, dword ptr [fault_sum]
    call print_hex32
    mov al, 10
    call putc
    CHECK_EQ("every #DE was taken", dword ptr [de_count], LOOPS)
    CHECK_EQ("every #PF was taken", dword ptr [pf_count], LOOPS)
    CHECK_EQ("every bad load faulted", dword ptr [fault_count], 6 * LOOPS / 16)
    mov eax, user_kernel_ds
    mov edx, user_stack_top
    call run_user
    CHECK_EQ("ring 3: a load of the kernel's data selector raises #GP", eax, USER_KILLED | VEC_GP)
    CHECK_EQ("with the selector as error code", dword ptr [user_fault_error], KERNEL_DS)
    PASS("trap's segment loads")
    ret

# #GP, #NP, #PF: from ring 3, user_fault_handler's; in the kernel, the bench page's #PF is fixed,
# any other fault is recorded and resumed at fault_resume.
kernel_fault:
    test dword ptr [ebx + FRAME_CS], 3
    jnz user_fault_handler
    cmp dword ptr [ebx + FRAME_VECTOR], VEC_PF
    jne kernel_fault_other
    READ_CR2
    cmp eax, BENCH_PAGE
    jne kernel_fault_other
    inc dword ptr [pf_count]
    or dword ptr [page_table_low + 4 * (BENCH_PAGE >> 12)], PTE_P
    ret
kernel_fault_other:
    inc dword ptr [fault_count]
    mov eax, dword ptr [ebx + FRAME_VECTOR]
    shl eax, 16
    add eax, dword ptr [ebx + FRAME_ERROR]
    add dword ptr [fault_sum], eax
    rol dword ptr [fault_sum], 5
    mov eax, dword ptr [fault_resume]
    mov dword ptr [ebx + FRAME_EIP], eax
    ret

divzero:
    inc dword ptr [de_count]
    add dword ptr [ebx + FRAME_EIP], 2
    ret

# ring 3: a few system calls, then exit with their count.
user_syscalls:
    mov esi, 4
user_syscalls_next:
    mov eax, SYS_NOP
    int 0x80
    mov eax, SYS_ADD
    mov ebx, esi
    mov ecx, 1
    int 0x80
    dec esi
    jnz user_syscalls_next
    mov ebx, eax
    mov eax, SYS_EXIT
    int 0x80

user_kernel_ds:
    mov ax, KERNEL_DS
    mov ds, ax
    ret

.data
.align 4096                             # the GDT has a page of its own (mapped elsewhere for a while)
gdt2:
    .long 0, 0                          # 0x00
    .long 0x0000FFFF, 0x00CF9A00        # 0x08: ring-0 code
    .long 0x0000FFFF, 0x00CF9300        # 0x10: ring-0 data
    .long 0x0000FFFF, 0x00CFFA00        # 0x18: ring-3 code
    .long 0x0000FFFF, 0x00CFF300        # 0x20: ring-3 data
    .long 0, 0                          # 0x28: the TSS (copied)
    .long 0, 0                          # 0x30: the LDT (copied)
    .long 0x0000FFFF, 0x00CF9300        # 0x38: SEL_MOVING
    .long 0x0000FFFF, 0x00CF1300        # 0x40: SEL_ABSENT (P = 0)
    .long 0x0000FFFF, 0x00CF9900        # 0x48: SEL_XONLY
    .long 0x0000FFFF, 0x00CF9200        # 0x50: SEL_UNACC
    .long 0x0000FFFF, 0x00CF9B00        # 0x58: SEL_RCODE
    .long 0x1000FFFF, 0x00CF9300        # 0x60: SEL_BASED
gdt2_end:
.align 4096
gdt_alt: .zero 4096
.align 4
    .word 0
gdt2r:
    .word gdt2_end - gdt2 - 1
    .long gdt2
    .word 0
gdt2r_short:
    .word SEL_BASED - 1
    .long gdt2
probe: .long 0, 0
.align 4096
iret_area: .zero 0x2000
saved_esp: .long 0
fault_resume: .long 0
fault_count: .long 0
fault_sum: .long 0
de_count: .long 0
pf_count: .long 0
