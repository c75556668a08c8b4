"""A shadow policy: a candidate that decides every packet beside the
enforced one and enforces nothing.

The engine (ipqd.decision.engine) asks `Shadow.decide` with the same packet
view right after the enforced matcher, counts what the shadow decided and
where its verdict (action or mark) differs, and hands each disagreement to
the worker to log. The verdict cache keeps the pair: its key holds the
fields both policies read, and an entry says whether the two disagree (so
its hits are counted as disagreements, and one is logged when the log's
rate allows: see CachedVerdict.disagrees). Pure.
"""
from __future__ import annotations

from ipqd.decision.compiler import Decision, compile_policy
from ipqd.policy.model import Policy

__all__ = ["Shadow", "disagree"]


class Shadow:
    """The candidate's compiled matcher, and what names it in the log."""

    def __init__(self, policy: Policy):
        self.matcher = compile_policy(policy)
        self.path = policy.path
        self.digest = policy.digest

    def decide(self, view, now: float) -> Decision:
        return self.matcher.decide(view, now)


def disagree(enforced: Decision, shadow: Decision) -> bool:
    """Whether the two would treat the packet differently: another action,
    or another mark on what both accept."""
    return enforced.action != shadow.action or enforced.mark != shadow.mark
