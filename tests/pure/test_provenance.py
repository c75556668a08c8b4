"""Provenance: a policy's digest (main file and fragments together), and
each logged decision carrying it with the deciding rule's file:line."""
from __future__ import annotations

import json

from ipqd.cli import main
from ipqd.daemon.decision_log import DecisionLog, decision_fields
from ipqd.policy.checked import load_checked, policy_digest
from ipqd.policy.model import Position
from test_decision_log import tcp_to, view_of

POLICY = "version: 1\ndefault: {action: drop}\nrules:\n  - {name: ssh, proto: tcp, dport: 22, " \
         "action: accept}\n"


def lay_out(tmp_path, fragment="rules:\n  - {name: web, proto: tcp, dport: 80, action: accept}\n"):
    tmp_path.chmod(0o755)
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY)
    path.chmod(0o644)
    (tmp_path / "policy.d").mkdir(mode=0o755, exist_ok=True)
    frag = tmp_path / "policy.d" / "10-web.yaml"
    frag.write_text(fragment)
    frag.chmod(0o644)
    return str(path)


def test_the_digest_covers_the_main_file_and_each_fragment(tmp_path):
    path = lay_out(tmp_path)
    digest = policy_digest(path)
    assert len(digest) == 64 and load_checked(path).digest == digest
    lay_out(tmp_path, "rules:\n  - {name: web, proto: tcp, dport: 81, action: accept}\n")
    assert policy_digest(path) != digest
    lay_out(tmp_path)
    assert policy_digest(path) == digest
    (tmp_path / "policy.d" / "10-web.yaml").rename(tmp_path / "policy.d" / "20-web.yaml")
    assert policy_digest(path) != digest            # a renamed fragment may move its rules


def test_a_decision_carries_the_digest_and_the_rules_line():
    fields = decision_fields("drop", "no-telnet", view_of(tcp_to(23)), 0, None,
                             Position("/etc/ipqd/policy.d/10-web.yaml", 12, 5), "ab" * 32)
    assert fields["IPQD_RULE_SOURCE"] == "/etc/ipqd/policy.d/10-web.yaml:12"
    assert fields["IPQD_POLICY_DIGEST"] == "ab" * 32
    sent = []
    log = DecisionLog(send=lambda m, p, f: sent.append(f), digest="cd" * 32)
    log.decision("accept", "ssh", view_of(tcp_to(22)), 0, None, Position("p.yaml", 4, 5))
    log.decision("drop", "default", view_of(tcp_to(23)), 0, None)
    log.close()
    assert [(f["IPQD_RULE"], f.get("IPQD_RULE_SOURCE"), f["IPQD_POLICY_DIGEST"])
            for f in sent if "IPQD_VERDICT" in f] == [("ssh", "p.yaml:4", "cd" * 32),
                                                      ("default", None, "cd" * 32)]


def test_explain_gives_the_same_digest(tmp_path, capsys):
    path = lay_out(tmp_path)
    assert main(["explain", path, "tcp 10.0.0.5:40000 -> 10.0.0.1:22", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert summary["digest"] == policy_digest(path)
