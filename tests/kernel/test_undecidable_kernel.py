"""The IPv6 extension-header evasion on a real kernel: `ipqd run` with
copy_range 256, default accept and telnet dropped; the client sends SYNs to
port 23 behind destination-options headers, and the server's listener never
sees them (no SYN-RECV), while ordinary traffic still passes."""
from __future__ import annotations

import signal
import socket
import time

import pytest

from daemon_harness import RunningIpqd
from ipv6_chains import syn_behind_headers, syn_behind_one_big_header
from netns import iptables

pytestmark = pytest.mark.kernel

POLICY = """\
version: 1
queue: {num: 0, copy_range: 256, bypass: false, fail_open: false}
hooks:
  - {chain: input, family: both}
default: {action: accept, log: true}
rules:
  - {name: no-telnet, proto: tcp, dport: 23, action: drop}
"""


def syn_received(lab, port: int) -> list:
    """The server's half-open connections to `port`, as `ss` lists them."""
    out = lab.server.sh(f"ss -Htn state syn-recv '( sport = :{port} )'").stdout
    return [line for line in out.splitlines() if line.strip()]


def wait_until(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def stats(ipqd) -> dict:
    mark = len(ipqd.lines)
    ipqd.signal(signal.SIGUSR1)
    line = ipqd.wait_for(lambda l: l.startswith("stats: "), start=mark)
    return {k: int(v) for k, v in (kv.split("=") for kv in line.split()[1:])}


@pytest.fixture
def listeners(lab):
    made = []
    for port in (23, 24):
        sock = lab.server.socket(socket.AF_INET6, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("::", port))
        sock.listen(16)
        made.append(sock)
    yield
    for sock in made:
        sock.close()


def test_syns_behind_extension_headers_never_reach_a_dropped_port(lab, tmp_path, listeners):
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    policy.chmod(0o644)
    ipqd = RunningIpqd(lab.server, str(policy), str(tmp_path / "state"))
    try:
        # The client has no socket for these SYNs: its reset to the SYN-ACK
        # would end the half-open connection that shows the SYN arrived.
        iptables(lab.client, "-A OUTPUT -p tcp --tcp-flags RST RST -j DROP", family=6)
        raw = lab.client.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_RAW)
        client, server = lab.CLIENT6, lab.SERVER6
        sent = {
            40001: syn_behind_one_big_header(client, server, 40001, 23),    # TCP past byte 256
            40002: syn_behind_headers(client, server, 40002, 23),           # 9 headers
            40003: syn_behind_headers(client, server, 40003, 24),           # allowed
        }
        for packet in sent.values():
            raw.sendto(packet, (server, 0))
        raw.close()
        # The allowed one arrives: the kernel takes such packets, and ipqd
        # has answered everything sent before it.
        assert wait_until(lambda: any(":40003" in l for l in syn_received(lab, 24))), \
            "the allowed SYN behind 9 extension headers never arrived\n" + "\n".join(ipqd.lines)
        time.sleep(0.3)
        assert syn_received(lab, 23) == [], "a SYN reached the dropped port 23"
        ipqd.wait_for(lambda l: l.startswith("DROP tcp [fd77::1]:40002 -> [fd77::2]:23 ")
                      and l.endswith("rule=no-telnet"))
        ipqd.wait_for(lambda l: l == "DROP cut (transport header past copy_range) tcp "
                                     "fd77::1 -> fd77::2 in=veth-s rule=queue.undecidable")
        # Ordinary traffic still passes.
        normal = lab.client.socket(socket.AF_INET6, socket.SOCK_STREAM)
        normal.settimeout(3)
        normal.connect((server, 24))
        normal.close()
        counted = stats(ipqd)
        assert counted["undecidable"] == 1 and counted["malformed"] == 0
        assert syn_received(lab, 23) == []
    finally:
        ipqd.stop()
