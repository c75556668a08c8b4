"""Checksums of rewritten packets agree with dpkt's independent computation."""
import dpkt
import pytest
from hypothesis import given, settings, strategies as st

from ipqd.decision.checksum import fix_checksums, internet_checksum

V4 = dict(src=bytes([10, 0, 0, 1]), dst=bytes([10, 0, 0, 2]))
V6 = dict(src=bytes.fromhex("fd000000000000000000000000000001"),
          dst=bytes.fromhex("fd000000000000000000000000000002"))


def build(version, proto, data):
    """A packet with correct checksums, computed by dpkt."""
    if proto == 6:
        upper = dpkt.tcp.TCP(sport=1234, dport=80, seq=1, flags=dpkt.tcp.TH_ACK, data=data)
    elif proto == 17:
        upper = dpkt.udp.UDP(sport=1234, dport=53, data=data)
        upper.ulen = len(upper)
    else:
        cls = dpkt.icmp.ICMP if version == 4 else dpkt.icmp6.ICMP6
        upper = cls(type=8 if version == 4 else 128, data=dpkt.icmp.ICMP.Echo(id=1, seq=2, data=data))
        proto = 1 if version == 4 else 58
    if version == 4:
        ip = dpkt.ip.IP(p=proto, ttl=64, data=upper, **V4)
        ip.len = len(ip)
    else:
        ip = dpkt.ip6.IP6(nxt=proto, hlim=64, data=upper, **V6)
        ip.plen = len(upper)
    return bytes(ip)


@settings(max_examples=200)
@given(st.sampled_from([4, 6]), st.sampled_from([6, 17, 1]), st.binary(max_size=300))
def test_fix_matches_dpkt(version, proto, data):
    good = build(version, proto, data)
    broken = bytearray(good)
    # Zero every checksum field: IPv4 header, then the upper layer's.
    header = 20 if version == 4 else 40
    if version == 4:
        broken[10:12] = b"\0\0"
    where = {6: 16, 17: 6, 1: 2}[proto]
    broken[header + where:header + where + 2] = b"\xde\xad"
    assert fix_checksums(bytes(broken)) == good


def test_lengths_follow_a_changed_payload():
    old = build(4, 17, b"hello")
    new = fix_checksums(old[:28] + b"a longer payload")
    ip = dpkt.ip.IP(new)
    assert ip.len == len(new) and ip.data.ulen == 8 + 16
    assert new == build(4, 17, b"a longer payload")


def test_rfc1071_example():
    # The worked example of RFC 1071 section 3: sum 0xddf2, checksum its complement.
    assert internet_checksum(bytes.fromhex("0001f203f4f5f6f7")) == (~0xDDF2 & 0xFFFF)


@pytest.mark.parametrize("packet, message", [
    (b"", "empty packet"),
    (b"\x50" + b"\0" * 30, "IP version 5"),
    (b"\x4f" + b"\0" * 30, "header length 60 does not fit"),
    (b"\x60" + b"\0" * 10, "IPv6 header needs 40 bytes"),
])
def test_not_a_packet(packet, message):
    with pytest.raises(ValueError, match=message):
        fix_checksums(packet)
