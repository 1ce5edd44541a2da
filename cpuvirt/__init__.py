"""cpuvirt: see how x86 CPU virtualization works, one exit at a time."""

__version__ = "0.1.0"
