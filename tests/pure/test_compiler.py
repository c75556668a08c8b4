"""The compiled matcher, field by field, plus rates, counters and reloads."""
from __future__ import annotations

import ipaddress
import pickle

import pytest

from ipqd.decision.compiler import compile_policy
from ipqd.decision.packet import PacketView
from ipqd.policy.model import (AddrMatch, Default, IfaceMatch, MarkMatch, Match, Policy,
                               RangeMatch, Rate, Rule, TcpFlagsMatch)

V4 = lambda text: int(ipaddress.IPv4Address(text))  # noqa: E731
V6 = lambda text: int(ipaddress.IPv6Address(text))  # noqa: E731
NET = ipaddress.ip_network


def tcp(dport=22, src="10.0.0.5", **fields) -> PacketView:
    base = dict(family=4, proto=6, src=V4(src), dst=V4("10.0.0.1"), sport=40000, dport=dport,
                tcp_flags=0x02, length=60, fragment="none", hook=1, mark=0)
    base.update(fields)
    return PacketView.build(**base)


def udp6(dport=53, **fields) -> PacketView:
    base = dict(family=6, proto=17, src=V6("fd00::1"), dst=V6("fd00::2"), sport=5353,
                dport=dport, length=80, fragment="none", hook=1, mark=0)
    base.update(fields)
    return PacketView.build(**base)


def icmp(icmp_type=8, code=0, **fields) -> PacketView:
    base = dict(family=4, proto=1, src=V4("10.0.0.5"), dst=V4("10.0.0.1"), icmp_type=icmp_type,
                icmp_code=code, length=84, fragment="none", hook=1, mark=0)
    base.update(fields)
    return PacketView.build(**base)


def policy(*matches, default="drop", **rule_fields) -> Policy:
    rules = tuple(Rule(name=f"r{i}", match=m, action="accept", **rule_fields)
                  for i, m in enumerate(matches))
    return Policy(path="t.yaml", rules=rules, default=Default(action=default))


def hit(match: Match, view: PacketView) -> bool:
    return compile_policy(policy(match)).decide(view).rule_index == 0


FIELD_CASES = [
    # (name, match, packets that match, packets that do not)
    ("family", Match(family=6), [udp6()], [tcp()]),
    ("proto", Match(proto=frozenset({17, 6})), [tcp(), udp6()], [icmp()]),
    ("src", Match(src=AddrMatch((NET("10.0.0.0/24"),))), [tcp()], [tcp(src="10.0.1.5"), udp6()]),
    ("src negated, other family never matches",
     Match(src=AddrMatch((NET("10.0.0.0/24"),), negate=True)), [tcp(src="10.9.9.9")],
     [tcp(), udp6()]),
    ("src of both families", Match(src=AddrMatch((NET("10.0.0.0/8"), NET("fd00::/16")))),
     [tcp(), udp6()], [tcp(src="192.168.0.1")]),
    ("dst /32", Match(dst=AddrMatch((NET("10.0.0.1/32"),))), [tcp()], [tcp(dst=V4("10.0.0.2"))]),
    ("dport list", Match(dport=RangeMatch(((22, 22), (80, 80)))), [tcp(22), tcp(80)],
     [tcp(23), icmp(), tcp(dport=None, fragment="not-first")]),
    ("dport wide range", Match(dport=RangeMatch(((1024, 65535),))), [tcp(5000)], [tcp(22)]),
    ("dport negated: no port, no match", Match(dport=RangeMatch(((22, 22),), negate=True)),
     [tcp(23)], [tcp(22), icmp()]),
    ("sport", Match(sport=RangeMatch(((40000, 40000),))), [tcp()], [tcp(sport=1), icmp()]),
    ("in exact", Match(in_=IfaceMatch(("eth0",))), [tcp(indev="eth0")],
     [tcp(indev="eth1"), tcp()]),
    ("in glob", Match(in_=IfaceMatch(("eth*", "wlan?"))), [tcp(indev="eth7"), tcp(indev="wlan0")],
     [tcp(indev="wlan10"), tcp(indev="lo")]),
    ("out negated, absent interface", Match(out=IfaceMatch(("lo",), negate=True)),
     [tcp(outdev="eth0")], [tcp(outdev="lo"), tcp()]),
    ("hook", Match(hook=frozenset({3})), [tcp(hook=3)], [tcp(hook=1), tcp(hook=None)]),
    ("icmp_type", Match(icmp_type=frozenset({8})), [icmp(8)], [icmp(0), tcp()]),
    ("icmp_code", Match(icmp_code=frozenset({1})), [icmp(3, 1)], [icmp(3, 0)]),
    ("tcp_flags syn,!ack", Match(tcp_flags=TcpFlagsMatch(mask=0x12, value=0x02)), [tcp()],
     [tcp(tcp_flags=0x12), udp6()]),
    ("ct_state", Match(ct_state=frozenset({"established"})), [tcp(ct_state="established")],
     [tcp(ct_state="new"), tcp()]),
    ("uid", Match(uid=RangeMatch(((1000, 1999),))), [tcp(uid=1000)], [tcp(uid=0), tcp()]),
    ("gid negated", Match(gid=RangeMatch(((0, 0),), negate=True)), [tcp(gid=100)],
     [tcp(gid=0), tcp()]),
    ("mark", Match(mark=MarkMatch(value=0x10, mask=0xF0)), [tcp(mark=0x1F)], [tcp(mark=0x20)]),
    ("length", Match(length=(0, 60)), [tcp(length=60)], [tcp(length=61)]),
    ("fragment", Match(fragment=frozenset({"not-first"})),
     [tcp(dport=None, fragment="not-first")], [tcp()]),
    ("malformed", Match(malformed=True), [tcp(malformed=True, reason="x", dport=None)], [tcp()]),
    ("AND of fields", Match(proto=frozenset({6}), dport=RangeMatch(((22, 22),)), hook=frozenset({1})),
     [tcp()], [tcp(hook=3), tcp(23)]),
]


@pytest.mark.parametrize("name,match,yes,no", FIELD_CASES, ids=[c[0] for c in FIELD_CASES])
def test_field(name, match, yes, no):
    for view in yes:
        assert hit(match, view), view
    for view in no:
        assert not hit(match, view), view


def test_plain_rules_never_match_malformed_packets():
    bad = tcp(malformed=True, reason="truncated copy", sport=None, dport=None, tcp_flags=None)
    assert not hit(Match(), bad)
    assert not hit(Match(family=4), bad)


def test_first_match_wins():
    p = policy(Match(dport=RangeMatch(((1024, 65535),))), Match(dport=RangeMatch(((5000, 5000),))),
               Match())
    matcher = compile_policy(p)
    assert matcher.decide(tcp(5000)).rule_index == 0
    assert matcher.decide(tcp(22)).rule_index == 2


def test_decision_carries_mark_and_log():
    rules = (Rule("a", Match(dport=RangeMatch(((22, 22),))), "accept", set_mark=7, log=False),
             Rule("b", Match(dport=RangeMatch(((23, 23),))), "drop"))
    p = Policy(path="t.yaml", rules=rules, default=Default(action="accept", log=True, set_mark=9))
    matcher = compile_policy(p)
    a, b, default = (matcher.decide(tcp(port)) for port in (22, 23, 24))
    assert (a.rule.name, a.action, a.mark, a.log) == ("a", "accept", 7, False)
    assert (b.rule_index, b.action, b.mark, b.log) == (1, "drop", None, True)
    assert (default.rule, default.rule_index, default.action, default.mark) == (None, -1, "accept", 9)


def test_rate_limited_rule_falls_through_then_refills():
    rules = (Rule("ping", Match(proto=frozenset({1})), "accept", rate=Rate(per_second=2, burst=3)),
             Rule("rest", Match(), "drop"))
    matcher = compile_policy(Policy(path="t.yaml", rules=rules))
    names = [matcher.decide(icmp(), now=100.0).rule.name for _ in range(5)]
    assert names == ["ping", "ping", "ping", "rest", "rest"]
    assert matcher.decide(icmp(), now=100.4).rule.name == "rest"     # 0.8 token
    assert matcher.decide(icmp(), now=100.5).rule.name == "ping"     # 1 token
    assert matcher.decide(icmp(), now=100.5).rule.name == "rest"
    assert [matcher.decide(icmp(), now=200.0).rule.name for _ in range(4)] == \
        ["ping", "ping", "ping", "rest"]                            # capped at the burst


def test_a_rate_is_not_spent_by_packets_an_earlier_rule_takes():
    rules = (Rule("ssh", Match(dport=RangeMatch(((22, 22),))), "accept"),
             Rule("any", Match(), "accept", rate=Rate(per_second=1, burst=1)))
    matcher = compile_policy(Policy(path="t.yaml", rules=rules))
    for _ in range(3):
        assert matcher.decide(tcp(22), now=1.0).rule.name == "ssh"
    assert matcher.decide(tcp(80), now=1.0).rule.name == "any"
    assert matcher.decide(tcp(80), now=1.0).rule is None


def test_counters_and_take_over():
    old = compile_policy(Policy(path="t.yaml", rules=(
        Rule("ssh", Match(dport=RangeMatch(((22, 22),))), "accept"),
        Rule("telnet", Match(dport=RangeMatch(((23, 23),))), "drop"))))
    for port, size in ((22, 60), (22, 1500), (23, 60), (80, 40)):
        decision = old.decide(tcp(port))
        old.bytes_by_index[decision.rule_index] += size      # as the engine adds them
    assert old.counters() == {
        "rules": {"ssh": {"hits": 2, "accepted": 2, "dropped": 0, "bytes": 1560},
                  "telnet": {"hits": 1, "accepted": 0, "dropped": 1, "bytes": 60}},
        "default": {"hits": 1, "accepted": 0, "dropped": 1, "bytes": 40},
        "undecidable": {"hits": 0, "accepted": 0, "dropped": 0, "bytes": 0},
        "offload_slots": {}, "offload_other": 15,
        "offload_mixed": []}
    new = compile_policy(Policy(path="t.yaml", rules=(
        Rule("web", Match(dport=RangeMatch(((80, 80),))), "accept"),
        Rule("ssh", Match(dport=RangeMatch(((2222, 2222),))), "accept"))))
    new.take_over(pickle.loads(pickle.dumps(old.carry_over())))     # as a pipe carries it
    new.decide(tcp(80))
    counters = new.counters()
    assert counters["rules"] == {"web": {"hits": 1, "accepted": 1, "dropped": 0, "bytes": 0},
                                 "ssh": {"hits": 2, "accepted": 2, "dropped": 0, "bytes": 1560}}
    assert counters["default"]["hits"] == 1 and counters["default"]["bytes"] == 40


def test_take_over_keeps_an_unchanged_rate_bucket_only():
    def build(rate):
        return compile_policy(Policy(path="t.yaml", rules=(
            Rule("ping", Match(proto=frozenset({1})), "accept", rate=rate),)))
    old = build(Rate(1, 2))
    old.decide(icmp(), now=5.0)
    old.decide(icmp(), now=5.0)
    new = build(Rate(1, 2))
    new.take_over(old.carry_over())
    assert new.decide(icmp(), now=5.0).rule is None         # the tokens stayed spent
    changed = build(Rate(1, 3))
    changed.take_over(old.carry_over())
    assert changed.decide(icmp(), now=5.0).rule.name == "ping"      # a new rate starts full


def test_take_over_subtracts_what_the_successor_took_before_it():
    """A successor answers packets for a moment before the predecessor's
    buckets reach it: those tokens count too, or a reload would allow an
    extra burst."""
    def build():
        return compile_policy(Policy(path="t.yaml", rules=(
            Rule("ping", Match(proto=frozenset({1})), "accept", rate=Rate(1, 2)),)))
    old = build()
    assert old.decide(icmp(), now=5.0).rule.name == "ping"          # 1 of 2 left
    new = build()
    assert new.decide(icmp(), now=5.01).rule.name == "ping"         # its own full bucket
    new.take_over(old.carry_over())
    assert new.decide(icmp(), now=5.02).rule is None                # 2 taken in all
    assert new.decide(icmp(), now=6.02).rule.name == "ping"         # refilled at 1/s


def test_fields_for_parse():
    p = policy(Match(proto=frozenset({6}), dport=RangeMatch(((22, 22),))),
               Match(in_=IfaceMatch(("eth0",))))
    assert compile_policy(p).fields == {"proto", "dport", "in"}
    assert "malformed" in compile_policy(policy(Match(malformed=True))).fields


def test_empty_policy_gives_the_default():
    matcher = compile_policy(Policy(path="t.yaml", default=Default(action="accept")))
    assert matcher.decide(tcp()).action == "accept"
    assert matcher.decide(PacketView.build(malformed=True, reason="x")).action == "accept"


def test_cost_does_not_depend_on_rules_before_the_match():
    """10,000 rules on other ports: the packet's bucket holds one rule."""
    rules = [Rule(f"r{i}", Match(proto=frozenset({6}), dport=RangeMatch(((1000 + i,) * 2,)),
                                 src=AddrMatch((NET(f"10.{i // 256}.{i % 256}.0/24"),))), "accept")
             for i in range(10_000)]
    matcher = compile_policy(Policy(path="t.yaml", rules=tuple(rules)))
    index = matcher._by_family[4][6]
    assert len(index.ports[10_999].order) == 1
    assert matcher.decide(tcp(10_999, src="10.39.15.1")).rule_index == 9_999


def test_pure_modules_import_no_io():
    import ast

    import ipqd.decision.compiler
    import ipqd.decision.packet
    for module in (ipqd.decision.packet, ipqd.decision.compiler):
        with open(module.__file__) as f:
            tree = ast.parse(f.read())
        names = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                names.add((node.module or "").split(".")[0])
        assert not names & {"socket", "select", "signal", "os"}, module.__name__


