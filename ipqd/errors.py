"""ipqd's exceptions: one hierarchy, so callers can catch what they can handle.

Pure layers raise these; the daemon and the command line decide what to log
and which exit code to use.
"""
from __future__ import annotations

import errno as _errno
import os


# Where two names share a number, the one netlink documentation uses.
_ERRNO_NAMES = {_errno.EOPNOTSUPP: "EOPNOTSUPP", _errno.EAGAIN: "EAGAIN"}


class IpqdError(Exception):
    """Base of every error ipqd raises on purpose."""


class DecodeError(IpqdError):
    """Bytes that do not decode: names what was being decoded, where, and why."""

    def __init__(self, what: str, offset: int, message: str):
        self.what = what
        self.offset = offset
        self.message = message
        super().__init__(f"cannot decode {what} at offset {offset}: {message}")

    def __reduce__(self):
        return (type(self), (self.what, self.offset, self.message))


class NetlinkError(IpqdError):
    """The kernel (or the socket) refused an operation; carries the errno."""

    def __init__(self, op: str, errno: int, hint: str = ""):
        self.op = op
        self.errno = errno
        self.hint = hint
        name = _ERRNO_NAMES.get(errno) or _errno.errorcode.get(errno, str(errno))
        text = f"{op}: {os.strerror(errno)} ({name})"
        if hint:
            text += f": {hint}"
        super().__init__(text)

    def __reduce__(self):
        return (NetlinkError, (self.op, self.errno, self.hint))


class PolicyError(IpqdError):
    """One problem in a policy file, with its position (1-based line and column)."""

    def __init__(self, path: str, line: int, column: int, message: str,
                 severity: str = "error"):
        self.path = path
        self.line = line
        self.column = column
        self.message = message
        self.severity = severity
        super().__init__(str(self))

    def __reduce__(self):
        return (type(self), (self.path, self.line, self.column, self.message, self.severity))

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}:{self.column}"
        prefix = "warning: " if self.severity == "warning" else ""
        return f"{where}: {prefix}{self.message}"


class PolicyErrors(IpqdError):
    """Every problem found in a policy at once, so `ipqd check` reports them all."""

    def __init__(self, errors: list[PolicyError]):
        self.errors = list(errors)
        super().__init__("\n".join(str(e) for e in self.errors))

    def __reduce__(self):
        return (type(self), (self.errors,))


class ProtocolError(IpqdError):
    """A child process sent a message that does not exist, or out of its
    order (ipqd.daemon.messages): a bug, never a packet's fault."""
