"""The command table and one request's dispatch (pure).

A command is a name in a CommandTable: its handler and whether it changes
anything. A handler is `handler(context, args, peer) -> dict`: `context` is
what the server was given (the daemon), `args` the request's JSON object,
`peer` who asked; it returns the answer's result (JSON values only) or
raises ControlError(code, message) (ipqd.control.codec.ERROR_CODES). Read
its arguments with `argument`, which raises "bad-arguments" for it.

Other modules add commands by adding entries to the table the daemon serves
(ipqd.daemon.control.COMMANDS).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

from ipqd.control.codec import Request, encode_error, encode_result
from ipqd.errors import ControlError, IpqdError

_MISSING = object()


@dataclass(frozen=True)
class Peer:
    """Who is on the other end of a connection (SO_PEERCRED), and whether
    they may run commands that change things."""
    pid: int
    uid: int
    gid: int
    may_change: bool


Handler = Callable[[Any, dict, Peer], dict]


@dataclass(frozen=True)
class Command:
    handler: Handler
    changes: bool           # False: anyone who may connect may run it
    summary: str = ""       # one line, for `help`


CommandTable = Dict[str, Command]


def dispatch(table: CommandTable, context: Any, request: Request,
             peer: Peer) -> Tuple[bytes, Optional[str]]:
    """The answer line to `request`, and its error code (None when it
    succeeded). A handler's ControlError is its answer; an ipqd or system
    error is answered "failed": a broken command costs one request, never
    the daemon."""
    try:
        return encode_result(_run(table, context, request, peer)), None
    except ControlError as error:
        return encode_error(error), error.code
    except (IpqdError, OSError, ValueError, TypeError, KeyError) as error:
        return encode_error(ControlError("failed", f"{request.command}: {error}")), "failed"
    except Exception as error:      # a handler's bug: one answer lost, never the daemon
        return encode_error(ControlError(
            "failed", f"{request.command}: internal error: {type(error).__name__}: {error}")), \
            "internal-error"


def _run(table: CommandTable, context: Any, request: Request, peer: Peer) -> dict:
    command = table.get(request.command)
    if command is None:
        raise ControlError("unknown-command", f"unknown command {request.command!r} (known: "
                           f"{', '.join(sorted(table))})")
    if command.changes and not peer.may_change:
        raise ControlError("not-permitted", f"{request.command!r} changes the running daemon: "
                           "only root and members of the control group may (--control-group "
                           "in ipqd(8))")
    return command.handler(context, request.args, peer)


def argument(args: dict, name: str, kind: type, default: Any = _MISSING) -> Any:
    """`args[name]`, which must be a `kind`; raises ControlError
    "bad-arguments" naming it when it is missing (and has no default) or of
    another type."""
    if name not in args:
        if default is _MISSING:
            raise ControlError("bad-arguments", f"argument {name!r} is missing")
        return default
    value = args[name]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ControlError("bad-arguments", f"argument {name!r} must be a {kind.__name__}, "
                           f"not {type(value).__name__}")
    return value


def no_arguments(args: dict, command: str) -> None:
    """Raises "bad-arguments" when a command that takes none got some."""
    if args:
        raise ControlError("bad-arguments", f"{command} takes no arguments "
                           f"(got {', '.join(sorted(args))})")
