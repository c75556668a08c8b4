"""The `ipqd` command's side of the control socket: one request, one answer."""
from __future__ import annotations

import errno
import socket
import time
from typing import Optional

from ipqd.control.codec import AnswerReader, encode_request
from ipqd.errors import ControlError

DEFAULT_SOCKET = "/run/ipqd/control"
DEFAULT_TIMEOUT = 10.0          # status and the like; a reload waits longer (its caller says)


def call(path: str, command: str, args: Optional[dict] = None,
         timeout: float = DEFAULT_TIMEOUT) -> dict:
    """Ask the daemon listening on `path`; its result. Raises ControlError:
    the daemon's refusal, or "not-running" / "not-permitted" / "failed" with
    a one-line reason when it cannot be asked."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    deadline = time.monotonic() + timeout
    try:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except OSError as error:
            raise _cannot_connect(path, error)
        sock.sendall(encode_request(command, args))
        reader = AnswerReader()
        while True:
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            data = sock.recv(1 << 20)
            if not data:
                raise ControlError("failed", f"the daemon closed {path} without answering "
                                   f"{command!r} (did it stop?)")
            answers = reader.feed(data)
            if answers:
                if isinstance(answers[0], ControlError):
                    raise answers[0]
                return answers[0]
    except socket.timeout:
        raise ControlError("failed", f"no answer to {command!r} on {path} within "
                           f"{timeout:g} s")
    except ControlError:
        raise
    except OSError as error:
        raise ControlError("failed", f"the control socket {path}: {error.strerror or error}")
    finally:
        sock.close()


def _cannot_connect(path: str, error: OSError) -> ControlError:
    if error.errno in (errno.ENOENT, errno.ECONNREFUSED):
        return ControlError("not-running", f"ipqd is not running: nothing answers on {path}")
    if error.errno == errno.EACCES:
        return ControlError("not-permitted", f"may not connect to {path}: ask root, or a "
                            "member of the control group")
    return ControlError("failed", f"cannot connect to {path}: {error.strerror}")
