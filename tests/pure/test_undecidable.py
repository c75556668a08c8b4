"""Packets whose copy hides what the rules need: decided by the fields they
have, or by queue.undecidable, never left to the default unseen.

The two packets of a known evasion (tests/ipv6_chains.py): an IPv6 SYN to a
dropped port behind one 408-byte destination-options header (its TCP header
lies past a 256-byte copy) and one behind nine small headers.
"""
from __future__ import annotations

import io
import random
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ipqd.wire import nfqueue as nfq
from ipqd.decision.compiler import UNDECIDABLE, UNDECIDABLE_NAME, compile_policy
from ipqd.daemon.decision_log import decision_fields, decision_message
from ipqd.decision.engine import Engine
from ipqd.errors import PolicyErrors
from ipqd.decision.packet import HIDDEN_CHAIN, PacketMeta, PacketView, parse
from ipqd.policy._undecidable import undecidable_accepted
from ipqd.policy.check import run_check
from ipqd.policy.loader import loads
from ipqd.policy.model import (Default, Match, Policy, QueueConfig, RangeMatch, Rate, Rule,
                               TcpFlagsMatch)
from ipv6_chains import syn_behind_headers, syn_behind_one_big_header
from reference import Reference
from policy_strategies import PORTS, random_policy, views
from test_verdict_cache import kernel_bytes, key_maker, read_key, room

CLIENT, SERVER = "fd00::1", "fd00::2"
COPY_RANGE = 256
TCP = frozenset({6})

# Everything allowed but telnet.
NO_TELNET = """\
version: 1
queue: {copy_range: 256}
default: {action: accept, log: true}
rules:
  - {name: no-telnet, proto: tcp, dport: 23, action: drop}
"""


def queued(payload: bytes, copy_range: int = COPY_RANGE) -> nfq.Packet:
    """The packet as the kernel queues it: cut at copy_range, cap_len the real length."""
    packet = nfq.Packet(0, 10, 1, 0x86DD, 1)
    packet.payload = payload[:copy_range] if copy_range else payload
    if copy_range and len(payload) > copy_range:
        packet.cap_len = len(payload)
    return packet


def decide(engine: Engine, payload: bytes) -> tuple:
    verdict = engine.decide(queued(payload), lambda index: None, None, 1.0)
    rule = verdict.decision.rule
    return verdict.verdict, rule.name if rule else "default"


# ---- the evasion packets through the engine ----------------------------------

def test_a_syn_behind_nine_extension_headers_meets_its_rule():
    engine = Engine(loads(NO_TELNET, "p.yaml"))
    assert decide(engine, syn_behind_headers(CLIENT, SERVER, 40000, 23)) == \
        (nfq.NF_DROP, "no-telnet")
    assert decide(engine, syn_behind_headers(CLIENT, SERVER, 40000, 24)) == \
        (nfq.NF_ACCEPT, "default")
    assert decide(engine, syn_behind_headers(CLIENT, SERVER, 40000, 23, count=24)) == \
        (nfq.NF_DROP, "no-telnet")                      # 252 bytes: all in the copy
    assert decide(engine, syn_behind_headers(CLIENT, SERVER, 40000, 24, count=30)) == \
        (nfq.NF_DROP, UNDECIDABLE_NAME)                 # the copy ends inside the chain
    assert (engine.counters.malformed, engine.counters.undecidable) == (0, 1)


def test_a_syn_whose_tcp_header_lies_past_copy_range_is_not_accepted_unseen():
    engine = Engine(loads(NO_TELNET, "p.yaml"))
    for port in (23, 24):       # which port, the copy does not show: either may be telnet
        verdict = engine.decide(queued(syn_behind_one_big_header(CLIENT, SERVER, 40000, port)),
                               lambda index: None, None, 1.0)
        assert verdict.verdict == nfq.NF_DROP
        assert verdict.decision.rule.name == UNDECIDABLE_NAME == "queue.undecidable"
        assert verdict.decision.rule_index == UNDECIDABLE and verdict.decision.log
        assert verdict.view.reason == "transport header past copy_range"
    assert (engine.counters.undecidable, engine.counters.malformed) == (2, 0)
    size = len(syn_behind_one_big_header(CLIENT, SERVER, 40000, 23))    # on the wire, uncut
    assert engine.matcher.counters()["undecidable"] == {"hits": 2, "accepted": 0, "dropped": 2,
                                                        "bytes": 2 * size}
    # The whole packet, as with copy_range 0, is simply decided.
    whole = engine.decide(queued(syn_behind_one_big_header(CLIENT, SERVER, 40000, 24), 0),
                         lambda index: None, None, 1.0)
    assert (whole.verdict, whole.decision.rule) == (nfq.NF_ACCEPT, None)


def test_undecidable_accept_is_the_old_behaviour_when_asked_for():
    policy = loads(NO_TELNET, "p.yaml")
    engine = Engine(Policy(path="p.yaml", rules=policy.rules, default=policy.default,
                           queue=QueueConfig(undecidable="accept")))
    assert decide(engine, syn_behind_one_big_header(CLIENT, SERVER, 40000, 23)) == \
        (nfq.NF_ACCEPT, UNDECIDABLE_NAME)


def test_cut_copies_are_never_cached_and_the_exact_layer_never_answers_them():
    """The cache's readers take neither evasion packet: they go to the full
    path, also after a plain SYN of the same addresses and ports was cached."""
    keys = key_maker({"proto", "dport", "src"})
    plain = syn_behind_headers(CLIENT, SERVER, 40000, 23, count=0)
    assert read_key(keys, kernel_bytes(queued(plain))) is not None
    for payload in (syn_behind_headers(CLIENT, SERVER, 40000, 23),
                    syn_behind_one_big_header(CLIENT, SERVER, 40000, 23)):
        assert read_key(keys, kernel_bytes(queued(payload))) is None
    engine = Engine(loads(NO_TELNET.replace("log: true", "log: false"), "p.yaml"))
    cached = key_maker(engine.needs, cache=engine.cache, batch=False)    # unlogged: all hit
    allowed = syn_behind_headers(CLIENT, SERVER, 40000, 24, count=0)
    for _ in range(3):                  # a miss, one that stores (second sight), then a hit
        data = kernel_bytes(queued(allowed))
        rest = cached.take([room(data)], [len(data)])
        key = cached.round.misses.get((0, 1))
        if rest:
            engine.decide(queued(allowed), lambda index: None, None, 1.0, key)
    assert cached.round.single, "the plain SYN was not answered from the cache"
    for payload in (syn_behind_headers(CLIENT, SERVER, 40000, 24),
                    syn_behind_one_big_header(CLIENT, SERVER, 40000, 24)):
        cached.round.clear()
        data = kernel_bytes(queued(payload))
        assert cached.take([room(data)], [len(data)]) == [0] and not cached.round.single


def test_the_decision_log_says_what_the_copy_cut_off():
    engine = Engine(loads(NO_TELNET, "p.yaml"))
    packet = queued(syn_behind_one_big_header(CLIENT, SERVER, 40000, 23))
    packet.indev = 3
    verdict = engine.decide(packet, {3: "veth-s"}.get, None, 1.0)
    fields = decision_fields("drop", verdict.decision.rule.name, verdict.view, 0, None)
    assert fields["IPQD_CUT"] == "transport header past copy_range"
    assert decision_message(fields) == ("DROP cut (transport header past copy_range) tcp "
                                        "fd00::1 -> fd00::2 in=veth-s rule=queue.undecidable")


# ---- the three-valued walk, case by case ----------------------------------------

def tcp_view(hidden=frozenset({"sport", "dport", "tcp_flags"}), **fields) -> PacketView:
    """A TCP view whose transport header the copy cut off."""
    base = dict(family=6, proto=6, src=1, dst=2, length=468, fragment="none", hook=1, mark=0,
                hidden=hidden, reason="transport header past copy_range")
    base.update(fields)
    return PacketView.build(**base)


def rule(name, action="drop", rate=None, set_mark=None, log=None, **match):
    return Rule(name=name, match=Match(**match), action=action, rate=rate, set_mark=set_mark,
                log=log)


def matcher(*rules, default="accept", undecidable="drop", set_mark=None):
    return compile_policy(Policy(path="t.yaml", rules=rules,
                                 default=Default(action=default, set_mark=set_mark),
                                 queue=QueueConfig(undecidable=undecidable)))


DPORT_23 = dict(proto=TCP, dport=RangeMatch(((23, 23),)))


def test_every_possible_rule_agreeing_decides():
    # no-telnet might match, the default drops too: drop, counted for the default
    m = matcher(rule("no-telnet", **DPORT_23), default="drop")
    decision = m.decide(tcp_view())
    assert (decision.action, decision.rule) == ("drop", None)
    assert m.counters()["default"]["hits"] == 1 and m.counters()["undecidable"]["hits"] == 0


def test_a_rule_matching_on_the_visible_fields_ends_the_walk():
    m = matcher(rule("tcp", "accept", proto=TCP), rule("no-telnet", **DPORT_23))
    decision = m.decide(tcp_view())
    assert decision.rule.name == "tcp"              # exact: nothing before it could match
    m = matcher(rule("no-telnet", **DPORT_23), rule("tcp", "drop", proto=TCP))
    decision = m.decide(tcp_view())                 # no-telnet or tcp: drop either way
    assert (decision.action, decision.rule.name, decision.offload) == ("drop", "tcp", frozenset())


def test_a_rule_the_visible_fields_rule_out_is_skipped():
    udp_only = rule("dns", "drop", proto=frozenset({17}), dport=RangeMatch(((53, 53),)))
    flags = rule("syn", "drop", proto=TCP, tcp_flags=TcpFlagsMatch(0x02, 0x02), length=(0, 100))
    decision = matcher(udp_only, flags).decide(tcp_view())
    assert (decision.action, decision.rule) == ("accept", None)     # length 468 rules syn out


def test_different_verdicts_or_marks_are_undecidable():
    m = matcher(rule("no-telnet", **DPORT_23))
    assert m.decide(tcp_view()).rule_index == UNDECIDABLE
    marked = matcher(rule("web", "accept", set_mark=7, **DPORT_23), default="accept")
    assert marked.decide(tcp_view()).rule_index == UNDECIDABLE
    same = matcher(rule("web", "accept", set_mark=7, **DPORT_23), default="accept", set_mark=7)
    assert same.decide(tcp_view()).mark == 7
    assert matcher(rule("no-telnet", **DPORT_23), undecidable="accept").decide(
        tcp_view()).action == "accept"


def test_a_rated_rule_might_match_and_keeps_its_tokens():
    no_telnet = rule("no-telnet", **DPORT_23)
    assert matcher(rule("tcp", "drop", proto=TCP), no_telnet).decide(tcp_view()).action == "drop"
    rated = rule("tcp-flood", "drop", rate=Rate(1.0, 1), proto=TCP)
    m = matcher(rated, no_telnet)
    assert m.decide(tcp_view(), now=1.0).rule_index == UNDECIDABLE     # out of tokens, maybe
    plain = PacketView.build(**{k: v for k, v in tcp_view().as_dict().items()
                                if k not in ("hidden", "reason")})
    assert m.decide(plain, now=1.0).rule.name == "tcp-flood"        # its one token was left


def test_malformed_rules_do_not_take_cut_packets_and_malformed_ones_are_unchanged():
    m = matcher(rule("bad", "accept", malformed=True), rule("no-telnet", **DPORT_23))
    assert m.decide(tcp_view()).rule_index == UNDECIDABLE
    truncated = syn_behind_one_big_header(CLIENT, SERVER, 40000, 23)[:300]   # no cap_len: garbage
    view = parse(truncated, PacketMeta(), m.fields)
    assert view.malformed and m.decide(view).rule.name == "bad"


def test_hidden_fields_no_rule_reads_change_nothing():
    m = matcher(rule("udp", "drop", proto=frozenset({17})))
    view = tcp_view(hidden=frozenset({"dport"}))
    assert "dport" not in m.fields and m.decide(view).rule is None     # the default, as usual


# ---- the walk against the rule-by-rule reference --------------------------------

def completions(view: PacketView, rng: random.Random, count: int):
    """Views with every hidden field filled in, as the packet might hold it."""
    values = dict(sport=PORTS, dport=PORTS, tcp_flags=[0x02, 0x12, 0x10, 0x04, 0],
                  icmp_type=[0, 3, 8, 128, 135], icmp_code=[0, 1], proto=[1, 6, 17, 58, 47],
                  fragment=["none", "first", "not-first"])
    for _ in range(count):
        filled = view.as_dict()
        filled.pop("hidden")
        filled.pop("reason")
        for name in view.hidden:
            filled[name] = rng.choice(values[name])
        yield PacketView.build(**filled)


HIDDEN_SETS = st.sampled_from([frozenset(), frozenset({"sport", "dport", "tcp_flags"}),
                               frozenset({"icmp_type", "icmp_code"}), HIDDEN_CHAIN])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2**32 - 1), views(), HIDDEN_SETS)
def test_the_walk_agrees_with_the_full_decision(seed, full, hidden):
    """With every field visible the walk decides as `decide`; with some
    hidden, a verdict it gives is the one every way of filling them in gets
    (the packet's own values included), else it says undecidable."""
    if full.malformed:
        return
    rng = random.Random(seed)
    policy = random_policy(rng, rng.randint(0, 30))
    expected = compile_policy(policy).decide(full)
    visible = PacketView.build(**full.as_dict())
    assert compile_policy(policy)._decide_hidden(visible).rule_index == expected.rule_index
    cut = PacketView.build(**{**full.as_dict(), "hidden": hidden, "reason": "cut"})
    for name in hidden:
        setattr(cut, name, None)
    walked = compile_policy(policy).decide(cut)
    if walked.rule_index == UNDECIDABLE:
        return
    reference = Reference(policy)
    for view in [full] + list(completions(cut, rng, 40)):
        index, action = reference.decide(view)
        rule_mark = policy.rules[index].set_mark if index >= 0 else policy.default.set_mark
        assert (action, rule_mark if action == "accept" else None) == \
            (walked.action, walked.mark), (view, walked)


# ---- queue.undecidable in the policy, and its warning --------------------------

def test_the_key_defaults_to_drop_and_reads_accept_or_drop():
    assert loads(NO_TELNET, "p.yaml").queue.undecidable == "drop"
    text = NO_TELNET.replace("{copy_range: 256}", "{copy_range: 256, undecidable: ACCEPT}")
    assert loads(text, "p.yaml").queue.undecidable == "accept"
    with pytest.raises(PolicyErrors) as error:
        loads(NO_TELNET.replace("{copy_range: 256}", "{undecidable: acept}"), "p.yaml")
    assert "p.yaml:2:22: queue: unknown action 'acept' (did you mean 'accept'?)" in str(error.value)


def check(text: str, tmp_path) -> str:
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    out = io.StringIO()
    assert run_check(SimpleNamespace(policy=str(path)), out=out, err=out) == 0
    return out.getvalue()


def test_check_warns_when_undecidable_accept_opens_a_drop_rule(tmp_path):
    text = NO_TELNET.replace("{copy_range: 256}", "{copy_range: 256, undecidable: accept}")
    out = check(text, tmp_path)
    assert (f"{tmp_path}/policy.yaml:5:5: warning: rule \"no-telnet\" drops by dport, proto, "
            "but a packet whose headers run past copy_range (IPv6 extension headers can take "
            "any length) cannot be matched on dport, proto, and queue.undecidable: accept lets "
            "it through: remove 'undecidable: accept' (drop is the default), or copy whole "
            "packets with copy_range: 0") in out
    assert "undecidable" not in check(NO_TELNET, tmp_path)              # drop: no hole
    whole = text.replace("copy_range: 256", "copy_range: 0")
    assert "undecidable" not in check(whole, tmp_path)                  # nothing is ever cut


def test_check_warns_when_undecidable_accept_opens_a_drop_default():
    ssh = Rule("ssh", Match(proto=TCP, dport=RangeMatch(((22, 22),))), "accept")
    policy = Policy(path="p.yaml", rules=(ssh,), default=Default(action="drop"),
                    queue=QueueConfig(undecidable="accept"))
    (warning,) = undecidable_accepted(policy)
    assert 'rule "ssh" accepts by dport, proto' in warning.message
    assert "lets it through where the default would drop it" in warning.message
    assert not undecidable_accepted(Policy(path="p.yaml", rules=(ssh,),
                                           default=Default(action="accept"),
                                           queue=QueueConfig(undecidable="accept")))
