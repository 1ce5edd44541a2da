# description: trap's common traps (cli, sti, clts, mov from/to CR0 and CR4) in loops, with what the C path must leave to Python around them: ring-3 cli/sti, CR writes that touch other bits or reserved ones, WP set after a supervisor write to a read-only page, timer interrupts waiting for sti's window, and trapping instructions rewritten in place
#
# Under `--mode trap` every instruction below faults at ring 1 and is emulated; modes/_trapfast.c
# answers the common ones in C. tests/test_trap_fast.py runs this guest with and without the C path
# and compares everything a reader can see. Nothing printed depends on host timing.
#include "kernel.inc"
#include "paging.inc"
#include "user.inc"
#include "pit.inc"

#define LOOPS 1500
#define RO_PAGE 0x3FF000                // the last page of the identity map, made read-only

.text
main:
    call user_init
    # Ring 3 (IOPL 0): cli and sti are the guest's own #GP, in every mode.
    mov eax, user_cli
    mov edx, user_stack_top
    call run_user
    CHECK_EQ("ring 3, IOPL 0: cli raises #GP", eax, USER_KILLED | VEC_GP)
    mov eax, user_cli
    CHECK_EQ("that #GP is a fault: saved EIP is the cli", dword ptr [user_fault_eip], eax)
    mov eax, user_sti
    mov edx, user_stack_top
    call run_user
    CHECK_EQ("ring 3, IOPL 0: sti raises #GP", eax, USER_KILLED | VEC_GP)

    mov esi, page_table_low
    mov edi, page_dir
    mov eax, PTE_P | PTE_W | PTE_U
    call paging_identity_4m
    and dword ptr [page_table_low + 4 * (RO_PAGE >> 12)], ~PTE_W
    mov eax, page_dir
    call paging_enable
    SET_HANDLER(VEC_GP, kernel_gp)
    SET_HANDLER(VEC_PF, kernel_pf)

    # The hot loop: every kind the C path answers, through several registers, and now and then a
    # CR write it must leave to Python (other bits: CR0.MP, CR4.PSE; a reserved CR4 bit: #GP).
    xor ebp, ebp
    mov edi, LOOPS
hot_loop:
    lidt [idtr]                         # Python's: reads guest memory through the hypervisor's TLB,
    cli                                 # which the WP/PGE toggles below flush
    sti
    mov eax, cr0
    xor ebp, eax
    rol ebp, 5
    xor eax, CR0_WP
    mov cr0, eax
    mov ecx, cr0
    xor ebp, ecx
    xor ecx, CR0_WP
    mov cr0, ecx
    mov edx, cr4
    xor ebp, edx
    rol ebp, 3
    xor edx, 0x80                       # PGE
    mov cr4, edx
    mov esi, cr4
    xor ebp, esi
    xor esi, 0x80
    mov cr4, esi
    clts
    mov ebx, cr0
    xor ebp, ebx
    add ebp, edi
    test edi, 15
    jnz hot_next
    xor ebx, 2                          # CR0.MP: not WP, Python's
    mov cr0, ebx
    xor ebx, 2
    mov cr0, ebx
    mov eax, cr4
    xor eax, 0x10                       # CR4.PSE: the walk's rules change, Python's
    mov cr4, eax
    xor eax, 0x10
    mov cr4, eax
    test edi, 63
    jnz hot_next
    mov eax, cr4
    or eax, 1 << 12                     # LA57: not in this CPU model, #GP
    mov cr4, eax
hot_next:
    dec edi
    jnz hot_loop
    mov eax, ebp
    call print_hex32
    mov al, 10
    call putc
    CHECK_EQ("a reserved CR4 bit raises #GP each time", dword ptr [gp_count], LOOPS / 64)
    mov eax, cr4
    and eax, 1 << 12
    CHECK_EQ("and CR4 keeps it clear", eax, 0)

    # CR0.WP: with it clear the kernel writes a read-only page; set, the write is a #PF. Setting
    # it after such a write needs the engine's TLB flushed (Python's); clearing it does not.
    mov edi, 40
wp_loop:
    mov eax, cr0
    and eax, ~CR0_WP
    mov cr0, eax
    mov dword ptr [RO_PAGE], edi        # allowed: WP = 0
    or eax, CR0_WP
    mov cr0, eax
    mov dword ptr [pf_resume], wp_resumed
    mov dword ptr [RO_PAGE + 4], edi    # #PF: WP = 1
wp_resumed:
    dec edi
    jnz wp_loop
    CHECK_EQ("CR0.WP = 0: the kernel writes a read-only page", dword ptr [RO_PAGE], 1)
    CHECK_EQ("CR0.WP = 1: the same write is a #PF, every time", dword ptr [pf_count], 40)
    CHECK_EQ("and the page was not written then", dword ptr [RO_PAGE + 4], 0)

    # Timer interrupts: IRQ 0 often pending at sti. The interrupt shadow lets the instruction after
    # sti run first, so the handler must always find `window` = 1.
    SET_HANDLER(VEC_IRQ0, tick)
    mov ax, 0xFFFE
    call pic_set_mask
    mov ax, 4                           # every 3,352 instructions of virtual time
    call pit_start_periodic
    mov edi, 400
irq_loop:
    cli
    mov dword ptr [window], 0
    mov ecx, 2000                       # longer than the period: IRQ 0 waits at the sti
irq_spin:
    dec ecx
    jnz irq_spin
    sti
    mov dword ptr [window], 1
    nop
    dec edi
    jnz irq_loop
    # A tight loop: the timer's deadline often falls just after an sti that found nothing pending
    # (the C path's sti): the interrupt must still wait for the instruction after it.
    mov ax, 2
    call pit_start_periodic
    mov edi, 20000
tight_loop:
    cli
    mov dword ptr [window], 0
    sti
    mov dword ptr [window], 1
    dec edi
    jnz tight_loop
    cli
    mov ax, 0xFFFF
    call pic_set_mask
    mov eax, dword ptr [ticks]
    cmp eax, 300
    setae al
    movzx eax, al
    CHECK_EQ("IRQ 0 reaches the kernel at its sti windows", eax, 1)
    CHECK_EQ("never before the instruction after sti (the interrupt shadow)", dword ptr [shadow_broken], 0)

    # Rewritten in place after it ran: cli, then sti, then mov eax, cr0, then clts, then nops.
    mov esi, 0
rewrite_loop:
    mov eax, dword ptr [patches + 4 * esi]
    mov dword ptr [patch_site], eax
    mov ecx, 3
rewrite_run:
    xor eax, eax
    call patch_site
    pushfd
    pop edx
    and edx, EFLAGS_IF
    xor ebp, edx
    xor ebp, eax
    rol ebp, 1
    dec ecx
    jnz rewrite_run
    mov eax, cr0
    and eax, 8
    xor ebp, eax
    or dword ptr [cr0_ts_source], 0     # keep a store between runs
    mov eax, cr0
    or eax, 8                           # TS again (Python's: another bit), for the next clts
    mov cr0, eax
    inc esi
    cmp esi, 5
    jb rewrite_loop
    cli
    mov eax, ebp
    call print_hex32
    mov al, 10
    call putc
    PASS("trap's common traps")
    ret

kernel_gp:
    inc dword ptr [gp_count]
    add dword ptr [ebx + FRAME_EIP], 3  # the 3-byte mov cr4, eax
    ret

kernel_pf:
    inc dword ptr [pf_count]
    mov eax, dword ptr [pf_resume]
    mov dword ptr [ebx + FRAME_EIP], eax
    ret

tick:
    inc dword ptr [ticks]
    cmp dword ptr [window], 1
    je tick_ok
    inc dword ptr [shadow_broken]
tick_ok:
    xor eax, eax                        # IRQ 0
    call pic_eoi
    ret

user_cli:
    cli
    ret
user_sti:
    sti
    ret

.data
patch_site: .byte 0x90, 0x90, 0x90, 0xC3      # 3 bytes rewritten, then ret
patches:
    .byte 0xFA, 0x90, 0x90, 0xC3               # cli
    .byte 0xFB, 0x90, 0x90, 0xC3               # sti
    .byte 0x0F, 0x20, 0xC0, 0xC3               # mov eax, cr0
    .byte 0x0F, 0x06, 0x90, 0xC3               # clts
    .byte 0x90, 0x90, 0x90, 0xC3               # nothing left to trap
gp_count: .long 0
pf_count: .long 0
pf_resume: .long 0
ticks: .long 0
window: .long 0
shadow_broken: .long 0
cr0_ts_source: .long 0
