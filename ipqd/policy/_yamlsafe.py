"""Reading a policy file into YAML nodes, refusing what a policy never needs.

A policy is plain data: mappings, lists and scalars. Everything else YAML can
do is refused here with a positioned error, before any value is interpreted:
tags (`!!python/object` and friends), anchors and aliases (the "billion
laughs" expansion), duplicate keys (YAML keeps the last one silently), deep
nesting (PyYAML's composer recurses once per level) and oversized files.

The result is a tree of `yaml.Node` objects, so every value keeps the line and
column it was written at. No Python object is ever constructed from a tag.
"""
from __future__ import annotations

import errno
import os
import stat
from typing import Dict, List, Optional, Tuple

import yaml
from yaml.composer import Composer
from yaml.events import AliasEvent, MappingEndEvent, ScalarEvent, SequenceEndEvent, \
    SequenceStartEvent
from yaml.nodes import MappingNode, ScalarNode, SequenceNode
from yaml.resolver import Resolver

from ipqd.errors import PolicyError
from ipqd.policy._limits import MAX_BYTES, MAX_DEPTH

try:                                # libyaml's parser is ~5x faster when present
    from yaml.cyaml import CParser as _Parser
except ImportError:                 # pragma: no cover - depends on the build
    from yaml.parser import Parser as _Parser
    from yaml.reader import Reader as _Reader
    from yaml.scanner import Scanner as _Scanner
else:
    _Reader = _Scanner = None

_YAML_TAG_PREFIX = "tag:yaml.org,2002:"

# What to do about a character YAML cannot start a value with.
_CHARACTER_HINTS = {
    "\t": "indent with spaces: YAML does not allow tabs",
    "@": 'quote values that start with @, e.g. "@lan"',
    "`": "quote values that start with `",
    "%": "quote values that start with %",
}
# What to do about some of libyaml's own wording.
_PROBLEM_HINTS = {
    "mapping values are not allowed in this context":
        "check the indentation, or quote a value that contains ': '",
    "mapping values are not allowed here":
        "check the indentation, or quote a value that contains ': '",
    "exceeded maximum nesting depth":
        "a policy needs only a few levels of nesting",
}


class _Refused(Exception):
    """A construct the policy language does not allow, at a YAML mark."""

    def __init__(self, mark, message: str):
        super().__init__(message)
        self.mark = mark
        self.message = message


class _PolicyComposer(Composer, _Parser, Resolver):
    """yaml.SafeLoader's composing half, with the refusals described above.

    Only the composer is used: scalars stay text plus the tag the resolver
    gives them (int, bool, str, ...), and the loader reads them itself.
    The nodes are built in one loop over the parser's events rather than by
    PyYAML's composer, whose per-node bookkeeping (anchors, path resolvers,
    peeks) a policy never needs: with libyaml's parser that is most of the
    time of a large load. Events are read in the same order, so every error
    is raised at the same event as PyYAML's composer would raise it.
    """

    def __init__(self, text: str):
        if _Reader is None:
            _Parser.__init__(self, text)
        else:                                       # pragma: no cover
            _Reader.__init__(self, text)
            _Scanner.__init__(self)
            _Parser.__init__(self)
        Composer.__init__(self)
        Resolver.__init__(self)
        self.duplicates: List[Tuple[yaml.Node, yaml.Node]] = []
        # Refused tags: said, and their nodes read as empty, so that every
        # other problem of the file is found too.
        self.refused_tags: List[Tuple[object, str]] = []
        # A plain scalar's implicit tag depends on its text alone, and a
        # policy repeats the same few words (keys, protocols, actions).
        self._plain_tags: Dict[str, str] = {}

    def compose_document(self):
        self.get_event()                            # document start
        node = self._compose(self.get_event(), 1)
        self.get_event()                            # document end
        return node

    def _compose(self, event, depth: int) -> yaml.Node:
        kind = type(event)
        if kind is AliasEvent:
            raise _Refused(event.start_mark,
                           f"YAML aliases (*{event.anchor}) are not allowed in a policy: "
                           "write the values out, or name them once in `sets:`")
        if event.anchor is not None:
            raise _Refused(event.start_mark,
                           f"YAML anchors (&{event.anchor}) are not allowed in a policy: "
                           "write the values out, or name them once in `sets:`")
        tagged = _tag_problem(event)
        if tagged is not None:
            self.refused_tags.append((event.start_mark, tagged))
            if kind is ScalarEvent:
                return ScalarNode("tag:yaml.org,2002:null", "", event.start_mark, event.end_mark)
        if depth > MAX_DEPTH:
            raise _Refused(event.start_mark,
                           f"the policy is nested too deeply (more than {MAX_DEPTH} levels)")
        if kind is ScalarEvent:
            value = event.value
            if event.implicit[0]:
                tag = self._plain_tags.get(value)
                if tag is None:
                    tag = self._plain_tags[value] = self.resolve(ScalarNode, value, (True, False))
            else:
                tag = self.DEFAULT_SCALAR_TAG
            return ScalarNode(tag, value, event.start_mark, event.end_mark, style=event.style)
        get_event = self.get_event
        depth += 1
        if kind is SequenceStartEvent:
            items: list = []
            node = SequenceNode(self.DEFAULT_SEQUENCE_TAG, items, event.start_mark, None,
                                flow_style=event.flow_style)
            item = get_event()
            while type(item) is not SequenceEndEvent:
                items.append(self._compose(item, depth))
                item = get_event()
            node.end_mark = item.end_mark
            return node
        pairs = []
        node = MappingNode(self.DEFAULT_MAPPING_TAG, pairs, event.start_mark, None,
                           flow_style=event.flow_style)
        item = get_event()
        while type(item) is not MappingEndEvent:
            key = self._compose(item, depth)
            pairs.append((key, self._compose(get_event(), depth)))
            item = get_event()
        node.end_mark = item.end_mark
        node.value = self._without_duplicates(pairs)
        return node

    def _without_duplicates(self, pairs):
        seen = {}
        kept = []
        for key, value in pairs:
            name = key.value if isinstance(key, yaml.ScalarNode) else None
            if name is not None and name in seen:
                self.duplicates.append((key, seen[name]))
                continue
            if name is not None:
                seen[name] = key
            kept.append((key, value))
        return kept


# How a refused tag's message starts (the loader keeps it, and drops what
# the emptied value would add at the same place).
TAG_PROBLEM_STARTS = ("YAML tags like", "'!")


def _tag_problem(event) -> Optional[str]:
    """Why an event's explicit tag is refused, or None when it has none."""
    tag = getattr(event, "tag", None)
    if tag is None or tag == "!":               # "!" is what a quoted scalar carries
        return None
    if tag.startswith(_YAML_TAG_PREFIX):
        written = "!!" + tag[len(_YAML_TAG_PREFIX):]
    else:
        written = tag
    if isinstance(event, yaml.ScalarEvent) and event.value == "" and not written.startswith("!!"):
        # `src: !10.0.0.0/8` is a YAML tag on an empty value, not a negation.
        return f"'{written}' is read by YAML as a tag: quote negations, e.g. \"{written}\""
    return f"YAML tags like '{written}' are not allowed in a policy"


def position_of(path: str, mark) -> Tuple[int, int]:
    """1-based (line, column) of a 0-based YAML mark."""
    return mark.line + 1, mark.column + 1


def error_at(path: str, mark, message: str, severity: str = "error") -> PolicyError:
    line, column = position_of(path, mark)
    return PolicyError(path, line, column, message, severity)


_KINDS = {stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device",
          stat.S_IFBLK: "a block device", stat.S_IFSOCK: "a socket", stat.S_IFDIR: "a directory"}


def read_text(path: str) -> str:
    """The text of a policy file.

    Raises OSError when the file cannot be read or is no regular file,
    PolicyError when it is too large or not UTF-8.
    """
    # Opened without waiting and checked before reading: a FIFO or a device
    # in place of the policy would otherwise block (or feed) the reader.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        kind = stat.S_IFMT(os.fstat(fd).st_mode)
    except OSError:
        os.close(fd)
        raise
    if kind != stat.S_IFREG:
        os.close(fd)
        if kind == stat.S_IFDIR:
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
        raise OSError(errno.EINVAL, f"not a regular file ({_KINDS.get(kind, 'special')}): "
                                    f"a policy must be a plain file", path)
    with os.fdopen(fd, "rb") as f:
        data = f.read(MAX_BYTES + 1)
    if len(data) > MAX_BYTES:
        raise PolicyError(path, 1, 1,
                          f"policy file is too large (more than {MAX_BYTES} bytes)")
    return decode(data, path)


def decode(data: bytes, path: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        before = data[:e.start]
        line = before.count(b"\n") + 1
        column = e.start - (before.rfind(b"\n") + 1) + 1
        raise PolicyError(path, line, column,
                          f"policy file is not UTF-8 text (byte 0x{data[e.start]:02x})") from None


def compose(text: str, path: str) -> Tuple[Optional[yaml.Node], List[PolicyError]]:
    """The root node of `text` (None when empty) and the non-fatal problems.

    Duplicate keys are reported and dropped (the first one is kept), and a
    refused tag is reported and its value read as empty, so the loader can
    go on checking. Everything else refused raises PolicyError.
    """
    if len(text) > MAX_BYTES:
        raise PolicyError(path, 1, 1,
                          f"policy file is too large (more than {MAX_BYTES} bytes)")
    composer = _PolicyComposer(text)
    try:
        root = composer.get_single_node()
    except _Refused as e:
        raise error_at(path, e.mark, e.message) from None
    except yaml.MarkedYAMLError as e:
        raise _syntax_error(path, text, e) from None
    except yaml.YAMLError as e:                   # reader errors: no mark
        raise _reader_error(path, text, e) from None
    finally:
        composer.dispose()
    problems = [error_at(path, mark, message) for mark, message in composer.refused_tags]
    problems += [
        error_at(path, key.start_mark,
                 f"duplicate key '{key.value}' (first on line {first.start_mark.line + 1}): "
                 "YAML would silently keep only the last one")
        for key, first in composer.duplicates
    ]
    return root, problems


def _syntax_error(path: str, text: str, e: yaml.MarkedYAMLError) -> PolicyError:
    mark = e.problem_mark or e.context_mark
    problem = (e.problem or "invalid YAML").strip()
    if problem.startswith("but ") and e.context:
        problem = f"{e.context.strip()} {problem}"
    message = f"YAML syntax error: {problem}"
    hint = _PROBLEM_HINTS.get(problem)
    if mark is not None and "cannot start any token" in problem:
        hint = _CHARACTER_HINTS.get(_character_at(text, mark))
    if hint:
        message += f" ({hint})"
    if mark is None:
        return PolicyError(path, 1, 1, message)
    return error_at(path, mark, message)


def _character_at(text: str, mark) -> str:
    lines = text.split("\n")
    if mark.line < len(lines) and mark.column < len(lines[mark.line]):
        return lines[mark.line][mark.column]
    return ""


def _reader_error(path: str, text: str, e: yaml.YAMLError) -> PolicyError:
    offset = getattr(e, "position", 0) or 0
    before = text[:offset]
    line = before.count("\n") + 1
    column = offset - (before.rfind("\n") + 1) + 1
    reason = getattr(e, "reason", None) or "unreadable"
    return PolicyError(path, line, column, f"YAML cannot read this character: {reason}")
