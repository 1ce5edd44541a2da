"""The engine floor: everything that touches libunicorn below the Python wrapper (register access
through ctypes, the guard every hook callback runs under). Imports nothing of cpuvirt but the ground
floor (errors, status, limits)."""
