"""Flow offload with the real kernel: `ipqd run` in a namespace, TCP flows
through it, and what ipqd and the kernel's offload rules each counted."""
from __future__ import annotations

import os
import re
import signal
import socket
import threading
import time

import pytest

from daemon_harness import RunningIpqd
from netns import iptables

pytestmark = pytest.mark.kernel

POLICY = """\
version: 1
queue: {num: 0, bypass: false, fail_open: false}
hooks:
  - {chain: input, family: ipv4, proto: tcp}
default: {action: drop, log: false}
rules:
  - {name: bulk, proto: tcp, dport: 5001, action: accept, log: false}
  - {name: watched, proto: tcp, dport: 5002, action: accept, log: false, offload: false}
  - {name: opened, proto: tcp, dport: 5003, ct_state: new, action: accept, log: false}
  - {name: closed, proto: tcp, dport: 5003, ct_state: established, action: drop, log: false}
"""


def start(lab, tmp_path, text=POLICY, *extra):
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    os.chmod(path, 0o644)
    return RunningIpqd(lab.server, str(path), str(tmp_path / "state"), *extra)


def send(lab, port: int, size: int, timeout: float = 20) -> int:
    """`size` bytes client -> server:port over TCP; the bytes the server read."""
    listener = lab.server.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("0.0.0.0", port))
    listener.listen(1)
    listener.settimeout(timeout)
    got = [0]

    def receive():
        try:
            conn, _ = listener.accept()
        except socket.timeout:
            return
        conn.settimeout(timeout)
        with conn:
            while True:
                try:
                    data = conn.recv(1 << 16)
                except socket.timeout:
                    return
                if not data:
                    return
                got[0] += len(data)

    reader = threading.Thread(target=receive)
    reader.start()
    client = lab.client.socket(socket.AF_INET, socket.SOCK_STREAM)
    client.settimeout(timeout)
    try:
        client.connect((lab.SERVER4, port))
        chunk = b"x" * (1 << 16)
        left = size
        while left > 0:
            left -= client.send(chunk[:left])
        client.shutdown(socket.SHUT_WR)
    finally:
        client.close()
        reader.join(timeout + 5)
        listener.close()
    return got[0]


def hits(ipqd) -> dict:
    """rule name -> hits, from ipqd's SIGUSR1 report."""
    mark = len(ipqd.lines)
    ipqd.signal(signal.SIGUSR1)
    ipqd.wait_for(lambda l: l.startswith("rule default:"), start=mark)
    found = {}
    for line in ipqd.lines[mark:]:
        m = re.match(r"rule (\S+): (\d+) hits", line)
        if m:
            found[m.group(1)] = int(m.group(2))
    return found


def stats(ipqd) -> dict:
    mark = len(ipqd.lines)
    ipqd.signal(signal.SIGUSR1)
    line = ipqd.wait_for(lambda l: l.startswith("stats: "), start=mark)
    return {k: int(v) for k, v in (kv.split("=") for kv in line.split()[1:])}


def offloaded_packets(host, variant: str, target: str) -> int:
    """Packets the kernel's offload rules (connmark match) accepted or dropped."""
    saved = host.sh(f"iptables-{variant}-save -c -t filter").stdout
    total = 0
    for line in saved.splitlines():
        # (each kept-verdict rule jumps to the chain that counts per rule slot)
        m = re.match(r"\[(\d+):\d+\] -A IPQD_INPUT .*connmark.* -j (IPQD_KEPT_)?" + target
                     + "$", line)
        if m:
            total += int(m.group(1))
    return total


@pytest.mark.parametrize("variant", ["legacy", "nft"])
def test_offloaded_flows_bypass_ipqd_and_the_kernel_counts_them(lab, tmp_path, variant):
    ipqd = start(lab, tmp_path, POLICY, "--backend", f"iptables-{variant}")
    try:
        size = 8 << 20
        assert send(lab, 5001, size) == size
        bulk_hits = hits(ipqd)["bulk"]
        in_kernel = offloaded_packets(lab.server, variant, "ACCEPT")
        # ipqd decided the SYN (and whatever was queued before the connmark was
        # written); the kernel accepted the rest.
        assert 1 <= bulk_hits <= 5, bulk_hits
        assert in_kernel >= 20 * bulk_hits, (in_kernel, bulk_hits)
        assert stats(ipqd)["offloaded"] >= 1

        # `offload: false`: every packet of the flow still comes to ipqd.
        assert send(lab, 5002, 1 << 20) == 1 << 20
        watched = hits(ipqd)["watched"]
        assert watched >= 20, watched
        assert offloaded_packets(lab.server, variant, "ACCEPT") - in_kernel <= 2
    finally:
        assert ipqd.stop() == 0
    assert "IPQD" not in lab.server.sh(f"iptables-{variant}-save").stdout


def test_an_established_flow_that_is_dropped_is_dropped_in_the_kernel(lab, tmp_path):
    ipqd = start(lab, tmp_path, POLICY, "--backend", "iptables-legacy")
    try:
        # The SYN is accepted (rule opened), the handshake's last ACK is dropped
        # (rule closed) and offloaded: the data and its retransmissions are
        # dropped by the kernel.
        assert send(lab, 5003, 1000, timeout=2) == 0
        found = hits(ipqd)
        assert found["opened"] >= 1
        assert 1 <= found["closed"] <= 3, found
        assert offloaded_packets(lab.server, "legacy", "DROP") >= 2
        assert offloaded_packets(lab.server, "legacy", "ACCEPT") == 0
    finally:
        ipqd.stop()


def test_a_request_that_comes_back_is_answered_and_ipqd_stops_asking(lab, tmp_path):
    """Without ipqd's hook rules nothing turns the request into a connmark:
    the packet comes back still carrying it and gets a plain verdict, and
    the worker stops asking, so later packets go through ipqd once."""
    plain = POLICY.split("  - {name: watched")[0]
    iptables(lab.server, "-A INPUT -p tcp --dport 5001 -j NFQUEUE --queue-num 0")
    ipqd = start(lab, tmp_path, plain, "--no-hooks", "--no-cache")
    try:
        size = 256 << 10
        assert send(lab, 5001, size) == size
        # (the workers' figures reach the report a moment later)
        deadline = time.monotonic() + 5
        while True:
            counted = stats(ipqd)
            if counted["offload_returned"] >= 1 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert counted["offloaded"] == 1 and counted["offload_returned"] == 1, counted
        assert counted["packets"] >= 20, counted     # the rest of the transfer, once each
    finally:
        ipqd.stop()


def test_the_nft_offload_rules_load_into_a_real_kernel(lab):
    """This kernel may lack nft's `queue`; the offload rules around it must load anyway."""
    from ipqd.kernel import hooks
    from ipqd.policy.model import Hook, QueueConfig
    plan = hooks.plan([Hook("input"), Hook("forward", "ipv6")], QueueConfig(conntrack=True), "nft")
    (argv, text), = plan.scripts
    without_queue = "\n".join(line for line in text.splitlines() if " queue num " not in line)
    assert sum("ct direction" in line and "ct mark set ct mark or" in line
               for line in without_queue.splitlines()) == 8
    result = lab.server.sh(f"nft -f - <<'END'\n{without_queue}\nEND", check=False)
    assert result.returncode == 0, result.stderr
    listed = lab.server.sh("nft list table inet ipqd").stdout
    assert "ct direction original ct mark & 0x20000000 == 0x20000000 counter name" in listed, \
        listed
    assert "meta mark set meta mark & 0x03ffffff accept" in listed, listed


def test_the_nft_rule_slots_count_offloaded_packets_per_rule(lab):
    """The nft counting path in a real kernel, without nft's `queue` (this
    kernel may lack it): a rule of another table plays ipqd's request on a
    flow's first packet (accept, rule slot 2); ipqd's rules write the slot
    into the connmark, and the later packets are counted in slot 2's named
    counter through the map, read back as `ipqd counters` reads them."""
    from ipqd.kernel import hooks
    from ipqd.kernel.offload_counters import parse_nft_json
    from ipqd.policy.model import Hook, QueueConfig
    from ipqd.policy.offload import layout
    queue = QueueConfig()
    plan = hooks.plan([Hook("input", "ipv4", "udp")], queue, "nft")
    (argv, text), = plan.scripts
    without_queue = "\n".join(line for line in text.splitlines() if " queue num " not in line)
    bits = layout(queue.offload, ["input"])
    request = bits.request_accept | bits.request_value(2)
    lab.server.sh("sysctl -qw net.netfilter.nf_conntrack_acct=1")
    lab.server.sh(f"nft -f - <<'END'\n{without_queue}\nEND")
    lab.server.sh("nft -f - <<'END'\ntable inet play {\n  chain input {\n"
                  "    type filter hook input priority -10; policy accept;\n"
                  f"    udp dport 5010 ct original packets 1 meta mark set {request:#x}\n"
                  "  }\n}\nEND")
    try:
        rx = lab.server.socket(socket.AF_INET, socket.SOCK_DGRAM)
        rx.bind(("0.0.0.0", 5010))
        rx.settimeout(2)
        tx = lab.client.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for size in (10, 20, 30, 40):
            tx.sendto(b"x" * size, (lab.SERVER4, 5010))
            assert len(rx.recv(100)) == size
        tx.close()
        rx.close()
        counts = parse_nft_json(lab.server.sh("nft -j list table inet ipqd").stdout)
        assert counts[(2, "accept")] == (3, 3 * 28 + 20 + 30 + 40), counts
        assert not any(packets for key, (packets, _) in counts.items() if key != (2, "accept"))
    finally:
        lab.server.sh("nft delete table inet play; nft delete table inet ipqd", check=False)
