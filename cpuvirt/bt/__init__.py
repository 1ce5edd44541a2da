"""Binary translation of guest kernel code (mode `full`): docs/binary-translation.md."""
