# description: self-modifying code: patched immediates and instructions, a loop patched while it runs, code copied and run, privileged instructions generated at run time
#
# x86 keeps instruction fetch coherent with stores (SDM Vol. 3A 8.1.3), so a kernel may rewrite
# code it has already run. A binary translator or a code-scanning hypervisor must notice every such
# store and drop what it derived from the old bytes. Each patch below is followed by a jump before
# the new code runs (the SDM's portable recipe: store, jump, execute).
#   1. a function returning an immediate: the immediate is patched, then the whole instruction;
#   2. a loop that patches its own body half-way through;
#   3. data stored next to code (same page) while that code keeps running unchanged;
#   4. code copied into a buffer at run time and run there, then replaced by other code;
#   5. privileged and I/O instructions written into that buffer and run: mov from/to CR0 (TS, MP), clts,
#      cli/sti, in and out (a generated polling putc prints one line of this output).
#include "kernel.inc"

#define LOOP_N       10                 // iterations of the self-patching loop
#define LOOP_SWITCH  4                  // iteration that patches the loop body
#define NEIGHBOUR_N  200                // stores next to code in test 3
#define CR0_MP       0x2
#define CR0_TS       0x8

.text
main:
    call test_patch_function
    call test_patch_loop
    call test_neighbour_data
    call test_copied_code
    call test_generated_privileged
    ret

# --- 1. patch a function that has already run -------------------------------------------------
test_patch_function:
    call smc_value
    CHECK_EQ("the function returns its original immediate", eax, 0x11111111)
    mov dword ptr [smc_value + 1], 0x22222222   # the imm32 of `mov eax, imm32`
    jmp test_patch_function_1
test_patch_function_1:
    call smc_value
    CHECK_EQ("after its immediate is rewritten it returns the new one", eax, 0x22222222)
    mov dword ptr [smc_value], 0x9090C889       # 89 C8 = mov eax, ecx; 90 90 = nop nop
    mov byte ptr [smc_value + 4], 0x90          # nop
    jmp test_patch_function_2
test_patch_function_2:
    mov ecx, 0x33333333
    call smc_value
    CHECK_EQ("after a new instruction is written over it (mov eax, ecx) it returns ecx", eax, 0x33333333)
    mov dword ptr [smc_value], 0x91090C8D       # 8D 0C 09 = lea ecx, [ecx + ecx]; 91 = xchg eax, ecx
    mov byte ptr [smc_value + 4], 0x90          # nop
    jmp test_patch_function_3
test_patch_function_3:
    mov ecx, 0x01010101
    call smc_value
    CHECK_EQ("after two new instructions of other lengths (lea; xchg) it returns 2 * ecx", eax, 0x02020202)
    ret

# smc_value: `mov eax, imm32; ret`, written as bytes so that its layout is known.
smc_value:
    .byte 0xB8
    .long 0x11111111
    ret

# --- 2. a loop whose body is patched while the loop runs ------------------------------------------
test_patch_loop:
    mov dword ptr [smc_loop_add + 1], 1         # make the test rerunnable
    xor eax, eax
    xor ecx, ecx
smc_loop_top:
    cmp ecx, LOOP_SWITCH
    jne smc_loop_add_jmp
    mov dword ptr [smc_loop_add + 1], 100       # from this iteration on the body adds 100
smc_loop_add_jmp:
    jmp smc_loop_add
smc_loop_add:
    .byte 0x05                                  # add eax, imm32
    .long 1
    inc ecx
    cmp ecx, LOOP_N
    jb smc_loop_top
    CHECK_EQ("a loop that rewrites its own add immediate on iteration 4 sums 4 * 1 + 6 * 100", eax, LOOP_SWITCH * 1 + (LOOP_N - LOOP_SWITCH) * 100)
    ret

# --- 3. data on a code page ------------------------------------------------------------------------
# Stores to smc_neighbour (the same page as smc_neighbour_fn) must not disturb that code.
test_neighbour_data:
    xor edx, edx
    mov ecx, NEIGHBOUR_N
smc_neighbour_loop:
    inc dword ptr [smc_neighbour]
    call smc_neighbour_fn
    add edx, eax
    dec ecx
    jnz smc_neighbour_loop
    CHECK_EQ("code keeps running unchanged while data on its page is written", edx, NEIGHBOUR_N * 7)
    CHECK_EQ("and the data written there reads back", dword ptr [smc_neighbour], NEIGHBOUR_N)
    ret

smc_neighbour_fn:
    mov eax, 7
    ret
.align 4
smc_neighbour:
    .long 0

# --- 4. code copied to a buffer and run there --------------------------------------------------------
test_copied_code:
    mov esi, tpl_a
    mov ecx, tpl_a_end - tpl_a
    call gen_copy
    mov ecx, 5
    call gen_buf
    CHECK_EQ("code copied to a buffer runs there (mov eax, imm; add eax, ecx)", eax, 0x0A0A0A0F)
    mov esi, tpl_b
    mov ecx, tpl_b_end - tpl_b
    call gen_copy
    mov ecx, 5
    call gen_buf
    CHECK_EQ("other code copied over it runs in its place (lea; xor)", eax, 0x0B0B0B0B ^ 15)
    mov byte ptr [gen_buf + 2], 0x41            # SIB 0x49 -> 0x41: lea eax, [ecx + 2*eax]
    mov eax, 0x10
    jmp test_copied_code_1
test_copied_code_1:
    mov ecx, 5
    call gen_buf
    CHECK_EQ("a one-byte patch of the copied code (its SIB byte) takes effect", eax, 0x0B0B0B0B ^ 37)
    ret

# gen_copy: copy ecx bytes from esi to gen_buf (then the caller jumps there with a call).
gen_copy:
    push edi
    mov edi, gen_buf
    rep movsb
    pop edi
    ret

# --- 5. privileged instructions generated at run time ---------------------------------------------
test_generated_privileged:
    mov esi, tpl_cr0
    mov ecx, tpl_cr0_end - tpl_cr0
    call gen_copy
    call gen_buf
    mov edx, cr0
    CHECK_EQ("generated mov eax, cr0 reads what static code reads", eax, edx)

    mov esi, tpl_set_ts
    mov ecx, tpl_set_ts_end - tpl_set_ts
    call gen_copy
    call gen_buf
    mov eax, cr0
    and eax, CR0_TS | CR0_MP
    CHECK_EQ("generated mov cr0, eax sets CR0.TS and CR0.MP", eax, CR0_TS | CR0_MP)

    mov esi, tpl_clts
    mov ecx, tpl_clts_end - tpl_clts
    call gen_copy
    call gen_buf
    mov eax, cr0
    and eax, CR0_TS | CR0_MP
    CHECK_EQ("generated clts clears CR0.TS only", eax, CR0_MP)

    mov esi, tpl_clear_mp
    mov ecx, tpl_clear_mp_end - tpl_clear_mp
    call gen_copy
    call gen_buf
    mov eax, cr0
    and eax, CR0_TS | CR0_MP
    CHECK_EQ("generated mov cr0, eax clears CR0.MP", eax, 0)

    mov esi, tpl_cli_sti
    mov ecx, tpl_cli_sti_end - tpl_cli_sti
    call gen_copy
    xor eax, eax
    call gen_buf
    CHECK_EQ("generated sti; cli runs and returns", eax, 0x57157157)

    mov esi, tpl_lsr
    mov ecx, tpl_lsr_end - tpl_lsr
    call gen_copy
    call gen_buf
    mov edx, eax
    push edx
    mov dx, COM1_LSR
    in al, dx
    pop edx
    movzx eax, al
    and eax, LSR_THRE
    and edx, LSR_THRE
    CHECK_EQ("generated in al, dx reads the UART line status as static code does", eax, edx)

    # The next line is printed by a generated putc (in and out), so it is missing if they failed.
    mov esi, tpl_putc
    mov ecx, tpl_putc_end - tpl_putc
    call gen_copy
    mov esi, generated_line
test_generated_putc_loop:
    mov al, byte ptr [esi]
    test al, al
    jz test_generated_putc_done
    call gen_buf
    inc esi
    jmp test_generated_putc_loop
test_generated_putc_done:
    mov al, 10
    call gen_buf
    ret

# Templates: position-independent code that is copied to gen_buf before it runs (never run here).
tpl_a:
    mov eax, 0x0A0A0A0A
    add eax, ecx
    ret
tpl_a_end:
tpl_b:
    lea eax, [ecx + 2*ecx]                      # 8D 04 49
    xor eax, 0x0B0B0B0B
    ret
tpl_b_end:
tpl_cr0:
    mov eax, cr0
    ret
tpl_cr0_end:
tpl_set_ts:
    mov eax, cr0
    or eax, CR0_TS | CR0_MP
    mov cr0, eax
    ret
tpl_set_ts_end:
tpl_clear_mp:
    mov eax, cr0
    and eax, ~CR0_MP
    mov cr0, eax
    ret
tpl_clear_mp_end:
tpl_clts:
    clts
    ret
tpl_clts_end:
tpl_cli_sti:
    sti                                         # every 8259 line is masked: nothing comes in
    nop
    cli
    mov eax, 0x57157157
    ret
tpl_cli_sti_end:
tpl_lsr:
    mov dx, COM1_LSR
    in al, dx
    movzx eax, al
    ret
tpl_lsr_end:
tpl_putc:                                       # al = character; preserves every register
    push edx
    push eax
    mov dx, COM1_LSR
tpl_putc_wait:
    in al, dx
    test al, LSR_THRE
    jz tpl_putc_wait
    pop eax
    mov dx, COM1
    out dx, al
    pop edx
    ret
tpl_putc_end:

.data
generated_line: .asciz "PASS this line was printed by in/out instructions generated at run time"

.bss
.align 4096
gen_buf:
    .zero 4096
