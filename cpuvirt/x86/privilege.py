"""Which instructions depend on privilege (SDM Vol. 2 and Vol. 3A 5.9), by capstone mnemonic: the one list
every mode's own set is built from (trap's traps, full's PM16 emulation, para's refusals, hw's #GP-before-exit,
the compare view's classes). A mode adds what its mechanism sees on top; the facts live here once."""

from __future__ import annotations

# Raise #GP(0) at CPL > 0 (mov to/from CR/DR is named "mov": its operands tell it from an ordinary mov).
CPL0_ONLY = frozenset(
    ("hlt", "lgdt", "lidt", "lldt", "ltr", "lmsw", "clts", "invlpg", "invd", "wbinvd", "rdmsr", "wrmsr")
)
# Raise #GP(0) when CPL > IOPL (the I/O instructions only where the TSS's I/O bitmap also refuses the port).
IOPL_SENSITIVE = frozenset(("cli", "sti"))
IO = frozenset(("in", "out", "insb", "insw", "insd", "outsb", "outsw", "outsd"))
# Far transfers whose outcome depends on CPL and descriptors: a deprivileged kernel must not run them as is.
FAR_TRANSFERS = frozenset(("iretd", "ljmp", "lcall", "retf"))
