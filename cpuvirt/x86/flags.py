"""The bits of EFLAGS, CR0 and CR4 (SDM Vol. 1 3.4.3, figure 3-8; Vol. 3A 2.5, figures 2-7 and 2-8),
each named once for all of cpuvirt.

The IntFlag classes name the bits for people: `CR0(0x80000011)` shows as `CR0.PG|ET|PE`, and a
decoder can list what is set. The module-level ints are the same values for the code that runs per
exit or per TLB fill, where an IntFlag's operators would cost a Python call each.
"""

from __future__ import annotations

from enum import IntFlag


class EFLAGS(IntFlag):
    CF = 1 << 0  # carry
    PF = 1 << 2  # parity (of the low byte)
    AF = 1 << 4  # auxiliary carry (out of bit 3)
    ZF = 1 << 6  # zero
    SF = 1 << 7  # sign
    TF = 1 << 8  # trap: #DB after each instruction
    IF = 1 << 9  # maskable interrupts enabled
    DF = 1 << 10  # string instructions go down
    OF = 1 << 11  # signed overflow
    IOPL = 3 << 12  # I/O privilege level (two bits)
    NT = 1 << 14  # nested task: iret returns through the TSS back link
    RF = 1 << 16  # resume: no instruction breakpoint on the next instruction
    VM = 1 << 17  # virtual-8086 mode
    AC = 1 << 18  # alignment check
    VIF = 1 << 19  # virtual IF (VME, PVI)
    VIP = 1 << 20  # virtual interrupt pending
    ID = 1 << 21  # CPUID is available (the bit can be flipped)


class CR0(IntFlag):
    PE = 1 << 0  # protection enable
    MP = 1 << 1  # monitor coprocessor
    EM = 1 << 2  # x87 emulation: x87 instructions raise #NM
    TS = 1 << 3  # task switched: the next x87/SSE instruction raises #NM
    ET = 1 << 4  # extension type (always 1 since the 486)
    NE = 1 << 5  # numeric error: x87 errors as #MF rather than IRQ 13
    WP = 1 << 16  # write protect: supervisor writes honour read-only pages
    AM = 1 << 18  # alignment mask (with EFLAGS.AC at CPL 3)
    NW = 1 << 29  # not write-through
    CD = 1 << 30  # cache disable
    PG = 1 << 31  # paging


class CR4(IntFlag):
    VME = 1 << 0  # virtual-8086 mode extensions
    PVI = 1 << 1  # protected-mode virtual interrupts
    TSD = 1 << 2  # time-stamp disable: rdtsc only at CPL 0
    DE = 1 << 3  # debugging extensions
    PSE = 1 << 4  # page-size extensions: 4 MiB pages in 32-bit paging
    PAE = 1 << 5  # physical-address extension
    MCE = 1 << 6  # machine-check enable
    PGE = 1 << 7  # global pages survive a CR3 write
    PCE = 1 << 8  # rdpmc at any CPL
    OSFXSR = 1 << 9  # the OS supports fxsave/fxrstor
    OSXMMEXCPT = 1 << 10  # the OS handles #XM
    SMEP = 1 << 20  # supervisor-mode execution prevention


# The same bits as plain ints, for the paths that run often.
EFLAGS_CF, EFLAGS_PF, EFLAGS_AF, EFLAGS_ZF = EFLAGS.CF.value, EFLAGS.PF.value, EFLAGS.AF.value, EFLAGS.ZF.value
EFLAGS_SF, EFLAGS_TF, EFLAGS_IF, EFLAGS_DF = EFLAGS.SF.value, EFLAGS.TF.value, EFLAGS.IF.value, EFLAGS.DF.value
EFLAGS_OF, EFLAGS_IOPL, EFLAGS_NT, EFLAGS_RF = EFLAGS.OF.value, EFLAGS.IOPL.value, EFLAGS.NT.value, EFLAGS.RF.value
EFLAGS_VM, EFLAGS_AC = EFLAGS.VM.value, EFLAGS.AC.value

CR0_PE, CR0_MP, CR0_EM, CR0_TS = CR0.PE.value, CR0.MP.value, CR0.EM.value, CR0.TS.value
CR0_ET, CR0_NE, CR0_WP, CR0_PG = CR0.ET.value, CR0.NE.value, CR0.WP.value, CR0.PG.value

CR4_PVI, CR4_TSD, CR4_DE, CR4_PSE = CR4.PVI.value, CR4.TSD.value, CR4.DE.value, CR4.PSE.value
CR4_PGE, CR4_PCE, CR4_OSFXSR, CR4_OSXMMEXCPT = CR4.PGE.value, CR4.PCE.value, CR4.OSFXSR.value, CR4.OSXMMEXCPT.value
CR4_SMEP = CR4.SMEP.value
