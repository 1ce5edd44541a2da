# description: isolation sweep: reads and writes its whole 4 GiB linear and physical space, paging off, identity-mapped and aliased onto its own RAM
#
# A hostile kernel looking for the hypervisor. A hypervisor that deprivileges the guest keeps its own
# code and data (translation cache, virtual CPU, shadow page tables) somewhere in the machine, and
# Unicorn does not enforce segment limits, so only the TLB-fill hook can fence it (DESIGN.md 3,
# "Isolation under deprivileging"). This guest touches one dword per page all over the address space
# and checks that it sees only its own RAM or unbacked memory, in four passes:
#   1. paging off (linear = physical), at offset 0 of each page;
#   2. paging on, all 4 GiB identity-mapped with 4 MiB pages, at offset 0xFFC;
#   3. paging on, 0-4 MiB identity-mapped and every 4 MiB above it aliased onto a frame of free
#      RAM, at offset 0x800: whatever linear window a hypervisor occupies, the guest maps it onto
#      its own memory, and each write must read back both there and through a second alias;
#   4. the same aliases executed, at offset 0x400 (above the end of RAM: one page per 16 MiB, and
#      one per 64 KiB in the dense ranges): the guest writes `mov eax, ADDRESS; ret` there and calls
#      it, then calls the same frame through its second alias, which earlier ran other code written
#      the same way: each must run what was last written (no translation, cached or the
#      hypervisor's, may stand in for the guest's bytes).
#
# What each physical page is, from the Multiboot memory size (mem_upper) and the pc-lite map:
#   0 - 0x9FFFF          low RAM (IVT, BIOS data, boot information): read, write back, read again
#   0xA0000 - 0xFFFFF    SKIPPED: the legacy hole (VGA window, option and BIOS ROMs under QEMU)
#   1 MiB - 4 MiB        this image, its stack and page tables: read, write back, read again
#   4 MiB - mem end      free RAM: a pattern (address ^ key) is written and must read back; after
#                        the sweep every pattern is checked again (writes elsewhere never reach RAM)
#   mem end - RAM end    SKIPPED: RAM the firmware keeps (SeaBIOS's top 128 KiB, reserved in the
#                        Multiboot map); RAM end is mem end rounded up to 1 MiB
#   RAM end - 4 GiB      outside RAM: a pattern is written and must never read back; reads give one
#                        fill value (cpuvirt: all-ones; QEMU: zeros), except in the firmware ROM
#                        (top 1 MiB: BIOS bytes under QEMU)
#   SKIPPED device pages, which have side effects: the IO-APIC (0xFEC00000), the HPET (0xFED00000)
#   and the local APIC with QEMU's MSI window
#   (0xFEE00000-0xFEEFFFFF: under QEMU a store there sends an MSI).
# The output is the same under QEMU and cpuvirt: no addresses, no counts, no values read.
#
# Density: every page below RAM end is visited; above it one page in `stride` (default 64 KiB), and
# every page of the `dense` ranges. Kernel command line (all optional, hex with 0x):
#   stride=0x10000            visit one page per stride outside RAM (a multiple of 0x1000)
#   dense=0xLO-0xHI           visit every page in [LO, HI) (up to 8 ranges; HI = 0x0: up to 4 GiB),
#                             e.g. a hypervisor window
#   strict                    also check that every read outside RAM, ROM included, is all-ones
#                             (cpuvirt's unbacked memory; QEMU differs, so only for cpuvirt runs)
#include "kernel.inc"

#define FREE_START   0x400000           // 4 MiB: everything below is this guest's own
#define LEGACY_LO    0xA0000
#define LEGACY_HI    0x100000
#define IOAPIC_LO    0xFEC00000
#define IOAPIC_HI    0xFEC01000
#define HPET_LO      0xFED00000
#define HPET_HI      0xFED01000
#define LAPIC_LO     0xFEE00000
#define LAPIC_HI     0xFEF00000         // the APIC page and QEMU's MSI window
#define ROM_LO       0xFFF00000
#define DEFAULT_STRIDE 0x400000
#define MAX_DENSE    8
#define PDE_4M       (PTE_P | PTE_W | PDE_PS)
#define MBI_MEM_UPPER 8

#define R_SKIP  0
#define R_KEEP  1                       // RAM in use: read, write back, read again
#define R_FREE  2                       // free RAM: pattern, read back
#define R_OUT   3                       // outside RAM: writes must not stick, one fill value
#define R_ROM   4                       // outside RAM in the firmware ROM range: writes must not stick

# error counters: [count, first address] per kind
#define E_FREE   0
#define E_KEEP   8
#define E_STICK  16
#define E_FILL   24
#define E_RAMCHG 32
#define E_ALIAS  40
#define E_ALIAS2 48
#define E_STRICT 56
#define E_EXEC   64
#define E_EXEC2  72
#define E_SIZE   80

#define RECORD(KIND) push edi ; lea edi, [errors + KIND] ; call record_error ; pop edi
#define REPORT(NAME, KIND) \
    PUSH_STRING(NAME) ; push KIND ; call report_errors ; add esp, 8

.text
main:
    call parse_cmdline
    cmp dword ptr [bad_option], 0
    jne main_done
    call memory_size
    cmp dword ptr [bad_memory], 0
    jne main_done
    call text_checksum
    mov dword ptr [text_sum_before], eax

    # --- 1. paging off -------------------------------------------------------------------------
    mov dword ptr [sweep_offset], 0
    mov dword ptr [sweep_key], 0x5A5AA5A5
    call physical_sweep
    REPORT("paging off: free RAM reads back what was written to it", E_FREE)
    REPORT("paging off: RAM in use (image, stack, low memory) keeps its contents when written back", E_KEEP)
    REPORT("paging off: writes outside RAM never read back", E_STICK)
    REPORT("paging off: reads outside RAM give one fill value (all-ones or zeros) outside the ROM", E_FILL)
    REPORT("paging off: writes outside RAM never changed RAM", E_RAMCHG)
    call report_strict

    # --- 2. paging on, identity map of 4 GiB --------------------------------------------------------
    call build_page_dirs
    mov eax, cr4
    or eax, CR4_PSE
    mov cr4, eax
    mov eax, pd_identity
    call paging_enable
    mov dword ptr [sweep_offset], 0xFFC
    mov dword ptr [sweep_key], 0x3C3CC3C3
    call physical_sweep
    REPORT("identity-mapped: free RAM reads back what was written to it", E_FREE)
    REPORT("identity-mapped: RAM in use (image, stack, page tables) keeps its contents when written back", E_KEEP)
    REPORT("identity-mapped: writes outside RAM never read back", E_STICK)
    REPORT("identity-mapped: reads outside RAM give one fill value (all-ones or zeros) outside the ROM", E_FILL)
    REPORT("identity-mapped: writes outside RAM never changed RAM", E_RAMCHG)
    call report_strict

    # --- 3. paging on, everything above 4 MiB aliased onto free RAM ---------------------------------
    mov eax, pd_alias
    mov cr3, eax
    mov dword ptr [sweep_offset], 0x800
    mov dword ptr [sweep_key], 0x69699696
    call clear_errors
    mov dword ptr [probe_fn], probe_alias
    call sweep
    REPORT("aliased onto RAM: every linear page above 4 MiB reads back what was written through it", E_ALIAS)
    REPORT("aliased onto RAM: and the same value reads back through a second alias of its frame", E_ALIAS2)

    # --- 4. the same aliases, executed: code written through each runs as written -----------------
    mov dword ptr [sweep_offset], 0x400
    call clear_errors
    mov dword ptr [probe_fn], probe_exec
    call sweep
    REPORT("aliased onto RAM: code written through linear pages all over the space runs as written", E_EXEC)
    REPORT("aliased onto RAM: and a second alias of its frame, which ran older code, runs the new code", E_EXEC2)

    call paging_disable
    call text_checksum
    CHECK_EQ("the guest's code is unchanged after the sweeps", eax, dword ptr [text_sum_before])
main_done:
    ret

# --- the command line ----------------------------------------------------------------------------
# parse_cmdline: read stride=, dense= and strict from the kernel command line (first word: the
# kernel's name, skipped). An option it does not know is a FAIL.
parse_cmdline:
    pushad
    mov dword ptr [stride], DEFAULT_STRIDE
    mov ebx, dword ptr [boot_info]
    test dword ptr [ebx], 0x4                   # flags bit 2: cmdline valid
    jz parse_done
    mov esi, dword ptr [ebx + 16]
    call skip_word                              # the kernel's name
parse_next:
    call skip_spaces
    cmp byte ptr [esi], 0
    je parse_done
    mov edi, opt_stride
    call match_prefix
    jnc parse_stride
    mov edi, opt_dense
    call match_prefix
    jnc parse_dense
    mov edi, opt_strict
    call match_prefix
    jnc parse_strict
    jmp parse_bad
parse_stride:
    call parse_hex
    jc parse_bad
    test eax, 0xFFF
    jnz parse_bad
    test eax, eax
    jz parse_bad
    mov dword ptr [stride], eax
    jmp parse_end_of_word
parse_dense:
    mov ecx, dword ptr [n_dense]
    cmp ecx, MAX_DENSE
    jae parse_bad
    call parse_hex
    jc parse_bad
    and eax, 0xFFFFF000
    mov dword ptr [dense + 8 * ecx], eax
    cmp byte ptr [esi], 0x2D                    # '-'
    jne parse_bad
    inc esi
    call parse_hex
    jc parse_bad
    add eax, 0xFFF                              # round the end up to a page
    and eax, 0xFFFFF000
    mov dword ptr [dense + 8 * ecx + 4], eax    # 0 = up to 4 GiB
    inc dword ptr [n_dense]
    jmp parse_end_of_word
parse_strict:
    mov dword ptr [strict], 1
parse_end_of_word:
    mov al, byte ptr [esi]
    cmp al, 0
    je parse_done
    cmp al, 0x20
    je parse_next
parse_bad:
    mov dword ptr [bad_option], 1
    FAIL("kernel command line", "expected stride=0xN, dense=0xLO-0xHI or strict")
parse_done:
    popad
    ret

skip_word:
    cmp byte ptr [esi], 0
    je skip_word_done
    cmp byte ptr [esi], 0x20
    je skip_word_done
    inc esi
    jmp skip_word
skip_word_done:
    ret

skip_spaces:
    cmp byte ptr [esi], 0x20
    jne skip_spaces_done
    inc esi
    jmp skip_spaces
skip_spaces_done:
    ret

# match_prefix: if the string at esi starts with the NUL-terminated string at edi, advance esi
# past it and clear CF; else set CF (esi unchanged).
match_prefix:
    push eax
    push esi
    push edi
match_prefix_loop:
    mov al, byte ptr [edi]
    test al, al
    jz match_prefix_yes
    cmp al, byte ptr [esi]
    jne match_prefix_no
    inc esi
    inc edi
    jmp match_prefix_loop
match_prefix_yes:
    pop edi
    add esp, 4                                  # keep the advanced esi
    pop eax
    clc
    ret
match_prefix_no:
    pop edi
    pop esi
    pop eax
    stc
    ret

# parse_hex: "0x" and 1-8 hex digits at esi -> eax, esi past them; CF set on a syntax error.
parse_hex:
    push ecx
    push edx
    cmp byte ptr [esi], 0x30                    # '0'
    jne parse_hex_bad
    mov al, byte ptr [esi + 1]
    or al, 0x20
    cmp al, 0x78                                # 'x'
    jne parse_hex_bad
    add esi, 2
    xor edx, edx
    xor ecx, ecx
parse_hex_loop:
    movzx eax, byte ptr [esi]
    sub eax, 0x30
    cmp eax, 10
    jb parse_hex_digit
    or eax, 0x20                                # 'A'-'F' -> 'a'-'f' (after the -0x30: 0x11 -> 0x31)
    sub eax, 0x31
    cmp eax, 6
    jae parse_hex_end
    add eax, 10
parse_hex_digit:
    cmp ecx, 8
    jae parse_hex_bad
    shl edx, 4
    or edx, eax
    inc ecx
    inc esi
    jmp parse_hex_loop
parse_hex_end:
    test ecx, ecx
    jz parse_hex_bad
    mov eax, edx
    pop edx
    pop ecx
    clc
    ret
parse_hex_bad:
    pop edx
    pop ecx
    stc
    ret

# --- memory size -----------------------------------------------------------------------------------
# memory_size: mem_end = 1 MiB + mem_upper KiB (page-aligned), ram_end = mem_end rounded up to
# 1 MiB, n_free = number of whole 4 MiB frames of free RAM from FREE_START.
memory_size:
    pushad
    mov ebx, dword ptr [boot_info]
    mov eax, dword ptr [ebx]
    and eax, 1
    mov edx, __bss_end
    cmp edx, FREE_START
    jae memory_size_bad
    test eax, eax
    jz memory_size_bad
    mov eax, dword ptr [ebx + MBI_MEM_UPPER]
    shl eax, 10
    add eax, LEGACY_HI
    and eax, 0xFFFFF000
    mov dword ptr [mem_end], eax
    add eax, 0xFFFFF
    and eax, 0xFFF00000
    mov dword ptr [ram_end], eax
    mov eax, dword ptr [mem_end]
    sub eax, FREE_START
    jb memory_size_bad
    shr eax, 22
    mov dword ptr [n_free], eax
    test eax, eax
    jz memory_size_bad
    PASS("multiboot_info gives the memory size, the image lies below 4 MiB, and there is free RAM above it")
    popad
    ret
memory_size_bad:
    mov dword ptr [bad_memory], 1
    FAIL("memory", "needs the Multiboot memory size, an image below 4 MiB and at least 12 MiB of RAM")
    popad
    ret

# --- page directories ------------------------------------------------------------------------------
# pd_identity: 1024 4 MiB pages, linear = physical. pd_alias: 0-4 MiB identity, then PDE i maps the
# free frame FREE_START + ((i - 1) mod n_free) * 4 MiB, so with FREE_START = 4 MiB the frame of
# PDE 1 + k is linear (1 + k) * 4 MiB: its "second alias".
build_page_dirs:
    pushad
    xor ecx, ecx
build_identity_loop:
    mov eax, ecx
    shl eax, 22
    or eax, PDE_4M
    mov dword ptr [pd_identity + 4 * ecx], eax
    inc ecx
    cmp ecx, 1024
    jb build_identity_loop
    mov dword ptr [pd_alias], PDE_4M            # 0-4 MiB identity
    mov ecx, 1
build_alias_loop:
    lea eax, [ecx - 1]
    xor edx, edx
    div dword ptr [n_free]
    mov eax, edx
    shl eax, 22
    add eax, FREE_START
    or eax, PDE_4M
    mov dword ptr [pd_alias + 4 * ecx], eax
    inc ecx
    cmp ecx, 1024
    jb build_alias_loop
    popad
    ret

# --- sweeping -----------------------------------------------------------------------------------------
# physical_sweep: probe_phys over every visited page, then check every free-RAM pattern again.
physical_sweep:
    call clear_errors
    mov dword ptr [fill_set], 0
    mov dword ptr [probe_fn], probe_phys
    call sweep
    cmp dword ptr [fill_set], 0                 # the fill value must be all-ones or zeros
    je physical_sweep_verify
    mov eax, dword ptr [fill_value]
    test eax, eax
    je physical_sweep_verify
    cmp eax, 0xFFFFFFFF
    je physical_sweep_verify
    push ebx
    xor ebx, ebx
    RECORD(E_FILL)
    pop ebx
physical_sweep_verify:
    pushad
    mov ebx, FREE_START
physical_sweep_verify_loop:
    cmp ebx, dword ptr [mem_end]
    jae physical_sweep_verify_done
    mov eax, ebx
    add eax, dword ptr [sweep_offset]
    mov ecx, eax
    xor ecx, dword ptr [sweep_key]
    cmp dword ptr [eax], ecx
    je physical_sweep_verify_next
    push ebx
    mov ebx, eax
    RECORD(E_RAMCHG)
    pop ebx
physical_sweep_verify_next:
    add ebx, 0x1000
    jmp physical_sweep_verify_loop
physical_sweep_verify_done:
    popad
    ret

# sweep: for every visited page from 0 to 4 GiB, call [probe_fn] with ebx = page + sweep_offset and
# eax = the page's kind (classify).
sweep:
    pushad
    xor ebx, ebx
sweep_loop:
    mov eax, ebx
    call classify
    push ebx
    add ebx, dword ptr [sweep_offset]
    call dword ptr [probe_fn]
    pop ebx
    call next_page
    jnc sweep_loop
    popad
    ret

# next_page: ebx = the next page to visit after ebx; CF set when past 4 GiB. Every page below
# ram_end and in the dense ranges is visited, one in `stride` elsewhere, and a dense range is
# never stepped over.
next_page:
    push eax
    push ecx
    push edx
    push esi
    mov eax, 0x1000
    cmp ebx, dword ptr [ram_end]
    jb next_page_step
    xor ecx, ecx
next_page_dense:
    cmp ecx, dword ptr [n_dense]
    jae next_page_sparse
    cmp ebx, dword ptr [dense + 8 * ecx]
    jb next_page_dense_next
    mov edx, dword ptr [dense + 8 * ecx + 4]
    test edx, edx                               # end 0: up to 4 GiB
    jz next_page_step
    cmp ebx, edx
    jb next_page_step
next_page_dense_next:
    inc ecx
    jmp next_page_dense
next_page_sparse:
    mov eax, dword ptr [stride]
next_page_step:
    mov esi, ebx
    add ebx, eax
    jc next_page_end
    xor ecx, ecx                                # do not step over the start of a dense range
next_page_clamp:
    cmp ecx, dword ptr [n_dense]
    jae next_page_done
    mov edx, dword ptr [dense + 8 * ecx]
    cmp edx, esi
    jbe next_page_clamp_next
    cmp edx, ebx
    jae next_page_clamp_next
    mov ebx, edx
next_page_clamp_next:
    inc ecx
    jmp next_page_clamp
next_page_done:
    pop esi
    pop edx
    pop ecx
    pop eax
    clc
    ret
next_page_end:
    pop esi
    pop edx
    pop ecx
    pop eax
    stc
    ret

# in_dense: CF set if eax lies in one of the dense ranges.
in_dense:
    push ecx
    push edx
    xor ecx, ecx
in_dense_loop:
    cmp ecx, dword ptr [n_dense]
    jae in_dense_no
    cmp eax, dword ptr [dense + 8 * ecx]
    jb in_dense_next
    mov edx, dword ptr [dense + 8 * ecx + 4]
    test edx, edx                               # end 0: up to 4 GiB
    jz in_dense_yes
    cmp eax, edx
    jb in_dense_yes
in_dense_next:
    inc ecx
    jmp in_dense_loop
in_dense_yes:
    pop edx
    pop ecx
    stc
    ret
in_dense_no:
    pop edx
    pop ecx
    clc
    ret

# classify: eax = a physical page -> eax = R_SKIP, R_KEEP, R_FREE, R_OUT or R_ROM (see the top).
classify:
    cmp eax, LEGACY_LO
    jb classify_keep
    cmp eax, LEGACY_HI
    jb classify_skip
    cmp eax, FREE_START
    jb classify_keep
    cmp eax, dword ptr [mem_end]
    jb classify_free
    cmp eax, dword ptr [ram_end]
    jb classify_skip
    cmp eax, IOAPIC_LO
    jb classify_out
    cmp eax, IOAPIC_HI
    jb classify_skip
    cmp eax, HPET_LO
    jb classify_out
    cmp eax, HPET_HI
    jb classify_skip
    cmp eax, LAPIC_LO
    jb classify_out
    cmp eax, LAPIC_HI
    jb classify_skip
    cmp eax, ROM_LO
    jb classify_out
    mov eax, R_ROM
    ret
classify_keep:
    mov eax, R_KEEP
    ret
classify_free:
    mov eax, R_FREE
    ret
classify_out:
    mov eax, R_OUT
    ret
classify_skip:
    mov eax, R_SKIP
    ret

# probe_phys: ebx = address, eax = its page's kind.
probe_phys:
    cmp eax, R_KEEP
    je probe_keep
    cmp eax, R_FREE
    je probe_free
    cmp eax, R_OUT
    je probe_outside
    cmp eax, R_ROM
    je probe_outside
    ret
probe_keep:
    mov ecx, dword ptr [ebx]
    mov dword ptr [ebx], ecx
    cmp dword ptr [ebx], ecx
    je probe_done
    RECORD(E_KEEP)
    ret
probe_free:
    mov ecx, ebx
    xor ecx, dword ptr [sweep_key]
    mov dword ptr [ebx], ecx
    cmp dword ptr [ebx], ecx
    je probe_done
    RECORD(E_FREE)
    ret
probe_outside:
    mov edx, dword ptr [ebx]                    # before the write
    mov ecx, ebx
    xor ecx, dword ptr [sweep_key]
    mov dword ptr [ebx], ecx
    mov esi, dword ptr [ebx]                    # after it
    cmp esi, ecx
    jne probe_outside_strict
    RECORD(E_STICK)
probe_outside_strict:
    cmp dword ptr [strict], 0
    je probe_outside_fill
    cmp edx, 0xFFFFFFFF
    jne probe_outside_not_ones
    cmp esi, 0xFFFFFFFF
    je probe_outside_fill
probe_outside_not_ones:
    RECORD(E_STRICT)
probe_outside_fill:
    cmp eax, R_ROM                              # QEMU has its BIOS there
    je probe_done
    cmp dword ptr [fill_set], 0
    jne probe_outside_compare
    mov dword ptr [fill_value], edx
    mov dword ptr [fill_set], 1
probe_outside_compare:
    cmp edx, dword ptr [fill_value]
    jne probe_outside_bad_fill
    cmp esi, dword ptr [fill_value]
    je probe_done
probe_outside_bad_fill:
    RECORD(E_FILL)
probe_done:
    ret

# probe_alias: under pd_alias, ebx = a linear address; everything above 4 MiB is free RAM.
probe_alias:
    cmp ebx, FREE_START
    jb probe_done
    mov ecx, ebx
    xor ecx, dword ptr [sweep_key]
    mov dword ptr [ebx], ecx
    cmp dword ptr [ebx], ecx
    je probe_alias_second
    RECORD(E_ALIAS)
probe_alias_second:
    mov eax, ebx                                # second alias: (1 + (pde - 1) mod n_free) * 4 MiB
    shr eax, 22
    dec eax
    xor edx, edx
    div dword ptr [n_free]
    lea eax, [edx + 1]
    shl eax, 22
    mov edx, ebx
    and edx, 0x3FFFFF
    or eax, edx
    cmp dword ptr [eax], ecx
    je probe_done
    RECORD(E_ALIAS2)
    ret

# probe_exec: under pd_alias, ebx = a linear address at or above the end of RAM, on a 16 MiB
# boundary or on a 64 KiB one inside a dense range (others are skipped: each probe is a new
# translation and an invalidation for a binary translator). Write `mov eax, ebx; ret` there, jump
# (SDM 8.1.3), call it; then call the same bytes through the second alias of the frame, which
# earlier ran other code written the same way (stale code must not run).
probe_exec:
    cmp ebx, dword ptr [ram_end]
    jb probe_done
    test ebx, 0xFFF000
    jz probe_exec_write
    test ebx, 0xF000
    jnz probe_done
    mov eax, ebx
    call in_dense
    jnc probe_done
probe_exec_write:
    mov byte ptr [ebx], 0xB8                    # mov eax, imm32
    mov dword ptr [ebx + 1], ebx
    mov byte ptr [ebx + 5], 0xC3                # ret
    jmp probe_exec_run
probe_exec_run:
    call ebx
    cmp eax, ebx
    je probe_exec_second
    RECORD(E_EXEC)
probe_exec_second:
    mov eax, ebx
    shr eax, 22
    dec eax
    xor edx, edx
    div dword ptr [n_free]
    lea eax, [edx + 1]
    shl eax, 22
    mov edx, ebx
    and edx, 0x3FFFFF
    or edx, eax
    call edx
    cmp eax, ebx
    je probe_done
    RECORD(E_EXEC2)
    ret

# --- reporting ---------------------------------------------------------------------------------------
clear_errors:
    pushad
    mov edi, errors
    mov ecx, E_SIZE / 4
    xor eax, eax
    rep stosd
    popad
    ret

# record_error: count one error of the kind at edi ([count, first address]), ebx = its address.
record_error:
    inc dword ptr [edi]
    cmp dword ptr [edi], 1
    jne record_error_done
    mov dword ptr [edi + 4], ebx
record_error_done:
    ret

# report_errors(kind, name): PASS name, or FAIL name: N times, first at 0x...
report_errors:
    pushad
    mov ebx, dword ptr [esp + 36]               # kind (pushad 32 + return address 4)
    add ebx, errors
    cmp dword ptr [ebx], 0
    jne report_errors_fail
    push dword ptr [esp + 40]                   # name
    call report_pass
    add esp, 4
    popad
    ret
report_errors_fail:
    inc dword ptr [fail_count]
    mov esi, fail_prefix
    call puts
    mov esi, dword ptr [esp + 40]
    call puts
    mov esi, errors_text
    call puts
    mov eax, dword ptr [ebx]
    call print_dec
    mov esi, first_at_text
    call puts
    mov eax, dword ptr [ebx + 4]
    call print_hex32
    call newline
    popad
    ret

report_strict:
    cmp dword ptr [strict], 0
    je report_strict_done
    REPORT("strict: every read outside RAM, ROM range included, gave all-ones", E_STRICT)
report_strict_done:
    ret

# text_checksum: eax = the sum of the image's code dwords (0x100000 up to hostile_text_end).
text_checksum:
    push ecx
    push esi
    mov esi, LEGACY_HI
    xor eax, eax
text_checksum_loop:
    add eax, dword ptr [esi]
    add esi, 4
    cmp esi, hostile_text_end - 4
    jbe text_checksum_loop
    pop esi
    pop ecx
    ret

#include "paging.inc"
.text
hostile_text_end:

.data
opt_stride:    .asciz "stride="
opt_dense:     .asciz "dense="
opt_strict:    .asciz "strict"
errors_text:   .asciz ": failed "
first_at_text: .asciz " times, first at "
.align 4
stride:          .long 0
n_dense:         .long 0
dense:           .zero 8 * MAX_DENSE
strict:          .long 0
bad_option:      .long 0
bad_memory:      .long 0
mem_end:         .long 0
ram_end:         .long 0
n_free:          .long 0
sweep_offset:    .long 0
sweep_key:       .long 0
probe_fn:        .long 0
fill_set:        .long 0
fill_value:      .long 0
text_sum_before: .long 0
errors:          .zero E_SIZE

.bss
.align 4096
pd_identity: .zero 4096
pd_alias:    .zero 4096
