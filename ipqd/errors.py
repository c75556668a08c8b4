"""ipqd's exceptions: one hierarchy, so callers can catch what they can handle.

Pure layers raise these; the daemon and the command line decide what to log
and which exit code to use. Each pickles to an equal error (a child process
may send one to its parent): one whose arguments are not its message says
how (`__reduce__`).

    IpqdError
      DecodeError       bytes that do not decode (wire)
      NetlinkError      the kernel or the socket refused an operation
      PolicyError       one problem in a policy file, at its position
      PolicyErrors      every problem of a policy at once
      InvalidValue      a policy value that cannot be used (before its position is known)
      PolicyRefused     a policy `ipqd run` will not load, with every line to report
      HookError         the queue rules could not be installed or removed
      StartupError      the daemon cannot start
      ReloadCalledOff   a stop came while a reload waited
      ProtocolError     a child process broke the message protocol
      CaptureError      a capture file that cannot be read (`ipqd explain`)
      NotIP             a captured frame that holds no IP packet
      DescriptionError  a packet description that cannot be read (`ipqd explain`)
      IpqError          a libipq call failed (ipqd.tools.ipq)
      SetError          a dynamic set change that cannot be made (ipqd set)
      ControlError      a control request refused, or the daemon not answering (ipqd.control)
"""
from __future__ import annotations

import errno as _errno
import os
from typing import List


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
        # Line 0: a problem of the file as a whole (its mode, its owner).
        where = f"{self.path}:{self.line}:{self.column}" if self.line else self.path
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


class InvalidValue(IpqdError):
    """A policy value that cannot be used; the message says what to write
    instead. The loader, which knows where it was written, makes it a PolicyError."""

    @property
    def message(self) -> str:
        return self.args[0]


class PolicyRefused(IpqdError):
    """A policy `ipqd run` does not load (ipqd.policy.checked): `lines`, every
    problem to report."""

    def __init__(self, lines: List[str]):
        self.lines = list(lines)
        super().__init__("\n".join(self.lines))

    def __reduce__(self):
        return (type(self), (self.lines,))


class HookError(IpqdError):
    """Installing or removing the queue rules failed; says which backend and what to try."""


class StartupError(IpqdError):
    """The daemon cannot start; the message says why and what to do, and
    `status` is the exit status that says what kind of failure it was
    (ipqd.exits: 1 the policy was refused, 3 unreadable, 4 the system)."""

    def __init__(self, message: str, status: int = 4):
        self.status = status
        super().__init__(message)

    def __reduce__(self):
        return (type(self), (str(self), self.status))


class ReloadCalledOff(IpqdError):
    """A stop was asked for while a reload waited: the reload ends unfinished."""


class CaptureError(IpqdError):
    """The file is not a capture, or is damaged from some record on."""


class NotIP(IpqdError):
    """The captured frame carries no IP packet; the text says what it carries instead."""


class SetError(IpqdError):
    """A dynamic set entry or change that cannot be used: not an address or
    network, an unknown set, a full set. The message says what to do."""

    @property
    def message(self) -> str:
        return self.args[0]


class DescriptionError(IpqdError):
    """A packet description (`ipqd explain`) that cannot be read; says what was wrong."""


# libipq's error codes and texts (libipq.c), which IpqError carries.
IPQ_ERR_NONE = 0
IPQ_ERR_IMPL = 1
IPQ_ERR_HANDLE = 2
IPQ_ERR_SOCKET = 3
IPQ_ERR_BIND = 4
IPQ_ERR_BUFFER = 5
IPQ_ERR_RECV = 6
IPQ_ERR_NLEOF = 7
IPQ_ERR_ADDRLEN = 8
IPQ_ERR_STRUNC = 9
IPQ_ERR_RTRUNC = 10
IPQ_ERR_NLRECV = 11
IPQ_ERR_SEND = 12
IPQ_ERR_SUPP = 13
IPQ_ERR_RECVBUF = 14
IPQ_ERR_TIMEOUT = 15
IPQ_ERR_PROTOCOL = 16

IPQ_ERR_TEXTS = {
    IPQ_ERR_NONE: "Unknown error",
    IPQ_ERR_IMPL: "Implementation error",
    IPQ_ERR_HANDLE: "Unable to create netlink handle",
    IPQ_ERR_SOCKET: "Unable to create netlink socket",
    IPQ_ERR_BIND: "Unable to bind netlink socket",
    IPQ_ERR_BUFFER: "Unable to allocate buffer",
    IPQ_ERR_RECV: "Failed to receive netlink message",
    IPQ_ERR_NLEOF: "Received EOF on netlink socket",
    IPQ_ERR_ADDRLEN: "Invalid peer address length",
    IPQ_ERR_STRUNC: "Sent message truncated",
    IPQ_ERR_RTRUNC: "Received message truncated",
    IPQ_ERR_NLRECV: "Received error from netlink",
    IPQ_ERR_SEND: "Failed to send netlink message",
    IPQ_ERR_SUPP: "Operation not supported",
    IPQ_ERR_RECVBUF: "Receive buffer size invalid",
    IPQ_ERR_TIMEOUT: "Timeout",
    IPQ_ERR_PROTOCOL: "Invalid protocol specified",
}


def ipq_errstr(ipq_errno: int) -> str:
    """libipq's text for one of its codes (an unknown code: "Unknown error")."""
    return IPQ_ERR_TEXTS.get(ipq_errno, IPQ_ERR_TEXTS[IPQ_ERR_NONE])


class IpqError(IpqdError):
    """A libipq call failed: `ipq_errno` is libipq's code, `errno` the system's."""

    def __init__(self, ipq_errno: int, errno: int = 0, detail: str = ""):
        self.ipq_errno = ipq_errno
        self.errno = errno
        self.detail = detail
        text = ipq_errstr(ipq_errno)
        if detail:
            text += f": {detail}"
        elif errno:
            text += f": {os.strerror(errno)}"
        super().__init__(text)

    def __reduce__(self):
        return (type(self), (self.ipq_errno, self.errno, self.detail))


class ControlError(IpqdError):
    """A control request that was refused or could not be made
    (ipqd.control): `code` is the protocol's word for it (`unknown-command`,
    `not-permitted`, `not-running`, ...), the text what to do. `details`,
    when there are any, are lines to print after it (a refused reload's
    `file:line:col` errors)."""

    def __init__(self, code: str, message: str, details: List[str] = ()):
        self.code = code
        self.message = message
        self.details = list(details)
        super().__init__(message)

    def __reduce__(self):
        return (type(self), (self.code, self.message, self.details))


class RegionsTooLarge(IpqdError):
    """Regions of packet space (ipqd.policy.regions) too many to compute
    exactly within the work allowed: `ipqd diff` says so instead of
    answering late or wrong."""
