# description: compute-bound benchmark kernel: ROUNDS x (byte sieve + recursive fib + word stores)
#
# Each round: a sieve of Eratosthenes over a 64 KiB byte array (stores, loops), a recursive
# fib(FIB_N) (call/ret-heavy), and a pass of 32-bit stores over a 16 KiB table. A checksum over
# every round is printed as "compute ROUNDS=<n> checksum=<hex>" and the kernel exits with status 0.
# ROUNDS=0 builds a kernel that only boots, prints and exits: the start-up baseline.
#include "kernel.inc"

#ifndef ROUNDS
#define ROUNDS 100
#endif
#define SIEVE_N  65536
#define FIB_N    18
#define TABLE_WORDS 4096

.text
main:
    xor ebp, ebp                        # checksum
    mov ecx, ROUNDS
    test ecx, ecx
    jz compute_done
compute_round:
    push ecx
    call sieve                          # eax = number of primes below SIEVE_N
    add ebp, eax
    mov eax, FIB_N
    call fib                            # eax = fib(FIB_N)
    add ebp, eax
    mov eax, ebp
    call fill_table                     # eax = a sum over the table
    xor ebp, eax
    rol ebp, 5
    pop ecx
    dec ecx
    jnz compute_round
compute_done:
    mov esi, result_text
    call puts
    mov eax, ROUNDS
    call print_dec
    mov esi, checksum_text
    call puts
    mov eax, ebp
    call print_hex32
    call newline
    ret

# sieve: mark composites in sieve_array (1 = composite); eax = count of primes below SIEVE_N.
sieve:
    push ebx
    push ecx
    push edi
    mov edi, sieve_array
    xor ecx, ecx
sieve_clear:
    mov byte ptr [edi + ecx], 0
    inc ecx
    cmp ecx, SIEVE_N
    jb sieve_clear
    mov ebx, 2
sieve_outer:
    mov eax, ebx
    imul eax, ebx
    cmp eax, SIEVE_N
    jae sieve_count
    cmp byte ptr [edi + ebx], 0
    jne sieve_next
sieve_mark:
    mov byte ptr [edi + eax], 1
    add eax, ebx
    cmp eax, SIEVE_N
    jb sieve_mark
sieve_next:
    inc ebx
    jmp sieve_outer
sieve_count:
    xor eax, eax
    mov ecx, 2
sieve_count_loop:
    cmp byte ptr [edi + ecx], 0
    jne sieve_count_skip
    inc eax
sieve_count_skip:
    inc ecx
    cmp ecx, SIEVE_N
    jb sieve_count_loop
    pop edi
    pop ecx
    pop ebx
    ret

# fib: eax = fib(eax), naively recursive.
fib:
    cmp eax, 2
    jb fib_base
    push ebx
    push eax
    dec eax
    call fib
    mov ebx, eax
    pop eax
    sub eax, 2
    call fib
    add eax, ebx
    pop ebx
fib_base:
    ret

# fill_table: table[i] = seed * i + i (32-bit stores), then sum it; eax = seed in, sum out.
fill_table:
    push ecx
    push edx
    push edi
    mov edx, eax
    mov edi, table
    xor ecx, ecx
fill_table_loop:
    lea eax, [edx + 1]
    imul eax, ecx
    mov dword ptr [edi + 4 * ecx], eax
    inc ecx
    cmp ecx, TABLE_WORDS
    jb fill_table_loop
    xor eax, eax
    xor ecx, ecx
sum_table_loop:
    add eax, dword ptr [edi + 4 * ecx]
    inc ecx
    cmp ecx, TABLE_WORDS
    jb sum_table_loop
    pop edi
    pop edx
    pop ecx
    ret

.data
result_text:   .asciz "compute ROUNDS="
checksum_text: .asciz " checksum="

.bss
.align 4096
sieve_array:
    .zero SIEVE_N
table:
    .zero 4 * TABLE_WORDS
