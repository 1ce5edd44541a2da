# description: true page faults in every form trap's C fill hook delivers, and the ones it must leave to Python
#
# Under trap, a load or store whose walk of the guest's tables faults, on a page the shadow holds no entry
# for, is a true #PF that modes/_trapfast.c delivers from the TLB fill (true_fault), with CR2 the
# instruction's memory operand. Each round makes a page not present (or read-only, or supervisor-only, or
# its PDE not present, or its PDE's A bit clear) and touches it with one instruction; the handler sums CR2,
# the error code and the faulting EIP into a checksum, repairs the entry and returns, and the instruction
# runs again. Forms C takes: mov (load, store, immediate, byte, moffs), add, cmp with base and index, inc, test,
# movzx, xchg, or with an 8-bit immediate, from ring 0 (ring 1 under trap) and ring 3. Forms it leaves to
# Python: an operand-size prefix, an access straddling into the page from the one before, push from memory,
# a segment prefix. The checksum must be native's (tests/test_true_pf_c.py; tests/test_truefault_model.py checks the walk and the decode against memory/walk.py and x86/faultaddr.py on random entries and instructions).
#include "kernel.inc"
#include "paging.inc"
#include "user.inc"

#define ROUNDS      40
#define PAGE_A      0x00300000
#define PAGE_B      0x00301000          // read-only for a supervisor write (CR0.WP = 1)
#define PAGE_C      0x00302000          // touched from ring 3
#define PAGE_D      0x00303000          // supervisor-only for a ring-3 load
#define ALIAS       0x00C00000          // its PDE not present until the handler points it at page_table_low
#define PT2         0x00310000          // the page table of 4-8 MiB (identity), its PDE's A bit cleared each round
#define HIGH_X      0x00405000          // a page mapped through PT2
#define PTE(p)      page_table_low + 4 * (p >> 12)

// make the page not present (the handler makes it present again); the next instruction touches it
#define NOT_PRESENT(page) and dword ptr [PTE(page)], ~PTE_P ; invlpg [page]

.text
main:
    call user_init
    SET_HANDLER(VEC_PF, pf_handler)
    PAGING_IDENTITY_4M_ON(PTE_P | PTE_W | PTE_U)
    mov edi, PT2                        # 4-8 MiB: identity, through PT2
    mov eax, 0x00400000 | PTE_P | PTE_W | PTE_U
    mov ecx, 1024
map_pt2:
    stosd
    add eax, 0x1000
    loop map_pt2
    mov dword ptr [page_dir + 4], PT2 | PTE_P | PTE_W | PTE_U
    xor esi, esi                        # the checksum
    mov ebp, ROUNDS
round:
    NOT_PRESENT(PAGE_A)
    mov eax, dword ptr [PAGE_A + 0x10]
    add esi, eax
    NOT_PRESENT(PAGE_A)
    mov dword ptr [PAGE_A + 0x20], ebp
    NOT_PRESENT(PAGE_A)
    mov dword ptr [PAGE_A + 0x30], 0x1234
    mov ecx, 3
    NOT_PRESENT(PAGE_A)
    add dword ptr [PAGE_A + 0x40], ecx
    mov ebx, PAGE_A - 0x100
    mov ecx, 0x43
    NOT_PRESENT(PAGE_A)
    cmp eax, dword ptr [ebx + ecx * 4 + 8]
    pushfd
    pop eax
    and eax, 0x8D5
    add esi, eax
    NOT_PRESENT(PAGE_A)
    inc dword ptr [PAGE_A + 0x50]
    NOT_PRESENT(PAGE_A)
    test dword ptr [PAGE_A + 0x50], 1
    setz al
    movzx eax, al
    add esi, eax
    NOT_PRESENT(PAGE_A)
    movzx eax, byte ptr [PAGE_A + 0xFFF]
    add esi, eax
    mov edx, ebp
    NOT_PRESENT(PAGE_A)
    xchg dword ptr [PAGE_A + 0x60], edx
    add esi, edx
    NOT_PRESENT(PAGE_A)
    or dword ptr [PAGE_A + 0x70], 8
    mov al, 0x5A
    NOT_PRESENT(PAGE_A)
    mov byte ptr [PAGE_A + 0x80], al
    # Python's: an operand-size prefix, a straddling access, push from memory, a segment prefix
    NOT_PRESENT(PAGE_A)
    mov ax, word ptr [PAGE_A + 0x90]
    add esi, eax
    NOT_PRESENT(PAGE_A)
    mov eax, dword ptr [PAGE_A - 2]
    add esi, eax
    NOT_PRESENT(PAGE_A)
    push dword ptr [PAGE_A + 0x20]
    pop eax
    add esi, eax
    NOT_PRESENT(PAGE_A)
    mov eax, dword ptr fs:[PAGE_A + 0x30]
    add esi, eax
    # a page table reached through a PDE whose A bit is clear: the faulting walk sets it (the handler sums it)
    and dword ptr [page_dir + 4], ~PTE_A
    and dword ptr [PT2 + 4 * ((HIGH_X - 0x00400000) >> 12)], ~PTE_P
    invlpg [HIGH_X]
    mov eax, dword ptr [HIGH_X + 0x10]
    add esi, eax
    # a supervisor write to a read-only page (CR0.WP = 1): a protection fault
    and dword ptr [PTE(PAGE_B)], ~PTE_W
    invlpg [PAGE_B]
    mov dword ptr [PAGE_B + 0x44], ebp
    # a PDE not present (the handler points it at the first page table)
    mov eax, dword ptr [ALIAS + PAGE_A + 0x20]
    add esi, eax
    mov dword ptr [page_dir + 12], 0   # PDE(ALIAS)
    invlpg [ALIAS + PAGE_A]
    # ring 3: a load of a page not present, a load of a supervisor-only page
    and dword ptr [PTE(PAGE_C)], ~PTE_P
    invlpg [PAGE_C]
    and dword ptr [PTE(PAGE_D)], ~PTE_U
    invlpg [PAGE_D]
    mov eax, user_code
    mov edx, user_stack_top
    call run_user
    add esi, eax
    dec ebp
    jnz round

    CHECK_EQ("every fault was taken", dword ptr [pf_count], ROUNDS * 20)
    mov eax, esi
    add eax, dword ptr [sum]
    call print_hex32
    call newline
    PASS("true page faults")
    ret

user_code:
    mov eax, dword ptr [PAGE_C + 0x10]
    add eax, dword ptr [PAGE_D + 0x20]
    mov ebx, eax
    mov eax, SYS_EXIT
    int 0x80

# #PF from ring 0 or 3 (isr_common's frame at ebx): sum CR2, the error code and the faulting EIP into
# `sum`, make the page present, writable and user-accessible (or the PDE of ALIAS present), and return: the
# instruction runs again.
pf_handler:
    inc dword ptr [pf_count]
    mov eax, cr2
    mov edx, dword ptr [sum]
    rol edx, 3
    add edx, eax
    add edx, dword ptr [ebx + FRAME_ERROR]
    rol edx, 3
    add edx, dword ptr [ebx + FRAME_EIP]
    mov dword ptr [sum], edx
    mov edx, dword ptr [page_dir + 4]   # PT2's PDE: its A bit, set by a walk through it (the faulting one too)
    and edx, PTE_A
    add dword ptr [sum], edx
    cmp eax, ALIAS
    jb pf_page
    mov eax, page_table_low
    or eax, PTE_P | PTE_W | PTE_U
    mov dword ptr [page_dir + 12], eax  # PDE(ALIAS)
    ret
pf_page:
    cmp eax, 0x00400000
    jae pf_high
    shr eax, 12
    or dword ptr [page_table_low + 4 * eax], PTE_P | PTE_W | PTE_U
    jmp pf_flush
pf_high:
    sub eax, 0x00400000
    shr eax, 12
    or dword ptr [PT2 + 4 * eax], PTE_P | PTE_W | PTE_U
pf_flush:
    mov eax, cr2
    invlpg [eax]
    ret

.data
pf_count: .long 0
sum: .long 0
