# description: the HPET at 0xFED00000 (machine/hpet.py): reset values, writable bits, the main counter,
# comparators (one-shot, periodic with Tn_VAL_SET_CNF, 32-bit mode), a level-triggered timer's GINTR_STA
# bit, and legacy replacement: timer 0 on IRQ 0 instead of the 8254, timer 1 on IRQ 8. Every line printed
# is independent of timing, so QEMU prints the same ones (tests/test_hpet.py).
#include "kernel.inc"

#define HPET            0xFED00000
#define GCAP_LO         HPET + 0x000
#define GCAP_HI         HPET + 0x004
#define GEN_CONF        HPET + 0x010
#define GINTR_STA       HPET + 0x020
#define MAIN_CNT        HPET + 0x0F0
#define MAIN_CNT_HI     HPET + 0x0F4
#define TN_CONF(N)      HPET + 0x100 + 0x20 * (N)
#define TN_CONF_HI(N)   HPET + 0x104 + 0x20 * (N)
#define TN_CMP(N)       HPET + 0x108 + 0x20 * (N)
#define TN_CMP_HI(N)    HPET + 0x10C + 0x20 * (N)

#define ENABLE_CNF      1
#define LEG_RT_CNF      2
#define TN_LEVEL        0x002
#define TN_INT_ENB      0x004
#define TN_PERIODIC     0x008
#define TN_VAL_SET      0x040
#define TN_32MODE       0x100
#define TN_ROUTE(P)     ((P) << 9)

#define VEC_IRQ8        0x28
#define TICKS_WANTED    5
#define PERIOD_1MS      100000          // HPET ticks (10 ns)
#define LEVEL_POLL      1000000

.text
main:
    SET_HANDLER(VEC_IRQ0, irq0_handler)
    SET_HANDLER(VEC_IRQ8, irq8_handler)
    SET_HANDLER(VEC_SPURIOUS_MASTER, spurious_handler)
    SET_HANDLER(VEC_SPURIOUS_SLAVE, spurious_slave_handler)

    # -- what the firmware leaves: QEMU 7.2's values --------------------------------------------
    CHECK_EQ("GCAP_ID: rev 1, 3 timers, 64-bit, legacy capable, vendor 8086", dword ptr [GCAP_LO], 0x8086A201)
    CHECK_EQ("GCAP_ID: COUNTER_CLK_PERIOD 10 ns (in fs)", dword ptr [GCAP_HI], 10000000)
    CHECK_EQ("GEN_CONF at reset", dword ptr [GEN_CONF], 0)
    CHECK_EQ("T0_CONF at reset: periodic and 64-bit capable", dword ptr [TN_CONF(0)], 0x30)
    CHECK_EQ("T2_CONF routing capability: I/O APIC input 2", dword ptr [TN_CONF_HI(2)], 4)
    CHECK_EQ("T1_COMP at reset", dword ptr [TN_CMP_HI(1)], 0xFFFFFFFF)
    CHECK_EQ("the halted counter reads 0", dword ptr [MAIN_CNT], 0)

    # -- writable bits ---------------------------------------------------------------------------
    mov dword ptr [TN_CONF(2)], 0xFFFFFFFB   # everything but Tn_INT_ENB_CNF
    mov eax, dword ptr [TN_CONF(2)]
    CHECK_EQ("T2_CONF after writing all ones (but INT_ENB)", eax, 0x7F7A)
    mov dword ptr [TN_CONF(2)], 0
    CHECK_EQ("T2_CONF cleared again", dword ptr [TN_CONF(2)], 0x30)
    mov dword ptr [TN_CONF(0)], TN_32MODE
    CHECK_EQ("32-bit mode truncates the comparator: high half", dword ptr [TN_CMP_HI(0)], 0)
    CHECK_EQ("32-bit mode truncates the comparator: low half", dword ptr [TN_CMP(0)], 0xFFFFFFFF)
    mov dword ptr [TN_CONF(0)], 0
    mov dword ptr [TN_CMP(0)], 0x12345678
    mov dword ptr [TN_CMP_HI(0)], 0x9A
    CHECK_EQ("a one-shot comparator takes what is written (low)", dword ptr [TN_CMP(0)], 0x12345678)
    CHECK_EQ("a one-shot comparator takes what is written (high)", dword ptr [TN_CMP_HI(0)], 0x9A)
    mov dword ptr [TN_CONF(0)], TN_PERIODIC | TN_VAL_SET
    mov dword ptr [TN_CMP(0)], 5000
    mov dword ptr [TN_CMP_HI(0)], 0
    mov eax, dword ptr [TN_CONF(0)]
    and eax, TN_VAL_SET
    CHECK_EQ("a comparator write clears Tn_VAL_SET_CNF", eax, 0)
    mov dword ptr [TN_CMP(0)], 777           # without VAL_SET: the period only
    CHECK_EQ("periodic: without VAL_SET a write sets the period, not the comparator", dword ptr [TN_CMP(0)], 5000)
    mov dword ptr [TN_CONF(0)], 0

    mov dword ptr [MAIN_CNT], 0x1000
    mov dword ptr [MAIN_CNT_HI], 0
    CHECK_EQ("the halted counter is written", dword ptr [MAIN_CNT], 0x1000)
    mov dword ptr [MAIN_CNT], 0

    # -- the counter runs while ENABLE_CNF is set ---------------------------------------------
    mov dword ptr [GEN_CONF], ENABLE_CNF
    mov esi, dword ptr [MAIN_CNT]
    mov ecx, 200
spin_a_little:
    dec ecx
    jnz spin_a_little
    mov edi, dword ptr [MAIN_CNT]
    xor eax, eax
    cmp edi, esi
    seta al
    CHECK_EQ("the enabled counter advances", eax, 1)
    mov dword ptr [GEN_CONF], 0
    mov esi, dword ptr [MAIN_CNT]
    mov ecx, 200
spin_halted:
    dec ecx
    jnz spin_halted
    mov edi, dword ptr [MAIN_CNT]
    CHECK_EQ("the disabled counter stops", edi, esi)

    # -- a level-triggered timer sets its GINTR_STA bit (line masked everywhere) ------------------
    mov dword ptr [GEN_CONF], ENABLE_CNF
    mov eax, dword ptr [MAIN_CNT]
    add eax, 1000
    mov dword ptr [TN_CMP(2)], eax
    mov dword ptr [TN_CMP_HI(2)], 0
    mov dword ptr [TN_CONF(2)], TN_LEVEL | TN_INT_ENB | TN_ROUTE(2)
    mov ecx, LEVEL_POLL
level_poll:
    test dword ptr [GINTR_STA], 4
    jnz level_seen
    dec ecx
    jnz level_poll
level_seen:
    mov eax, dword ptr [GINTR_STA]
    CHECK_EQ("a level-triggered timer sets its GINTR_STA bit", eax, 4)
    mov dword ptr [GINTR_STA], 4
    CHECK_EQ("writing 1 clears it", dword ptr [GINTR_STA], 0)
    mov dword ptr [TN_CONF(2)], 0
    mov dword ptr [GEN_CONF], 0

    # -- legacy replacement: timer 0 periodic on IRQ 0, the 8254 disconnected ---------------------
    mov ax, PIT_DIVISOR(1000)                # the 8254 at 1 kHz: it would tick 30 times below
    call pit_start_periodic
    mov ax, 0xFEFA                           # IRQ 0, the cascade and IRQ 8 open
    call pic_set_mask
    mov dword ptr [GEN_CONF], LEG_RT_CNF
    mov dword ptr [MAIN_CNT], 0
    mov dword ptr [TN_CONF(0)], TN_PERIODIC | TN_VAL_SET | TN_INT_ENB
    mov dword ptr [TN_CMP_HI(0)], 0          # comparator and period, high halves (clears VAL_SET)
    mov dword ptr [TN_CONF(0)], TN_PERIODIC | TN_VAL_SET | TN_INT_ENB
    mov dword ptr [TN_CMP(0)], PERIOD_1MS    # comparator and period, low halves
    mov dword ptr [GEN_CONF], LEG_RT_CNF | ENABLE_CNF
wait_ticks:
    sti
    hlt
    cli
    cmp dword ptr [irq0_count], TICKS_WANTED
    jb wait_ticks
    mov dword ptr [TN_CONF(0)], 0            # no more timer 0 interrupts
    mov eax, dword ptr [irq0_count]
    cmp eax, TICKS_WANTED
    sete al
    movzx eax, al
    CHECK_EQ("legacy route: 5 periodic timer 0 interrupts on IRQ 0", eax, 1)
    mov eax, dword ptr [TN_CMP(0)]
    sub eax, dword ptr [MAIN_CNT]
    xor edx, edx
    cmp eax, PERIOD_1MS
    setbe dl
    CHECK_EQ("the periodic comparator has moved ahead of the counter, by at most a period", edx, 1)

    # timer 1 one-shot, 30 ms on, on IRQ 8: meanwhile no IRQ 0 (the 8254 is disconnected)
    mov dword ptr [irq0_count], 0
    mov eax, dword ptr [MAIN_CNT]
    add eax, 30 * PERIOD_1MS
    mov dword ptr [TN_CMP(1)], eax
    mov dword ptr [TN_CMP_HI(1)], 0
    mov dword ptr [TN_CONF(1)], TN_INT_ENB
wait_irq8:
    sti
    hlt
    cli
    cmp dword ptr [irq8_count], 0
    je wait_irq8
    CHECK_EQ("legacy route: timer 1 one-shot on IRQ 8, once", dword ptr [irq8_count], 1)
    CHECK_EQ("legacy route: the 8254 does not reach IRQ 0", dword ptr [irq0_count], 0)

    # legacy route off: the 8254 ticks on IRQ 0 again
    mov dword ptr [TN_CONF(1)], 0
    mov dword ptr [GEN_CONF], ENABLE_CNF
wait_pit:
    sti
    hlt
    cli
    cmp dword ptr [irq0_count], 0
    je wait_pit
    PASS("legacy route off: the 8254 reaches IRQ 0 again")
    mov ax, 0xFFFF
    call pic_set_mask
    mov dword ptr [GEN_CONF], 0
    ret

irq0_handler:
    inc dword ptr [irq0_count]
    mov al, 0
    call pic_eoi
    ret

irq8_handler:
    inc dword ptr [irq8_count]
    mov al, 8
    call pic_eoi
    ret

spurious_handler:
    ret

# The level-triggered check drove GSI 2, the master's cascade input (QEMU wires GSI 2 to it), which
# latched IRQ 2: once unmasked it is a spurious slave interrupt, whose master in-service bit needs an EOI.
spurious_slave_handler:
    mov al, PIC_EOI
    out PIC1_CMD, al
    ret

.data
.align 4
irq0_count: .long 0
irq8_count: .long 0
