"""`queue.undecidable`, and the warning about a policy it leaves open.

A packet whose copy (queue.copy_range) ends before a field the rules need to
tell its verdict gets this action: IPv6 extension headers can put the
transport header anywhere in a packet, so no copy_range but 0 shows it for
sure (see ipqd.decision.compiler). Parsed here so that the loader only has to name
the field: QUEUE_FIELDS gets "undecidable" and QUEUE_PARSERS gets
`"undecidable": parse_undecidable`.
"""
from __future__ import annotations

from typing import List, Optional

import yaml

from ipqd.errors import PolicyError
from ipqd.policy.model import HIDDEN_CHAIN, HIDDEN_IP
from ipqd.policy._nodes import Where, choice
from ipqd.policy.model import ACTIONS, Policy

_IPV6_HEADER = 40           # a copy shorter than this can cut the addresses off


def parse_undecidable(where: Where, node: yaml.Node) -> Optional[str]:
    """`accept` or `drop`; None after an error."""
    return choice(where, node, "undecidable", ACTIONS, kind="action")


def undecidable_accepted(policy: Policy) -> List[PolicyError]:
    """A warning when `undecidable: accept` lets packets past what would drop
    them: a rule deciding by a field a cut copy can hide, whose action is not
    the default's (a drop rule under default accept, an accept rule under
    default drop). One warning, at the first such rule."""
    queue = policy.queue
    if queue.undecidable != "accept" or queue.copy_range == 0:
        return []
    can_hide = HIDDEN_IP if queue.copy_range < _IPV6_HEADER else HIDDEN_CHAIN
    for rule in policy.rules:
        read = sorted(rule.match.fields() & can_hide)
        if not read or rule.match.malformed or rule.action == policy.default.action:
            continue
        fields = ", ".join(read)
        evaded = "" if rule.action == "drop" else " where the default would drop it"
        position = rule.position
        return [PolicyError(
            position.path if position else policy.path, position.line if position else 1,
            position.column if position else 1,
            f'rule "{rule.name}" {rule.action}s by {fields}, but a packet whose headers run '
            f"past copy_range (IPv6 extension headers can take any length) cannot be matched "
            f"on {fields}, and queue.undecidable: accept lets it through{evaded}: remove "
            f"'undecidable: accept' (drop is the default), or copy whole packets with "
            f"copy_range: 0", severity="warning")]
    return []
