"""Log injection: rule names, interface names and addresses reach stderr and
journal fields, and none of them can forge a second entry or a field."""
from __future__ import annotations

import os
import sys

import pytest

from daemon_harness import RunningIpqd, udp_probe
from ipqd.daemon.decision_log import clean, encode_journal
from sandbox import Journald, require_journald

HOSTILE = "r\rACCEPT tcp 1.2.3.4:1 -> 5.6.7.8:2 rule=forged\x1b[2J\x85x\u2028y\x00z"
# The same text as YAML escapes, for the policy file.
HOSTILE_YAML = r'"r\rACCEPT tcp 1.2.3.4:1 -> 5.6.7.8:2 rule=forged\e[2J\Nx\Ly\0z"'
IFNAME = "v\x1b[31ms\x7f"

POLICY = f"""\
version: 1
queue: {{num: 0}}
hooks: [{{chain: input, family: ipv4, proto: udp}}]
default: {{action: accept, log: false}}
rules:
  - name: {HOSTILE_YAML}
    proto: udp
    dport: 5001
    action: drop
    log: true
"""


@pytest.mark.kernel
def test_hostile_rule_and_interface_names_make_one_escaped_stderr_line(lab, tmp_path):
    lab.server.sh(f"ip link set veth-s down && ip link set veth-s name $(printf 'v\\033[31ms\\177') "
                  f"&& ip link set dev $(printf 'v\\033[31ms\\177') up")
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY)
    os.chmod(path, 0o644)
    ipqd = RunningIpqd(lab.server, str(path), str(tmp_path / "st"))
    try:
        assert not udp_probe(lab, 5001)
        line = ipqd.wait_for(lambda l: l.startswith("DROP udp"))
        assert line.endswith(f"in={clean(IFNAME)} rule={clean(HOSTILE)}"), line
        assert not any(c in line for c in "\r\x1b\x85\u2028\x00\x7f")
        assert sum("forged" in l for l in ipqd.lines) == 1       # the one line, escaped
    finally:
        ipqd.stop()


WRITER = """
import sys, time
from ipqd.daemon.decision_log import DecisionLog
from ipqd.decision.packet import PacketMeta, parse
sys.path.insert(0, %r)
from fuzz_corpus import ipv4, udp
log = DecisionLog("journal")
view = parse(ipv4(udp(dport=5001)), PacketMeta(hook=1, indev="eth0\\nPRIORITY=0\\nMESSAGE=forged"))
log.decision("drop", "x\\nIPQD_VERDICT=accept\\nMESSAGE=forged\\n", view, 0, None)
log.event("reload\\nMESSAGE=forged", 6, IPQD_EVENT="e\\nIPQD_VERDICT=accept")
log.close()
"""


def test_journal_fields_cannot_be_forged():
    require_journald()
    with Journald() as journald:
        writer = journald.popen([sys.executable, "-c", WRITER % os.path.dirname(os.path.dirname(os.path.abspath(__file__)))])
        assert writer.wait(30) == 0
        decision = journald.wait_journal(lambda e: "IPQD_VERDICT" in e, identifier="ipqd")
        entries = journald.journal(identifier="ipqd")
    assert len(entries) == 2
    assert decision["IPQD_VERDICT"] == "drop" and decision["PRIORITY"] == "5"
    assert decision["IPQD_RULE"] == "x\\x0aIPQD_VERDICT=accept\\x0aMESSAGE=forged\\x0a"
    assert decision["IPQD_IN"] == "eth0\\x0aPRIORITY=0\\x0aMESSAGE=forged"
    assert decision["MESSAGE"].startswith("DROP udp 10.0.0.1:40000 -> 10.0.0.2:5001 in=eth0\\x0a")
    event = [e for e in entries if "IPQD_EVENT" in e][0]
    assert event["MESSAGE"] == "reload\\x0aMESSAGE=forged" and "IPQD_VERDICT" not in event
    assert not any(e["MESSAGE"] == "forged" for e in entries)


def test_journal_encoding_carries_a_newline_inside_one_field():
    """Even unescaped, a newline cannot start a field: such a value is sent length-prefixed."""
    data = encode_journal({"MESSAGE": "a\nPRIORITY=0", "PRIORITY": "6"})
    assert data == b"MESSAGE\n\x0c\x00\x00\x00\x00\x00\x00\x00a\nPRIORITY=0\nPRIORITY=6\n"
