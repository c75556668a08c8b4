"""A checked policy as bytes for another process, and the outline the
supervisor keeps of it.

The supervisor's loading process packs the policy once; each worker (a new
one for each reload) unpacks it before it touches a packet. The supervisor
keeps only the outline: it needs the settings, hooks and warnings, not the
rules. Pure: bytes in, policy out.
"""
from __future__ import annotations

import pickle
from dataclasses import replace

from ipqd.policy.model import Policy

_PROTOCOL = pickle.HIGHEST_PROTOCOL


def pack(policy: Policy) -> bytes:
    """The whole policy as bytes."""
    return pickle.dumps(policy, _PROTOCOL)


def unpack(data: bytes) -> Policy:
    """The policy `pack` packed."""
    return pickle.loads(data)


def outline(policy: Policy) -> Policy:
    """The policy without its rules (and its shadow's): what the supervisor keeps."""
    shadow = replace(policy.shadow, rules=()) if policy.shadow is not None else None
    return replace(policy, rules=(), shadow=shadow)
