"""A `Rate` as a token bucket: a rule's rate (ipqd.decision.compiler) and the
decision log's (ipqd.daemon.decision_log). Pure: the time is passed in."""
from __future__ import annotations

from typing import Optional

from ipqd.policy.model import Rate

__all__ = ["TokenBucket"]


class TokenBucket:
    """Starts full. Looking (`available`) changes nothing, so a rule that
    then loses to an earlier one costs it nothing; only `take` spends."""
    __slots__ = ("per_second", "burst", "tokens", "stamp", "spent")

    def __init__(self, rate: Rate):
        self.per_second = float(rate.per_second)
        self.burst = float(rate.burst)
        self.tokens = self.burst
        self.stamp: Optional[float] = None      # None: full, nothing taken yet
        self.spent = 0                          # tokens taken since it was made

    def level(self, now: float) -> float:
        """The tokens there at `now`: a clock that went back refills nothing."""
        if self.stamp is None or now <= self.stamp:
            return self.tokens
        return min(self.burst, self.tokens + (now - self.stamp) * self.per_second)

    # `view` is for RateTable's sake (ipqd.decision.rate_table): one bucket
    # for every packet needs none.
    def available(self, now: float, view=None) -> bool:
        return self.level(now) >= 1.0

    def take(self, now: float, view=None) -> bool:
        """Spend a token if one is there at `now`; whether one was."""
        level = self.level(now)
        if level < 1.0:
            return False
        self.tokens = level - 1.0
        self.spent += 1
        if self.stamp is None or now > self.stamp:
            self.stamp = now
        return True

    def resume(self, tokens: float, stamp: Optional[float]) -> None:
        """Go on from a predecessor's bucket (its `tokens` at `stamp`), less
        what this one has taken meanwhile: a reload's successor answers
        packets before the predecessor's state reaches it."""
        spent, last = self.spent, self.stamp
        self.tokens, self.stamp = tokens, stamp
        if spent and last is not None:
            self.tokens = self.level(last) - spent
            self.stamp = last if stamp is None else max(last, stamp)
