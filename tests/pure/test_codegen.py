"""The generated decision function: where it answers, it answers as the
reference evaluator (tests/reference.py) and the compiled matcher do, and
it leaves to the full path every rule with a field it does not specialize."""
from __future__ import annotations

import dataclasses
import random
from typing import Optional

from ipqd.decision.codegen import SPECIALIZED, build_decider
from ipqd.decision.compiler import compile_policy
from ipqd.decision.engine import Engine
from ipqd.decision.packet import PacketMeta, parse
from ipqd.decision.verdict_cache import KeyMaker, VerdictCache
from ipqd.policy.model import Default, Match, Policy, RangeMatch, Rule
from ipqd.wire import nfqueue as nfq
from policy_strategies import random_policy
from reference import Reference
from test_verdict_cache import IFNAME, V4, checksum_free_packet, kernel_bytes, random_queued, \
    room

CT_OF = {0: None, 1: "new", 2: "established"}


def key_of(fields: frozenset, packet: nfq.Packet) -> Optional[tuple]:
    keys = KeyMaker(fields, VerdictCache(), batch=False, ifname=IFNAME)
    data = kernel_bytes(packet)
    keys.take([room(data)], [len(data)])
    misses = list(keys.round.misses.values())
    return misses[0] if misses else None


def view_of(packet: nfq.Packet, fields: frozenset):
    meta = PacketMeta(packet.hook, IFNAME(packet.indev), IFNAME(packet.outdev), packet.mark,
                      packet.uid, packet.gid, CT_OF[packet.queue], packet.cap_len,
                      4 if packet.family == 2 else 6)
    return parse(packet.payload, meta, fields)


def quiet(policy: Policy, rng: random.Random) -> Policy:
    """Most rules and the default not logged, so that the function answers often."""
    rules = tuple(dataclasses.replace(r, log=rng.random() < 0.1) for r in policy.rules)
    return dataclasses.replace(policy, rules=rules, default=Default(
        action=rng.choice(["accept", "drop"]), log=rng.random() < 0.1))


def test_the_generated_function_agrees_with_the_reference_where_it_answers():
    rng = random.Random(19)
    answered = checked = 0
    for _ in range(120):
        policy = quiet(random_policy(rng, rng.randint(1, 80), address_bias=rng.random() < 0.5),
                       rng)
        matcher = compile_policy(policy)
        decider = build_decider(policy, matcher.fields)
        reference = Reference(policy)
        for _ in range(60):
            packet = random_queued(rng)
            key = key_of(matcher.fields, packet)
            if key is None:
                continue
            checked += 1
            got = decider.decide(key)
            if got is None:
                continue                    # the full path decides
            answered += 1
            view = view_of(packet, matcher.fields)
            index, action = reference.decide(view)
            assert (got.rule_index, got.accept) == (index, action == "accept"), \
                (packet, policy.rules[:index + 1], decider.source)
            expected = matcher.decide(view)
            assert got.mark == expected.mark and got.fresh
    # (drawn matches also read cgroups and dynamic sets, which it leaves to the full path)
    assert answered > checked / 4, (answered, checked)


def rule(name: str, dport: int, **match) -> Rule:
    return Rule(name=name, match=Match(proto=frozenset({17}), dport=RangeMatch(((dport, dport),)),
                                       **match), action="accept")


def udp_key(policy: Policy, dport: int, mark: int = 0):
    packet = nfq.Packet(1, 2, 1, 0x0800, 1)
    packet.payload = checksum_free_packet(4, 17, V4[0], V4[1], 1000, dport, 0, (0, 0), b"")
    packet.mark = mark
    fields = compile_policy(policy).fields
    return build_decider(policy, fields), key_of(fields, packet)


def test_a_rule_with_a_field_it_does_not_know_goes_to_the_full_path():
    # `length` and `mark` are not specialized: the rule that tests one, when
    # it is the first candidate, is left to the compiled matcher...
    assert "length" not in SPECIALIZED and "mark" not in SPECIALIZED
    policy = Policy(path="p.yaml", rules=(rule("long", 53, length=(1000, 2000)), rule("dns", 53),
                                          rule("web", 80)),
                    default=Default(action="drop", log=False))
    decider, key = udp_key(policy, 53)
    assert decider.decide(key) is None
    # ...and it does not stand in the way of packets it cannot match on the
    # fields the function reads.
    decider, key = udp_key(policy, 80)
    assert decider.decide(key).rule_index == 2
    decider, key = udp_key(policy, 81)
    assert decider.decide(key).rule_index == -1


def test_a_rule_attribute_added_later_goes_to_the_full_path():
    """Another match kind or rule setting (a rate per source, a time window)
    the generator does not know of: the rule is never answered here."""
    @dataclasses.dataclass(frozen=True)
    class LaterRule(Rule):
        window: Optional[str] = None
    policy = Policy(path="p.yaml", rules=(LaterRule(**{f.name: getattr(rule("w", 53), f.name)
                                                       for f in dataclasses.fields(Rule)},
                                                    window="09:00-17:00"),
                                          rule("dns", 53)),
                    default=Default(action="drop", log=False))
    decider, key = udp_key(policy, 53)
    assert decider.decide(key) is None and decider.answerable == 1


def test_the_engine_answers_new_flows_with_it_and_counts_them_as_decided():
    dns = Rule(name="dns", match=Match(proto=frozenset({17}), dport=RangeMatch(((53, 60),))),
               action="accept")
    policy = Policy(path="p.yaml", rules=tuple(rule(f"r{i}", 1000 + i) for i in range(50))
                    + (dns,), default=Default(action="drop", log=False))
    engine = Engine(policy)
    keys = KeyMaker(engine.needs, engine.cache, batch=False, ifname=IFNAME)
    data = []
    for n in range(5):
        packet = nfq.Packet(1, 2, n + 1, 0x0800, 1)
        packet.payload = checksum_free_packet(4, 17, V4[0], V4[1], 1000, 53 + n, 0, (0, 0), b"")
        data.append(kernel_bytes(packet))
    assert keys.take([room(d) for d in data], [len(d) for d in data]) == []
    assert [entry.rule_index for _, _, entry in keys.round.single] == [50] * 5
    engine.settle()
    assert engine.counters.packets == engine.counters.accepted == 5
    assert engine.cache.hits == 0 and engine.matcher.counters()["rules"]["dns"]["hits"] == 5
    assert "def decide(key" in engine.decider.source


def test_explain_runs_the_generated_function_and_shows_its_source(tmp_path, capsys):
    from ipqd.cli import main
    from ipqd.decision.codegen import decider_for
    from ipqd.policy.loader import load
    path = tmp_path / "p.yaml"
    path.write_text("version: 1\nqueue: {offload: off}\ndefault: {action: drop, log: false}\n"
                    "rules:\n"
                    "  - {name: low, proto: udp, src: 10.0.0.0/8, sport: 1-1023, action: drop}\n"
                    "  - {name: dns, proto: udp, src: 10.0.0.0/8, dport: 53, action: accept}\n")
    path.chmod(0o644)
    assert main(["explain", str(path), "--show-code"]) == 0
    assert "def decide(key" in capsys.readouterr().out
    policy = load(str(path))
    decider = decider_for(policy, compile_policy(policy).fields)
    udp = checksum_free_packet(4, 17, 0x0A000001, 0x0A000002, 40000, 53, 0, (0, 0), b"")
    assert decider.decide_packet(udp, 4).rule_index == 1        # what explain checks against
    assert main(["explain", str(path), "udp 10.0.0.1:40000 -> 10.0.0.2:53"]) == 0
    assert "dns" in capsys.readouterr().out


def test_addresses_at_the_edges_of_blocks_and_networks():
    """IPv4 addresses are looked up by their /16 block first: networks that
    are a block, span blocks or lie inside one, negated or not."""
    import ipaddress
    from ipqd.policy.model import AddrMatch

    def src(*nets, negate=False):
        return AddrMatch(tuple(ipaddress.ip_network(n) for n in nets), negate)
    rules = (Rule(name="block", match=Match(src=src("10.1.0.0/16")), action="accept"),
             Rule(name="two", match=Match(src=src("10.2.0.0/15")), action="drop"),
             Rule(name="half", match=Match(src=src("10.5.128.0/17", "10.6.0.7/32")),
                  action="accept"),
             Rule(name="not-ten", match=Match(src=src("10.0.0.0/8", negate=True)),
                  action="drop"))
    policy = Policy(path="p.yaml", rules=rules, default=Default(action="accept", log=False))
    matcher = compile_policy(policy)
    decider = build_decider(policy, matcher.fields)
    reference = Reference(policy)
    edges = ["9.255.255.255", "10.0.255.255", "10.1.0.0", "10.1.255.255", "10.2.0.0",
             "10.3.255.255", "10.4.0.0", "10.5.127.255", "10.5.128.0", "10.5.255.255",
             "10.6.0.6", "10.6.0.7", "10.6.0.8", "11.0.0.0", "0.0.0.0", "255.255.255.255"]
    for text in edges:
        address = int(ipaddress.ip_address(text))
        packet = nfq.Packet(1, 2, 1, 0x0800, 1)
        packet.payload = checksum_free_packet(4, 17, address, V4[1], 1000, 53, 0, (0, 0), b"")
        key = key_of(matcher.fields, packet)
        index, _ = reference.decide(view_of(packet, matcher.fields))
        assert decider.decide(key).rule_index == index, text
