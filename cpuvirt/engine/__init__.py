"""The engine floor: everything that touches libunicorn below the Python wrapper (register access
through ctypes, the hooks of a vCPU each added under one guard). Imports nothing of cpuvirt but the ground
floor (errors, status, limits)."""
