"""Random policies and packet views for the property tests (hypothesis
strategies and seeded generators), and the check that the compiled matcher
agrees with the rule-by-rule reference."""
from __future__ import annotations

import ipaddress
import random

from hypothesis import strategies as st

from ipqd.decision.address_set import parse_entry
from ipqd.decision.compiler import compile_policy
from ipqd.decision.packet import PacketView
from ipqd.policy.model import (CT_STATES, FRAGMENTS, AddrMatch, Default, IfaceMatch, MarkMatch,
                               Match, Policy, RangeMatch, Rate, Rule, TcpFlagsMatch, TimeWindow)
from ipqd.policy.reject import reject_kind
from reference import Reference

# A small universe, so that rules and packets collide often.
V4 = [int(ipaddress.IPv4Address(a)) for a in
      ("10.0.0.1", "10.0.0.2", "10.0.1.1", "192.168.1.10", "172.16.0.1")]
V6 = [int(ipaddress.IPv6Address(a)) for a in
      ("fd00::1", "fd00::2", "fd00:1::1", "2001:db8::1")]
NETWORKS = [ipaddress.ip_network(n) for n in (
    "10.0.0.0/8", "10.0.0.0/24", "10.0.0.1/32", "10.0.1.0/24", "192.168.0.0/16",
    "0.0.0.0/0", "172.16.0.0/12", "fd00::/16", "fd00::/64", "fd00::1/128",
    "2001:db8::/32", "::/0")]
PORTS = [0, 22, 53, 80, 443, 1024, 5353, 40000, 65535]
PORT_RANGES = [(22, 22), (53, 53), (80, 80), (443, 443), (1024, 65535), (0, 1023),
               (440, 450), (22, 80), (5353, 5353)]
PROTOS = [1, 6, 17, 58, 132, 136, 47]
IFACES = ["eth0", "eth1", "wlan0", "lo"]
IFACE_PATTERNS = ["eth0", "eth*", "wlan?", "lo", "e[t]h1", "ppp*"]
MARKS = [0, 0x10, 0x11, 0xFF, 0x100]
LENGTHS = [20, 40, 64, 100, 576, 1200, 1500, 9000]
ICMP_TYPES = [0, 3, 8, 11, 128, 129, 135]
CGROUPS = ["system.slice", "system.slice/nginx.service", "system.slice/nginx", "user.slice"]


def maybe(strategy, none_weight: int = 3):
    return st.one_of(*([st.none()] * none_weight), strategy)


def small_set(values, max_size=3):
    return st.frozensets(st.sampled_from(values), min_size=1, max_size=max_size)


def ranges(values):
    return st.builds(RangeMatch, st.lists(st.sampled_from(values), min_size=1, max_size=3)
                     .map(tuple), st.booleans())


# Dynamic sets: their names in matches, their entries drawn apart and changed
# between packets (assert_agrees).
DYNAMIC = ["dyn_a", "dyn_b"]
static_addr_matches = st.builds(AddrMatch, st.lists(st.sampled_from(NETWORKS), min_size=1,
                                                    max_size=3).map(tuple), st.booleans())
dynamic_addr_matches = st.builds(AddrMatch, st.lists(st.sampled_from(NETWORKS), max_size=2)
                                 .map(tuple), st.booleans(),
                                 st.lists(st.sampled_from(DYNAMIC), min_size=1, max_size=2,
                                          unique=True).map(tuple))
addr_matches = st.one_of(static_addr_matches, static_addr_matches, dynamic_addr_matches)
iface_matches = st.builds(IfaceMatch, st.lists(st.sampled_from(IFACE_PATTERNS), min_size=1,
                                               max_size=2).map(tuple), st.booleans())
FLAG_MASKS = [(0x02, 0x02), (0x12, 0x02), (0x12, 0x12), (0x17, 0x02), (0x04, 0x04),
              (0xFF, 0x00), (0x01, 0x00)]
MARK_MATCHES = [(0x10, 0xFF), (0x10, 0x10), (0, 0xFFFFFFFF), (0x100, 0x100),
                (0x11, 0xFFFFFFFF)]
LENGTH_RANGES = [(0, 100), (40, 1500), (1000, 65535), (64, 64)]
tcp_flags = st.sampled_from(FLAG_MASKS).map(lambda mv: TcpFlagsMatch(*mv))
marks = st.sampled_from(MARK_MATCHES).map(lambda vm: MarkMatch(*vm))
lengths = st.sampled_from(LENGTH_RANGES)


MATCH_FIELDS = dict(
    family=maybe(st.sampled_from([4, 6])),
    proto=maybe(small_set(PROTOS), 2),
    src=maybe(addr_matches),
    dst=maybe(addr_matches),
    sport=maybe(ranges(PORT_RANGES), 5),
    dport=maybe(ranges(PORT_RANGES), 2),
    in_=maybe(iface_matches, 5),
    out=maybe(iface_matches, 6),
    hook=maybe(small_set(range(5)), 5),
    icmp_type=maybe(small_set(ICMP_TYPES), 8),
    icmp_code=maybe(small_set([0, 1]), 8),
    tcp_flags=maybe(tcp_flags, 6),
    ct_state=maybe(small_set(CT_STATES), 6),
    uid=maybe(ranges([(0, 0), (1000, 1000), (0, 999)]), 8),
    gid=maybe(ranges([(0, 0), (100, 100)]), 8),
    mark=maybe(marks, 6),
    length=maybe(lengths, 6),
    fragment=maybe(small_set(FRAGMENTS), 6),
    cgroup=maybe(small_set(CGROUPS), 8),
    malformed=st.sampled_from([False] * 9 + [True]),
)
MATCHES = st.builds(Match, **MATCH_FIELDS)
# Most rules test src: long lists get address tables.
MATCHES_BY_ADDRESS = st.builds(Match, **dict(MATCH_FIELDS, src=maybe(addr_matches, 1)))
ACTIONS = st.sampled_from(["accept", "drop", "reject", "log"])
# tcp-reset only where the loader allows it (proto tcp alone); see _reject_with.
ICMP_REFUSALS = [None, "port-unreachable", "admin-prohibited", "host-unreachable"]
SET_MARKS = st.sampled_from([None, 7])
LOGS = st.sampled_from([None, True, False])
DEFAULTS = st.builds(Default, action=ACTIONS, log=st.booleans(),
                     reject_with=st.sampled_from(ICMP_REFUSALS))


def _reject_with(choose, match: Match, action: str):
    """A reject_with the loader would take for this rule (None unless reject)."""
    if action != "reject":
        return None
    kinds = ICMP_REFUSALS + (["tcp-reset"] if match.proto == frozenset({6}) else [])
    return choose(kinds)


# Rates, one bucket or one per key; few keys, so that the tables evict.
RATES = [None] * 8 + [
    Rate(2.0, 2, "2/second burst 2"),
    Rate(1.0, 2, "1/second burst 2 per src", per=(("src", 32, 128),), keys=3),
    Rate(1.0, 1, "1/second per src/24/64,dport", per=(("src", 24, 64), ("dport", 0, 0)), keys=2),
    Rate(0.5, 2, "1/2s per dst/8/16", per=(("dst", 8, 16),), keys=4),
]


# Time windows: office hours in two zones, a night across midnight, weekends.
WINDOWS = [None] * 6 + [
    TimeWindow(frozenset(range(5)), 9 * 60, 17 * 60, "Europe/Paris"),
    TimeWindow(frozenset({4, 5}), 22 * 60, 6 * 60, "UTC"),
    TimeWindow(frozenset({5, 6}), 0, 24 * 60, "America/New_York"),
    TimeWindow(frozenset(range(7)), 12 * 60 + 30, 13 * 60, "Asia/Kathmandu"),
]


def _rule(i: int, match: Match, action: str, set_mark, log, choose, rates: bool = False) -> Rule:
    return Rule(name=f"r{i}", match=match, action=action, set_mark=set_mark, log=log,
                reject_with=_reject_with(choose, match, action),
                rate=choose(RATES) if rates else None, time=choose(WINDOWS) if rates else None)


@st.composite
def policies(draw, max_rules: int = 50, address_bias: bool = False, rates: bool = False):
    count = draw(st.integers(0, max_rules))
    match_strategy = MATCHES_BY_ADDRESS if address_bias else MATCHES

    def choose(kinds):
        return draw(st.sampled_from(kinds))
    rules = tuple(_rule(i, draw(match_strategy), draw(ACTIONS), draw(SET_MARKS), draw(LOGS),
                        choose, rates)
                  for i in range(count))
    default = draw(DEFAULTS)
    if default.action == "log":
        default = Default("drop", default.log)
    elif default.action != "reject":
        default = Default(default.action, default.log)
    return Policy(path="property.yaml", rules=rules, default=default)


@st.composite
def views(draw):
    """Views as parse makes them: ports only on port protocols and first fragments."""
    meta = dict(
        hook=draw(st.sampled_from([None, 0, 1, 2, 3, 4])),
        indev=draw(st.sampled_from([None] + IFACES)),
        outdev=draw(st.sampled_from([None] + IFACES)),
        mark=draw(st.sampled_from(MARKS)),
        uid=draw(st.sampled_from([None, 0, 1000, 500])),
        gid=draw(st.sampled_from([None, 0, 100])),
        ct_state=draw(st.sampled_from((None,) + CT_STATES)),
        cgroup=draw(st.sampled_from([None] + CGROUPS + ["system.slice/nginx.service/x"])),
    )
    family = draw(st.sampled_from([4, 6]))
    addresses = V4 if family == 4 else V6
    fields = dict(family=family, proto=draw(st.sampled_from(PROTOS + [59, 50])),
                  src=draw(st.sampled_from(addresses)), dst=draw(st.sampled_from(addresses)),
                  length=draw(st.sampled_from(LENGTHS)),
                  fragment=draw(st.sampled_from(FRAGMENTS)))
    if draw(st.integers(0, 9)) == 0:
        # malformed: what was read before the fault stays, L4 never does
        fields["malformed"] = True
        fields["reason"] = "test"
        for name in ("family", "proto", "src", "dst", "length", "fragment"):
            if draw(st.booleans()):
                fields[name] = None
        if fields["family"] is None:
            fields["src"] = fields["dst"] = None
    elif fields["fragment"] != "not-first":
        proto = fields["proto"]
        if proto in (6, 17, 132, 136):
            fields["sport"] = draw(st.sampled_from(PORTS))
            fields["dport"] = draw(st.sampled_from(PORTS))
        if proto == 6:
            fields["tcp_flags"] = draw(st.sampled_from([0x02, 0x12, 0x10, 0x04, 0x11, 0xFF, 0]))
        if (family, proto) in ((4, 1), (6, 58)):
            fields["icmp_type"] = draw(st.sampled_from(ICMP_TYPES))
            fields["icmp_code"] = draw(st.sampled_from([0, 1, 2]))
    return PacketView.build(**meta, **fields)


def random_match(rng: random.Random, address_bias: bool = False) -> Match:
    """A Match drawn from the same universe by plain `random` (fast for big policies)."""
    def some(chance, make):
        return make() if rng.random() < chance else None

    def pick_set(values):
        return frozenset(rng.sample(values, rng.randint(1, min(3, len(values)))))

    def pick_ranges(values):
        return RangeMatch(tuple(rng.choice(values) for _ in range(rng.randint(1, 3))),
                          rng.random() < 0.3)

    def pick_addr():
        if rng.random() < 0.2:
            return AddrMatch(tuple(rng.choice(NETWORKS) for _ in range(rng.randint(0, 2))),
                             rng.random() < 0.25, tuple(rng.sample(DYNAMIC, rng.randint(1, 2))))
        return AddrMatch(tuple(rng.choice(NETWORKS) for _ in range(rng.randint(1, 3))),
                         rng.random() < 0.25)

    def pick_iface():
        return IfaceMatch(tuple(rng.sample(IFACE_PATTERNS, rng.randint(1, 2))),
                          rng.random() < 0.3)

    return Match(
        family=some(0.25, lambda: rng.choice([4, 6])),
        proto=some(0.4, lambda: pick_set(PROTOS)),
        src=some(0.8 if address_bias else 0.3, pick_addr),
        dst=some(0.25, pick_addr),
        sport=some(0.15, lambda: pick_ranges(PORT_RANGES)),
        dport=some(0.4, lambda: pick_ranges(PORT_RANGES)),
        in_=some(0.15, pick_iface),
        out=some(0.1, pick_iface),
        hook=some(0.15, lambda: pick_set(list(range(5)))),
        icmp_type=some(0.1, lambda: pick_set(ICMP_TYPES)),
        icmp_code=some(0.1, lambda: pick_set([0, 1])),
        tcp_flags=some(0.12, lambda: TcpFlagsMatch(*rng.choice(FLAG_MASKS))),
        ct_state=some(0.12, lambda: pick_set(list(CT_STATES))),
        uid=some(0.08, lambda: pick_ranges([(0, 0), (1000, 1000), (0, 999)])),
        gid=some(0.08, lambda: pick_ranges([(0, 0), (100, 100)])),
        mark=some(0.12, lambda: MarkMatch(*rng.choice(MARK_MATCHES))),
        length=some(0.12, lambda: rng.choice(LENGTH_RANGES)),
        fragment=some(0.12, lambda: pick_set(list(FRAGMENTS))),
        cgroup=some(0.06, lambda: pick_set(CGROUPS)),
        malformed=rng.random() < 0.1,
    )


def random_policy(rng: random.Random, count: int, address_bias: bool = False,
                  actions=("accept", "drop"), rates: bool = False) -> Policy:
    rules = tuple(_rule(i, random_match(rng, address_bias), rng.choice(actions),
                        rng.choice([None, 7]), rng.choice([None, True, False]), rng.choice,
                        rates)
                  for i in range(count))
    default = rng.choice([a for a in actions if a != "log"])
    return Policy(path="random.yaml", rules=rules, default=Default(action=default))


def assert_agrees(policy, packets, seed: int = 0, step: float = 1.0, start: float = 0.0):
    """The matcher and the reference agree on every packet, while the
    dynamic sets' entries change between packets (the same on both sides)."""
    matcher = compile_policy(policy)
    contents = {name: set() for name in DYNAMIC}
    reference = Reference(policy, contents)
    rng = random.Random(seed)
    logged = 0                      # log rules' hits: counted, but decide nothing
    for n, view in enumerate(packets):
        for _ in range(rng.choice([0, 0, 1, 2])):
            name, net = rng.choice(DYNAMIC), rng.choice(NETWORKS)
            store = matcher.sets.get(name)
            entry = parse_entry(str(net))
            if net in contents[name]:
                contents[name].discard(net)
                if store is not None:
                    store.discard(entry)
            else:
                contents[name].add(net)
                if store is not None:
                    store.add(entry)
        decision = matcher.decide(view, now=start + n * step)
        expected_index, expected_action = reference.decide(view, now=start + n * step)
        assert decision.rule_index == expected_index, (view, policy.rules[:expected_index + 1])
        assert decision.action == expected_action
        assert decision.log_rules == tuple(policy.rules[j].name for j in reference.logged)
        logged += len(reference.logged)
        if expected_action == "reject":
            assert reject_kind(decision.reject_with, view.proto, view.hook) == \
                reference.refusal(expected_index, view)
    total = sum(c["hits"] for c in matcher.counters()["rules"].values())
    assert total + matcher.counters()["default"]["hits"] == len(packets) + logged
