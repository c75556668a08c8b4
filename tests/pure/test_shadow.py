"""A shadow policy decides beside the enforced one: counted, logged with
both verdicts and rules, never enforced, and the verdict cache keeps the pair."""
from __future__ import annotations

from dataclasses import replace
from ipaddress import IPv4Address

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ipqd.daemon.decision_log import DecisionLog, shadow_fields, shadow_message
from ipqd.decision.address_set import parse_entry
from ipqd.decision.compiler import compile_policy
from ipqd.decision.described import build_packet
from ipqd.decision.engine import Engine
from ipqd.decision.packet import parse
from ipqd.policy.checked import load_checked
from ipqd.policy.loader import loads
from ipqd.policy.model import Rate
from ipqd.wire import nfqueue as nfq
from test_verdict_cache import (CT_OF, IFNAME, V4, cached_engine, checksum_free_packet,
                                decide_cached, policies, queued)

ENFORCED = loads("version: 1\ndefault: {action: drop, log: false}\nrules:\n"
                 "  - {name: ssh, proto: tcp, dport: 22, action: accept}\n", "policy.yaml")
CANDIDATE = loads("version: 1\ndefault: {action: drop, log: false}\nrules:\n"
                  "  - {name: ssh-lan, proto: tcp, dport: 22, src: 10.0.0.0/8, action: accept}\n"
                  "  - {name: dns, proto: udp, dport: 53, action: accept}\n", "candidate.yaml")


def udp(dport: int, src: int = V4[0]) -> nfq.Packet:
    packet = nfq.Packet(0, 2, 1, 0x0800, 1)
    packet.payload = checksum_free_packet(4, 17, src, V4[1], 1000, dport, 0, (0, 0), b"")
    return packet


def test_the_enforced_verdict_stands_and_the_shadow_is_counted():
    engine = Engine(replace(ENFORCED, shadow=CANDIDATE))
    verdict = engine.decide(udp(53), IFNAME, None, 0.0)
    assert verdict.verdict == nfq.NF_DROP                   # the shadow accepts; not enforced
    assert engine.disagreement.rule.name == "dns"
    verdict = engine.decide(udp(54), IFNAME, None, 0.0)
    assert engine.disagreement is None
    counters = engine.counters.as_dict()
    assert (counters["shadow_decided"], counters["shadow_disagreed"]) == (2, 1)
    assert engine.shadow.matcher.counters()["rules"]["dns"]["hits"] == 1


def test_the_cache_keeps_the_pair():
    engine = cached_engine(replace(ENFORCED, shadow=CANDIDATE))
    for _ in range(4):      # kept on its second sight, then answered from the cache
        assert decide_cached(engine, udp(54), 0.0)[0] == nfq.NF_DROP     # agree: cached
    engine.settle()
    assert engine.cache.hits == 2
    assert engine.counters.shadow_decided == 4 and engine.counters.shadow_disagreed == 0
    # A disagreeing entry is kept but, with no log rate, answered in full to be logged.
    for _ in range(3):
        decide_cached(engine, udp(53), 0.0)
    engine.settle()
    assert engine.cache.hits == 2 and engine.counters.shadow_disagreed == 3


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(policies(), policies(), st.lists(queued(), min_size=1, max_size=40), st.data())
def test_a_cached_engine_with_a_shadow_counts_as_a_full_one(policy, shadow, stream, data):
    policy = replace(policy, shadow=shadow)
    full, cached = Engine(policy), cached_engine(policy)
    stream = stream + [data.draw(st.sampled_from(stream)) for _ in range(len(stream))]
    now = 0.0
    for n, packet in enumerate(stream):
        packet.packet_id = n + 1
        now += data.draw(st.sampled_from([0.0, 0.1, 1.0]))
        expected = full.decide(packet, IFNAME, CT_OF[packet.queue], now)
        got = decide_cached(cached, packet, now)
        assert got == (expected.verdict, expected.mark, expected.decision.rule_index)
    cached.settle()
    assert cached.counters.as_dict() == full.counters.as_dict()
    assert cached.shadow.matcher.counters() == full.shadow.matcher.counters()


def test_a_disagreement_is_logged_with_both_verdicts_and_rules():
    matcher, shadow = compile_policy(ENFORCED), compile_policy(CANDIDATE)
    payload, meta = build_packet("tcp 192.0.2.7:51514 -> 10.0.0.1:22 in=veth0")
    view = parse(payload, meta._replace(hook=1))
    a, b = matcher.decide(view), shadow.decide(view)
    fields = shadow_fields(a, b, view, 0, "aa" * 32, "bb" * 32)
    assert {k: v for k, v in fields.items() if "SHADOW" in k or k in (
        "IPQD_VERDICT", "IPQD_RULE", "IPQD_RULE_SOURCE", "IPQD_EVENT")} == {
        "IPQD_EVENT": "shadow-disagreement", "IPQD_VERDICT": "accept", "IPQD_RULE": "ssh",
        "IPQD_RULE_SOURCE": "policy.yaml:4", "IPQD_SHADOW_VERDICT": "drop",
        "IPQD_SHADOW_RULE": "default", "IPQD_SHADOW_POLICY_DIGEST": "bb" * 32}
    assert shadow_message(fields) == ("SHADOW accept -> drop tcp 192.0.2.7:51514 -> 10.0.0.1:22 "
                                      "in=veth0 rule=ssh shadow-rule=default")


def test_disagreements_share_the_decision_logs_rate():
    sent = []
    clock = type("Clock", (), {"now": 0.0, "__call__": lambda self: self.now})()
    log = DecisionLog(rate=Rate(5, 5), send=lambda m, p, f: sent.append(f), clock=clock)
    matcher, shadow = compile_policy(ENFORCED), compile_policy(CANDIDATE)
    payload, meta = build_packet("tcp 192.0.2.7:51514 -> 10.0.0.1:22")
    view = parse(payload, meta._replace(hook=1))
    for _ in range(20):
        log.disagreement(matcher.decide(view), shadow.decide(view), view, 0)
    log.close()
    assert len([f for f in sent if f.get("IPQD_EVENT") == "shadow-disagreement"]) == 5
    assert log.suppressed == 15


def test_a_policy_names_its_shadow(tmp_path):
    tmp_path.chmod(0o755)
    main = tmp_path / "policy.yaml"
    main.write_text("version: 1\nshadow: candidate.yaml\ndefault: {action: drop}\n")
    candidate = tmp_path / "candidate.yaml"
    candidate.write_text("version: 1\ndefault: {action: accept}\n")
    for f in (main, candidate):
        f.chmod(0o644)
    policy = load_checked(str(main))
    assert policy.shadow.path == str(candidate) and policy.shadow.default.action == "accept"
    assert policy.shadow.digest and policy.shadow.digest != policy.digest


def test_flows_are_not_offloaded_while_a_shadow_decides():
    hooked = loads("version: 1\nhooks: [{chain: input}]\ndefault: {action: drop, log: false}\n"
                   "rules:\n  - {name: ssh, proto: tcp, dport: 22, action: accept}\n", "p.yaml")
    assert Engine(hooked).offloading
    assert not Engine(replace(hooked, shadow=CANDIDATE)).offloading



def test_check_reports_the_shadows_errors(tmp_path):
    import io
    from argparse import Namespace
    from ipqd.policy.check import run_check
    main = tmp_path / "policy.yaml"
    main.write_text("version: 1\nhooks: [{chain: input, family: ipv4}]\nshadow: candidate.yaml\n"
                    "default: {action: accept}\n")
    out = io.StringIO()
    assert run_check(Namespace(policy=str(main)), out=out, err=out) == 1
    assert f"{tmp_path}/candidate.yaml: cannot read the shadow policy" in out.getvalue()
    (tmp_path / "candidate.yaml").write_text("version: 1\ndefault: {action: acept}\n")
    out = io.StringIO()
    assert run_check(Namespace(policy=str(main)), out=out, err=out) == 1
    assert out.getvalue().splitlines() == [
        f"{tmp_path}/candidate.yaml:2:19: default: unknown action 'acept' (did you mean 'accept'?)",
        "1 error"]
    main.write_text("version: 1\nshadow: policy.yaml\ndefault: {action: accept}\n")
    out = io.StringIO()
    assert run_check(Namespace(policy=str(main)), out=out, err=out) == 1
    assert "shadow names the policy itself" in out.getvalue()


def test_a_set_change_reaches_the_shadows_set_of_that_name():
    sets = "sets:\n  banned: {type: address, dynamic: true}\n"
    enforced = loads("version: 1\ndefault: {action: accept, log: false}\n" + sets +
                     "rules: []\n", "policy.yaml")
    candidate = loads("version: 1\ndefault: {action: accept, log: false}\n" + sets +
                      "rules:\n  - {name: bans, src: '@banned', action: drop}\n", "candidate.yaml")
    engine = cached_engine(replace(enforced, shadow=candidate))
    assert decide_cached(engine, udp(53), 0.0)[0] == nfq.NF_ACCEPT
    assert engine.disagreement is None
    engine.change_set("banned", "add", [parse_entry(str(IPv4Address(V4[0])))])
    assert decide_cached(engine, udp(53), 0.0)[0] == nfq.NF_ACCEPT     # enforced: no rule
    assert engine.disagreement.rule.name == "bans"
    engine.change_set("banned", "flush")
    decide_cached(engine, udp(53), 0.0)
    assert engine.disagreement is None
