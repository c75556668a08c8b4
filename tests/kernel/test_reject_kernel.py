"""`action: reject` through the real queue: the client is refused at once,
and gets the same error as from the kernel's own REJECT rule (the oracle)."""
from __future__ import annotations

import errno
import os
import signal
import socket
import time

import pytest

from daemon_harness import RunningIpqd
from netns import iptables

pytestmark = pytest.mark.kernel

POLICY = """\
version: 1
queue: {num: 0, bypass: false, fail_open: false}
hooks:
  - {chain: input}
default: {action: accept, log: false}
rules:
  - {name: tcp-default, proto: tcp, dport: 5101, action: reject}
  - {name: tcp-icmp, proto: tcp, dport: 5102, action: reject, reject_with: port-unreachable}
  - {name: tcp-dropped, proto: tcp, dport: 5103, action: drop}
  - {name: udp-default, proto: udp, dport: 5201, action: reject}
  - {name: udp-admin, proto: udp, dport: 5202, action: reject, reject_with: admin-prohibited}
  - {name: udp-host, proto: udp, dport: 5203, action: reject, reject_with: host-unreachable}
"""

# The same refusals written as the kernel's own rules, per family.
ORACLE = {
    4: ["-p tcp --dport 5101 -j REJECT --reject-with tcp-reset",
        "-p tcp --dport 5102 -j REJECT --reject-with icmp-port-unreachable",
        "-p tcp --dport 5103 -j DROP",
        "-p udp --dport 5201 -j REJECT --reject-with icmp-port-unreachable",
        "-p udp --dport 5202 -j REJECT --reject-with icmp-admin-prohibited",
        "-p udp --dport 5203 -j REJECT --reject-with icmp-host-unreachable"],
    6: ["-p tcp --dport 5101 -j REJECT --reject-with tcp-reset",
        "-p tcp --dport 5102 -j REJECT --reject-with icmp6-port-unreachable",
        "-p tcp --dport 5103 -j DROP",
        "-p udp --dport 5201 -j REJECT --reject-with icmp6-port-unreachable",
        "-p udp --dport 5202 -j REJECT --reject-with icmp6-adm-prohibited",
        "-p udp --dport 5203 -j REJECT --reject-with icmp6-addr-unreachable"],
}
TCP_PORTS = (5101, 5102, 5103)
UDP_PORTS = (5201, 5202, 5203)
# A refusal "at once": far below any retransmission timer (1 s for a SYN).
AT_ONCE = 0.25
WAIT = 1.5


def _listen(lab):
    """A listener on every port in both families: only a firewall refuses."""
    opened = []
    for family, any_addr in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        for port in TCP_PORTS:
            s = lab.server.socket(family, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.bind((any_addr, port))
            s.listen(8)
            opened.append(s)
        for port in UDP_PORTS:
            s = lab.server.socket(family, socket.SOCK_DGRAM)
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.bind((any_addr, port))
            opened.append(s)
    return opened


def _outcome(lab, family: int, kind: int, port: int):
    """(errno name or 'ok'/'timeout', seconds) of one attempt client -> server."""
    target = lab.SERVER4 if family == 4 else lab.SERVER6
    s = lab.client.socket(socket.AF_INET if family == 4 else socket.AF_INET6, kind)
    s.settimeout(WAIT)
    started = time.monotonic()
    try:
        if kind == socket.SOCK_STREAM:
            s.connect((target, port))
        else:
            s.connect((target, port))
            s.send(b"probe")
            s.recv(100)             # only an ICMP error can end this early
        return "ok", time.monotonic() - started
    except socket.timeout:
        return "timeout", time.monotonic() - started
    except OSError as e:
        return errno.errorcode[e.errno], time.monotonic() - started
    finally:
        s.close()


def _outcomes(lab) -> dict:
    out = {}
    for family in (4, 6):
        for port in TCP_PORTS:
            out[(family, "tcp", port)] = _outcome(lab, family, socket.SOCK_STREAM, port)
        for port in UDP_PORTS:
            out[(family, "udp", port)] = _outcome(lab, family, socket.SOCK_DGRAM, port)
    return out


def _same_flow(lab, family: int, times: int = 4) -> list:
    """One connected UDP socket to 5201 sending `times` datagrams: each answer."""
    target = lab.SERVER4 if family == 4 else lab.SERVER6
    s = lab.client.socket(socket.AF_INET if family == 4 else socket.AF_INET6, socket.SOCK_DGRAM)
    s.settimeout(WAIT)
    s.connect((target, 5201))
    answers = []
    try:
        for n in range(times):
            try:
                s.send(b"again %d" % n)
                s.recv(100)
                answers.append("ok")
            except socket.timeout:
                answers.append("timeout")
            except OSError as e:
                answers.append(errno.errorcode[e.errno])
    finally:
        s.close()
    return answers


def _stats(ipqd) -> dict:
    mark = len(ipqd.lines)
    ipqd.signal(signal.SIGUSR1)
    line = ipqd.wait_for(lambda l: l.startswith("stats: "), start=mark)
    return {k: int(v) for k, v in (kv.split("=") for kv in line.split()[1:])}


@pytest.mark.parametrize("backend", ["iptables-legacy", "iptables-nft"])
def test_reject_refuses_at_once_as_the_kernels_reject_does(lab, tmp_path, backend):
    # ICMP errors are rate limited per peer; the test sends a few dozen.
    lab.server.sh("sysctl -qw net.ipv4.icmp_ratelimit=0 net.ipv6.icmp.ratelimit=0")
    sockets = _listen(lab)
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY)
    os.chmod(path, 0o644)
    try:
        ipqd = RunningIpqd(lab.server, str(path), str(tmp_path / "state"), "--backend", backend)
        try:
            got = _outcomes(lab)
            # later packets of a rejected flow are refused too: nothing cached
            # or offloaded lets them through
            again = {family: _same_flow(lab, family) for family in (4, 6)}
            stats = _stats(ipqd)
        finally:
            assert ipqd.stop() == 0
        for family in (4, 6):
            for rule in ORACLE[family]:
                iptables(lab.server, f"-A INPUT {rule}", family)
        oracle = _outcomes(lab)
    finally:
        for s in sockets:
            s.close()

    for family in (4, 6):
        refused, seconds = got[(family, "tcp", 5101)]
        assert refused == "ECONNREFUSED" and seconds < AT_ONCE, (family, got)
        refused, seconds = got[(family, "udp", 5201)]
        assert refused == "ECONNREFUSED" and seconds < AT_ONCE, (family, got)
        assert got[(family, "tcp", 5103)][0] == "timeout"       # a drop is not a refusal
    assert got[(4, "udp", 5202)][0] == "EHOSTUNREACH"           # ICMP_PKT_FILTERED
    assert got[(6, "udp", 5202)][0] == "EACCES"                 # ICMPV6_ADM_PROHIBITED
    # Every attempt ends as it does against the kernel's own REJECT rules.
    assert {k: v[0] for k, v in got.items()} == {k: v[0] for k, v in oracle.items()}
    for key, (outcome, seconds) in got.items():
        if outcome != "timeout":
            assert seconds < AT_ONCE, (key, got)
    # Every refusal went through ipqd: one per attempt (a TCP client sends one
    # SYN before the reset; 5103's dropped SYNs are not rejects).
    assert stats["rejected"] >= 2 * 5, stats
    assert stats["reject_returned"] == 0, stats
    assert again == {4: ["ECONNREFUSED"] * 4, 6: ["ECONNREFUSED"] * 4}, again
