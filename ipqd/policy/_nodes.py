"""Reading YAML nodes as policy values, reporting every problem at its node.

The loader never stops at the first problem: each helper reports what is
wrong through a `Where` and returns None, and the caller goes on with the
next field.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Tuple

import yaml

from ipqd.errors import PolicyError
from ipqd.policy._values import one_of, suggest

STR = "tag:yaml.org,2002:str"
INT = "tag:yaml.org,2002:int"
BOOL = "tag:yaml.org,2002:bool"
NULL = "tag:yaml.org,2002:null"
_TRUE = ("yes", "true", "on", "y")


class Where:
    """One file's problem list, with the context every message starts with."""

    def __init__(self, path: str, problems: List[PolicyError], prefix: str = ""):
        self.path = path
        self.problems = problems
        self.prefix = prefix

    def within(self, prefix: str) -> "Where":
        return Where(self.path, self.problems, prefix)

    def error(self, node: yaml.Node, message: str) -> None:
        self._add(node, message, "error")

    def warn(self, node: yaml.Node, message: str) -> None:
        self._add(node, message, "warning")

    def _add(self, node: yaml.Node, message: str, severity: str) -> None:
        mark = node.start_mark
        self.problems.append(PolicyError(self.path, mark.line + 1, mark.column + 1,
                                         self.prefix + message, severity))


def describe(node: yaml.Node) -> str:
    """How a value reads in a message: 'a list', 'empty', 'the number 3', "'x'"."""
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    if node.tag == NULL:
        return "empty"
    if node.tag == INT:
        return f"the number {node.value}"
    if node.tag == BOOL:
        return node.value
    return f"'{node.value}'"


def is_scalar(node: yaml.Node) -> bool:
    return isinstance(node, yaml.ScalarNode) and node.tag != NULL


def fields(where: Where, node: yaml.Node, known: Iterable[str], what: str,
           listing: Optional[str] = None) -> Optional[List[Tuple[yaml.Node, str, yaml.Node]]]:
    """(key node, key, value node) of a mapping whose keys must be in `known`.

    `what` names the mapping in a type error ("queue must be a mapping ...").
    Unknown keys are reported with the closest known key, or with `listing`
    (default: every known key).
    """
    known = list(known)
    if not isinstance(node, yaml.MappingNode):
        where.within("").error(node, f"{what} must be a mapping of fields, "
                                     f"not {describe(node)}")
        return None
    out = []
    for key, value in node.value:
        if not is_scalar(key) or key.tag not in (STR, INT, BOOL):
            where.error(key, f"a field name must be a word, not {describe(key)}")
            continue
        if key.value not in known:
            hint = suggest(key.value, known) or f" (expected {listing or one_of(known)})"
            where.error(key, f"unknown field '{key.value}'{hint}")
            continue
        out.append((key, key.value, value))
    return out


def text(where: Where, node: yaml.Node, field: str, expected: str) -> Optional[str]:
    """The text of a scalar, as written (so `no` stays 'no' and 0x10 stays '0x10')."""
    if not is_scalar(node):
        where.error(node, f"{field} must be {expected}, not {describe(node)}")
        return None
    return node.value


def choice(where: Where, node: yaml.Node, field: str, choices: Iterable[str],
           kind: Optional[str] = None) -> Optional[str]:
    """One of `choices`, in any case; `kind` names what was unknown (the field)."""
    word = text(where, node, field, one_of(choices))
    if word is None:
        return None
    word = word.strip().lower()
    if word not in choices:
        hint = suggest(word, choices) or f" (expected {one_of(choices)})"
        where.error(node, f"unknown {kind or field} '{word}'{hint}")
        return None
    return word


def boolean(where: Where, node: yaml.Node, field: str) -> Optional[bool]:
    if not (isinstance(node, yaml.ScalarNode) and node.tag == BOOL):
        where.error(node, f"{field} must be true or false, not {describe(node)}")
        return None
    return node.value.lower() in _TRUE


def scalars(where: Where, node: yaml.Node, field: str,
            expected: str) -> Optional[List[yaml.ScalarNode]]:
    """A scalar or a non-empty list of scalars, as a list of nodes."""
    if is_scalar(node):
        return [node]
    if not isinstance(node, yaml.SequenceNode):
        where.error(node, f"{field} must be {expected}, not {describe(node)}")
        return None
    if not node.value:
        where.error(node, f"{field} is an empty list, which matches nothing: "
                          "remove the field or give it values")
        return None
    items = []
    for item in node.value:
        if not is_scalar(item):
            where.error(item, f"each item of {field} must be {expected}, not {describe(item)}")
            return None
        items.append(item)
    return items


def words(where: Where, node: yaml.Node, field: str,
          table: Dict[str, object]) -> Optional[frozenset]:
    """A word or a list of words from `table`, as the set of their values."""
    items = scalars(where, node, field, f"one of {one_of(table)} or a list of them")
    if items is None:
        return None
    out = set()
    for item in items:
        word = item.value.strip().lower()
        if word not in table:
            hint = suggest(word, table) or f" (expected {one_of(table)})"
            where.error(item, f"unknown {field} '{item.value}'{hint}")
            return None
        out.add(table[word])
    return frozenset(out)

