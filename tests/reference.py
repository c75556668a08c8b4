"""The most obvious evaluator of a policy: every rule, in order, every field, literally.

It states the semantics of `ipqd.policy.model.Match` as directly as possible
so the compiled matcher can be checked against it. Speed does not matter.
"""
from __future__ import annotations

import datetime
import fnmatch
import ipaddress
import zoneinfo
from typing import Optional

from ipqd.policy.model import Policy


class Bucket:
    """A token bucket that starts full; only a match takes a token."""

    def __init__(self, per_second: float, burst: int):
        self.per_second = per_second
        self.burst = burst
        self.tokens = float(burst)
        self.stamp: Optional[float] = None

    def level(self, now: float) -> float:
        if self.stamp is None or now <= self.stamp:
            return self.tokens
        return min(float(self.burst), self.tokens + (now - self.stamp) * self.per_second)

    def take(self, now: float) -> None:
        self.tokens = self.level(now) - 1.0
        if self.stamp is None or now > self.stamp:
            self.stamp = now


class KeyedBuckets:
    """A Bucket per key, as the docs state it: a key's bucket starts full;
    a take makes its key the most recently used; past `keys` keys the least
    recently used is forgotten."""

    def __init__(self, rate):
        self.rate = rate
        self.buckets = {}               # key -> Bucket, least recently used first

    def key(self, view) -> tuple:
        parts = [view.family]
        for field, v4, v6 in self.rate.per:
            value = getattr(view, field)
            if field in ("src", "dst") and value is not None:
                if view.family == 4:
                    value = int(ipaddress.ip_network((value, v4), strict=False).network_address)
                elif view.family == 6:
                    value = int(ipaddress.ip_network((value, v6), strict=False).network_address)
                else:
                    value = None
            parts.append(value)
        return tuple(parts)

    def level(self, now: float, view) -> float:
        bucket = self.buckets.get(self.key(view))
        return float(self.rate.burst) if bucket is None else bucket.level(now)

    def take(self, now: float, view) -> None:
        key = self.key(view)
        bucket = self.buckets.pop(key, None)
        if bucket is None:
            bucket = Bucket(self.rate.per_second, self.rate.burst)
            if len(self.buckets) >= self.rate.keys:
                del self.buckets[next(iter(self.buckets))]
        self.buckets[key] = bucket
        bucket.take(now)


class Reference:
    """Evaluates a policy rule by rule. `decide` returns (rule index or -1, action)."""

    def __init__(self, policy: Policy, sets: Optional[dict] = None):
        self.policy = policy
        # The dynamic sets' entries: name -> ipaddress networks (the caller changes them).
        self.sets = sets if sets is not None else {}
        self.buckets = [None if not r.rate else KeyedBuckets(r.rate) if r.rate.per
                        else Bucket(r.rate.per_second, r.rate.burst) for r in policy.rules]

    def decide(self, view, now: float = 0.0):
        """(rule index or -1, action); `logged` then holds the indexes of the
        `action: log` rules that matched on the way (they decide nothing)."""
        self.logged = []
        for index, rule in enumerate(self.policy.rules):
            if not matches(rule.match, view, self.sets):
                continue
            if rule.time is not None and not in_window(rule.time, now):
                continue
            bucket = self.buckets[index]
            if isinstance(bucket, KeyedBuckets):
                if bucket.level(now, view) < 1.0:
                    continue
                bucket.take(now, view)
            elif bucket is not None:
                if bucket.level(now) < 1.0:
                    continue
                bucket.take(now)
            if rule.action == "log":
                self.logged.append(index)
                continue
            return index, rule.action
        return -1, self.policy.default.action


    def refusal(self, index: int, view) -> str:
        """How a packet rule `index` (-1: the default) rejects is refused:
        the reject_with written, else a reset for TCP (but at output),
        port-unreachable for every other protocol."""
        written = (self.policy.rules[index] if index >= 0 else self.policy.default).reject_with
        if written is not None:
            return written
        # at output (hook 3) the kernel's reset does not reach the host's own socket
        return "tcp-reset" if view.proto == 6 and view.hook != 3 else "port-unreachable"


def in_window(window, now: float) -> bool:
    """`now` (Unix time) on one of the window's days, at a minute from its
    start (included) to its end (excluded), wrapping past midnight; the day
    is `now`'s own date in the window's zone (None: the host's)."""
    zone = zoneinfo.ZoneInfo(window.tz) if window.tz else None
    moment = datetime.datetime.fromtimestamp(now, zone)
    minute = moment.hour * 60 + moment.minute
    if moment.weekday() not in window.days:
        return False
    if window.start < window.end:
        return window.start <= minute < window.end
    return minute >= window.start or minute < window.end


def matches(m, view, sets=None) -> bool:
    """Whether Match `m` matches the packet view, field by field."""
    if m.malformed != view.malformed:
        return False
    if m.family is not None and view.family != m.family:
        return False
    if m.proto is not None and (view.proto is None or view.proto not in m.proto):
        return False
    for field in ("src", "dst"):
        addr = getattr(m, field)
        if addr is not None and not address_matches(addr, view.family, getattr(view, field),
                                                    sets):
            return False
    for field in ("sport", "dport", "uid", "gid"):
        ranges = getattr(m, field)
        value = getattr(view, field)
        if ranges is not None:
            if value is None:
                return False
            inside = any(lo <= value <= hi for lo, hi in ranges.ranges)
            if inside == ranges.negate:
                return False
    for field, attr in (("in_", "indev"), ("out", "outdev")):
        iface = getattr(m, field)
        name = getattr(view, attr)
        if iface is not None:
            if name is None:
                return False
            inside = any(fnmatch.fnmatchcase(name, p) for p in iface.patterns)
            if inside == iface.negate:
                return False
    for field in ("hook", "icmp_type", "icmp_code", "ct_state", "fragment"):
        values = getattr(m, field)
        value = getattr(view, field)
        if values is not None and (value is None or value not in values):
            return False
    if m.tcp_flags is not None:
        if view.tcp_flags is None or (view.tcp_flags & m.tcp_flags.mask) != m.tcp_flags.value:
            return False
    if m.mark is not None:
        if view.mark is None or (view.mark & m.mark.mask) != m.mark.value:
            return False
    if m.cgroup is not None:
        path = view.cgroup          # the deepest cgroup path the packet was marked with
        if path is None or not any(path == a or path.startswith(a + "/") for a in m.cgroup):
            return False
    if m.length is not None:
        lo, hi = m.length
        if view.length is None or not lo <= view.length <= hi:
            return False
    return True


def address_matches(addr, family, value, sets=None) -> bool:
    """Only packets of the networks' families can match, negated or not; a
    dynamic set may hold either family, whatever it holds now."""
    if value is None or family is None:
        return False
    networks = [n for n in addr.networks if n.version == family]
    if addr.dynamic:
        ip = ipaddress.ip_address(value) if family == 4 else ipaddress.IPv6Address(value)
        inside = any(ip in n for n in networks) or any(
            ip in n for name in addr.dynamic for n in (sets or {}).get(name, ())
            if n.version == family)
        return inside != addr.negate
    if not networks:
        return False
    ip = ipaddress.ip_address(value) if family == 4 else ipaddress.IPv6Address(value)
    inside = any(ip in n for n in networks)
    return inside != addr.negate
