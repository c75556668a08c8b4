"""`ipqd explain --pcap` agrees with the live daemon, packet for packet, on a
stateful policy.

`ipqd run` answers the server's input traffic with a policy that starts with
`ct_state: [established, related]` and gives each conntrack state a rule of
its own; a packet socket on the server's interface records both directions
into a capture (what `tcpdump -i veth-s -w` records: incoming packets before
any hook, the daemon's drops too). The traffic brings every state: new
connections, their replies and later packets, replies to connections the
server opened, an ICMP error about one of them, packets conntrack calls
invalid, and neighbour discovery (untracked). Then explain replays the
capture with the same policy, and each packet the daemon decided gets the
daemon's verdict and rule from explain, in the same order.
"""
from __future__ import annotations

import collections
import ipaddress
import json
import os
import re
import socket
import struct
import subprocess
import threading
import time

import dpkt
import pytest

from daemon_harness import IPQD, RunningIpqd

pytestmark = pytest.mark.kernel

POLICY = """\
version: 1
queue: {num: 0, fail_open: false, offload: off}
hooks:
  - {chain: input, family: both}
default: {action: drop, log: true}
logging: {rate: 100000/second}
rules:
  - {name: established, ct_state: [established, related], action: accept}
  - {name: invalid, ct_state: invalid, action: drop}
  - {name: untracked, ct_state: untracked, action: accept}
  - {name: dns, proto: udp, dport: 5353, action: accept}
  - {name: ping, proto: icmp, icmp_type: echo-request, action: accept}
  - {name: ping6, proto: icmpv6, icmp_type: echo-request, action: accept}
  - {name: web, proto: tcp, dport: 8080, action: accept}
  - {name: no-telnet, proto: tcp, dport: 23, action: drop}
"""
ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4
LINKTYPE_LINUX_SLL = 113
LINE = re.compile(r"(ACCEPT|DROP) (?:(?:malformed|cut) \(.*\) )?(\S+) (\S+) -> (\S+)"
                  r"(?: type=(\d+) code=(\d+))?(?: in=\S+)?(?: out=\S+)? rule=(\S+)")


class Capture:
    """A packet socket on one interface of a host, written to a pcap
    (Linux cooked capture: it keeps each packet's direction)."""

    def __init__(self, host, device: str, path: str):
        self.path = path
        self.directions: list = []          # pkttype per frame, in file order
        self.sock = host.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_ALL))
        self.sock.bind((device, ETH_P_ALL))
        self.sock.settimeout(0.05)
        self._stop = threading.Event()
        self._file = open(path, "wb")
        self._writer = dpkt.pcap.Writer(self._file, snaplen=65535, linktype=LINKTYPE_LINUX_SLL)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data, (_, proto, pkttype, hatype, address) = self.sock.recvfrom(65535)
            except socket.timeout:
                continue
            header = struct.pack("!HHH8sH", pkttype, hatype, len(address), address[:8], proto)
            self._writer.writepkt(header + data, time.time())
            self.directions.append(pkttype)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()
        self._file.close()


def key_of(proto: str, src: str, dst: str, icmp_type, icmp_code) -> tuple:
    def split(endpoint: str):
        if endpoint.startswith("["):
            address, _, port = endpoint[1:].partition("]:")
            return address, int(port)
        if endpoint.count(":") == 1:
            address, port = endpoint.split(":")
            return address, int(port)
        return endpoint, None
    return (proto, *split(src), *split(dst),
            None if icmp_type is None else int(icmp_type),
            None if icmp_code is None else int(icmp_code))


def record_key(record: dict) -> tuple:
    p = record["packet"]
    names = {6: "tcp", 17: "udp", 1: "icmp", 58: "icmpv6"}

    def endpoint(address, port):
        if port is None:
            return address
        return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
    return key_of(names.get(p["proto"], str(p["proto"])), endpoint(p["src"], p["sport"]),
                  endpoint(p["dst"], p["dport"]), p["icmp_type"], p["icmp_code"])


def live_decisions(lines) -> dict:
    """Each key's (verdict, rule) in the daemon's order."""
    decided = collections.defaultdict(list)
    for line in lines:
        found = LINE.fullmatch(line)
        if found:
            verdict, proto, src, dst, icmp_type, icmp_code, rule = found.groups()
            decided[key_of(proto, src, dst, icmp_type, icmp_code)].append((verdict, rule))
    return decided


def raw_send(host, packet: bytes, destination: str) -> None:
    """An IPv4 packet exactly as built (IP_HDRINCL), from inside `host`."""
    sock = host.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    try:
        sock.sendto(packet, (destination, 0))
    finally:
        sock.close()


def crafted(lab, l4, proto: int) -> bytes:
    packet = dpkt.ip.IP(src=ipaddress.ip_address(lab.CLIENT4).packed,
                        dst=ipaddress.ip_address(lab.SERVER4).packed, p=proto, ttl=64, data=l4)
    packet.len = len(packet)
    return bytes(packet)           # dpkt fills in the IP and TCP checksums


def udp_socket(host, port: int = 0) -> socket.socket:
    sock = host.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", port))
    sock.settimeout(2)
    return sock


def traffic(lab) -> None:
    """Every conntrack state at the server's input hook, one exchange at a time."""
    server, client = lab.server, lab.client
    # A UDP request, its answer, and a second request: new, then established.
    listener, asker = udp_socket(server, 5353), udp_socket(client)
    asker.sendto(b"q1", (lab.SERVER4, 5353))
    _, peer = listener.recvfrom(100)
    listener.sendto(b"r1", peer)
    assert asker.recv(100) == b"r1"
    asker.sendto(b"q2", (lab.SERVER4, 5353))
    assert listener.recv(100) == b"q2"
    # The server asks a DNS-like question: the answer is established (the case).
    resolver, querier = udp_socket(client, 53), udp_socket(server)
    querier.sendto(b"query", (lab.CLIENT4, 53))
    _, peer = resolver.recvfrom(100)
    resolver.sendto(b"answer", peer)
    assert querier.recv(100) == b"answer"
    # The server probes a closed port: the port unreachable is related.
    querier.sendto(b"probe", (lab.CLIENT4, 9))
    time.sleep(0.2)
    for sock in (listener, asker, resolver, querier):
        sock.close()
    # A TCP connection to an allowed port, data both ways, closed by the client.
    web = server.socket(socket.AF_INET, socket.SOCK_STREAM)
    web.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    web.bind(("0.0.0.0", 8080))
    web.listen(4)
    web.settimeout(2)
    browser = client.socket(socket.AF_INET, socket.SOCK_STREAM)
    browser.settimeout(2)
    browser.connect((lab.SERVER4, 8080))
    conn, _ = web.accept()
    conn.settimeout(2)
    browser.sendall(b"GET")
    assert conn.recv(100) == b"GET"
    conn.sendall(b"200 OK")
    assert browser.recv(100) == b"200 OK"
    browser.close()
    assert conn.recv(100) == b""
    conn.close()
    time.sleep(0.2)
    # A SYN to a denied port: dropped, never answered.
    telnet = client.socket(socket.AF_INET, socket.SOCK_STREAM)
    telnet.setblocking(False)
    telnet.connect_ex((lab.SERVER4, 23))
    time.sleep(0.3)
    telnet.close()
    # The server connects to a closed port of the client: the reset is established.
    refused = server.socket(socket.AF_INET, socket.SOCK_STREAM)
    refused.settimeout(2)
    with pytest.raises(ConnectionRefusedError):
        refused.connect((lab.CLIENT4, 24))
    refused.close()
    # Packets conntrack calls invalid: a FIN with no connection, an unasked echo
    # reply; and a bare ACK, which it picks up mid-stream as new.
    raw_send(client, crafted(lab, dpkt.tcp.TCP(sport=41000, dport=8080, seq=5, ack=9,
                                               flags=dpkt.tcp.TH_FIN | dpkt.tcp.TH_ACK,
                                               win=512), 6), lab.SERVER4)
    raw_send(client, crafted(lab, dpkt.icmp.ICMP(type=0, data=dpkt.icmp.ICMP.Echo(
        id=4242, seq=1)), 1), lab.SERVER4)
    raw_send(client, crafted(lab, dpkt.tcp.TCP(sport=41001, dport=8080, seq=5, ack=9,
                                               flags=dpkt.tcp.TH_ACK, win=512), 6), lab.SERVER4)
    web.close()
    # Pings both ways: requests new then established, the server's answer established;
    # IPv6 brings neighbour discovery (untracked).
    assert client.sh(f"ping -c 2 -i 0.2 -W 1 {lab.SERVER4}", check=False).returncode == 0
    assert server.sh(f"ping -c 1 -W 1 {lab.CLIENT4}", check=False).returncode == 0
    assert client.sh(f"ping -6 -c 1 -W 1 {lab.SERVER6}", check=False).returncode == 0
    time.sleep(0.3)


def test_explain_gives_each_captured_packet_the_live_verdict(lab, tmp_path):
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    os.chmod(policy, 0o644)
    ipqd = RunningIpqd(lab.server, str(policy), str(tmp_path / "state"))
    try:
        mark = len(ipqd.lines)
        capture = Capture(lab.server, "veth-s", str(tmp_path / "live.pcap"))
        try:
            traffic(lab)
        finally:
            capture.stop()
        replay = subprocess.run([IPQD, "explain", str(policy), "--pcap", capture.path, "--json",
                                 "--in", "veth-s"], capture_output=True, text=True, timeout=60)
        assert replay.returncode == 0, replay.stderr
        objects = [json.loads(line) for line in replay.stdout.splitlines()]
        records = [o for o in objects if o["type"] == "packet"]
        assert len(records) == len(capture.directions)
        incoming = [r for r in records
                    if capture.directions[r["number"] - 1] != PACKET_OUTGOING
                    and r["verdict"] is not None]
        explained = collections.defaultdict(list)
        for r in incoming:
            explained[record_key(r)].append((r["verdict"].upper(), r["rule"] or "default"))
        unicast = {k for k in explained if k[3] in (lab.SERVER4, lab.SERVER6)}

        def logged_all() -> bool:
            live = live_decisions(ipqd.lines[mark:])
            return all(len(live[k]) >= len(explained[k]) for k in unicast)
        deadline = time.monotonic() + 10
        while not logged_all() and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        ipqd.stop()
    live = live_decisions(ipqd.lines[mark:])
    for key, decisions in explained.items():
        if key in unicast:          # only this test's traffic: exactly the daemon's decisions
            assert decisions == live[key], (key, decisions, live[key])
        elif live[key]:             # background (neighbour discovery): a run of the daemon's
            runs = [live[key][i:i + len(decisions)] for i in range(len(live[key]))]
            assert decisions in runs, (key, decisions, live[key])
        # else multicast the server is no member of (MLD reports): no hook saw it
    # Every conntrack state was there, and the reply was accepted.
    states = {r["packet"]["ct_state"] for r in incoming if record_key(r) in live}
    assert states >= {"new", "established", "related", "invalid", "untracked"}, states
    assert any(k[:3] == ("udp", lab.CLIENT4, 53) and d == [("ACCEPT", "established")]
               for k, d in explained.items()), explained
    compared = sum(len(d) for k, d in explained.items() if live[k])
    assert compared >= 20, explained
