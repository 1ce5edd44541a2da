"""Errors a user can cause. The CLI prints each as one line and exits with status 2."""


class CpuvirtError(Exception):
    """Bad input from the user: a bad image, an unknown guest or mode, a malformed trace."""


class GuestBuildError(CpuvirtError):
    """A bundled guest's source does not assemble; the message reads `file:line: what`."""


class MultibootError(CpuvirtError):
    """The file is not a Multiboot v1 kernel this loader can boot; the message says why."""


class TraceFormatError(CpuvirtError):
    """A trace file that is not cpuvirt-trace/1; the message names the line."""
