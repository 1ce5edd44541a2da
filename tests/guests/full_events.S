# description: what full's C callouts for the kernel's iretd must leave to Python: returns to ring 3 with a plain frame (the common case), with the kernel's data segments still loaded (iretd nulls them), with IOPL 3 in the image, with frames across a page boundary, and one iretd site sending the kernel to alternating targets
#
# Under `--mode full` the guest kernel's iretd, segment loads and CR2 reads are callouts; bt/_callout.c
# answers the common ones in C (modes/full/evfast.py). tests/test_full_events.py runs this guest with and
# without the C path (CPUVIRT_FULL_EVENTS_C) and compares everything a reader can see, and its console
# with native's. Nothing printed depends on host timing.
#include "kernel.inc"
#include "user.inc"

#define LOOPS 120
#define EFLAGS_IOPL3 0x3002

.text
main:
    call user_init
    xor ebp, ebp
    mov esi, LOOPS
loop:
    # the common case: a plain frame, the user's data segments
    mov eax, user_code
    mov ecx, EFLAGS_FIXED
    xor ebx, ebx
    mov edi, frame_area + 0x800
    call enter_user
    add ebp, eax
    rol ebp, 3
    # the kernel's DS/ES/FS/GS still loaded: iretd to ring 3 nulls them (Python's)
    mov eax, user_code
    mov ecx, EFLAGS_FIXED
    mov ebx, 1
    mov edi, frame_area + 0x800
    call enter_user
    add ebp, eax
    rol ebp, 3
    # IOPL 3 in the image: the virtual IOPL changes (Python's), then stays 3 for the system calls' returns
    test esi, 3
    jnz skip_iopl
    mov eax, user_code
    mov ecx, EFLAGS_IOPL3
    xor ebx, ebx
    mov edi, frame_area + 0x800
    call enter_user
    add ebp, eax
    rol ebp, 3
    pushfd                              # back to IOPL 0 (through a kernel iretd: Python's)
    and dword ptr [esp], ~0x3000
    push KERNEL_CS
    push iopl_back
    iretd
iopl_back:
skip_iopl:
    # frames across a page boundary: ESP/SS on the next page, or EFLAGS too
    mov eax, user_code
    mov ecx, EFLAGS_FIXED
    xor ebx, ebx
    mov edi, frame_area + 0x1000 + 8
    call enter_user
    add ebp, eax
    rol ebp, 3
    mov eax, user_code
    mov ecx, EFLAGS_FIXED
    xor ebx, ebx
    mov edi, frame_area + 0x1000 + 16
    call enter_user
    add ebp, eax
    rol ebp, 3
    # one kernel iretd site, alternating targets
    mov eax, target_a
    call iret_to
    mov eax, target_b
    call iret_to
    mov eax, target_a
    call iret_to
    mov eax, target_a
    call iret_to
    dec esi
    jnz loop
    mov eax, ebp
    call print_hex32
    call newline
    mov eax, dword ptr [targets]
    call print_hex32
    call newline
    PASS("full's kernel iretd")
    ret

# iret_to(eax): an iretd to the kernel's own ring at eax, which returns to our caller
iret_to:
    pushfd
    push KERNEL_CS
    push eax
    iretd

target_a:
    add dword ptr [targets], 1
    ret
target_b:
    add dword ptr [targets], 0x10000
    ret

# enter_user(eax = EIP, ecx = EFLAGS image, ebx = 1: keep the kernel's data segments, edi = where the
# frame ends): run ring 3 until SYS_EXIT; returns its exit code (as run_user, user.inc)
enter_user:
    push ebx
    push esi
    push edi
    push ebp
    mov dword ptr [user_saved_esp], esp
    mov dword ptr [tss + 4], esp
    test ebx, ebx
    jnz enter_user_frame
    mov bp, USER_DS
    mov ds, bp
    mov es, bp
    mov fs, bp
    mov gs, bp
enter_user_frame:
    mov esp, edi
    push USER_DS
    push user_stack_top
    push ecx
    push USER_CS
    push eax
    iretd

# ring 3: system calls, then exit with DS, ES and its CPL as the kernel saw it (not IOPL: ring 3's pushfd
# shows the real IOPL under deprivileging, a known hole)
user_code:
    mov eax, SYS_NOP
    int 0x80
    mov eax, SYS_GETCPL
    int 0x80
    mov edx, eax
    mov eax, SYS_NOP
    int 0x80
    mov ebx, ds
    mov ecx, es
    shl ecx, 16
    or ebx, ecx
    shl edx, 24
    or ebx, edx
    mov eax, SYS_EXIT
    int 0x80

.data
.align 4
targets: .long 0

.bss
.align 4096
frame_area:
    .zero 0x2000
