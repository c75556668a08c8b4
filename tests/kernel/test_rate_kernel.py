"""A rate per source through the real queue, against the kernel's own
hashlimit on the same packets: each source (or /24) gets its burst."""
from __future__ import annotations

import os
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
  - {chain: input, family: ipv4, proto: udp}
default: {action: drop, log: false}
rules:
  - {name: per-host, proto: udp, dport: 5501, action: accept, log: false,
     rate: {limit: 1/minute, burst: 3, per: src}}
  - {name: per-net, proto: udp, dport: 5502, action: accept, log: false,
     rate: {limit: 1/minute, burst: 3, per: src/24}}
"""
ORACLE = [
    "-p udp --dport 5501 -m hashlimit --hashlimit-upto 1/minute --hashlimit-burst 3 "
    "--hashlimit-mode srcip --hashlimit-name ipqd-host -j ACCEPT",
    "-p udp --dport 5502 -m hashlimit --hashlimit-upto 1/minute --hashlimit-burst 3 "
    "--hashlimit-mode srcip --hashlimit-srcmask 24 --hashlimit-name ipqd-net -j ACCEPT",
    "-p udp --dport 5501:5502 -j DROP",
]
SOURCES = ("10.77.0.1", "10.77.0.3")          # one /24
SENT = 8


def _received(lab) -> dict:
    """(source, port) -> datagrams the server got of SENT sent."""
    receivers = {}
    for port in (5501, 5502):
        rx = lab.server.socket(socket.AF_INET, socket.SOCK_DGRAM)
        rx.bind(("0.0.0.0", port))
        rx.settimeout(0.5)
        receivers[port] = rx
    try:
        for source in SOURCES:
            tx = lab.client.socket(socket.AF_INET, socket.SOCK_DGRAM)
            tx.bind((source, 0))
            for port in (5501, 5502):
                for n in range(SENT):
                    tx.sendto(f"{source} {n}".encode(), (lab.SERVER4, port))
            tx.close()
        time.sleep(0.3)
        got = {(s, p): 0 for s in SOURCES for p in (5501, 5502)}
        for port, rx in receivers.items():
            while True:
                try:
                    data, (addr, _) = rx.recvfrom(100)
                except socket.timeout:
                    break
                got[(addr, port)] += 1
        return got
    finally:
        for rx in receivers.values():
            rx.close()


def test_rate_per_source_counts_as_hashlimit_does(lab, tmp_path):
    lab.client.sh("ip addr add 10.77.0.3/24 dev veth-c")
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY)
    os.chmod(path, 0o644)
    ipqd = RunningIpqd(lab.server, str(path), str(tmp_path / "state"),
                       "--backend", "iptables-legacy")
    try:
        got = _received(lab)
    finally:
        assert ipqd.stop() == 0
    for rule in ORACLE:
        iptables(lab.server, f"-A INPUT {rule}")
    oracle = _received(lab)
    assert got == oracle, (got, oracle)
    # per host: each source its own burst; per /24: both share one
    assert [got[(s, 5501)] for s in SOURCES] == [3, 3]
    assert sum(got[(s, 5502)] for s in SOURCES) == 3
