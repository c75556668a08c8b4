"""Warnings about a valid policy: rules that can never match, and lock-outs.

Both checks are conservative: a warning is only given when it is certain,
so a silent lint proves nothing, but a warning is never wrong.
"""
from __future__ import annotations

import dataclasses
import functools
from fnmatch import fnmatchcase
from typing import Dict, Iterator, List, Tuple

import yaml

from ipqd.errors import PolicyError
from ipqd.policy.model import AddrMatch, IfaceMatch, Match, Policy, RangeMatch, Rule

# Past this many rule-to-rule comparisons the search stops (a policy that large
# is generated, not written). The candidates are narrowed first (see _Group),
# so a generated policy of distinct addresses needs almost none.
MAX_COMPARISONS = 200_000


def lint(policy: Policy, default_node: yaml.Node) -> List[PolicyError]:
    return list(shadowed(policy.rules)) + cut_off(policy, default_node)


# --- shadowed rules ------------------------------------------------------------------

def shadowed(rules: Tuple[Rule, ...]) -> Iterator[PolicyError]:
    """A warning for each rule that an earlier rule without a rate always beats.

    The warning names the first such earlier rule. Comparing every rule with
    every earlier one is quadratic, so each rule is compared only with the
    earlier rules that could cover it (_Group.candidates), lowest first.
    """
    groups: Dict[Tuple[bool, frozenset], _Group] = {}
    items: Dict[int, List[Tuple[str, object]]] = {}    # earlier rule -> _tested
    budget = MAX_COMPARISONS
    for later, b in enumerate(rules):
        tested = b.match.fields()
        candidates = set()
        for (malformed, fields), group in groups.items():
            if malformed == b.match.malformed and fields <= tested:
                candidates.update(group.candidates(b.match))
        for earlier in sorted(candidates):
            budget -= 1
            if budget < 0:
                return
            if _covers(items[earlier], b.match):
                yield _shadow_warning(rules[earlier], b)
                break
        if b.rate is None:
            items[later] = _tested(b.match)
            key = (b.match.malformed, tested)
            if key not in groups:
                groups[key] = _Group(tested)
            groups[key].add(later, b.match)


class _Group:
    """Earlier rules that test the same fields, indexed by one address field.

    A rule whose `src` (or `dst`) lists networks can only cover a rule whose
    networks all lie inside them; so its candidates are found by looking up
    the first network of the later rule, shortened to each prefix length in
    use. Rules without a positive address test are always candidates.
    """
    __slots__ = ("attr", "networks", "lengths", "rest")

    def __init__(self, fields: frozenset):
        self.attr = "src" if "src" in fields else "dst" if "dst" in fields else None
        self.networks: Dict[Tuple[int, int, int], List[int]] = {}   # (version, length, address)
        self.lengths: Dict[int, set] = {4: set(), 6: set()}
        self.rest: List[int] = []

    def add(self, index: int, match: Match) -> None:
        addr = getattr(match, self.attr) if self.attr else None
        if addr is None or addr.negate:
            self.rest.append(index)
            return
        for net in addr.networks:
            key = (net.version, net.prefixlen, int(net.network_address))
            self.networks.setdefault(key, []).append(index)
            self.lengths[net.version].add(net.prefixlen)

    def candidates(self, match: Match) -> List[int]:
        found = list(self.rest)
        addr = getattr(match, self.attr) if self.attr else None
        if addr is not None and not addr.negate:
            first = addr.networks[0]
            address = int(first.network_address)
            for length in self.lengths[first.version]:
                if length <= first.prefixlen:
                    shift = first.max_prefixlen - length
                    found += self.networks.get((first.version, length, address >> shift << shift), ())
        return found


def _shadow_warning(a: Rule, b: Rule) -> PolicyError:
    if a.position.path == b.position.path:
        where = f"line {a.position.line}"
    else:
        where = f"{a.position.path} line {a.position.line}"
    return PolicyError(b.position.path, b.position.line, b.position.column,
                       f'rule "{b.name}" can never match: rule "{a.name}" ({where}) '
                       "matches every packet it would", severity="warning")


def covers(a: Match, b: Match) -> bool:
    """True when every packet `b` matches is certainly matched by `a`."""
    return a.malformed == b.malformed and _covers(_tested(a), b)


def _tested(match: Match) -> List[Tuple[str, object]]:
    """(field, value) of each field `match` tests, the cheapest to compare first."""
    return [(name, getattr(match, name)) for name in _COVERS_ORDER
            if getattr(match, name) is not None] + \
        [(name, True) for name in _UNKNOWN_FIELDS if getattr(match, name) is not None]


def _covers(tested: List[Tuple[str, object]], b: Match) -> bool:
    for name, mine in tested:
        theirs = getattr(b, name)
        if theirs is None or not _COVERS.get(name, _never)(mine, theirs):
            return False
    return True


def _never(a, b) -> bool:
    return False


def _equal(a, b) -> bool:
    return a == b


def _subset(a: frozenset, b: frozenset) -> bool:
    return b <= a


def _addresses(a: AddrMatch, b: AddrMatch) -> bool:
    if a.negate or b.negate:
        return a.negate == b.negate and set(a.networks) == set(b.networks)
    return all(any(n.version == m.version and n.subnet_of(m) for m in a.networks)
               for n in b.networks)


@functools.lru_cache(maxsize=4096)
def _merged(ranges: Tuple[Tuple[int, int], ...]) -> Tuple[Tuple[int, int], ...]:
    out: List[List[int]] = []
    for low, high in sorted(ranges):
        if out and low <= out[-1][1] + 1:
            out[-1][1] = max(out[-1][1], high)
        else:
            out.append([low, high])
    return tuple((low, high) for low, high in out)


def _ranges(a: RangeMatch, b: RangeMatch) -> bool:
    if a.negate or b.negate:
        return a.negate == b.negate and set(a.ranges) == set(b.ranges)
    outer = _merged(a.ranges)
    return all(any(low <= b_low and b_high <= high for low, high in outer)
               for b_low, b_high in b.ranges)


def _is_glob(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


def _interfaces(a: IfaceMatch, b: IfaceMatch) -> bool:
    if a.negate or b.negate:
        return a.negate == b.negate and set(a.patterns) == set(b.patterns)
    return all(p in a.patterns or
               (not _is_glob(p) and any(fnmatchcase(p, q) for q in a.patterns))
               for p in b.patterns)


def _bits(a, b) -> bool:
    # (x & b.mask) == b.value implies (x & a.mask) == a.value when a tests
    # no bit b leaves free and b's values agree with a's.
    return a.mask & b.mask == a.mask and b.value & a.mask == a.value


def _span(a: Tuple[int, int], b: Tuple[int, int]) -> bool:
    return a[0] <= b[0] and b[1] <= a[1]


_COVERS = {
    "family": _equal,
    "proto": _subset,
    "src": _addresses,
    "dst": _addresses,
    "sport": _ranges,
    "dport": _ranges,
    "in_": _interfaces,
    "out": _interfaces,
    "hook": _subset,
    "icmp_type": _subset,
    "icmp_code": _subset,
    "tcp_flags": _bits,
    "ct_state": _subset,
    "uid": _ranges,
    "gid": _ranges,
    "mark": _bits,
    "length": _span,
    "fragment": _subset,
}
_COVERS_ORDER = sorted(_COVERS, key=lambda name: _COVERS[name] in (_addresses, _interfaces))
# A field added to Match later is never taken as covered: no false warning.
_UNKNOWN_FIELDS = [f.name for f in dataclasses.fields(Match)
                   if f.name not in _COVERS and f.name != "malformed"]


# --- lock-out ----------------------------------------------------------------------

def cut_off(policy: Policy, default_node: yaml.Node) -> List[PolicyError]:
    """A warning when dropping by default on input also drops replies to the host."""
    if policy.default.action != "drop":
        return []
    if not any(hook.chain == "input" for hook in policy.hooks):
        return []
    if any(_accepts_established(rule) for rule in policy.rules):
        return []
    mark = default_node.start_mark
    return [PolicyError(policy.path, mark.line + 1, mark.column + 1,
                        "default drops input traffic and no rule accepts established "
                        "connections: replies to this host's own connections will be dropped "
                        "(add a first rule with ct_state: [established, related] and "
                        "action: accept)", severity="warning")]


def _accepts_established(rule: Rule) -> bool:
    if rule.action != "accept" or rule.rate is not None or rule.match.malformed:
        return False
    states = rule.match.ct_state
    return (states is not None and "established" in states) or not rule.match.fields()
