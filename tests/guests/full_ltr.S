# description: ltr by the guest kernel as xv6's switchuvm does it (the TSS descriptor rewritten available, with another TSS's base, then loaded), each load followed by a ring-3 system call whose kernel stack comes from the TSS just loaded; and the loads full's C callouts must leave to Python: a busy TSS (#GP), another TSS selector
#
# Under `--mode full` the kernel's `ltr ax` is a callout that bt/_callout.c answers in C for the TSS selector
# the translations' snapshot holds. tests/test_full_events.py runs this guest with and without the C path and
# compares everything a reader can see, and its console with native's. The TSS that is not loaded has ESP0 0:
# a system call through a wrong TR base would not come back. Nothing printed depends on host timing.
#include "kernel.inc"
#include "paging.inc"
#include "user.inc"

#define LOOPS 95
#define TSS_SEL 0x28
#define TSS2_SEL 0x38

.text
main:
    call user_init
    SET_HANDLER(VEC_GP, kernel_gp)
    PAGING_IDENTITY_4M_ON(PTE_P | PTE_W)
    # a GDT of its own page (the image's shares one with code, which full traces): the image's 7
    # descriptors, and a second TSS descriptor at 0x38
    mov esi, gdt
    mov edi, gdt2
    mov ecx, 14
    rep movsd
    lgdt [gdt2r]
    xor ebp, ebp
    mov esi, LOOPS
loop:
    # xv6's switchuvm: the descriptor rewritten (available again, this time's TSS), then ltr
    test esi, 7
    jz busy                             # every eighth time: not rewritten, so still busy
    mov eax, tss_a
    test esi, 1
    jz rewrite
    mov eax, tss_b
rewrite:
    mov dword ptr [cur_tss], eax
    mov edi, gdt2 + TSS_SEL
    mov ecx, TSS_SIZE - 1
    mov dl, 0x89
    call set_system_descriptor
busy:
    mov ax, TSS_SEL
    ltr ax                              # (#GP when busy: kernel_gp skips it, and TR stays)
    test esi, 15
    jnz same_selector
    mov edi, gdt2 + TSS2_SEL            # another selector: the translations' snapshot changes (Python's)
    mov eax, tss_b
    mov ecx, TSS_SIZE - 1
    mov dl, 0x89
    call set_system_descriptor
    mov ax, TSS2_SEL
    ltr ax
    mov dword ptr [cur_tss], tss_b
same_selector:
    str eax
    add ebp, eax
    rol ebp, 3
    # a system call from ring 3 through the loaded TSS (the other one's ESP0 is 0)
    mov dword ptr [tss_a + 4], 0
    mov dword ptr [tss_b + 4], 0
    mov edi, dword ptr [cur_tss]
    mov eax, user_code
    mov edx, user_stack_top
    call run_user_tss
    add ebp, eax
    dec esi
    jnz loop
    mov eax, ebp
    call print_hex32
    call newline
    mov eax, dword ptr [gp_count]
    call print_hex32
    call newline
    PASS("full's kernel ltr")
    ret

# kernel_gp: a busy TSS's ltr skipped (3 bytes); ring 3's #GP as user.inc handles it
kernel_gp:
    test dword ptr [ebx + FRAME_CS], 3
    jnz user_fault_handler
    inc dword ptr [gp_count]
    add dword ptr [ebx + FRAME_EIP], 3
    ret

# run_user_tss(eax = ring-3 EIP, edx = ring-3 stack top, edi = the TSS TR holds): run_user (user.inc) with
# that TSS's ESP0 and SS0
run_user_tss:
    push ebx
    push esi
    push edi
    push ebp
    mov dword ptr [user_saved_esp], esp
    mov dword ptr [edi + 4], esp
    mov dword ptr [edi + 8], KERNEL_DS
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

user_code:
    mov eax, SYS_NOP
    int 0x80
    mov eax, SYS_EXIT
    mov ebx, 5
    int 0x80

.data
.align 4
gp_count: .long 0
cur_tss: .long 0
    .word 0
gdt2r:
    .word 8 * 8 - 1
    .long gdt2

.bss
.align 4096
gdt2:
    .zero 4096
tss_a:
    .zero TSS_SIZE
.align 16
tss_b:
    .zero TSS_SIZE
