# description: page-table stores and invlpg in every form full's C callout hook serves, and the cases it must leave to Python
#
# Under full, a kernel store that keeps faulting on a traced page table becomes an adaptive callout, and
# invlpg is a callout; bt/_callout.c serves both where Python would do nothing but the store (no shadow
# entry derives from the word: ADAPTIVE) or drop one shadow entry (a page without translated code:
# INVLPG). Each round: xor/or/and/mov with an immediate, a 32-bit, 16-bit or high-byte register, base,
# index and displacement addressing; a store whose word an entry derives from every other round (the
# page was read: Python zaps); one site that stores into a page table and into a plain page (its
# untraced run: Python's); invlpg of data pages, of a page nothing maps and of a code page. The flags of
# each store and the final entries are summed into a checksum that must be native's
# (tests/test_ptemod_c.py).
#include "kernel.inc"
#include "paging.inc"

#define ROUNDS      64
#define PAGE_A      0x00300000
#define PAGE_B      0x00301000
#define PAGE_C      0x00302000
#define PAGE_D      0x00303000
#define PAGE_E      0x00304000
#define PAGE_F      0x00305000
#define PLAIN       0x00306000          // an ordinary data page: no shadow entry derives from it
#define ALIAS       0x00307000          // the IDT's linear page, mapped to IDT_ONE or IDT_TWO
#define IDT_ONE     0x00308000
#define IDT_TWO     0x00309000
#define GDT_ALIAS   0x0030A000          // the GDT's linear page, mapped to GDT_ONE or GDT_TWO
#define GDT_ONE     0x0030B000
#define GDT_TWO     0x0030C000
#define SEL_TEST    0x38                // a data segment: base 0 in GDT_ONE, 0x10 in GDT_TWO
#define PTE(p)      page_table_low + 4 * (p >> 12)
#define FLAGS_MASK  0x8D5               // CF PF AF ZF SF OF

# esi += the arithmetic flags
#define SUM_FLAGS pushfd ; pop eax ; and eax, FLAGS_MASK ; add esi, eax

.text
main:
    PAGING_IDENTITY_4M_ON(PTE_P | PTE_W)
    xor esi, esi                        # the checksum
    mov ebp, ROUNDS
round:
    # imm8 xor, disp32 only; invlpg through a register
    xor dword ptr [PTE(PAGE_A)], PTE_W
    SUM_FLAGS
    mov edi, PAGE_A
    invlpg [edi]
    # a 32-bit register through a base register; the page was read the round before, every other round
    mov ebx, PTE(PAGE_B)
    mov ecx, dword ptr [ebx]
    xor ecx, PTE_W
    mov dword ptr [ebx], ecx
    invlpg [PAGE_B]
    test ebp, 1
    jz no_read
    mov eax, dword ptr [PAGE_B]         # an entry derives from PTE(PAGE_B) until the next invlpg
no_read:
    mov ecx, 0x400
    mov ebx, PAGE_B - 0x1000
    invlpg [ebx + ecx * 4]              # base and scaled index: page B
    mov eax, dword ptr [PAGE_B]         # its entry again
    mov eax, dword ptr [PTE(PAGE_F)]
    xchg dword ptr [PTE(PAGE_F)], eax   # a store only Python emulates: it takes in what C logged so far
    or dword ptr [PTE(PAGE_B)], 0       # a store that zaps B's entry (the value unchanged) ...
    mov eax, dword ptr [PAGE_B]         # ... so, with no invlpg, this read walks again and makes an entry
    mov eax, dword ptr [PTE(PAGE_F)]
    xchg dword ptr [PTE(PAGE_F)], eax   # Python takes in the zap, then that entry, which C's copy keeps
    invlpg [PAGE_A]                     # (page A has no entry: this only flushes the engine's TLB)
    mov eax, dword ptr [PAGE_B]         # a shadow hit on it
    mov ebx, PAGE_B + 0x1010
    invlpg [ebx - 0x80]                 # a negative 8-bit displacement: page B
    # a byte and a word
    xor byte ptr [PTE(PAGE_C)], PTE_U
    SUM_FLAGS
    or word ptr [PTE(PAGE_C)], 0
    SUM_FLAGS
    and word ptr [PTE(PAGE_C) + 2], 0xFFFF
    SUM_FLAGS
    invlpg [PAGE_C + 0x123]
    # a high-byte register: clear the entry's bits 8-15 and put them back
    mov edx, dword ptr [PTE(PAGE_D)]
    and byte ptr [PTE(PAGE_D) + 1], 0
    SUM_FLAGS
    mov byte ptr [PTE(PAGE_D) + 1], dh
    # an index register with a scale, and a 32-bit immediate
    mov ecx, PAGE_E >> 12
    xor dword ptr [page_table_low + 4 * ecx], 0x80000000 | PTE_U
    SUM_FLAGS
    and dword ptr [page_table_low + 4 * ecx], 0x7FFFFFFF
    SUM_FLAGS
    or dword ptr [page_table_low + 4 * ecx], ecx
    SUM_FLAGS
    invlpg [PAGE_E]
    # one site, two kinds of frame: a page table, then a plain page three times (its untraced run)
    mov ebx, PTE(PAGE_F)
    mov eax, PAGE_F | PTE_P | PTE_W
    call store_at
    mov ebx, PLAIN
    mov eax, ebp
    call store_at
    add ebx, 4
    call store_at
    add ebx, 4
    call store_at
    invlpg [PAGE_F]
    # data beside translated code (its frame is traced for coherence): read-modify-writes and a logic op
    stc                                 # inc and dec keep CF
    inc dword ptr [counters]
    SUM_FLAGS
    add dword ptr [counters + 4], ebp
    SUM_FLAGS
    sub word ptr [counters + 8], 3      # through 0x8000: OF once
    SUM_FLAGS
    clc
    dec byte ptr [counters + 12]        # through 0: CF stays clear
    SUM_FLAGS
    xor dword ptr [counters + 16], 0x5A5A5A5A
    SUM_FLAGS
    # and a store into translated code itself: the immediate patched_fn returns
    mov ecx, ebp
    imul ecx, ecx, 0x01010101
    call patch
    call patched_fn
    cmp eax, ecx
    jne smc_wrong
    # invlpg of a page nothing maps (PDE 1 is not present), and of a page with translated code
    invlpg [0x00400000]
    invlpg [round]
    dec ebp
    jnz round

    # 70 plain stores in a row make store_at's site native again; then page-table stores again
    mov ecx, 70
    mov ebx, PLAIN
plain_run:
    mov eax, ecx
    call store_at
    dec ecx
    jnz plain_run
    mov ecx, 8
    mov ebx, PTE(PAGE_F)
traced_again:
    mov eax, PAGE_F | PTE_P | PTE_W
    call store_at
    invlpg [PAGE_F]
    mov eax, dword ptr [PAGE_F]
    dec ecx
    jnz traced_again

    # A page table no shadow entry derives from any more (its one page was invlpg'ed): a store into it is
    # emulated and the frame left untraced (Python's), until the next walk through it traces it again
    mov eax, pt_high
    or eax, PTE_P | PTE_W
    mov dword ptr [page_dir + 4], eax   # PDE 1: 4-8 MiB through pt_high
    mov dword ptr [pt_high], 0x00200000 | PTE_P | PTE_W
    mov dword ptr [pt_high + 4], 0x00201000 | PTE_P | PTE_W
    mov ecx, 8
high_round:
    mov eax, dword ptr [0x00400000]     # an entry derives from pt_high's first PTE
    invlpg [0x00400000]                 # ... and no longer
    xor dword ptr [pt_high + 4], PTE_W
    dec ecx
    jnz high_round

    # The hypervisor's own TLB (its reads of the guest's tables) through a remapped page: the IDT is read at
    # ALIAS, whose frame a page-table store switches between two copies; each invlpg must drop the page
    # (the tables are copied from kernel.inc's, not through sidt/sgdt, which trap cannot virtualize)
    push esi                            # the checksum (rep movsd uses esi)
    cld
    mov esi, idt
    mov edi, IDT_ONE
    mov ecx, 512
    rep movsd
    mov esi, idt
    mov edi, IDT_TWO
    mov ecx, 512
    rep movsd
    mov edx, handler_one
    mov ebx, IDT_ONE + 8 * 0x81
    call put_gate
    mov edx, handler_two
    mov ebx, IDT_TWO + 8 * 0x81
    call put_gate
    lidt [alias_idtr]
    mov ecx, 12
idt_round:
    mov eax, IDT_ONE | PTE_P | PTE_W
    test ecx, 1
    jz idt_map
    mov eax, IDT_TWO | PTE_P | PTE_W
idt_map:
    mov ebx, PTE(ALIAS)
    call store_pte
    invlpg [ALIAS]
    mov dword ptr [which_idt], 0
    int 0x81
    mov eax, 1
    test ecx, 1
    jz idt_check
    mov eax, 2
idt_check:
    cmp dword ptr [which_idt], eax
    jne idt_wrong
    dec ecx
    jnz idt_round
    lidt [idtr]
    PASS("an IDT read through a remapped page")
    jmp idt_done
idt_wrong:
    lidt [idtr]
    FAIL("an IDT read through a remapped page", "int 0x81 went through the IDT the page mapped before its invlpg")
idt_done:

    # The same for the GDT, which segment loads read through the hypervisor's TLB (and its C copy): FS is
    # loaded with a selector whose base differs in the two copies
    mov dword ptr [PLAIN + 0x100], 0xAAAA
    mov dword ptr [PLAIN + 0x110], 0xBBBB
    mov esi, gdt
    mov edi, GDT_ONE
    mov ecx, 14                         # 7 descriptors
    rep movsd
    mov esi, gdt
    mov edi, GDT_TWO
    mov ecx, 14
    rep movsd
    mov dword ptr [GDT_ONE + SEL_TEST], 0x0000FFFF
    mov dword ptr [GDT_ONE + SEL_TEST + 4], 0x00CF9200
    mov dword ptr [GDT_TWO + SEL_TEST], 0x0010FFFF
    mov dword ptr [GDT_TWO + SEL_TEST + 4], 0x00CF9200
    mov eax, GDT_ONE | PTE_P | PTE_W
    mov ebx, PTE(GDT_ALIAS)
    call store_pte
    invlpg [GDT_ALIAS]
    lgdt [alias_gdtr]
    mov ecx, 12
gdt_round:
    mov eax, GDT_ONE | PTE_P | PTE_W
    mov edx, 0xAAAA
    test ecx, 1
    jz gdt_map
    mov eax, GDT_TWO | PTE_P | PTE_W
    mov edx, 0xBBBB
gdt_map:
    mov ebx, PTE(GDT_ALIAS)
    call store_pte
    invlpg [GDT_ALIAS]
    mov ax, SEL_TEST
    mov fs, ax
    mov eax, dword ptr fs:[PLAIN + 0x100]
    cmp eax, edx
    jne gdt_wrong
    dec ecx
    jnz gdt_round
    mov ax, KERNEL_DS
    mov fs, ax
    lgdt [gdtr]
    PASS("a GDT read through a remapped page")
    jmp gdt_done
gdt_wrong:
    mov ax, KERNEL_DS
    mov fs, ax
    lgdt [gdtr]
    FAIL("a GDT read through a remapped page", "a segment load read the GDT the page mapped before its invlpg")
gdt_done:
    pop esi

    PASS("stores into translated code")
    jmp smc_done
smc_wrong:
    FAIL("stores into translated code", "patched_fn returned an immediate from before the store")
smc_done:
    mov eax, dword ptr [counters]
    add esi, eax
    mov eax, dword ptr [counters + 4]
    add esi, eax
    mov eax, dword ptr [counters + 8]
    add esi, eax
    mov eax, dword ptr [counters + 12]
    add esi, eax
    mov eax, dword ptr [counters + 16]
    add esi, eax

    # every page still maps itself, with the rights it started with (after an even number of rounds)
    CHECK_EQ("PTE of page A", dword ptr [PTE(PAGE_A)], PAGE_A | PTE_P | PTE_W)
    CHECK_EQ("PTE of page B", dword ptr [PTE(PAGE_B)], PAGE_B | PTE_P | PTE_W | PTE_A)
    CHECK_EQ("PTE of page D", dword ptr [PTE(PAGE_D)], PAGE_D | PTE_P | PTE_W)
    mov eax, dword ptr [PTE(PAGE_E)]
    and eax, 0xFFFFFF9F                 # not A or D
    CHECK_EQ("PTE of page E", eax, PAGE_E | PTE_P | PTE_W | PTE_U | (PAGE_E >> 12))
    CHECK_EQ("page A reads", dword ptr [PAGE_A], 0)
    mov dword ptr [PAGE_A], 0x1234      # writable again
    CHECK_EQ("page A wrote", dword ptr [PAGE_A], 0x1234)
    CHECK_EQ("the plain page", dword ptr [PLAIN], 1)
    mov eax, dword ptr [PTE(PAGE_C)]
    add esi, eax
    mov eax, dword ptr [PTE(PAGE_E)]
    add esi, eax
    mov eax, esi
    call print_hex32
    call newline
    PASS("page-table stores and invlpg")
    ret

# The helpers and the counters on a code page of their own (the loop invlpg's main's page, which leaves
# its shadow entry clean: a store there walks again, and stays Python's)
.align 4096
store_at:
    mov dword ptr [ebx], eax
    ret

store_pte:
    mov dword ptr [ebx], eax
    ret

patch:
    mov dword ptr [patched_fn + 1], ecx
    ret

patched_fn:
    mov eax, 0x11111111
    ret

# counters in the code's own frame, on lines of their own
.align 64
counters:
    .long 0, 0, 0x00018040, 0x20, 0
.align 64

# put_gate: the 32-bit interrupt gate at ebx (DPL 0) to the handler at edx
put_gate:
    mov eax, edx
    and eax, 0xFFFF
    or eax, KERNEL_CS << 16
    mov dword ptr [ebx], eax
    mov eax, edx
    and eax, 0xFFFF0000
    mov ah, 0x8E
    mov dword ptr [ebx + 4], eax
    ret

handler_one:
    mov dword ptr [which_idt], 1
    iretd

handler_two:
    mov dword ptr [which_idt], 2
    iretd

.data
.align 4
which_idt:
    .long 0
.bss
.align 4096
pt_high:
    .zero 4096
.data
alias_gdtr:
    .word 0x3F
    .long GDT_ALIAS
alias_idtr:
    .word 0x7FF
    .long ALIAS
