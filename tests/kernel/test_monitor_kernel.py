"""`mode: monitor` through the real queue: what the policy would drop or
reject gets through, and the log and the counters say it was not enforced."""
from __future__ import annotations

import os
import signal

import pytest

from daemon_harness import RunningIpqd, tcp_probe, udp_probe

pytestmark = pytest.mark.kernel

POLICY = """\
version: 1
mode: monitor
queue: {num: 0, bypass: false, fail_open: false}
hooks:
  - {chain: input, family: ipv4}
default: {action: drop, log: false}
rules:
  - {name: watch, proto: udp, dport: 5301, action: log}
  - {name: refused, proto: tcp, dport: 5401, action: reject}
  - {name: open, proto: udp, dport: 5301, action: accept, log: false}
"""


def test_monitor_mode_lets_everything_through_and_logs_what_it_would_stop(lab, tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY)
    os.chmod(path, 0o644)
    ipqd = RunningIpqd(lab.server, str(path), str(tmp_path / "state"),
                       "--backend", "iptables-legacy")
    try:
        assert tcp_probe(lab, 5401)             # the policy would reject it
        assert udp_probe(lab, 5302)             # the default would drop it
        assert udp_probe(lab, 5301)             # accepted, and logged by "watch"
        ipqd.wait_for(lambda l: l.startswith("REJECT (not enforced) tcp") and "rule=refused" in l)
        ipqd.wait_for(lambda l: l.startswith("DROP (not enforced) udp") and ":5302 " in l)
        ipqd.wait_for(lambda l: l.startswith("ACCEPT udp") and "logged-by=watch" in l)
        mark = len(ipqd.lines)
        ipqd.signal(signal.SIGUSR1)
        line = ipqd.wait_for(lambda l: l.startswith("stats: "), start=mark)
        stats = {k: int(v) for k, v in (kv.split("=") for kv in line.split()[1:])}
        assert stats["dropped"] == 0 and stats["rejected"] == 0
        assert stats["not_enforced"] >= 2 and stats["accepted"] == stats["packets"]
    finally:
        assert ipqd.stop() == 0
