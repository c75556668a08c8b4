"""A set written as a mapping: loaded from a file, or dynamic.

    sets:
      admins: [10.0.0.1, fd00::1]                      # a list, as always
      blocklist: {file: /etc/ipqd/blocklist.txt}      # one entry per line, '#' comments
      banned: {type: address, dynamic: true, timeout: 1h, max: 1000000}

A file set is static: read at each load and reload, its entries expanded
into the rules like a list's. A dynamic set starts empty and changes while
ipqd runs (`ipqd set add`); its entries are addresses or networks of both
families. Pure: the loader reads the file and hands its text in.
"""
from __future__ import annotations

import re
from typing import List, Optional, Tuple

import yaml

from ipqd.errors import InvalidValue, PolicyError
from ipqd.policy import _values as values
from ipqd.policy._nodes import Where, boolean, describe, fields, text
from ipqd.policy._values import parse_duration
from ipqd.policy.model import DynamicSet, Position

SET_FIELDS = ("type", "file", "dynamic", "timeout", "max")
SET_TYPES = ("address", "port")
DYNAMIC_MAX = 1_000_000             # entries a dynamic set may be given room for
DYNAMIC_MAX_DEFAULT = 65536
FILE_ENTRIES_MAX = 1_000_000        # lines with an entry in one set file
_PORT_TEXT = re.compile(r"^\d+(\s*-\s*\d+)?$")


class SetMapping:
    """A set's mapping, read: its `file` (node and path) or its dynamic settings."""

    def __init__(self):
        self.kind: Optional[str] = None         # `type`, when written
        self.file: Optional[Tuple[yaml.Node, str]] = None
        self.dynamic: Optional[DynamicSet] = None
        self.ok = True


def read_mapping(where: Where, name: str, node: yaml.MappingNode) -> SetMapping:
    """The set mapping's fields, each problem reported at its node."""
    out = SetMapping()
    inner = where.within(f"set '{name}': ")
    found = fields(inner, node, SET_FIELDS, f"set '{name}'")
    if found is None:
        out.ok = False
        return out
    got = {key_name: (key, value) for key, key_name, value in found}
    if "type" in got:
        word = text(inner, got["type"][1], "type", "address or port")
        if word is not None and word.strip() not in SET_TYPES:
            hint = values.suggest(word, SET_TYPES) or " (expected address or port)"
            inner.error(got["type"][1], f"unknown type '{word}'{hint}")
            out.ok = False
        out.kind = word.strip() if word else None
    dynamic = boolean(inner, got["dynamic"][1], "dynamic") if "dynamic" in got else False
    if dynamic is None:
        out.ok = False
        return out
    if dynamic:
        return _dynamic(inner, name, node, got, out)
    for field in ("timeout", "max"):
        if field in got:
            inner.error(got[field][0], f"{field} is for dynamic sets: add 'dynamic: true', "
                                       f"or remove {field}")
            out.ok = False
    if "file" not in got:
        inner.error(node, "a set mapping needs 'file: PATH' (entries read from a file) or "
                          "'dynamic: true' (entries added with `ipqd set add`); "
                          "or write the set as a list")
        out.ok = False
        return out
    path = text(inner, got["file"][1], "file", "a file path")
    if not path or not path.strip():
        out.ok = False
        return out
    out.file = (got["file"][1], path.strip())
    return out


def _dynamic(where: Where, name: str, node: yaml.Node, got: dict, out: SetMapping) -> SetMapping:
    if "file" in got:
        where.error(got["file"][0], "a dynamic set starts empty: load a file into it with "
                                    f"`ipqd set add {name} --file PATH`, or remove 'dynamic: true'")
        out.ok = False
    if out.kind == "port":
        where.error(got["type"][1], "dynamic sets hold addresses and networks: "
                                    "write 'type: address'")
        out.ok = False
    timeout = None
    if "timeout" in got:
        written = text(where, got["timeout"][1], "timeout", "a duration such as 1h")
        try:
            timeout = parse_duration(written) if written is not None else None
        except InvalidValue as e:
            where.error(got["timeout"][1], f"timeout: {e.message}")
            out.ok = False
        if written is None:
            out.ok = False
    most = DYNAMIC_MAX_DEFAULT
    if "max" in got:
        written = text(where, got["max"][1], "max", "a number of entries")
        number = values.parse_number(written.replace("_", "")) if written is not None else None
        if number is None or not 1 <= number <= DYNAMIC_MAX:
            where.error(got["max"][1], f"max must be a number of entries from 1 to "
                                       f"{DYNAMIC_MAX}, not {describe(got['max'][1])}")
            out.ok = False
        else:
            most = number
    mark = node.start_mark
    out.kind = "address"
    out.dynamic = DynamicSet(name, timeout, most,
                             Position(where.path, mark.line + 1, mark.column + 1))
    return out


def parse_set_file(path: str, content: str, name: str, kind: Optional[str],
                   problems: List[PolicyError]) -> Tuple[Optional[str], tuple]:
    """(kind, entries) of a set file's text: one address, network, port or
    range per line, `#` comments, blank lines. Each bad line is an error at
    `path:line:column`; kind None when the set is not usable. Without a
    `type`, the first entry's kind is the set's."""
    members, ok = [], True
    count = 0
    for number, line in enumerate(content.splitlines(), start=1):
        written = line.split("#", 1)[0].strip()
        if not written:
            continue
        count += 1
        if count > FILE_ENTRIES_MAX:
            problems.append(PolicyError(path, number, 1, f"set '{name}': more than "
                                        f"{FILE_ENTRIES_MAX} entries in one file"))
            return None, ()
        column = len(line) - len(line.lstrip()) + 1
        this = "port" if _PORT_TEXT.match(written) else "address"
        if kind is None:
            kind = this
        elif this != kind:
            what = "a port" if this == "port" else "an address"
            problems.append(PolicyError(path, number, column,
                                        f"set '{name}' holds {kind}s, but '{written}' is {what}: "
                                        f"split the file into an address set and a port set"))
            ok = False
            continue
        try:
            if this == "port":
                members.append(values.parse_range(written, "port", 0, 65535, "8000-8099"))
                continue
            network, warning = values.parse_network(written)
        except InvalidValue as e:
            problems.append(PolicyError(path, number, column, f"set '{name}': {e.message}"))
            ok = False
            continue
        if warning:
            problems.append(PolicyError(path, number, column, f"set '{name}': {warning}",
                                        "warning"))
        members.append(network)
    if not ok:
        return None, ()
    return kind or "address", tuple(dict.fromkeys(members))
