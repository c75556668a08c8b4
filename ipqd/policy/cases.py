"""A policy's test cases: packets described as `ipqd explain` reads them,
each with the verdict (and optionally the rule) the policy must give it.

    tests:
      - {packet: "tcp 10.0.0.5:40000 -> 10.0.0.1:22 syn", expect: accept, rule: ssh}
      - name: telnet stays closed
        packet: "tcp 10.0.0.5:40000 -> 10.0.0.1:23"
        expect: drop

Cases live in the policy's own `tests:` section, in `tests.d/*.yaml` beside
it (each a list of cases, or a mapping with `tests:`), or in files named on
`ipqd test`'s command line. `policy_cases(path)` reads the policy's own;
`read_cases(path)` one file. Both raise PolicyErrors with each problem's
file:line:column, and OSError when a file cannot be read. Running them is
ipqd.decision.verify's job.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import List, Optional

import yaml

from ipqd.errors import PolicyError, PolicyErrors
from ipqd.policy._nodes import Where, choice, describe, fields, text
from ipqd.policy._yamlsafe import compose, read_text
from ipqd.policy.model import ACTIONS, Position

__all__ = ["Case", "CASE_FIELDS", "TESTS_DIR", "policy_cases", "read_cases", "case_files"]

TESTS_DIR = "tests.d"
CASE_FIELDS = ("name", "packet", "expect", "rule")
DEFAULT_RULE = "default"                # `rule: default`: no rule matches
_HAS_TESTS = re.compile(r"^tests\s*:", re.MULTILINE)


@dataclass(frozen=True)
class Case:
    """One test case: `packet` in explain's grammar must get `expect`
    (accept or drop), from the rule named `rule` when given ("default":
    from the policy's default)."""
    position: Position
    packet: str
    expect: str
    rule: Optional[str] = None
    name: Optional[str] = None

    @property
    def title(self) -> str:
        return self.name or self.packet


def case_files(policy_path: str) -> List[str]:
    """The `tests.d/*.yaml` files beside the policy, in name order."""
    directory = os.path.join(os.path.dirname(policy_path), TESTS_DIR)
    if not os.path.isdir(directory):
        return []
    return [os.path.join(directory, name) for name in sorted(os.listdir(directory))
            if name.endswith(".yaml") and not name.startswith(".")]


def policy_cases(policy_path: str) -> List[Case]:
    """The policy's own cases: its `tests:` section, then tests.d/*.yaml."""
    text_ = read_text(policy_path)
    cases = _cases(policy_path, text_, section_only=True) if _HAS_TESTS.search(text_) else []
    for name in case_files(policy_path):
        cases += read_cases(name)
    return cases


def read_cases(path: str) -> List[Case]:
    """The cases in one file: a list of cases, or a mapping with `tests:`."""
    return _cases(path, read_text(path), section_only=False)


def _cases(path: str, text_: str, section_only: bool) -> List[Case]:
    try:
        root, problems = compose(text_, path)
    except PolicyError as error:
        raise PolicyErrors([error]) from None
    problems = [p for p in problems if p.severity == "error"]
    where = Where(path, problems)
    node = root
    if isinstance(root, yaml.MappingNode):
        node = next((value for key, value in root.value
                     if isinstance(key, yaml.ScalarNode) and key.value == "tests"), None)
        if node is None and not section_only:
            where.error(root, "a file of test cases is a list of cases, or a mapping with "
                              "`tests:` holding that list")
    elif section_only:
        node = None
    cases = []
    if node is not None:
        if not isinstance(node, yaml.SequenceNode):
            where.error(node, f"tests must be a list of cases, not {describe(node)}")
        else:
            for item in node.value:
                case = _case(where, item)
                if case is not None:
                    cases.append(case)
    if where.problems:
        raise PolicyErrors(where.problems)
    return cases


def _case(where: Where, node: yaml.Node) -> Optional[Case]:
    inside = where.within("test case: ")
    items = fields(inside, node, CASE_FIELDS, "a test case")
    if items is None:
        return None
    got = {}
    for key, name, value in items:
        if name == "expect":
            got[name] = choice(inside, value, name, ACTIONS, kind="verdict")
        else:
            got[name] = text(inside, value, name, "text")
    for needed in ("packet", "expect"):
        if needed not in got:
            inside.error(node, f"`{needed}` is missing (e.g. "
                               f"{{packet: \"tcp 10.0.0.5:40000 -> 10.0.0.1:22 syn\", "
                               f"expect: accept}})")
            return None
    if any(value is None for value in got.values()):
        return None
    mark = node.start_mark
    return Case(Position(where.path, mark.line + 1, mark.column + 1), got["packet"],
                got["expect"], got.get("rule"), got.get("name"))
