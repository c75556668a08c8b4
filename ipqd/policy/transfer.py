"""A checked policy as bytes for another process, in pieces that load quickly.

The supervisor's loading process packs the policy once; each worker unpacks
it in its compile thread, beside its packet loop. Unpickling a 10,000-rule
policy in one piece is a single C call of about 12 ms that holds the GIL,
so every packet would wait that long. Packed in pieces of CHUNK rules, each
`pickle.loads` is a fraction of a millisecond, and between two the packet
loop gets the GIL. Pure: bytes in, policy out.
"""
from __future__ import annotations

import pickle
from dataclasses import replace

from ipqd.policy.model import Policy

CHUNK = 200
_PROTOCOL = pickle.HIGHEST_PROTOCOL


def pack(policy: Policy) -> bytes:
    """The policy as bytes: its outline (everything but the rules) and its
    rules in pieces of CHUNK."""
    rules = policy.rules
    pieces = [pickle.dumps(rules[i:i + CHUNK], _PROTOCOL) for i in range(0, len(rules), CHUNK)]
    return pickle.dumps((pickle.dumps(outline(policy), _PROTOCOL), pieces), _PROTOCOL)


def unpack(data: bytes) -> Policy:
    """The policy `pack` packed, read a piece at a time."""
    packed_outline, pieces = pickle.loads(data)
    rules: list = []
    for piece in pieces:
        rules.extend(pickle.loads(piece))
    return replace(pickle.loads(packed_outline), rules=tuple(rules))


def outline(policy: Policy) -> Policy:
    """The policy without its rules: what the supervisor keeps."""
    return replace(policy, rules=())
