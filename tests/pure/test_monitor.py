"""Monitor mode and log rules: every packet accepted under `mode: monitor`,
what the policy would do logged and counted as not enforced; `action: log`
logs and lets the next rule decide."""
from __future__ import annotations

import struct

from ipqd.daemon.decision_log import decision_fields, decision_message
from ipqd.decision.compiler import compile_policy, offload_states
from ipqd.decision.engine import Engine, fallback_verdict
from ipqd.decision.packet import PacketMeta, parse
from ipqd.policy.loader import loads
from ipqd.wire import nfqueue as nfq

POLICY = """\
version: 1
mode: monitor
hooks: [{chain: input}]
default: {action: drop, log: false}
rules:
  - {name: watch, proto: tcp, dport: [23, 25], action: log}
  - {name: telnet, proto: tcp, dport: 23, action: reject, log: false}
  - {name: web, proto: tcp, dport: 80, action: accept, log: false}
  - {name: smtp, proto: tcp, dport: 25, action: accept, log: false}
"""


def payload(dport: int) -> bytes:
    tcp = struct.pack("!HHIIBBHHH", 40000, dport, 1, 0, 5 << 4, 0x02, 65535, 0, 0)
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, 1, 0, 64, 6, 0,
                       b"\x0a\x00\x00\x01", b"\x0a\x00\x00\x02") + tcp


def packet(dport: int) -> nfq.Packet:
    p = nfq.Packet(0, 2, 1, 0x0800, 1)
    p.payload = payload(dport)
    p.mark = 0
    return p


def decide(engine, dport, key=None):
    return engine.decide(packet(dport), lambda i: None, "new", 1.0, key)


def test_monitor_mode_accepts_what_the_policy_would_drop_and_says_so():
    engine = Engine(loads(POLICY))
    rejected = decide(engine, 23, key=("a",))
    dropped = decide(engine, 22, key=("b",))
    accepted = decide(engine, 80)
    assert (rejected.verdict, rejected.mark, rejected.enforced) == (nfq.NF_ACCEPT, None, False)
    assert rejected.decision.action == "reject" and rejected.decision.log
    assert (dropped.verdict, dropped.enforced, dropped.decision.rule) == \
        (nfq.NF_ACCEPT, False, None)
    assert dropped.decision.log                # logged whatever the default's log says
    assert accepted.enforced and accepted.verdict in (nfq.NF_ACCEPT, nfq.NF_REPEAT)
    c = engine.counters
    assert (c.packets, c.accepted, c.dropped, c.not_enforced, c.rejected) == (3, 3, 0, 2, 0)
    assert engine.cache.entries == {}          # every would-be drop comes back to be logged
    counters = engine.matcher.counters()["rules"]
    assert counters["telnet"]["hits"] == counters["telnet"]["dropped"] == 1   # what it would do
    assert counters["telnet"]["accepted"] == 0


def test_monitor_mode_accepts_what_cannot_be_decided():
    policy = loads(POLICY)
    assert fallback_verdict(policy) == nfq.NF_ACCEPT
    assert Engine(policy).fallback().verdict == nfq.NF_ACCEPT
    enforcing = loads(POLICY.replace("mode: monitor", "mode: enforce"))
    assert fallback_verdict(enforcing) == nfq.NF_DROP
    assert decide(Engine(enforcing), 22).verdict == nfq.NF_DROP


def test_a_log_rule_logs_and_the_next_rule_decides():
    policy = loads(POLICY.replace("mode: monitor", "mode: enforce"))
    matcher = compile_policy(policy)
    view = parse(payload(25), PacketMeta(hook=1, family=4), matcher.fields)
    decision = matcher.decide(view)
    assert decision.rule.name == "smtp" and decision.action == "accept"
    assert decision.log and decision.log_rules == ("watch",)
    assert matcher.rated                       # not cached: log rules count each packet
    other = matcher.decide(parse(payload(80), PacketMeta(hook=1, family=4), matcher.fields))
    assert other.log_rules == () and not other.log
    counters = matcher.counters()["rules"]
    assert (counters["watch"]["hits"], counters["watch"]["accepted"],
            counters["watch"]["dropped"]) == (1, 0, 0)


def test_a_log_rule_is_never_offloaded_nor_lets_what_it_logs_be():
    policy = loads(POLICY.replace("mode: monitor", "mode: enforce"))
    per_rule, _ = offload_states(policy.rules, policy.default)
    states = dict(zip((r.name for r in policy.rules), per_rule))
    assert states["watch"] == frozenset() and states["smtp"] == frozenset()
    assert states["web"] == frozenset({"new", "established"})     # port 80: never logged


def test_the_journal_tells_would_be_decisions_and_log_rules():
    view = parse(payload(23), PacketMeta(hook=1, family=4))
    fields = decision_fields("reject", "telnet", view, 0, None, enforced=False,
                             log_rules=("watch", "all"))
    assert fields["IPQD_ENFORCED"] == "no" and fields["IPQD_LOG_RULES"] == "watch,all"
    assert decision_message(fields).startswith("REJECT (not enforced) tcp 10.0.0.1:40000")
    assert decision_message(fields).endswith("rule=telnet logged-by=watch,all")
    assert "IPQD_ENFORCED" not in decision_fields("drop", "x", view, 0, None)


def test_explain_marks_what_monitor_mode_would_not_enforce(capsys, tmp_path):
    from ipqd.cli import main
    path = tmp_path / "p.yaml"
    path.write_text(POLICY)
    assert main(["explain", str(path), "tcp 10.0.0.5:40000 -> 10.0.0.1:23 syn"]) == 0
    line = capsys.readouterr().out
    assert "REJECT" in line and "(not enforced: mode monitor accepts it)" in line
    assert "(logged by watch)" in line
    assert main(["explain", str(path), "tcp 10.0.0.5:40000 -> 10.0.0.1:80 syn", "--json"]) == 0
    assert '"enforced": true' in capsys.readouterr().out
