"""Changing a policy safely, on a real queue: a shadow policy decides every
packet beside the enforced one and enforces nothing, its disagreements
logged and counted (also for packets the verdict cache answers); a reload
to a policy that fails its own test cases is refused and the running one
stays; every logged decision names its policy's digest and rule line."""
from __future__ import annotations

import json
import signal
import subprocess

import pytest

from daemon_harness import IPQD, RunningIpqd, udp_probe
from ipqd.policy.checked import policy_digest

pytestmark = pytest.mark.kernel

POLICY = """\
version: 1
queue: {{num: 0}}
hooks:
  - {{chain: input, family: ipv4, proto: udp}}
default: {{action: drop, log: false}}
{shadow}rules:
  - {{name: p5000, proto: udp, dport: 5000, action: accept}}
  - {{name: p5001, proto: udp, dport: 5001, action: accept, log: true}}
{tests}"""
CANDIDATE = """\
version: 1
default: {action: drop, log: false}
rules:
  - {name: only-5000, proto: udp, dport: 5000, action: accept}
"""
FAILING = """\
tests:
  - {packet: "udp 10.0.0.1:1 -> 10.0.0.2:5001", expect: drop, rule: default}
"""


def write(path, text):
    path.write_text(text)
    path.chmod(0o644)
    return str(path)


def stats(ipqd) -> dict:
    mark = len(ipqd.lines)
    ipqd.signal(signal.SIGUSR1)
    line = ipqd.wait_for(lambda l: l.startswith("stats: "), start=mark)
    return {k: int(v) for k, v in (kv.split("=") for kv in line.split()[1:])}


@pytest.mark.parametrize("named_by", ["policy", "option"])
def test_a_shadow_decides_beside_and_enforces_nothing(lab, tmp_path, named_by):
    tmp_path.chmod(0o755)
    in_policy = "shadow: candidate.yaml\n" if named_by == "policy" else ""
    policy = write(tmp_path / "policy.yaml", POLICY.format(shadow=in_policy, tests=""))
    candidate = write(tmp_path / "candidate.yaml", CANDIDATE)
    option = ("--shadow", candidate) if named_by == "option" else ()
    ipqd = RunningIpqd(lab.server, policy, str(tmp_path / "state"), *option)
    try:
        assert any(f"shadow policy {candidate} deciding beside it" in l for l in ipqd.lines)
        for port in (5000, 5001):
            for _ in range(3):
                assert udp_probe(lab, port), f"the enforced policy accepts {port}"
        line = ipqd.wait_for(lambda l: l.startswith("SHADOW "))
        assert line.startswith("SHADOW accept -> drop udp ") and ":5001 " in line
        assert line.endswith("rule=p5001 shadow-rule=default")
        counts = stats(ipqd)
        assert counts["shadow_disagreed"] == 3
        assert counts["shadow_decided"] == counts["packets"] >= 6
        assert counts["cache_hits"] >= 1        # the agreeing flow, kept on its second sight
        assert sum(l.startswith("SHADOW ") for l in ipqd.lines) == 3
        shown = subprocess.run([IPQD, "status", "--json", "--control",
                                str(tmp_path / "state" / "control")],
                               capture_output=True, text=True, timeout=60)
        assert shown.returncode == 0, shown.stderr
        shadow = json.loads(shown.stdout)["shadow"]
        assert shadow == {"path": candidate, "digest": policy_digest(candidate),
                          "decided": counts["shadow_decided"], "disagreed": 3}
        # a reload keeps the shadow, from the policy or from the option
        assert ipqd.reload().startswith("reloaded policy")
        assert udp_probe(lab, 5001)
        assert stats(ipqd)["shadow_disagreed"] == 4         # the counts carried over, and one more
    finally:
        assert ipqd.stop() == 0


def test_a_reload_refuses_a_policy_that_fails_its_tests(lab, tmp_path):
    tmp_path.chmod(0o755)
    path = tmp_path / "policy.yaml"
    write(path, POLICY.format(shadow="", tests=""))
    ipqd = RunningIpqd(lab.server, str(path), str(tmp_path / "state"))
    try:
        digest = policy_digest(str(path))
        write(path, POLICY.format(shadow="", tests=FAILING))
        answer = ipqd.reload()
        assert answer.startswith("reload refused")
        assert any('test "udp 10.0.0.1:1 -> 10.0.0.2:5001" failed: expected drop (default), '
                   'decided accept (p5001)' in l for l in ipqd.lines)
        assert udp_probe(lab, 5001), "the running policy stays"
        assert policy_digest(str(path)) != digest
    finally:
        assert ipqd.stop() == 0
