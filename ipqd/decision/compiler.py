"""Rules compiled into a first-match matcher whose cost does not grow with the rule count.

`compile_policy(policy)` returns a `Matcher`; `Matcher.decide(view, now)`
returns the `Decision` of the first rule, in policy order, that matches the
packet view, or the default's. The semantics are those of
`ipqd.policy.model.Match`; tests/reference.py states them as a plain loop
and a property test checks that both always agree.

How a decision is found without looking at every rule:
1. Buckets by (family, proto, dport). For each family and each protocol
   some rule names (plus the port-carrying ones), the rules that can match
   are listed in policy order. Rules that test `dport` with a short, plain
   list of ports sit only in the lists of those ports ("exact"); the others
   (no dport test, wide or negated ranges) sit in one "wild" list. A packet
   looks up its port's exact list and the wild list.
2. Address tables. A long list is split by the address field most of its
   rules test: for each prefix length in use, the address shifted right is
   looked up in a dict giving the rules whose networks contain it.
3. Verification. The rule indexes found are walked lowest first; each rule
   runs the checks the lookup did not already prove, and a rate-limited rule
   with an empty token bucket does not match. Scanning several lists only
   ever looks at indexes below the best match found so far.

A token is taken only from the rule that finally matches, so `decide` gives
the same answer as evaluating the rules one by one.

Packets whose copy hides fields (`PacketView.hidden`: a transport header
past copy_range, behind IPv6 extension headers or IPv4 options) are decided
by a plain walk over the rules with three answers: a rule whose checks on
the fields the view has fail is skipped; one that reads a hidden field, or
has a rate, might match, and its verdict is possible; one that matches on
the fields the view has ends the walk (else the default does). When every
possible decision has the same verdict and mark, that is the decision;
otherwise the policy's `queue.undecidable` action decides (`UNDECIDABLE`).
Such packets are rare: the walk is kept plain, off the lookup path.

Flow offload (`offload_states`): each Decision also says from which conntrack
states of the deciding packet its verdict can be handed to the kernel for
the rest of the flow, because ipqd would give every later packet of the flow
(same direction, same hook) the same verdict.
"""
from __future__ import annotations

import fnmatch
import re
from functools import lru_cache
from operator import attrgetter
from typing import Callable, Collection, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

from ipqd.decision.address_set import AddressSet
from ipqd.decision.packet import MALFORMED
from ipqd.decision.rate_table import RateTable
from ipqd.policy.windows import within
from ipqd.policy.cgroup import cgroup_layout, under
from ipqd.decision.token_bucket import TokenBucket
from ipqd.policy.offload import assign_slots, layout as offload_layout
from ipqd.policy.model import (PORT_PROTOCOLS, PROTO_ICMP, PROTO_ICMPV6, AddrMatch, IfaceMatch,
                               Match, Policy, Position, RangeMatch, Rate, Rule)

Check = Callable[[object], bool]

# The decision on a packet whose hidden fields leave its verdict open: its
# rule_index and the name its RuleRef carries (the policy key that sets it).
UNDECIDABLE = -2
UNDECIDABLE_NAME = "queue.undecidable"
# A dport list with at most this many ports is expanded into exact buckets.
EXACT_PORTS_MAX = 64
# Lists longer than this get an address table.
ADDRESS_TABLE_MIN = 16
_OTHER = -1            # the protocol key of every protocol no rule names
_UNBOUNDED = 1 << 62   # a worker's copy of a dynamic set: see Matcher
_BITS = {4: 32, 6: 128}


class RuleRef(NamedTuple):
    """What a decision keeps of its rule: enough to name, count and explain
    it. The policy's own Rule objects, with their matches, can then go once
    the policy is compiled (a worker keeps no policy)."""
    name: str
    action: str
    rate: Optional[Rate]
    position: Optional[Position]     # where the rule was written


class Decision(NamedTuple):
    """What to do with a packet: the matching rule (None: the default)."""
    rule: Optional[RuleRef]
    rule_index: int
    action: str
    mark: Optional[int]
    log: bool
    # Conntrack states of the deciding packet from which this verdict holds for
    # the rest of its flow (see offload_states); empty: never offload.
    offload: frozenset = frozenset()
    # With action reject: the rule's reject_with, None for the protocol's own
    # refusal (ipqd.policy.reject.reject_kind).
    reject_with: Optional[str] = None
    # The names of the `action: log` rules above the decider that matched the
    # packet (the decision is then logged).
    log_rules: Tuple[str, ...] = ()
    # Packet-mark bits naming the rule's offload slot in a request
    # (ipqd.policy.offload.assign_slots): whose the kernel's counts are.
    offload_slot: int = 0


# ---- field checks: one small closure per tested field -----------------------
#
# A check is made once per distinct (field, value) of a policy and shared by
# every rule that tests the same (see _checks): a large policy repeats its
# protocols, ports and interfaces thousands of times.

# One attribute getter per field name, shared by the checks of every rule.
_getter: Callable[[str], Callable[[object], object]] = lru_cache(maxsize=None)(attrgetter)


def _member(attr: str, values: frozenset) -> Check:
    get = _getter(attr)
    return lambda view: get(view) in values          # None is never in values


def _in_ranges(attr: str, match: RangeMatch) -> Check:
    get = _getter(attr)
    negate = match.negate
    if _span(match) <= EXACT_PORTS_MAX:
        values = _small_set(_range_values(match))

        def check(view) -> bool:
            value = get(view)
            return value is not None and (value in values) != negate
        return check
    ranges = match.ranges

    def check_ranges(view) -> bool:
        value = get(view)
        if value is None:
            return False
        for lo, hi in ranges:
            if lo <= value <= hi:
                return not negate
        return negate
    return check_ranges


def _span(match: RangeMatch) -> int:
    return sum(max(0, hi - lo + 1) for lo, hi in match.ranges)


def _range_values(match: RangeMatch) -> set:
    return {v for lo, hi in match.ranges for v in range(lo, hi + 1)}


def _small_set(values) -> Union[tuple, frozenset]:
    """The values as something `in` can test: a tuple when they are a few (a
    tenth of a frozenset's size, as fast to search), else a frozenset."""
    return tuple(sorted(values)) if len(values) <= 4 else frozenset(values)


def prefix_tables(networks: Sequence) -> Dict[int, Tuple[Tuple[int, Collection[int]], ...]]:
    """family -> ((shift, {address >> shift of each network}), ...).

    An address lies in one of the networks when, for some prefix length in
    use, its top bits are among the networks' top bits.
    """
    by_family: Dict[int, Dict[int, set]] = {}
    for net in networks:
        shift = _BITS[net.version] - net.prefixlen
        keys = by_family.setdefault(net.version, {}).setdefault(shift, set())
        keys.add(int(net.network_address) >> shift)
    return {family: tuple((shift, _small_set(keys)) for shift, keys in sorted(shifts.items()))
            for family, shifts in by_family.items()}


def _in_networks(attr: str, match: AddrMatch) -> Check:
    get = _getter(attr)
    # (family, table) pairs, not a dict: most matches have one family, and this
    # is the check of which a policy of many address rules has one per rule.
    tables = tuple(prefix_tables(match.networks).items())
    negate = match.negate

    def check(view) -> bool:
        address = get(view)
        if address is None:
            return False
        family = view.family
        for table_family, table in tables:
            if table_family == family:
                for shift, keys in table:
                    if (address >> shift) in keys:
                        return not negate
                return negate
        return False
    return check


def _in_networks_or_sets(attr: str, match: AddrMatch, stores: Tuple[AddressSet, ...]) -> Check:
    """As _in_networks, with the dynamic sets' entries looked up as the packet
    comes (their contents change while the matcher runs); either family."""
    get = _getter(attr)
    tables = prefix_tables(match.networks)
    negate = match.negate

    def check(view) -> bool:
        address = get(view)
        if address is None:
            return False
        family = view.family
        for shift, keys in tables.get(family, ()):
            if (address >> shift) in keys:
                return not negate
        for store in stores:
            if store.contains(family, address):
                return not negate
        return negate
    return check


def _iface(attr: str, match: IfaceMatch) -> Check:
    get = _getter(attr)
    exact = frozenset(p for p in match.patterns if not _is_glob(p))
    globs = [fnmatch.translate(p) for p in match.patterns if _is_glob(p)]
    regex = re.compile("|".join(globs)) if globs else None
    negate = match.negate
    answers: Dict[str, bool] = {}   # interface names are few: remember each answer

    def check(view) -> bool:
        name = get(view)
        if name is None:
            return False
        answer = answers.get(name)
        if answer is None:
            inside = name in exact or (regex is not None and regex.match(name) is not None)
            answer = answers[name] = inside != negate
        return answer
    return check


def _is_glob(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


def _tcp_flags(mask: int, value: int) -> Check:
    def check(view) -> bool:
        flags = view.tcp_flags
        return flags is not None and (flags & mask) == value
    return check


def _mark(mask: int, value: int) -> Check:
    def check(view) -> bool:
        mark = view.mark
        return mark is not None and (mark & mask) == value
    return check


def _length(lo: int, hi: int) -> Check:
    def check(view) -> bool:
        length = view.length
        return length is not None and lo <= length <= hi
    return check


def _cgroup(paths: frozenset) -> Check:
    answers: Dict[str, bool] = {}   # the policy's paths are few: remember each answer

    def check(view) -> bool:
        path = view.cgroup
        if path is None:
            return False
        answer = answers.get(path)
        if answer is None:
            answer = answers[path] = any(under(path, a) for a in paths)
        return answer
    return check


def match_families(match: Match) -> frozenset:
    """The families a packet must have for the match to be possible at all."""
    families = frozenset({4, 6}) if match.family is None else frozenset({match.family})
    for addr in (match.src, match.dst):
        if addr is not None:
            families &= addr.families
    return families


def _checks(match: Match, skip: frozenset, made: Dict[tuple, object],
            stores: Optional[Dict[str, AddressSet]] = None
            ) -> Tuple[Tuple[Check, ...], Tuple[str, ...]]:
    """The checks for every tested field not in `skip`, cheapest first, and
    the field (policy word) each one reads.

    `made` holds the checks made so far for this policy, by maker and value:
    a check already made for an equal value is used again, and so is an
    equal tuple of fields (a policy has few).
    """
    out: List[Check] = []
    names: List[str] = []

    def add(field: str, make: Callable[..., Check], *args) -> None:
        key = (make, args)
        check = made.get(key)
        if check is None:
            check = made[key] = make(*args)
        out.append(check)
        names.append(field)

    m = match
    if m.family is not None and "family" not in skip:
        add("family", _member, "family", frozenset({m.family}))  # src/dst check their own
    if m.proto is not None and "proto" not in skip:
        add("proto", _member, "proto", m.proto)
    if m.dport is not None and "dport" not in skip:
        add("dport", _in_ranges, "dport", m.dport)
    for attr in ("hook", "ct_state", "fragment", "icmp_type", "icmp_code"):
        values = getattr(m, attr)
        if values is not None:
            add(attr, _member, attr, values)
    if m.sport is not None:
        add("sport", _in_ranges, "sport", m.sport)
    if m.tcp_flags is not None:
        add("tcp_flags", _tcp_flags, m.tcp_flags.mask, m.tcp_flags.value)
    if m.mark is not None:
        add("mark", _mark, m.mark.mask, m.mark.value)
    if m.length is not None:
        add("length", _length, *m.length)
    for attr in ("uid", "gid"):
        if getattr(m, attr) is not None:
            add(attr, _in_ranges, attr, getattr(m, attr))
    if m.cgroup is not None:
        add("cgroup", _cgroup, m.cgroup)
    for field, attr, value in (("in", "indev", m.in_), ("out", "outdev", m.out)):
        if value is not None:
            add(field, _iface, attr, value)
    for attr in ("src", "dst"):
        addr = getattr(m, attr)
        if addr is not None and addr.dynamic:
            add(attr, _in_networks_or_sets, attr, addr,
                tuple((stores or {})[name] for name in addr.dynamic))
        elif addr is not None:
            add(attr, _in_networks, attr, addr)
    fields = tuple(names)
    return tuple(out), made.setdefault(("fields", fields), fields)


def _exact_dports(match: Match) -> Optional[frozenset]:
    """The destination ports of a rule that sits only in their buckets, or None."""
    dport = match.dport
    if dport is None or dport.negate or _span(dport) > EXACT_PORTS_MAX:
        return None
    return frozenset(_range_values(dport))


# ---- compiled rules and candidate lists ------------------------------------

class _Compiled:
    """One rule, ready to verify: the checks left after the lookup, every check
    (for views the lookup cannot place) with the field each reads, its bucket
    and its decision."""
    __slots__ = ("checks", "full_checks", "fields", "bucket", "decision", "window",
                 "window_until", "window_open")

    def __init__(self, index: int, rule: Rule, default_log: bool, exact: bool,
                 made: Dict[tuple, object], stores: Dict[str, AddressSet]):
        m = rule.match
        self.checks = _checks(m, _PROVEN_EXACT if exact else _PROVEN, made, stores)[0]
        self.full_checks, self.fields = _checks(m, frozenset(), made, stores)
        # A rate kept per key is a RateTable: the same available/take, by the view's key.
        rate = rule.rate
        self.bucket = None if rate is None else RateTable(rate) if rate.per else TokenBucket(rate)
        # `time:`: whether the window is open, known until `window_until`
        # (Unix time: the next minute, the window's own granularity).
        self.window = rule.time
        self.window_until = self.window_open = None
        log = rule.log if rule.log is not None else default_log
        mark = rule.set_mark if rule.action == "accept" else None
        self.decision = Decision(RuleRef(rule.name, rule.action, rule.rate, rule.position),
                                 index, rule.action, mark, log, reject_with=rule.reject_with)

    @property
    def rule(self) -> RuleRef:
        return self.decision.rule


# What the bucket lookup proves of the rules it lists (dport: for exact rules).
_PROVEN = frozenset({"family", "proto"})
_PROVEN_EXACT = _PROVEN | {"dport"}


class _Candidates:
    """Rule indexes in policy order, optionally split by an address table."""
    __slots__ = ("order", "attr", "rest", "tables")

    def __init__(self, indexes: Sequence[int], rules: Sequence[Rule], family: int):
        self.order = tuple(sorted(set(indexes)))
        self.attr: Optional[str] = None
        self.rest: Tuple[int, ...] = self.order
        self.tables: Tuple[Tuple[int, Dict[int, Tuple[int, ...]]], ...] = ()
        if len(self.order) > ADDRESS_TABLE_MIN:
            self._split(rules, family)

    def _split(self, rules: Sequence[Rule], family: int) -> None:
        def positive(i: int, attr: str) -> bool:
            addr = getattr(rules[i].match, attr)
            return addr is not None and not addr.negate and not addr.dynamic \
                and family in addr.families
        counts = {attr: sum(positive(i, attr) for i in self.order) for attr in ("src", "dst")}
        attr = max(counts, key=counts.get)
        if counts[attr] * 2 < len(self.order):
            return
        tables: Dict[int, Dict[int, List[int]]] = {}
        rest = []
        for i in self.order:
            if not positive(i, attr):
                rest.append(i)
                continue
            networks = getattr(rules[i].match, attr).networks
            for shift, keys in prefix_tables(networks)[family]:
                table = tables.setdefault(shift, {})
                for key in keys:
                    table.setdefault(key, []).append(i)
        self.attr = attr
        self.rest = tuple(rest)
        self.tables = tuple((shift, {k: tuple(v) for k, v in table.items()})
                            for shift, table in sorted(tables.items()))


class _ProtoIndex:
    """The candidates of one (family, proto): by destination port and without."""
    __slots__ = ("ports", "wild", "no_port")

    def __init__(self, family: int, members: List[int], rules: Sequence[Rule],
                 exact: Sequence[Optional[frozenset]], carries_ports: bool):
        self.no_port = _Candidates([i for i in members if rules[i].match.dport is None],
                                   rules, family)
        ports: Dict[int, List[int]] = {}
        wild: List[int] = []
        if carries_ports:
            for i in members:
                if exact[i] is None:
                    wild.append(i)
                else:
                    for port in exact[i]:
                        ports.setdefault(port, []).append(i)
        self.ports = {port: _Candidates(ix, rules, family) for port, ix in ports.items()}
        self.wild = _Candidates(wild, rules, family)


def _index_family(family: int, plain: List[int], rules: Sequence[Rule],
                  exact: Sequence[Optional[frozenset]]) -> Dict[int, _ProtoIndex]:
    """proto -> the candidates of the well-formed rules `plain` for `family`."""
    members = [i for i in plain if family in match_families(rules[i].match)]
    named = {p for i in members if rules[i].match.proto is not None for p in rules[i].match.proto}
    keys = named | PORT_PROTOCOLS | {PROTO_ICMP, PROTO_ICMPV6}
    index = {}
    for proto in keys:
        listed = [i for i in members
                  if rules[i].match.proto is None or proto in rules[i].match.proto]
        index[proto] = _ProtoIndex(family, listed, rules, exact, proto in PORT_PROTOCOLS)
    others = [i for i in members if rules[i].match.proto is None]
    index[_OTHER] = _ProtoIndex(family, others, rules, exact, False)
    return index


# ---- the matcher ------------------------------------------------------------

class Matcher:
    """A compiled policy. `decide` is the packet path; the rest is bookkeeping."""

    def __init__(self, policy: Policy):
        self.path = policy.path                     # for explain: the policy itself is not kept
        default = self.default = policy.default
        rules = policy.rules
        exact = [_exact_dports(rule.match) for rule in rules]
        made: Dict[tuple, object] = {}
        # The dynamic sets, empty until their entries come (Engine.change_set).
        # Unbounded here: the supervisor holds each set to its max, and a
        # change it made must never fail in a worker.
        self.sets: Dict[str, AddressSet] = {
            name: AddressSet(name, _UNBOUNDED)
            for name in {s.name for s in policy.sets} | policy.dynamic_sets()}
        self._compiled = [_Compiled(i, rule, default.log, exact[i] is not None, made, self.sets)
                          for i, rule in enumerate(rules)]
        self._none = len(self._compiled)             # "no rule matched" as an index
        self.rated = False                           # see decide
        # `cgroup:` rules: how the output hook numbers cgroups in the mark.
        self.cgroups = cgroup_layout(policy.queue.offload, policy.queue.cgroups)
        # Added to `now` to give Unix time, for `time:` windows: the daemon's
        # clock is monotonic (the worker sets it); explain passes Unix time.
        self.clock_offset = 0.0
        self._hits = [0] * len(self._compiled)
        self._default_hits = 0
        # Bytes decided, by rule index: the engine adds each packet's length
        # where the decision's index points, so the default (-1) is the last
        # entry and the undecidable action (-2) the one before it.
        self.bytes_by_index = [0] * (len(self._compiled) + 2)
        self._names = tuple(rule.name for rule in rules)     # by index: for carry_over
        # Single buckets carry over a reload; tables by key start empty.
        self._bucketed = tuple(c for c in self._compiled if type(c.bucket) is TokenBucket)
        self._tables = tuple(c.bucket for c in self._compiled if type(c.bucket) is RateTable)
        self._default = Decision(None, -1, default.action,
                                 default.set_mark if default.action == "accept" else None,
                                 default.log, reject_with=default.reject_with)
        action = self.undecidable = policy.queue.undecidable
        self._undecidable = Decision(RuleRef(UNDECIDABLE_NAME, action, None, None),
                                     UNDECIDABLE, action, None, default.log)
        self._undecidable_hits = 0
        # `action: log` rules decide nothing: they stay out of the lookup, and
        # those above the decider are checked one by one (_logged).
        plain = [i for i, rule in enumerate(rules)
                 if not rule.match.malformed and rule.action != "log"]
        self._plain = tuple(plain)
        self._malformed = tuple(i for i, rule in enumerate(rules)
                                if rule.match.malformed and rule.action != "log")
        self._log_plain = tuple(i for i, rule in enumerate(rules)
                                if not rule.match.malformed and rule.action == "log")
        self._log_malformed = tuple(i for i, rule in enumerate(rules)
                                    if rule.match.malformed and rule.action == "log")
        self._by_family = {family: _index_family(family, plain, rules, exact) for family in (4, 6)}
        self._offload(policy)
        fields = set(policy.fields())
        if "cgroup" in fields:
            fields.add("mark")      # the cgroup is in the mark: cache keys must hold it
        if self._malformed:
            fields.add(MALFORMED)
        self.fields = frozenset(fields)

    def _offload(self, policy: Policy) -> None:
        self.offload_slots: Dict[str, int] = {}     # rule name -> its slot value
        self.offload_other = 0                      # the value "other" (0: no slots)
        # The kernel counts per slot since the hooks were installed (the
        # daemon's start), reloads or not: each value's first owner since
        # then, and the values a reload gave to another rule ("mixed": their
        # counts belong to no single rule).
        self.slot_owners: Dict[int, str] = {}
        self.slot_mixed: set = set()
        if policy.queue.offload.mode == "off":
            return
        per_rule, default = offload_states(policy.rules, policy.default)
        bits = offload_layout(policy.queue.offload, {hook.chain for hook in policy.hooks})
        names = [c.rule.name for c, states in zip(self._compiled, per_rule) if states]
        slots = self.offload_slots = assign_slots(names + ["default"] * bool(default), bits)
        self.offload_other = bits.other if bits is not None else 0
        self.slot_owners = {v: name for name, v in slots.items() if v and v != self.offload_other}
        request = bits.request_value if bits is not None else (lambda value: 0)
        for c, states in zip(self._compiled, per_rule):
            if states:
                c.decision = c.decision._replace(offload=states,
                                                 offload_slot=request(slots[c.rule.name]))
        if default:
            self._default = self._default._replace(offload=default,
                                                   offload_slot=request(slots["default"]))

    # -- the packet path --

    def decide(self, view, now: float = 0.0) -> Decision:
        """The decision for one packet view; counts it and takes a rate token.
        A view whose copy hid fields some rule reads is walked instead
        (`_decide_hidden`).

        Afterwards `rated` says whether a rate-limited rule matched the view's
        fields (taking part in the decision whether it had tokens or not): such
        a decision depends on the time and must not be cached."""
        self.rated = False
        if view.malformed:
            i = self._scan_full(self._malformed, view, now)
        elif view.hidden and not view.hidden.isdisjoint(self.fields):
            return self._decide_hidden(view)
        else:
            by_proto = self._by_family.get(view.family)
            if by_proto is None or view.proto is None:
                i = self._scan_full(self._plain, view, now)
            else:
                i = self._lookup(by_proto.get(view.proto) or by_proto[_OTHER], view, now)
        if i == self._none:
            self._default_hits += 1
            decision = self._default
        else:
            c = self._compiled[i]
            if c.bucket is not None:
                c.bucket.take(now, view)
            self._hits[i] += 1
            decision = c.decision
        logs = self._log_malformed if view.malformed else self._log_plain
        if logs and logs[0] < i:
            return self._logged(logs, i, view, now, decision)
        return decision

    def _logged(self, logs: Sequence[int], limit: int, view, now: float,
                decision: Decision) -> Decision:
        """`decision`, logged and naming the log rules below `limit` that match.
        Such a decision is not cached (`rated`): each packet counts its log rules."""
        compiled = self._compiled
        names = []
        for j in logs:
            if j >= limit:
                break
            c = compiled[j]
            for check in c.full_checks:
                if not check(view):
                    break
            else:
                if c.window is not None:
                    self.rated = True
                    if not self._open(c, now):
                        continue
                if c.bucket is not None:
                    self.rated = True
                    if not c.bucket.available(now, view):
                        continue
                    c.bucket.take(now, view)
                self._hits[j] += 1
                names.append(c.rule.name)
        if not names:
            return decision
        self.rated = True
        return decision._replace(log=True, log_rules=tuple(names))

    def _lookup(self, index: _ProtoIndex, view, now: float) -> int:
        dport = view.dport
        if dport is None:
            return self._first(index.no_port, view, now, self._none)
        best = self._none
        exact = index.ports.get(dport)
        if exact is not None:
            best = self._first(exact, view, now, best)
        return self._first(index.wild, view, now, best)

    def _first(self, cands: _Candidates, view, now: float, limit: int) -> int:
        """The lowest index below `limit` of a candidate that matches, else `limit`."""
        if cands.attr is None:
            return self._scan(cands.order, view, now, limit)
        best = self._scan(cands.rest, view, now, limit)
        address = getattr(view, cands.attr)
        for shift, table in cands.tables:
            hits = table.get(address >> shift)
            if hits is not None:
                best = self._scan(hits, view, now, best)
        return best

    def _scan(self, order: Sequence[int], view, now: float, limit: int) -> int:
        compiled = self._compiled
        for i in order:
            if i >= limit:
                return limit
            c = compiled[i]
            for check in c.checks:
                if not check(view):
                    break
            else:
                if c.bucket is None and c.window is None:
                    return i
                self.rated = True
                if (c.window is None or self._open(c, now)) and \
                        (c.bucket is None or c.bucket.available(now, view)):
                    return i
        return limit

    def _scan_full(self, order: Sequence[int], view, now: float) -> int:
        """Rule by rule with every check: malformed packets and odd views."""
        compiled = self._compiled
        for i in order:
            c = compiled[i]
            for check in c.full_checks:
                if not check(view):
                    break
            else:
                if c.bucket is None and c.window is None:
                    return i
                self.rated = True
                if (c.window is None or self._open(c, now)) and \
                        (c.bucket is None or c.bucket.available(now, view)):
                    return i
        return self._none

    def _open(self, c: _Compiled, now: float) -> bool:
        """Whether rule `c`'s time window is open at `now` (+ clock_offset:
        Unix time). Worked out once a minute: windows are in whole minutes,
        and so are the offsets of the time zones in use."""
        wall = now + self.clock_offset
        until = c.window_until
        if until is None or wall >= until or wall < until - 60.0:
            c.window_open = within(c.window, wall)
            c.window_until = (wall // 60.0 + 1.0) * 60.0
        return c.window_open

    def _decide_hidden(self, view) -> Decision:
        """The decision for a view missing fields some rule reads (see the
        module's docstring). Takes no rate token: a rule that only might
        match does not spend its rate."""
        hidden = view.hidden
        compiled = self._compiled
        possible: List[int] = []            # rule indexes, self._none for the default
        logs = self._log_plain
        for i in self._plain:
            c = compiled[i]
            certain = c.bucket is None and c.window is None
            for check, field in zip(c.full_checks, c.fields):
                if field in hidden:
                    certain = False
                elif not check(view):
                    break                   # cannot match, whatever it hides
            else:
                possible.append(i)
                if certain:
                    break
        else:
            possible.append(self._none)
        decisions = [self._default if i == self._none else compiled[i].decision
                     for i in possible]
        if logs and logs[0] < possible[0]:
            # Only the log rules above every possible decider, and only where
            # they certainly match: a rule reading a hidden field might not.
            certain_logs = [j for j in logs if j < possible[0] and compiled[j].bucket is None
                            and compiled[j].window is None
                            and hidden.isdisjoint(compiled[j].fields)]
            logged = self._logged(certain_logs, possible[0], view, 0.0, decisions[0])
            decisions[0] = logged
        last = decisions[-1]
        if any(d.action != last.action or d.mark != last.mark or d.reject_with != last.reject_with
               for d in decisions):
            self._undecidable_hits += 1
            if decisions[0].log_rules:
                return self._undecidable._replace(log=True, log_rules=decisions[0].log_rules)
            return self._undecidable
        # Counted for the rule that matches on the fields the view has (or the default).
        self.tally(possible[-1] if possible[-1] != self._none else -1)
        if len(decisions) == 1:
            return last                     # no rule before it could match: exact
        if decisions[0].log_rules:
            last = last._replace(log_rules=decisions[0].log_rules)
        # Which rule decided is not known: nothing that rests on it (offload),
        # and logged if any of them logs.
        return last._replace(offload=frozenset(), log=any(d.log for d in decisions))

    # -- counters --

    def rate_stats(self) -> Dict[str, int]:
        """The rates kept per key: keys tracked now, and keys forgotten to
        stay within `keys` (early: before their bucket had refilled)."""
        return {"rate_keys": sum(len(t) for t in self._tables),
                "rate_evicted": sum(t.evicted for t in self._tables),
                "rate_evicted_early": sum(t.evicted_early for t in self._tables)}

    def tally(self, rule_index: int, count: int = 1, size: int = 0) -> None:
        """Count decisions made without `decide` (verdict cache hits), and
        their `size` in bytes; -1 is the default."""
        if rule_index < 0:
            self._default_hits += count
        else:
            self._hits[rule_index] += count
        self.bytes_by_index[rule_index] += size

    def counters(self) -> dict:
        """{"rules": {name: {hits, accepted, dropped, bytes}}, "default": {...},
        "undecidable": {...}} (the queue.undecidable action's), in rule order."""
        rules: Dict[str, dict] = {}
        sizes = self.bytes_by_index
        for c, hits, size in zip(self._compiled, self._hits, sizes):
            entry = rules.setdefault(c.rule.name, dict(_ZERO))
            _add_hits(entry, c.rule.action, hits, size)
        default = dict(_ZERO)
        _add_hits(default, self._default.action, self._default_hits, sizes[-1])
        undecidable = dict(_ZERO)
        _add_hits(undecidable, self._undecidable.action, self._undecidable_hits, sizes[-2])
        return {"rules": rules, "default": default, "undecidable": undecidable,
                "offload_slots": dict(self.offload_slots), "offload_other": self.offload_other,
                "offload_mixed": sorted(self.slot_mixed)}

    def carry_over(self) -> dict:
        """What a successor in another process takes over (`take_over`): hit
        counts and rate buckets by rule name. Plain data, for a pipe; it is
        on the hand-over's path, so only what is not zero."""
        hits: Dict[str, int] = {}
        sizes: Dict[str, int] = {}
        for name, count, size in zip(self._names, self._hits, self.bytes_by_index):
            if count:
                hits[name] = hits.get(name, 0) + count
            if size:
                sizes[name] = sizes.get(name, 0) + size
        buckets: Dict[str, tuple] = {}
        for c in self._bucketed:
            if c.rule.name not in buckets:
                buckets[c.rule.name] = (c.rule.rate, c.bucket.tokens, c.bucket.stamp)
        return {"hits": hits, "default": self._default_hits, "buckets": buckets,
                "undecidable": self._undecidable_hits, "bytes": sizes,
                "slot_owners": dict(self.slot_owners), "slot_mixed": sorted(self.slot_mixed),
                "default_bytes": self.bytes_by_index[-1],
                "undecidable_bytes": self.bytes_by_index[-2]}

    def take_over(self, state: dict) -> None:
        """Start from a predecessor's `carry_over`: each name's hits go to the
        first rule of that name, a bucket carries over when its rate is
        unchanged."""
        names = self._names
        sizes = state.get("bytes", {})          # none from an older ipqd
        if state["hits"] or sizes:
            # the first index of each name: reversed, so that it is written last
            first = dict(zip(reversed(names), range(len(names) - 1, -1, -1)))
            for name, count in state["hits"].items():
                index = first.get(name)
                if index is not None:
                    self._hits[index] += count
            for name, size in sizes.items():
                index = first.get(name)
                if index is not None:
                    self.bytes_by_index[index] += size
        self.bytes_by_index[-1] += state.get("default_bytes", 0)
        owners = dict(state.get("slot_owners", {}))
        self.slot_mixed.update(state.get("slot_mixed", ()))
        for value, name in self.slot_owners.items():
            if owners.setdefault(value, name) != name:
                self.slot_mixed.add(value)
        self.slot_owners = owners
        self.bytes_by_index[-2] += state.get("undecidable_bytes", 0)
        for c in self._bucketed:
            carried = state["buckets"].get(c.rule.name)
            if carried is not None and carried[0] == c.rule.rate:
                c.bucket.resume(carried[1], carried[2])
        self._default_hits += state["default"]
        self._undecidable_hits += state.get("undecidable", 0)    # none from an older ipqd


_ZERO = {"hits": 0, "accepted": 0, "dropped": 0, "bytes": 0}


def _add_hits(entry: dict, action: str, hits: int, size: int) -> None:
    entry["hits"] += hits
    if action == "accept":
        entry["accepted"] += hits
    elif action != "log":           # drop or reject; a log rule's hits decide nothing
        entry["dropped"] += hits
    entry["bytes"] += size


# ---- flow offload -----------------------------------------------------------
#
# A decision may be offloaded when every later packet P' of the deciding
# packet P's flow, in the same direction at the same hook, would get the same
# decision. The kernel rules (ipqd.kernel.hooks) apply an offloaded verdict only to
# packets whose conntrack state is new or established (a related ICMP error
# carries its master flow's connmark; invalid and untracked packets have no
# connmark), so P' is new or established: established only, once P is.
# P' shares P's flow-invariant fields. Conntrack defragments, and validates
# the headers of the packets it tracks, so P' is whole and well formed.
#
# Fields a flow keeps: addresses, ports, protocol, family, interfaces (routes
# are taken not to change under a flow) and the hook. The others may differ
# from packet to packet: TCP flags, length, mark, fragment, ICMP type and
# code, and the owner (packets the kernel sends for a socket, such as a reset
# after close, have none).

FLOW_FIELDS = frozenset({"family", "proto", "src", "dst", "sport", "dport", "in", "out", "hook"})
_LATER = {"established": frozenset({"established"}),
          "new": frozenset({"new", "established"})}
# Comparing rules with earlier ones is quadratic; past this budget a decision
# is simply not offloaded.
OFFLOAD_COMPARISONS = 200_000


def offload_states(rules: Sequence[Rule], default) -> Tuple[Tuple[frozenset, ...], frozenset]:
    """For each rule, and for the default, the states ("new", "established")
    of a deciding packet from which its verdict holds for the rest of the flow.

    Conservative: a state is only given when it is certain. Rule i qualifies
    from state s when it cannot miss a later packet (no per-packet field, no
    rate, its ct_state holds every later state), does nothing per packet (no
    log, no set_mark, not `offload: false`), and no earlier rule can match a
    later packet that P did not match: an earlier rule that tests only flow
    fields and states it tells apart the same way for every later packet,
    or one that shares no packet with rule i on flow fields.
    """
    out = []
    budget = [OFFLOAD_COMPARISONS]
    unsafe = {s: [] for s in _LATER}      # earlier rules a later packet might match
    for i, rule in enumerate(rules):
        states = set()
        if _offloadable_itself(rule, default.log):
            for state, later in _LATER.items():
                if _holds_for(rule.match.ct_state, later) and \
                        _all_disjoint(rule.match, unsafe[state], budget):
                    states.add(state)
        out.append(frozenset(states))
        for state, later in _LATER.items():
            # A log rule that a later packet matches would log it.
            if not _stable(rule, later) or rule.action == "log":
                unsafe[state].append(rule.match)
    plain = not default.log and default.set_mark is None and default.action != "reject"
    default_states = frozenset(s for s in _LATER if plain and not unsafe[s])
    return tuple(out), default_states


def _offloadable_itself(rule: Rule, default_log: bool) -> bool:
    m = rule.match
    logs = rule.log if rule.log is not None else default_log
    # A reject is answered per packet: the kernel's REJECT sends each refusal.
    return (rule.offload and rule.rate is None and rule.time is None and not logs
            and rule.set_mark is None
            and rule.action not in ("reject", "log") and not m.malformed
            and m.fields() <= FLOW_FIELDS | {"ct_state"}
            # a dynamic set's answer may change within a flow: neither the rule
            # nor anything it could shadow is offloaded
            and not m.dynamic_sets())


def _holds_for(ct_state: Optional[frozenset], later: frozenset) -> bool:
    return ct_state is None or later <= ct_state


def _stable(rule: Rule, later: frozenset) -> bool:
    """True when the rule matches every later packet or none, as it did the first."""
    m = rule.match
    if m.malformed:
        return True             # later packets are well formed (conntrack checks them)
    if rule.rate is not None or rule.time is not None or \
            not m.fields() <= FLOW_FIELDS | {"ct_state"} or m.dynamic_sets():
        return False
    ct = m.ct_state
    return ct is None or later <= ct or not later & ct


def _all_disjoint(match: Match, earlier: List[Match], budget: List[int]) -> bool:
    for other in earlier:
        budget[0] -= 1
        if budget[0] < 0 or not disjoint(other, match):
            return False
    return True


def disjoint(a: Match, b: Match) -> bool:
    """True when no packet can match both, by their flow fields alone."""
    if not match_families(a) & match_families(b):
        return True
    for attr in ("proto", "hook"):
        x, y = getattr(a, attr), getattr(b, attr)
        if x is not None and y is not None and not x & y:
            return True
    for attr in ("sport", "dport"):
        if _ranges_apart(getattr(a, attr), getattr(b, attr)):
            return True
    for attr in ("src", "dst"):
        if _networks_apart(getattr(a, attr), getattr(b, attr)):
            return True
    for attr in ("in_", "out"):
        x, y = getattr(a, attr), getattr(b, attr)
        if x is not None and y is not None and not x.negate and not y.negate and \
                not any(_is_glob(p) for p in x.patterns + y.patterns) and \
                not set(x.patterns) & set(y.patterns):
            return True
    return False


def _ranges_apart(x: Optional[RangeMatch], y: Optional[RangeMatch]) -> bool:
    if x is None or y is None:
        return False
    if x.negate and y.negate:
        return False
    if x.negate or y.negate:            # every plain value among the negated ranges
        plain, negated = (y, x) if x.negate else (x, y)
        return all(any(nlo <= lo and hi <= nhi for nlo, nhi in negated.ranges)
                   for lo, hi in plain.ranges)
    return not any(lo <= yhi and ylo <= hi for lo, hi in x.ranges for ylo, yhi in y.ranges)


def _networks_apart(x: Optional[AddrMatch], y: Optional[AddrMatch]) -> bool:
    if x is None or y is None or x.negate or y.negate or x.dynamic or y.dynamic:
        return False
    return not any(n.version == m.version and n.overlaps(m)
                   for n in x.networks for m in y.networks)


def compile_policy(policy: Policy) -> Matcher:
    """The policy's rules as a Matcher. Pure: reads nothing but `policy`."""
    return Matcher(policy)
