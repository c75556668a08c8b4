"""`ipqd set add|del|list|flush`: change or read a dynamic set of the running
daemon over its control socket (commands set-add, set-del, set-list,
set-flush; ipqd.daemon.sets answers them).

Entries come from the command line or a file (`--file F`, `-` for standard
input: one per line, `#` comments). They go in requests of up to CHUNK
entries each, every request applied whole or not at all; a bad entry is
reported at its file line.

Exit statuses (ipqd.exits): 0 done; 1 an entry or a request was refused
(a bad entry, an unknown set, a full set); 3 the file cannot be read; 4 the
daemon is not running or does not answer.
"""
from __future__ import annotations

import json
import re
import sys
from contextlib import nullcontext
from typing import Iterator, List, Optional, Tuple

from ipqd.console import error_line
from ipqd.control.client import call
from ipqd.errors import ControlError
from ipqd.exits import EXIT_FAILED, EXIT_INVALID, EXIT_OK, EXIT_UNREADABLE
from ipqd.policy._values import format_duration

CHUNK = 100_000             # entries per request: about 2 MB, well inside MAX_REQUEST
TIMEOUT = 60.0              # a request of CHUNK entries takes well under a second
_ENTRY_AT = re.compile(r"^entry (\d+): (.*)$", re.S)


def run_set(args) -> int:
    verb = args.set_verb
    if verb == "list":
        return _list(args)
    if verb == "flush":
        return _report(_ask(args, "set-flush", {"set": args.name}),
                       lambda r: f"set {r['set']}: {r['flushed']} entries deleted")
    try:
        entries = list(_entries(args))
    except OSError as error:
        error_line(f"ipqd set {verb}: cannot read {args.file}: {error.strerror}")
        return EXIT_UNREADABLE
    if not entries:
        error_line(f"ipqd set {verb}: no entries: name addresses or networks, or --file")
        return EXIT_INVALID
    command = "set-add" if verb == "add" else "set-del"
    totals = {"added": 0, "renewed": 0, "deleted": 0, "missing": 0}
    result = None
    for start in range(0, len(entries), CHUNK):
        chunk = entries[start:start + CHUNK]
        request = {"set": args.name, "entries": [text for text, _ in chunk]}
        if verb == "add" and args.timeout is not None:
            request["timeout"] = args.timeout
        result = _ask(args, command, request, chunk)
        if isinstance(result, int):
            if start:
                error_line(f"ipqd set {verb}: the first {start} entries were "
                           f"{'added' if verb == 'add' else 'deleted'}; none after them")
            return result
        for key in totals:
            totals[key] += result.get(key, 0)
    if verb == "add":
        timeout = result.get("timeout")
        print(f"set {args.name}: {totals['added']} added, {totals['renewed']} renewed "
              f"(timeout {format_duration(timeout) if timeout else 'none'}); {result['size']} entries")
    else:
        print(f"set {args.name}: {totals['deleted']} deleted, {totals['missing']} not there; "
              f"{result['size']} entries")
    return EXIT_OK


def _list(args) -> int:
    result = _ask(args, "set-list", {"set": args.name} if args.name else {})
    if isinstance(result, int):
        return result
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
    elif args.name is None:
        for s in result["sets"]:
            print(f"{s['set']}: {s['size']} entries (max {s['max']}, timeout "
                  f"{format_duration(s['timeout']) if s['timeout'] else 'none'})")
    else:
        width = max([len(e["entry"]) for e in result["entries"]] + [5])
        out = [f"{'ENTRY':<{width}}  REMAINING"]
        out += [f"{e['entry']:<{width}}  "
                f"{format_duration(e['remaining']) if e['remaining'] is not None else 'no timeout'}"
                for e in result["entries"]]
        print("\n".join(out))
    return EXIT_OK


def _entries(args) -> Iterator[Tuple[str, Optional[str]]]:
    """(entry, where it was written: "FILE:LINE", or None on the command line)."""
    for text in args.entries:
        yield text, None
    if args.file is not None:
        name = "<stdin>" if args.file == "-" else args.file
        stream = sys.stdin if args.file == "-" else open(args.file, encoding="utf-8")
        with stream if stream is not sys.stdin else nullcontext(stream):
            for number, line in enumerate(stream, start=1):
                text = line.split("#", 1)[0].strip()
                if text:
                    yield text, f"{name}:{number}"


def _ask(args, command: str, request: dict, chunk: List[Tuple[str, Optional[str]]] = ()):
    """The result; or, after the reason was said, the exit status."""
    try:
        return call(args.control, command, request, TIMEOUT)
    except ControlError as error:
        message = error.message
        found = _ENTRY_AT.match(message)
        if found and chunk and 0 < int(found.group(1)) <= len(chunk):
            where = chunk[int(found.group(1)) - 1][1]
            if where:
                message = f"{where}: {found.group(2)}"
        error_line(f"ipqd set {args.set_verb}: {message}")
        return EXIT_INVALID if error.code in ("refused", "bad-arguments") else EXIT_FAILED


def _report(result, line) -> int:
    if isinstance(result, int):
        return result
    print(line(result))
    return EXIT_OK
