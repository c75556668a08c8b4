"""The conservative "rule A matches every packet rule B would" test, field by field."""
from __future__ import annotations

import ipaddress
import random

import pytest

from ipqd.policy._limits import MAX_SHADOW_STEPS
from ipqd.policy._lint import covers, shadowed
from ipqd.policy.loader import loads
from ipqd.policy.model import AddrMatch, IfaceMatch, MarkMatch, Match, Position, RangeMatch, \
    Rate, Rule, TcpFlagsMatch

net = ipaddress.ip_network
TCP, UDP = 6, 17


def ports(*ranges, negate=False):
    return RangeMatch(tuple(ranges), negate)


@pytest.mark.parametrize("a, b", [
    (Match(), Match(proto=frozenset({TCP}))),
    (Match(proto=frozenset({TCP, UDP})), Match(proto=frozenset({UDP}))),
    (Match(proto=frozenset({TCP}), dport=ports((1, 1024))),
     Match(proto=frozenset({TCP}), dport=ports((22, 22)), src=AddrMatch((net("10.0.0.0/8"),)))),
    (Match(dport=ports((1, 100), (101, 200))), Match(dport=ports((50, 150)))),
    (Match(src=AddrMatch((net("10.0.0.0/8"), net("fd00::/8")))),
     Match(src=AddrMatch((net("10.1.0.0/16"), net("fd00:1::/32"))))),
    (Match(src=AddrMatch((net("10.0.0.0/8"),), negate=True)),
     Match(src=AddrMatch((net("10.0.0.0/8"),), negate=True), proto=frozenset({TCP}))),
    (Match(in_=IfaceMatch(("eth*",))), Match(in_=IfaceMatch(("eth0", "eth1")))),
    (Match(tcp_flags=TcpFlagsMatch(0x02, 0x02)), Match(tcp_flags=TcpFlagsMatch(0x12, 0x02))),
    (Match(mark=MarkMatch(0x10, 0xF0)), Match(mark=MarkMatch(0x12))),
    (Match(length=(0, 1500)), Match(length=(64, 64))),
    (Match(malformed=True), Match(malformed=True, proto=frozenset({TCP}))),
    (Match(family=6), Match(family=6, proto=frozenset({58}))),
])
def test_covers(a, b):
    assert covers(a, b)


@pytest.mark.parametrize("a, b", [
    (Match(proto=frozenset({TCP})), Match()),
    (Match(proto=frozenset({TCP})), Match(proto=frozenset({TCP, UDP}))),
    (Match(dport=ports((1, 100), (102, 200))), Match(dport=ports((50, 150)))),
    (Match(src=AddrMatch((net("10.0.0.0/16"),))), Match(src=AddrMatch((net("10.0.0.0/8"),)))),
    (Match(src=AddrMatch((net("10.0.0.0/8"),), negate=True)),
     Match(src=AddrMatch((net("10.0.0.0/16"),), negate=True))),
    (Match(src=AddrMatch((net("10.0.0.0/8"),), negate=True)),
     Match(src=AddrMatch((net("192.168.0.0/16"),)))),
    (Match(dport=ports((22, 22), negate=True)), Match(dport=ports((23, 23)))),
    (Match(in_=IfaceMatch(("eth*",))), Match(in_=IfaceMatch(("e*",)))),
    (Match(in_=IfaceMatch(("eth0",), negate=True)), Match(in_=IfaceMatch(("wlan0",)))),
    (Match(tcp_flags=TcpFlagsMatch(0x12, 0x02)), Match(tcp_flags=TcpFlagsMatch(0x02, 0x02))),
    (Match(mark=MarkMatch(0x12)), Match(mark=MarkMatch(0x10, 0xF0))),
    (Match(length=(64, 1500)), Match(length=(0, 100))),
    (Match(), Match(malformed=True)),
    (Match(malformed=True), Match()),
    (Match(family=4), Match(src=AddrMatch((net("10.0.0.0/8"),)))),
])
def test_does_not_cover(a, b):
    assert not covers(a, b)


# --- the search for shadowed rules --------------------------------------------------------

def rule(index: int, match: Match, rate=None) -> Rule:
    return Rule(f"r{index}", match, "accept", rate=rate, position=Position("p.yaml", index + 1, 5))


def every_pair(rules):
    """What shadowed() finds, by comparing every rule with every earlier one."""
    for later, b in enumerate(rules):
        for a in rules[:later]:
            if a.rate is None and covers(a.match, b.match):
                yield f'rule "{b.name}" can never match: rule "{a.name}"'
                break


NETWORKS = [net(n) for n in ("10.0.0.0/8", "10.1.0.0/16", "10.1.2.0/24", "10.1.2.3/32",
                             "10.2.0.0/16", "0.0.0.0/0", "fd00::/8", "fd00:1::/32", "::/0")]
RANGES = [(22, 22), (23, 23), (22, 23), (80, 80), (1, 1024), (0, 65535), (8050, 8050)]


def random_rule(r: random.Random, index: int) -> Rule:
    def some(choices, kind):
        picked = tuple(dict.fromkeys(r.choice(choices) for _ in range(r.randint(1, 3))))
        return kind(picked, negate=r.random() < 0.15)
    fields = {}
    if r.random() < 0.5:
        fields["src"] = some(NETWORKS, AddrMatch)
    if r.random() < 0.3:
        fields["dst"] = some(NETWORKS, AddrMatch)
    if r.random() < 0.6:
        fields["proto"] = frozenset(r.sample([TCP, UDP], r.randint(1, 2)))
        if r.random() < 0.7:
            fields["dport"] = some(RANGES, RangeMatch)
        if r.random() < 0.3:
            fields["sport"] = some(RANGES, RangeMatch)
    return rule(index, Match(malformed=r.random() < 0.05, **fields),
                rate=Rate(1.0, 1) if r.random() < 0.1 else None)


@pytest.mark.parametrize("seed", range(300))
def test_the_index_finds_what_comparing_every_pair_finds(seed):
    r = random.Random(seed)
    rules = tuple(random_rule(r, i) for i in range(r.randint(1, 40)))
    found = [w.message.split(" (line")[0] for w in shadowed(rules)]
    assert found == list(every_pair(rules))


def test_the_search_stops_with_a_warning_past_its_steps():
    # Negated ports cannot be indexed: every rule is compared with every earlier one.
    tcp = frozenset({TCP})
    rules = tuple(rule(i, Match(proto=tcp, dport=ports((i, i), negate=True)))
                  for i in range(1_000))
    # Rule k costs one list and k comparisons: the steps run out at rule 200.
    (stopped,) = shadowed(rules, max_steps=20_000)
    assert str(stopped).startswith('p.yaml:200:5: warning: rule "r199" (rule 200 of 1000) '
                                   "and the rules after it were not checked for rules that "
                                   "shadow them: the check stops after 20000 steps")
    assert MAX_SHADOW_STEPS == 1_000_000


ND_POLICY = """\
version: 1
hooks: [{chain: input, family: %(family)s}]
default: {action: %(default)s}
rules:
  - {name: established, ct_state: [established, related], action: accept}
%(rule)s"""
ND_RULES = {
    "none": "",
    "nd": "  - {name: nd, proto: icmpv6, icmp_type: [neighbour-solicitation, "
          "neighbour-advertisement], action: accept}\n",
    "all-icmpv6": "  - {name: icmp6, proto: icmpv6, action: accept}\n",
    "only-solicitation": "  - {name: ns, proto: icmpv6, icmp_type: neighbour-solicitation, "
                         "action: accept}\n",
    "tracked-only": "  - {name: nd, proto: icmpv6, ct_state: [new], action: accept}\n",
    "ipv4-only": "  - {name: nd, family: ipv4, action: accept}\n",
}


@pytest.mark.parametrize("family, default, rule, warned", [
    ("both", "drop", "none", True), ("ipv6", "drop", "none", True),
    ("ipv4", "drop", "none", False), ("both", "accept", "none", False),
    ("both", "drop", "nd", False), ("both", "drop", "all-icmpv6", False),
    ("both", "drop", "only-solicitation", True), ("both", "drop", "tracked-only", True),
    ("both", "drop", "ipv4-only", True),
])
def test_a_drop_default_that_breaks_ipv6_neighbour_discovery_is_warned(family, default, rule,
                                                                        warned):
    policy = loads(ND_POLICY % dict(family=family, default=default, rule=ND_RULES[rule]), "p.yaml")
    found = [w for w in policy.warnings if "neighbour discovery" in w.message]
    assert bool(found) == warned, policy.warnings
    if warned:
        assert (found[0].line, found[0].column) == (3, 1)
