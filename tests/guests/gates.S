# description: hostile far transfers: call gates, task switches (ljmp/lcall to a TSS, IDT task gate, iret with NT), iretd to VM=1
#
# Every one of these used to be carried out by the engine itself (or abort the host). Here each must
# behave as on hardware, and under deprivileging the guest must never reach real CPL 0: code that
# believes it runs at CPL 0 reads CR0, which at real ring 0 under trap/full would show the
# hypervisor's CR0 instead of the guest's.
#include "kernel.inc"
#include "user.inc"

#define GATE_SEL   0x3B         // GDT 7: 32-bit call gate, DPL 3, to KERNEL_CS:gate_target, 2 parameters
#define TSS2_SEL   0x40         // GDT 8: TSS, DPL 0 (task 2: ring 0, entered by ljmp)
#define TSS3_SEL   0x4B         // GDT 9: TSS, DPL 3 (task 3: ring-0 code!), selector RPL 3
#define TSS4_SEL   0x50         // GDT 10: TSS, DPL 0 (task 4: entered by lcall and an IDT task gate)
#define VEC_TASK   0x41         // IDT task gate to task 4
#define EFLAGS_NT  0x4000
#define EFLAGS_VM  0x20000
#define V86_CS     0x7000       // V86 code at linear 0x70000
#define V86_ES     0x7123

.text
main:
    call user_init
    mov eax, cr0
    mov dword ptr [kernel_cr0], eax
    # a bigger GDT: the kernel's seven entries, then the gate and three TSS descriptors
    mov esi, gdt
    mov edi, big_gdt
    mov ecx, 14
    rep movsd
    mov eax, gate_target
    and eax, 0xFFFF
    or eax, KERNEL_CS << 16
    mov dword ptr [big_gdt + 7 * 8], eax
    mov eax, gate_target
    and eax, 0xFFFF0000
    or eax, 0xEC02                      # P, DPL 3, type 0xC (32-bit call gate), 2 parameters
    mov dword ptr [big_gdt + 7 * 8 + 4], eax
    lea edi, [big_gdt + 8 * 8]
    mov eax, tss2
    mov ecx, 103
    mov dl, 0x89
    call set_system_descriptor
    lea edi, [big_gdt + 9 * 8]
    mov eax, tss3
    mov ecx, 103
    mov dl, 0xE9                        # DPL 3: reachable from ring 3
    call set_system_descriptor
    lea edi, [big_gdt + 10 * 8]
    mov eax, tss4
    mov ecx, 103
    mov dl, 0x89
    call set_system_descriptor
    lgdt [big_gdtr]
    mov esi, tss2
    mov eax, task2_entry
    mov edx, task2_stack_top
    call init_tss
    mov esi, tss3
    mov eax, task3_entry
    mov edx, task3_stack_top
    call init_tss
    mov esi, tss4
    mov eax, task4_entry
    mov edx, task4_stack_top
    call init_tss

    # --- 1: a call gate from ring 3 to ring 0, two parameters -----------------------------------
    mov eax, user_gate
    mov edx, user_stack_top
    call run_user
    CHECK_EQ("lcall through a DPL-3 call gate from ring 3 and retf 8 back", eax, 42)
    mov eax, dword ptr [kernel_cr0]
    CHECK_EQ("the gate's target runs at (virtual) CPL 0: mov from cr0 gives the guest's CR0", dword ptr [g_cr0], eax)
    mov eax, dword ptr [tss + 4]
    sub eax, 24
    CHECK_EQ("the gate switched to the stack in TSS.ESP0 (6 dwords pushed)", dword ptr [g_esp], eax)
    CHECK_EQ("parameter 1 copied (the last pushed lies lowest)", dword ptr [g_p1], 0x22222222)
    CHECK_EQ("parameter 2 copied", dword ptr [g_p2], 0x11111111)
    CHECK_EQ("the caller's CS was pushed", dword ptr [g_cs], USER_CS)
    CHECK_EQ("the caller's SS was pushed", dword ptr [g_ss], USER_DS)

    # --- 2: ljmp to a TSS and back ------------------------------------------------------------------
    mov ebx, 0x5A5A5A5A
    .byte 0xEA
    .long 0
    .word TSS2_SEL
    CHECK_EQ("ljmp to a TSS ran task 2", dword ptr [t2_ran], 1)
    CHECK_EQ("task 2 ran without NT (a jmp nests nothing)", dword ptr [t2_nt], 0)
    CHECK_EQ("EBX came back from the old task's TSS", ebx, 0x5A5A5A5A)
    movzx eax, word ptr [tss2]
    CHECK_EQ("task 2's back link untouched by a jmp", eax, 0)
    mov eax, dword ptr [kernel_cr0]
    or eax, 8
    mov ecx, cr0
    CHECK_EQ("a task switch sets CR0.TS", ecx, eax)
    clts

    # --- 3: lcall to a TSS, iret back (NT and the back link) --------------------------------------
    .byte 0x9A
    .long 0
    .word TSS4_SEL
    CHECK_EQ("lcall to a TSS ran task 4", dword ptr [t4_ran], 1)
    CHECK_EQ("task 4 ran with NT = 1", dword ptr [t4_nt], EFLAGS_NT)
    CHECK_EQ("task 4's back link names the caller's TSS", dword ptr [t4_link], TSS_SEL)
    pushfd
    pop eax
    and eax, EFLAGS_NT
    CHECK_EQ("iret with NT returned to the caller, whose NT is clear", eax, 0)
    mov eax, dword ptr [big_gdt + 10 * 8 + 4]
    and eax, 0x200
    CHECK_EQ("task 4's TSS is no longer busy after its iret", eax, 0)

    .byte 0xFF, 0x1D                    # lcall ptr [tss4_ptr] (FF /3: far, memory operand)
    .long tss4_ptr
    CHECK_EQ("lcall m16:32 to a TSS ran task 4 again", dword ptr [t4_ran], 2)

    # --- 4: int n through an IDT task gate -----------------------------------------------------------
    mov dword ptr [idt + 8 * VEC_TASK], TSS4_SEL << 16
    mov dword ptr [idt + 8 * VEC_TASK + 4], 0xE500   # P, DPL 3, type 5 (task gate)
    int VEC_TASK
    CHECK_EQ("int n through a task gate ran task 4 again", dword ptr [t4_ran], 3)
    clts

    # --- 5: from ring 3, ljmp to a DPL-3 TSS whose task has ring-0 code -------------------------
    mov eax, user_tss3
    mov edx, user_stack_top
    call run_user
    CHECK_EQ("task 3 resumed the ring-3 caller through the kernel TSS", eax, 43)
    mov eax, dword ptr [kernel_cr0]
    or eax, 8
    CHECK_EQ("task 3 reads the guest's CR0 (never the hypervisor's: no real ring 0)", dword ptr [t3_cr0], eax)
    clts

    # --- 6: iretd with EFLAGS.VM = 1 from ring 3: VM is ignored at CPL > 0 --------------------------
    mov eax, user_iret_vm
    mov edx, user_stack_top
    call run_user
    CHECK_EQ("iretd with VM = 1 at CPL 3 stays in protected mode", eax, 44)

    # --- 7: virtual-8086 mode entered from ring 0, left by a #GP ----------------------------------
    mov byte ptr [V86_CS * 16], 0xF4    # hlt: privileged, #GP in V86 mode
    SET_HANDLER(VEC_GP, v86_gp)
    call run_v86
    SET_HANDLER(VEC_GP, user_fault_handler)
    CHECK_EQ("hlt in V86 mode raised #GP to the ring-0 handler", eax, 0x86)
    CHECK_EQ("the V86 frame holds EFLAGS with VM set", dword ptr [v86_flags], EFLAGS_VM)
    CHECK_EQ("the V86 frame holds CS:EIP of the hlt", dword ptr [v86_cseip], V86_CS << 16)
    CHECK_EQ("the V86 frame holds ES", dword ptr [v86_es], V86_ES)
    ret

# init_tss: esi = TSS, eax = entry, edx = stack top: a ring-0 task with the kernel's segments.
init_tss:
    mov dword ptr [esi + 0x20], eax
    mov dword ptr [esi + 0x24], EFLAGS_FIXED
    mov dword ptr [esi + 0x38], edx
    mov dword ptr [esi + 0x48], KERNEL_DS
    mov dword ptr [esi + 0x4C], KERNEL_CS
    mov dword ptr [esi + 0x50], KERNEL_DS
    mov dword ptr [esi + 0x54], KERNEL_DS
    mov dword ptr [esi + 0x58], KERNEL_DS
    mov dword ptr [esi + 0x5C], KERNEL_DS
    mov dword ptr [esi + 0x04], edx
    mov dword ptr [esi + 0x08], KERNEL_DS
    mov word ptr [esi + 0x66], 104
    ret

# gate_target: ring 0 through the call gate; [esp] = EIP, CS, p1, p2, ESP, SS
gate_target:
    mov eax, cr0
    mov dword ptr [g_cr0], eax
    mov dword ptr [g_esp], esp
    mov eax, dword ptr [esp + 4]
    mov dword ptr [g_cs], eax
    mov eax, dword ptr [esp + 8]
    mov dword ptr [g_p1], eax
    mov eax, dword ptr [esp + 12]
    mov dword ptr [g_p2], eax
    mov eax, dword ptr [esp + 20]
    mov dword ptr [g_ss], eax
    .byte 0xCA                          # retf 8: back to ring 3, dropping the two parameters
    .word 8

task2_entry:
    inc dword ptr [t2_ran]
    pushfd
    pop eax
    and eax, EFLAGS_NT
    mov dword ptr [t2_nt], eax
    mov ebx, 0x12345678                 # not what the old task gets back
    .byte 0xEA
    .long 0
    .word TSS_SEL
    jmp task2_entry

task3_entry:
    mov eax, cr0
    mov dword ptr [t3_cr0], eax
    .byte 0xEA                          # back to the kernel TSS: the ring-3 caller resumes
    .long 0
    .word TSS_SEL
    jmp task3_entry

task4_entry:
    inc dword ptr [t4_ran]
    pushfd
    pop eax
    and eax, EFLAGS_NT
    mov dword ptr [t4_nt], eax
    movzx eax, word ptr [tss4]
    mov dword ptr [t4_link], eax
    iretd
    jmp task4_entry

# run_v86: iretd into V86 mode at V86_CS:0 (IF = 0, IOPL = 0); the #GP handler comes back through
# user_return with 0x86.
run_v86:
    push ebx
    push esi
    push edi
    push ebp
    mov dword ptr [user_saved_esp], esp
    mov dword ptr [tss + 4], esp
    push 0                              # GS
    push 0                              # FS
    push 0                              # DS
    push V86_ES                         # ES
    push 0x7800                         # SS
    push 0x100                          # ESP
    push EFLAGS_VM | EFLAGS_FIXED
    push V86_CS
    push 0                              # EIP
    iretd

v86_gp:
    mov eax, dword ptr [ebx + FRAME_EFLAGS]
    and eax, EFLAGS_VM
    mov dword ptr [v86_flags], eax
    mov eax, dword ptr [ebx + FRAME_CS]
    shl eax, 16
    or eax, dword ptr [ebx + FRAME_EIP]
    mov dword ptr [v86_cseip], eax
    mov eax, dword ptr [ebx + FRAME_USER_SS + 4]
    mov dword ptr [v86_es], eax
    mov eax, 0x86
    jmp user_return

# ---- ring 3 --------------------------------------------------------------------------------------
user_gate:
    push 0x11111111
    push 0x22222222
    .byte 0x9A
    .long 0
    .word GATE_SEL
    mov eax, SYS_EXIT
    mov ebx, 42
    int 0x80

user_tss3:
    .byte 0xEA
    .long 0
    .word TSS3_SEL
    mov eax, SYS_EXIT
    mov ebx, 43
    int 0x80

user_iret_vm:
    mov eax, esp
    push USER_DS
    push eax
    push EFLAGS_VM | EFLAGS_FIXED
    push USER_CS
    push user_iret_vm_back
    iretd
user_iret_vm_back:
    mov eax, SYS_EXIT
    mov ebx, 44
    int 0x80

.data
.align 8
big_gdt:
    .zero 11 * 8
big_gdt_end:
.align 4
    .word 0
big_gdtr:
    .word big_gdt_end - big_gdt - 1
    .long big_gdt
tss4_ptr: .long 0
    .word TSS4_SEL
kernel_cr0: .long 0
g_cr0: .long 0
g_esp: .long 0
g_cs:  .long 0
g_p1:  .long 0
g_p2:  .long 0
g_ss:  .long 0
t2_ran: .long 0
t2_nt:  .long 0
t3_cr0: .long 0
t4_ran: .long 0
t4_nt:  .long 0
t4_link: .long 0
v86_flags: .long 0
v86_cseip: .long 0
v86_es: .long 0

.bss
.align 16
tss2: .zero 104
tss3: .zero 104
tss4: .zero 104
.align 16
    .zero 4096
task2_stack_top:
    .zero 4096
task3_stack_top:
    .zero 4096
task4_stack_top:
