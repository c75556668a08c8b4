"""Warnings about a valid policy: rules that can never match, lock-outs, and
packets let through undecided (ipqd.policy._undecidable).

The first two are conservative: a warning is only given when it is certain,
so a silent lint proves nothing, but a warning is never wrong.
"""
from __future__ import annotations

import dataclasses
import functools
import heapq
from fnmatch import fnmatchcase
from typing import Dict, Iterator, List, Tuple

import yaml

from ipqd.errors import PolicyError
from ipqd.policy._limits import MAX_SHADOW_STEPS, MAX_TOGETHER_CUBES, MAX_TOGETHER_RULES
from ipqd.policy._undecidable import undecidable_accepted
from ipqd.policy.model import PROTO_ICMPV6, AddrMatch, IfaceMatch, Match, Policy, RangeMatch, Rule
from ipqd.policy.reject import rejects_as_drop


def lint(policy: Policy, default_node: yaml.Node) -> List[PolicyError]:
    alone = list(shadowed(policy.rules))
    return alone + shadowed_together(policy.rules, alone) + cut_off(policy, default_node) + \
        ipv6_cut_off(policy, default_node) + undecidable_accepted(policy) + \
        rejects_as_drop(policy, default_node)


# --- rules that several earlier rules shadow together ---------------------------

def shadowed_together(rules: Tuple[Rule, ...], warned: List[PolicyError]) -> List[PolicyError]:
    """A warning for each rule no packet reaches past the earlier rules
    without a rate, though none of them alone covers it (`shadowed` names
    those): the warning names the earlier rules that share packets with it,
    which together take them all. Exact (ipqd.policy.regions), so only for
    policies of at most MAX_TOGETHER_RULES rules, each rule's search stopped
    (and no warning given) past MAX_TOGETHER_CUBES."""
    if not rules or len(rules) > MAX_TOGETHER_RULES:
        return []
    from ipqd.policy import regions
    done = {(w.path, w.line, w.column) for w in warned}
    try:
        space = regions.Space(rule.match for rule in rules)
    except regions.TooLarge:
        return []
    out = []
    for index, rule in enumerate(rules):
        p = rule.position
        if index == 0 or (p.path, p.line, p.column) in done:
            continue
        try:
            _, cube, earlier = regions.reach(rules, index, space, MAX_TOGETHER_CUBES)
        except regions.TooLarge:
            continue
        if cube is None and earlier:
            needed = regions.needed(rules, index, earlier, space, MAX_TOGETHER_CUBES)
            out.append(_together_warning(rule, [rules[i] for i in needed]))
    return out


def _together_warning(b: Rule, earlier: List[Rule]) -> PolicyError:
    names = [f'"{a.name}" ({_where(a, b)})' for a in earlier]
    listed = ", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else names[0]
    return PolicyError(b.position.path, b.position.line, b.position.column,
                       f'rule "{b.name}" can never match: rule{"s" if len(names) > 1 else ""} '
                       f"{listed} together match every packet it would", severity="warning")


def _where(a: Rule, b: Rule) -> str:
    if a.position.path == b.position.path:
        return f"line {a.position.line}"
    return f"{a.position.path} line {a.position.line}"


# --- shadowed rules ------------------------------------------------------------------

def shadowed(rules: Tuple[Rule, ...], max_steps: int = MAX_SHADOW_STEPS) -> Iterator[PolicyError]:
    """A warning for each rule that an earlier rule without a rate always beats.

    The warning names the first such earlier rule. Comparing every rule with
    every earlier one is quadratic, so each rule is compared only with the
    earlier rules that could cover it (_Group.candidates), lowest first. A
    shadowed rule is never a candidate: whatever it covers, the earlier rule
    that covers it covers too. Past `max_steps` of work the search stops with
    a warning naming the first rule it did not check.
    """
    # Earlier rules grouped by shape (malformed, the fields they test), and
    # for each shape seen, the groups whose rules could cover a rule of it.
    groups: Dict[Tuple[bool, frozenset], _Group] = {}
    applying: Dict[Tuple[bool, frozenset], List[_Group]] = {}
    items: Dict[int, List[Tuple[str, object]]] = {}    # earlier rule -> _tested
    steps = 0
    for later, b in enumerate(rules):
        shape = (b.match.malformed, b.match.fields())
        found = applying.get(shape)
        if found is None:
            steps += len(groups)
            found = applying[shape] = [group for (malformed, fields), group in groups.items()
                                       if malformed == shape[0] and fields <= shape[1]]
        lists: List[List[int]] = []                    # each ascending
        for group in found:
            steps += group.candidates(b.match, lists)
        shadow = previous = None
        for earlier in heapq.merge(*lists):
            if earlier == previous:                    # filed under several of its networks
                continue
            previous = earlier
            steps += 1
            if steps > max_steps:
                break
            if _covers(items[earlier], b.match):
                shadow = earlier
                break
        if steps > max_steps:
            yield _stopped_warning(b, later, len(rules), max_steps)
            return
        if shadow is not None:
            yield _shadow_warning(rules[shadow], b)
        elif b.rate is None and b.time is None and b.action != "log":   # these let packets by
            items[later] = _tested(b.match)
            group = groups.get(shape)
            if group is None:
                group = groups[shape] = _Group(shape[1])
                steps += len(applying)
                for (malformed, fields), covering in applying.items():
                    if malformed == shape[0] and shape[1] <= fields:
                        covering.append(group)
            group.add(later, b.match)


class _Group:
    """Earlier rules that test the same fields, indexed by one of them.

    A rule can only cover a rule whose values all lie inside its own, so in
    particular the later rule's first network, or first port range. With
    `src` or `dst`, an earlier rule is filed under each of its networks and
    found by looking up the later rule's first network shortened to each
    prefix length in use. With `dport` or `sport` (and no address), a rule of
    single ports is filed under each port and found when the later rule's
    first range is that one port; a later range of several ports may be
    covered by single ports together, so it takes every rule. Rules the index
    cannot file (negated, port ranges) are always candidates. Every list
    holds rule numbers in ascending order.
    """
    __slots__ = ("attr", "ports", "filed", "lengths", "rest", "everything")

    def __init__(self, fields: frozenset):
        self.attr = next((name for name in ("src", "dst", "dport", "sport") if name in fields),
                         None)
        self.ports = self.attr in ("dport", "sport")
        self.filed: Dict[object, List[int]] = {}    # (version, length, address), or a port
        self.lengths: Dict[int, set] = {4: set(), 6: set()}
        self.rest: List[int] = []
        self.everything: List[int] = []

    def add(self, index: int, match: Match) -> None:
        self.everything.append(index)
        test = getattr(match, self.attr) if self.attr else None
        if test is None or test.negate or getattr(test, "dynamic", ()):
            self.rest.append(index)
        elif self.ports:
            if any(low != high for low, high in test.ranges):
                self.rest.append(index)
                return
            for port, _ in test.ranges:
                self.filed.setdefault(port, []).append(index)
        else:
            for net in test.networks:
                key = (net.version, net.prefixlen, int(net.network_address))
                self.filed.setdefault(key, []).append(index)
                self.lengths[net.version].add(net.prefixlen)

    def candidates(self, match: Match, lists: List[List[int]]) -> int:
        """Adds the lists of rules that could cover `match`; returns the lookups made."""
        test = getattr(match, self.attr) if self.attr else None
        if test is None or test.negate or getattr(test, "dynamic", ()):
            lists.append(self.rest)
            return 1
        if self.ports:
            low, high = test.ranges[0]
            if low != high:
                lists.append(self.everything)
                return 1
            lists += (self.rest, self.filed.get(low, []))
            return 2
        lists.append(self.rest)
        first = test.networks[0]
        address = int(first.network_address)
        lookups = 1
        for length in self.lengths[first.version]:
            if length <= first.prefixlen:
                shift = first.max_prefixlen - length
                key = (first.version, length, address >> shift << shift)
                lists.append(self.filed.get(key, []))
                lookups += 1
        return lookups


def _shadow_warning(a: Rule, b: Rule) -> PolicyError:
    if a.position.path == b.position.path:
        where = f"line {a.position.line}"
    else:
        where = f"{a.position.path} line {a.position.line}"
    return PolicyError(b.position.path, b.position.line, b.position.column,
                       f'rule "{b.name}" can never match: rule "{a.name}" ({where}) '
                       "matches every packet it would", severity="warning")


def _stopped_warning(b: Rule, index: int, total: int, steps: int) -> PolicyError:
    return PolicyError(b.position.path, b.position.line, b.position.column,
                       f'rule "{b.name}" (rule {index + 1} of {total}) and the rules after it '
                       f"were not checked for rules that shadow them: the check stops after "
                       f"{steps} steps (write fewer rules, e.g. with sets)", severity="warning")


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
    if a.dynamic or b.dynamic:      # what a dynamic set holds is known only at run time
        return a == b
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


# --- lock-outs: a drop default that cuts the host off ------------------------------

def cut_off(policy: Policy, default_node: yaml.Node) -> List[PolicyError]:
    """A warning when dropping by default on input also drops replies to the host."""
    return _drop_default_warning(
        policy, default_node, lambda hook: hook.chain == "input", _accepts_established,
        "default drops input traffic and no rule accepts established connections: replies "
        "to this host's own connections will be dropped (add a first rule with ct_state: "
        "[established, related] and action: accept)")


def ipv6_cut_off(policy: Policy, default_node: yaml.Node) -> List[PolicyError]:
    """A warning when dropping IPv6 by default also drops neighbour
    discovery: the host can then no longer resolve its neighbours' link
    addresses, and IPv6 stops working after the neighbour cache expires."""
    return _drop_default_warning(
        policy, default_node,
        lambda hook: (hook.chain in ("input", "output") and hook.family in ("both", "ipv6")
                      and hook.proto in (None, "icmpv6", "ipv6-icmp")),
        _accepts_neighbour_discovery,
        "default drops IPv6 and no rule accepts neighbour discovery: IPv6 will stop working "
        "once the neighbour cache expires (add a rule with proto: icmpv6, icmp_type: "
        "[neighbour-solicitation, neighbour-advertisement] and action: accept)")


def _drop_default_warning(policy: Policy, default_node: yaml.Node, hooked, accepts,
                          message: str) -> List[PolicyError]:
    """`message` as a warning at `default`, when it drops, some hook is
    `hooked` and no rule `accepts` what must get through."""
    if policy.default.action == "accept" or not any(hooked(hook) for hook in policy.hooks):
        return []
    if any(accepts(rule) for rule in policy.rules):
        return []
    mark = default_node.start_mark
    return [PolicyError(policy.path, mark.line + 1, mark.column + 1, message,
                        severity="warning")]


def _accepts_established(rule: Rule) -> bool:
    if rule.action != "accept" or rule.rate is not None or rule.match.malformed:
        return False
    states = rule.match.ct_state
    return (states is not None and "established" in states) or not rule.match.fields()


ND_TYPES = frozenset({135, 136})        # neighbour solicitation and advertisement
# What a rule accepting neighbour discovery may test besides protocol and type:
# the kernel gives ND messages no connection (ct_state untracked).
_ND_FIELDS = frozenset({"family", "proto", "icmp_type", "icmp_code", "ct_state", "src", "dst",
                        "in", "out", "hook"})


def _accepts_neighbour_discovery(rule: Rule) -> bool:
    match = rule.match
    if rule.action != "accept" or rule.rate is not None or match.malformed:
        return False
    if not match.fields() <= _ND_FIELDS or match.family == 4:
        return False
    return ((match.proto is None or PROTO_ICMPV6 in match.proto)
            and (match.icmp_type is None or ND_TYPES <= match.icmp_type)
            and (match.icmp_code is None or 0 in match.icmp_code)
            and (match.ct_state is None or "untracked" in match.ct_state))
