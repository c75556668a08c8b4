"""The conservative "rule A matches every packet rule B would" test, field by field."""
from __future__ import annotations

import ipaddress

import pytest

from ipqd.policy._lint import covers
from ipqd.policy.model import AddrMatch, IfaceMatch, MarkMatch, Match, RangeMatch, TcpFlagsMatch

net = ipaddress.ip_network
TCP, UDP = 6, 17


def ports(*ranges, negate=False):
    return RangeMatch(tuple(ranges), negate)


@pytest.mark.parametrize("a, b", [
    (Match(), Match(proto=frozenset({TCP}))),
    (Match(proto=frozenset({TCP, UDP})), Match(proto=frozenset({UDP}))),
    (Match(proto=frozenset({TCP}), dport=ports((1, 1024))),
     Match(proto=frozenset({TCP}), dport=ports((22, 22)), src=AddrMatch((net("10.0.0.0/8"),)))),
    (Match(dport=ports((1, 100), (101, 200))), Match(dport=ports((50, 150)))),
    (Match(src=AddrMatch((net("10.0.0.0/8"), net("fd00::/8")))),
     Match(src=AddrMatch((net("10.1.0.0/16"), net("fd00:1::/32"))))),
    (Match(src=AddrMatch((net("10.0.0.0/8"),), negate=True)),
     Match(src=AddrMatch((net("10.0.0.0/8"),), negate=True), proto=frozenset({TCP}))),
    (Match(in_=IfaceMatch(("eth*",))), Match(in_=IfaceMatch(("eth0", "eth1")))),
    (Match(tcp_flags=TcpFlagsMatch(0x02, 0x02)), Match(tcp_flags=TcpFlagsMatch(0x12, 0x02))),
    (Match(mark=MarkMatch(0x10, 0xF0)), Match(mark=MarkMatch(0x12))),
    (Match(length=(0, 1500)), Match(length=(64, 64))),
    (Match(malformed=True), Match(malformed=True, proto=frozenset({TCP}))),
    (Match(family=6), Match(family=6, proto=frozenset({58}))),
])
def test_covers(a, b):
    assert covers(a, b)


@pytest.mark.parametrize("a, b", [
    (Match(proto=frozenset({TCP})), Match()),
    (Match(proto=frozenset({TCP})), Match(proto=frozenset({TCP, UDP}))),
    (Match(dport=ports((1, 100), (102, 200))), Match(dport=ports((50, 150)))),
    (Match(src=AddrMatch((net("10.0.0.0/16"),))), Match(src=AddrMatch((net("10.0.0.0/8"),)))),
    (Match(src=AddrMatch((net("10.0.0.0/8"),), negate=True)),
     Match(src=AddrMatch((net("10.0.0.0/16"),), negate=True))),
    (Match(src=AddrMatch((net("10.0.0.0/8"),), negate=True)),
     Match(src=AddrMatch((net("192.168.0.0/16"),)))),
    (Match(dport=ports((22, 22), negate=True)), Match(dport=ports((23, 23)))),
    (Match(in_=IfaceMatch(("eth*",))), Match(in_=IfaceMatch(("e*",)))),
    (Match(in_=IfaceMatch(("eth0",), negate=True)), Match(in_=IfaceMatch(("wlan0",)))),
    (Match(tcp_flags=TcpFlagsMatch(0x12, 0x02)), Match(tcp_flags=TcpFlagsMatch(0x02, 0x02))),
    (Match(mark=MarkMatch(0x12)), Match(mark=MarkMatch(0x10, 0xF0))),
    (Match(length=(64, 1500)), Match(length=(0, 100))),
    (Match(), Match(malformed=True)),
    (Match(malformed=True), Match()),
    (Match(family=4), Match(src=AddrMatch((net("10.0.0.0/8"),)))),
])
def test_does_not_cover(a, b):
    assert not covers(a, b)
