"""A rule's rate kept per key (`rate: {limit: ..., per: src}`): one token
bucket per source address, source network, port, or a combination. Pure:
the time is passed in.

Memory is bounded: at most `Rate.keys` keys are tracked. A key is tracked
from the first token it takes (looking takes nothing), and each take makes
it the most recently used. When a new key would pass the bound, the least
recently used key is forgotten (`evicted`). Forgetting a key whose bucket
has refilled loses nothing: a key not tracked has a full bucket. Forgetting
one that has not (`evicted_early`, counted apart) gives that key a full
bucket again when it comes back: under a flood of more distinct keys than
the bound, each key gets at most `burst` packets per return, as if first
seen.
"""
from __future__ import annotations

from collections import OrderedDict
from operator import attrgetter
from typing import Callable, List, Optional, Tuple

from ipqd.policy.model import Rate

__all__ = ["RateTable", "key_reader"]

_BITS = {4: 32, 6: 128}


def key_reader(per: Tuple[Tuple[str, int, int], ...]) -> Callable[[object], tuple]:
    """A function from a packet view to its key under `per`: ((field, IPv4
    prefix, IPv6 prefix), ...), the prefixes for addresses only. A field the
    packet does not carry (ports on ICMP) is None in the key: such packets
    share one bucket per value of the other fields."""
    if len(per) == 1 and (per[0][0] in ("sport", "dport") or per[0][1:] == (32, 128)):
        # one field read whole (`per: src`, `per: dport`): no shift, one getter
        get = attrgetter("family", per[0][0])
        return get
    parts: List[Callable[[object], object]] = []
    for field, v4, v6 in per:
        if field in ("src", "dst"):
            shifts = {4: 32 - v4, 6: 128 - v6}

            def part(view, field=field, shifts=shifts):
                address = getattr(view, field)
                family = view.family
                if address is None or family not in shifts:
                    return None
                return address >> shifts[family]
        else:
            def part(view, field=field):
                return getattr(view, field)
        parts.append(part)
    if len(parts) == 1:
        (only,) = parts
        return lambda view: (view.family, only(view))
    return lambda view: (view.family,) + tuple(part(view) for part in parts)


class RateTable:
    """Token buckets by key, each starting full, at most `rate.keys` of them.
    The same `available`/`take` as TokenBucket, with the packet view."""
    __slots__ = ("per_second", "burst", "max_keys", "key", "entries", "evicted",
                 "evicted_early", "_last")

    def __init__(self, rate: Rate):
        self.per_second = float(rate.per_second)
        self.burst = float(rate.burst)
        self.max_keys = rate.keys
        self.key = key_reader(rate.per)
        # key -> [tokens, stamp]; in the order of their last take, oldest first
        self.entries: "OrderedDict[tuple, list]" = OrderedDict()
        self.evicted = 0
        self.evicted_early = 0
        self._last: Optional[Tuple[object, tuple]] = None     # (view, its key)

    def _key_of(self, view) -> tuple:
        last = self._last
        if last is not None and last[0] is view:
            return last[1]
        key = self.key(view)
        self._last = (view, key)
        return key

    def _level(self, entry: list, now: float) -> float:
        tokens, stamp = entry
        if stamp is None or now <= stamp:
            return tokens
        return min(self.burst, tokens + (now - stamp) * self.per_second)

    def available(self, now: float, view=None) -> bool:
        key = self.key(view)
        self._last = (view, key)
        entry = self.entries.get(key)
        return entry is None or self._level(entry, now) >= 1.0

    def take(self, now: float, view=None) -> bool:
        """Spend one of the key's tokens if there is one at `now`; whether there was."""
        key = self._key_of(view)
        entries = self.entries
        entry = entries.get(key)
        if entry is None:
            if len(entries) >= self.max_keys:
                self._evict(now)
            entry = entries[key] = [self.burst, None]
        else:
            entries.move_to_end(key)
        level = self._level(entry, now)
        if level < 1.0:
            return False
        entry[0] = level - 1.0
        if entry[1] is None or now > entry[1]:
            entry[1] = now
        return True

    def _evict(self, now: float) -> None:
        _, oldest = self.entries.popitem(last=False)
        self.evicted += 1
        if self._level(oldest, now) < self.burst:
            self.evicted_early += 1

    def __len__(self) -> int:
        return len(self.entries)
