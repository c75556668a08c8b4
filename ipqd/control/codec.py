"""The control protocol as bytes: one JSON request per line, one JSON
answer per line (pure; docs/control.md).

    request:  {"ipqd": 1, "command": "status", "args": {}}
    answer:   {"ipqd": 1, "ok": true, "result": {...}}
              {"ipqd": 1, "ok": false, "error": {"code": "unknown-command",
                                                 "message": "...", "details": []}}

`RequestReader` is the daemon's side of one connection: bytes in, requests
(or the ControlError that answers a bad one) out. `AnswerReader` is the
client's. Neither touches a socket (ipqd.control.server and .client do).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import List, Optional, Union

from ipqd.errors import ControlError

VERSION = 1
MAX_REQUEST = 16 << 20          # a bulk set change of 100,000+ entries fits
MAX_ANSWER = 256 << 20          # a listing of a million set entries fits

# Every error code, one table: code -> when it is given.
ERROR_CODES = {
    "malformed": "the line is not a JSON object with the request's fields",
    "too-large": "the request is longer than MAX_REQUEST (the connection is closed)",
    "unsupported-version": "the request's protocol version is not this daemon's",
    "unknown-command": "no such command",
    "bad-arguments": "the command's arguments are wrong",
    "not-permitted": "the command changes things, and the peer may not",
    "too-slow": "the request did not arrive in time (the connection is closed)",
    "busy": "too many connections at once (the connection is closed)",
    "refused": "the daemon would not do it (a policy it will not load, ...)",
    "failed": "the command could not be carried out",
    "not-running": "no daemon answers on the socket (given by the client only)",
}
REQUEST_KEYS = {"ipqd", "command", "args"}


@dataclass(frozen=True)
class Request:
    command: str
    args: dict = field(default_factory=dict)


def encode_request(command: str, args: Optional[dict] = None) -> bytes:
    return _line({"ipqd": VERSION, "command": command, "args": args or {}})


def decode_request(line: bytes) -> Request:
    """One line (without its newline) to a Request; raises ControlError
    (malformed, unsupported-version)."""
    value = _json(line, "request")
    if not isinstance(value, dict):
        raise ControlError("malformed", "a request is a JSON object")
    version = value.get("ipqd")
    if version != VERSION:
        raise ControlError("unsupported-version",
                           f"protocol version {version!r} is not supported (this daemon "
                           f"speaks {VERSION}): use the ipqd command of the same version")
    unknown = sorted(set(value) - REQUEST_KEYS)
    if unknown:
        raise ControlError("malformed", f"unknown request field(s) {', '.join(unknown)} "
                           f"(expected {', '.join(sorted(REQUEST_KEYS))})")
    command, args = value.get("command"), value.get("args", {})
    if not isinstance(command, str) or not command:
        raise ControlError("malformed", "a request's \"command\" is a non-empty string")
    if not isinstance(args, dict):
        raise ControlError("malformed", "a request's \"args\" is a JSON object")
    return Request(command, args)


def encode_result(result: dict) -> bytes:
    return _line({"ipqd": VERSION, "ok": True, "result": result})


def encode_error(error: ControlError) -> bytes:
    return _line({"ipqd": VERSION, "ok": False,
                  "error": {"code": error.code, "message": error.message,
                            "details": list(error.details)}})


def decode_answer(line: bytes) -> dict:
    """One answer line to its result; a refusal raises its ControlError,
    and so does an answer that is not one (code "malformed")."""
    value = _json(line, "answer")
    if not isinstance(value, dict) or value.get("ipqd") != VERSION or "ok" not in value:
        raise ControlError("malformed", "the daemon's answer is not a version "
                           f"{VERSION} answer: is the daemon the same version as this command?")
    if value["ok"] is True and isinstance(value.get("result"), dict):
        return value["result"]
    error = value.get("error")
    if not isinstance(error, dict):
        raise ControlError("malformed", "the daemon's answer has neither result nor error")
    details = error.get("details") or []
    raise ControlError(str(error.get("code", "failed")), str(error.get("message", "")),
                       [str(d) for d in details] if isinstance(details, list) else [])


class RequestReader:
    """The daemon's side of one connection. `feed` takes what arrived and
    gives every complete request in order: a Request, or the ControlError to
    answer in its place. After a too-large request `closed` is set: the
    rest of the stream cannot be framed, so the connection ends."""

    def __init__(self, limit: int = MAX_REQUEST):
        self.limit = limit
        self.buffer = bytearray()
        self.closed = False

    @property
    def partial(self) -> bool:
        """Part of a request has come, and not its end."""
        return bool(self.buffer)

    def feed(self, data: bytes) -> List[Union[Request, ControlError]]:
        if self.closed:
            return []
        self.buffer += data
        out: List[Union[Request, ControlError]] = []
        while True:
            end = self.buffer.find(b"\n")
            if end < 0:
                if len(self.buffer) > self.limit:
                    out.append(self._too_large())
                return out
            if end > self.limit:
                out.append(self._too_large())
                return out
            line = bytes(self.buffer[:end])
            del self.buffer[:end + 1]
            if not line.strip():
                continue
            try:
                out.append(decode_request(line))
            except ControlError as error:
                out.append(error)

    def _too_large(self) -> ControlError:
        self.closed = True
        self.buffer = bytearray()
        return ControlError("too-large", f"a request may be at most {self.limit} bytes "
                            "(one line); split a bulk change into several requests")


class AnswerReader:
    """The client's side: `feed` gives the answers complete so far (each a
    result dict, or the ControlError the daemon answered)."""

    def __init__(self, limit: int = MAX_ANSWER):
        self.limit = limit
        self.buffer = bytearray()

    def feed(self, data: bytes) -> List[Union[dict, ControlError]]:
        self.buffer += data
        out: List[Union[dict, ControlError]] = []
        while True:
            end = self.buffer.find(b"\n")
            if end < 0:
                if len(self.buffer) > self.limit:
                    raise ControlError("too-large", f"the daemon's answer is longer than "
                                       f"{self.limit} bytes")
                return out
            line = bytes(self.buffer[:end])
            del self.buffer[:end + 1]
            try:
                out.append(decode_answer(line))
            except ControlError as error:
                out.append(error)


def _json(line: bytes, what: str):
    try:
        return json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as error:
        raise ControlError("malformed", f"the {what} is not UTF-8 (byte {error.start})")
    except (ValueError, RecursionError) as error:
        raise ControlError("malformed", f"the {what} is not JSON: {str(error)[:120]}")


def _line(value: dict) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8") + b"\n"
