"""The connection tracker `ipqd explain` replays captures with: the states
the kernel's conntrack gives, packet by packet (ipqd/decision/conntrack.py).

Each scenario is a conversation in order: (packet, capture time, the state
conntrack gives it). tests/kernel/test_explain_live.py checks the same
against the live kernel."""
from __future__ import annotations

import ipaddress
import struct

import dpkt
import pytest

from ipqd.decision.conntrack import (ICMPV6_UNTRACKED, TCP_CONNTRACKS, TCP_STATE_NAMES, Tracker,
                                     sIG, sIV)
from ipqd.decision.packet import parse, transport_offset

A, B, C = "10.0.0.5", "10.0.0.1", "10.0.0.9"
A6, B6 = "fd00::5", "fd00::1"
SYN, SYNACK, ACK, FIN, RST, PSH = "S", "SA", "A", "FA", "R", "PA"
_BITS = {"F": dpkt.tcp.TH_FIN, "S": dpkt.tcp.TH_SYN, "R": dpkt.tcp.TH_RST,
         "P": dpkt.tcp.TH_PUSH, "A": dpkt.tcp.TH_ACK, "U": dpkt.tcp.TH_URG}


def ip(src: str, dst: str, l4, proto: int, **fields) -> bytes:
    a, b = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    if a.version == 6:
        packet = dpkt.ip6.IP6(src=a.packed, dst=b.packed, nxt=proto, hlim=64, data=l4)
        packet.plen = len(bytes(l4))
        return bytes(packet)
    packet = dpkt.ip.IP(src=a.packed, dst=b.packed, p=proto, ttl=64, data=l4, **fields)
    packet.len = len(packet)
    return bytes(packet)


def tcp(src, sport, dst, dport, flags=SYN) -> bytes:
    bits = 0
    for letter in flags:
        bits |= _BITS[letter]
    return ip(src, dst, dpkt.tcp.TCP(sport=sport, dport=dport, flags=bits, win=1000), 6)


def udp(src, sport, dst, dport, proto=17) -> bytes:
    datagram = dpkt.udp.UDP(sport=sport, dport=dport, data=b"q")
    datagram.ulen = len(datagram)
    return ip(src, dst, datagram, proto)


def echo(src, dst, kind=8, ident=7) -> bytes:
    if ":" in src:
        return ip(src, dst, dpkt.icmp6.ICMP6(type=kind, data=struct.pack("!HH", ident, 1)), 58)
    return ip(src, dst, dpkt.icmp.ICMP(type=kind, data=dpkt.icmp.ICMP.Echo(id=ident, seq=1)), 1)


def error(src, dst, quoted: bytes, kind=3, code=3) -> bytes:
    """An ICMP error quoting `quoted` (cut to its first 28 bytes, as RFC 792 allows)."""
    if ":" in src:
        return ip(src, dst, dpkt.icmp6.ICMP6(type=kind, code=code, data=b"\0" * 4 + quoted), 58)
    return ip(src, dst, dpkt.icmp.ICMP(type=kind, code=code,
                                       data=dpkt.icmp.ICMP.Unreach(data=quoted[:28])), 1)


def replay(steps) -> list:
    tracker = Tracker()
    return [tracker.track(parse(packet), packet, now) for packet, now, _ in steps]


def check(steps) -> None:
    assert replay(steps) == [expected for _, _, expected in steps]


SCENARIOS = {
    "tcp handshake, data, close": [
        (tcp(A, 40000, B, 22, SYN), 0, "new"),
        (tcp(A, 40000, B, 22, SYN), 1, "new"),               # retransmitted: still unanswered
        (tcp(B, 22, A, 40000, SYNACK), 1, "established"),
        (tcp(A, 40000, B, 22, ACK), 1, "established"),
        (tcp(A, 40000, B, 22, PSH), 1, "established"),
        (tcp(B, 22, A, 40000, PSH), 1, "established"),
        (tcp(A, 40000, B, 22, FIN), 2, "established"),
        (tcp(B, 22, A, 40000, FIN), 2, "established"),
        (tcp(A, 40000, B, 22, ACK), 2, "established"),
        # a new connection on the same ports after the close: reopened
        (tcp(A, 40000, B, 22, SYN), 3, "new"),
        (tcp(B, 22, A, 40000, SYNACK), 3, "established"),
    ],
    "tcp refused: the reset answers, then the connection is gone": [
        (tcp(A, 40001, B, 23, SYN), 0, "new"),
        (tcp(B, 23, A, 40001, "RA"), 0, "established"),
        (tcp(A, 40001, B, 23, SYN), 1, "new"),
    ],
    "tcp picked up mid-stream (nf_conntrack_tcp_loose)": [
        (tcp(A, 40002, B, 80, ACK), 0, "new"),
        (tcp(A, 40002, B, 80, PSH), 0, "new"),
        (tcp(B, 80, A, 40002, ACK), 0, "established"),
        (tcp(A, 40002, B, 80, ACK), 0, "established"),
    ],
    "tcp first packets conntrack refuses": [
        (tcp(A, 40003, B, 80, FIN), 0, "invalid"),
        (tcp(A, 40003, B, 80, RST), 0, "invalid"),
        (tcp(A, 40003, B, 80, SYNACK), 0, "invalid"),
        (tcp(A, 40003, B, 80, ""), 0, "invalid"),            # no flags
        (tcp(A, 40003, B, 80, "SF"), 0, "invalid"),          # tcp_valid_flags
        (tcp(A, 40003, B, 80, "F"), 0, "invalid"),
    ],
    "tcp moves the table calls invalid": [
        (tcp(A, 40004, B, 80, SYN), 0, "new"),
        (tcp(A, 40004, B, 80, ACK), 0, "invalid"),           # an ACK before the SYN/ACK
        (tcp(A, 40004, B, 80, FIN), 0, "invalid"),
        (tcp(A, 40004, B, 80, SYNACK), 0, "invalid"),        # the client cannot SYN/ACK
        (tcp(B, 80, A, 40004, SYNACK), 0, "established"),
        (tcp(A, 40004, B, 80, ACK), 0, "established"),
        (tcp(B, 80, A, 40004, SYNACK), 0, "established"),    # late retransmission: ignored
    ],
    "tcp timeouts by state": [
        (tcp(A, 40005, B, 80, SYN), 0, "new"),
        (tcp(B, 80, A, 40005, SYNACK), 121, "invalid"),      # SYN_SENT lasts 120 s
        (tcp(A, 40006, B, 80, SYN), 200, "new"),
        (tcp(B, 80, A, 40006, SYNACK), 200, "established"),
        (tcp(A, 40006, B, 80, ACK), 200, "established"),
        (tcp(A, 40006, B, 80, PSH), 200 + 86400, "established"),     # 5 days
    ],
    "udp request and reply": [
        (udp(A, 5353, B, 53), 0, "new"),
        (udp(A, 5353, B, 53), 0, "new"),
        (udp(B, 53, A, 5353), 1, "established"),
        (udp(A, 5353, B, 53), 1, "established"),
        (udp(A, 5353, B, 53), 40, "new"),                    # replied within 2 s: 30 s
        (udp(A, 5354, B, 53), 100, "new"),
        (udp(B, 53, A, 5354), 101, "established"),
        (udp(A, 5354, B, 53), 104, "established"),           # a stream now: 120 s
        (udp(A, 5354, B, 53), 200, "established"),
        (udp(A, 5355, B, 53, proto=136), 0, "new"),          # UDP-Lite alike
        (udp(B, 53, A, 5355, proto=136), 0, "established"),
    ],
    "icmp echo": [
        (echo(A, B), 0, "new"),
        (echo(B, A, kind=0), 0, "established"),
        (echo(A, B), 1, "established"),                      # the same identifier
        (echo(A, B, ident=8), 1, "new"),
        (echo(B, A, kind=0, ident=9), 1, "invalid"),         # a reply nobody asked for
        (echo(B, A, kind=0), 40, "invalid"),                 # 30 s later: forgotten
        (echo(A, B, kind=13), 40, "new"),                    # timestamp request
        (echo(A, B, kind=9), 40, "invalid"),                 # router advertisement
        (echo(A, B, kind=40), 40, "invalid"),                # above NR_ICMP_TYPES
    ],
    "icmp errors are related to the connection they quote": [
        (udp(A, 5000, B, 9), 0, "new"),
        (error(B, A, udp(A, 5000, B, 9)), 0, "related"),
        (error(C, A, udp(A, 5000, B, 9), kind=11, code=0), 0, "related"),   # a router's
        (error(B, C, udp(A, 5000, B, 9)), 0, "invalid"),     # not sent to the quoted source
        (error(B, A, udp(A, 5001, B, 9)), 0, "invalid"),     # no such connection
        (tcp(A, 40007, B, 80, SYN), 0, "new"),
        (error(B, A, tcp(A, 40007, B, 80, SYN)[:28]), 0, "related"),    # 8 bytes of TCP
        (echo(A, B, ident=3), 0, "new"),
        (error(B, A, echo(A, B, ident=3)), 0, "related"),
        (error(B, A, echo(B, A, kind=9)), 0, "invalid"),     # quotes a message with no tuple
        (error(B, A, udp(A, 5000, B, 9)), 31, "invalid"),    # the connection expired
    ],
    "icmpv6": [
        (echo(A6, B6, kind=128), 0, "new"),
        (echo(B6, A6, kind=129), 0, "established"),
        (udp(A6, 5000, B6, 9), 0, "new"),
        (error(B6, A6, udp(A6, 5000, B6, 9), kind=1, code=4), 0, "related"),
        (error(B6, A6, udp(A6, 5001, B6, 9), kind=1, code=4), 0, "invalid"),
        (echo(B6, A6, kind=137), 0, "invalid"),              # redirect: no connection
    ] + [(echo(A6, "ff02::1", kind=kind), 0, "untracked") for kind in sorted(ICMPV6_UNTRACKED)],
    "other protocols: by addresses": [
        (ip(A, B, b"\0" * 8, 47), 0, "new"),
        (ip(A, B, b"\0" * 8, 47), 0, "new"),
        (ip(B, A, b"\0" * 8, 47), 0, "established"),
        (ip(A, B, b"\0" * 8, 50), 0, "new"),
    ],
    "fragments get their first fragment's state": [
        (udp(A, 5000, B, 53), 0, "new"),
        (udp(B, 53, A, 5000), 0, "established"),
        (ip(B, A, dpkt.udp.UDP(sport=53, dport=5000, ulen=8), 17, mf=1), 0, "established"),
        (ip(B, A, b"\0" * 16, 17, offset=1480), 0, "established"),
    ],
}


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_scenario(name):
    check(SCENARIOS[name])


def test_packets_conntrack_cannot_key_have_no_state():
    packet = tcp(A, 1, B, 2)
    cut = parse(packet[:24], _cut(packet))
    assert Tracker().track(cut, packet[:24], 0) is None
    assert Tracker().track(parse(b"\x45\x00"), b"\x45\x00", 0) == "invalid"       # malformed


def _cut(packet: bytes):
    from ipqd.decision.packet import PacketMeta
    return PacketMeta(wire_len=len(packet))


def test_the_table_is_bounded_least_recent_forgotten():
    tracker = Tracker(capacity=3)
    for port in (1, 2, 3):
        assert tracker.track(parse(udp(A, port, B, 53)), udp(A, port, B, 53), 0) == "new"
    tracker.track(parse(udp(A, 1, B, 53)), udp(A, 1, B, 53), 0)       # 1 is recent again
    assert tracker.track(parse(udp(A, 4, B, 53)), udp(A, 4, B, 53), 0) == "new"
    assert len(tracker) == 3 and tracker.evicted == 1
    assert tracker.track(parse(udp(B, 53, A, 2)), udp(B, 53, A, 2), 0) == "new"   # 2 forgotten
    assert tracker.track(parse(udp(B, 53, A, 1)), udp(B, 53, A, 1), 0) == "established"


def test_the_tcp_table_is_the_kernels():
    # Spot checks against nf_conntrack_proto_tcp.c's comments.
    original, reply = TCP_CONNTRACKS
    names = dict(enumerate(TCP_STATE_NAMES))
    assert names[original[0][0]] == "SYN_SENT"          # sNO -> sSS on a SYN
    assert names[original[3][0]] == "ESTABLISHED"       # sNO -> sES on an ACK: picked up
    assert names[reply[1][1]] == "SYN_RECV"             # sSS -> sSR on the SYN/ACK
    assert names[original[3][2]] == "ESTABLISHED"       # sSR -> sES on the ACK
    assert names[original[2][3]] == "FIN_WAIT" and names[reply[2][4]] == "LAST_ACK"
    assert original[1][3] == sIV and reply[1][3] == sIG
    assert all(len(row) == 10 for side in TCP_CONNTRACKS for row in side)


def test_transport_offset():
    hop_by_hop = bytes([17, 0]) + b"\x01\x04\x00\x00\x00\x00"
    datagram = dpkt.udp.UDP(sport=1, dport=2, ulen=8)
    v6 = struct.pack("!IHBB", 6 << 28, 16, 0, 64) + b"\0" * 32 + hop_by_hop + bytes(datagram)
    assert transport_offset(v6) == 48
    assert transport_offset(udp(A, 1, B, 2)) == 20
    assert transport_offset(udp(A, 1, B, 2)[:12]) is None
    assert transport_offset(b"") is None and transport_offset(b"\x10") is None
