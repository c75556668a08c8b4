"""The packet view: fields read from real bytes, malformed packets named, never an exception."""
from __future__ import annotations

import glob
import ipaddress
import os
import struct

import dpkt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ipqd.decision.packet import PacketMeta, PacketView, parse
from ipqd.tools.pcap import NotIP, ip_payload, read_capture
from ipv6_chains import syn_behind_headers, syn_behind_one_big_header

A4 = ipaddress.IPv4Address("10.0.0.5").packed
B4 = ipaddress.IPv4Address("10.0.0.1").packed
A6 = ipaddress.IPv6Address("fd00::1").packed
B6 = ipaddress.IPv6Address("fd00::2").packed
META = PacketMeta(hook=1, indev="eth0", mark=0x10, uid=1000, ct_state="new")
SHARED = "/work/shared/captures/tcpdump-tests"
HERE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "captures")


def ipv4(l4, p=6, mf=0, offset=0) -> bytes:
    ip = dpkt.ip.IP(src=A4, dst=B4, p=p, ttl=64, data=l4)
    ip.mf, ip.offset = mf, offset
    ip.len = len(ip)
    return bytes(ip)


def ipv6(rest: bytes, nxt: int) -> bytes:
    return struct.pack("!IHBB", 6 << 28, len(rest), nxt, 64) + A6 + B6 + rest


def ext(nxt: int, body_units: int = 0) -> bytes:
    """A generic extension header (hop-by-hop, routing, destination options)."""
    return bytes([nxt, body_units]) + b"\x01\x04\x00\x00\x00\x00" + b"\x00" * (8 * body_units)


TCP_SYN = bytes(dpkt.tcp.TCP(sport=40000, dport=22, flags=dpkt.tcp.TH_SYN, seq=1))
UDP_DNS = bytes(dpkt.udp.UDP(sport=5353, dport=53, ulen=8))


def test_tcp_over_ipv4():
    view = parse(ipv4(TCP_SYN), META)
    assert (view.family, view.proto, view.sport, view.dport) == (4, 6, 40000, 22)
    assert view.tcp_flags == dpkt.tcp.TH_SYN
    assert view.length == 40 and view.fragment == "none" and not view.malformed
    assert view.src_text == "10.0.0.5" and view.dst_text == "10.0.0.1"
    assert (view.hook, view.indev, view.outdev, view.mark, view.uid, view.gid,
            view.ct_state) == (1, "eth0", None, 0x10, 1000, None, "new")


def test_udp_over_ipv6():
    view = parse(ipv6(UDP_DNS, 17), META)
    assert (view.family, view.proto, view.sport, view.dport) == (6, 17, 5353, 53)
    assert view.src_text == "fd00::1" and view.dst == int(ipaddress.IPv6Address("fd00::2"))
    assert view.tcp_flags is None and view.icmp_type is None and view.length == 48


def test_icmp_echo():
    icmp = bytes(dpkt.icmp.ICMP(type=8, code=0, data=dpkt.icmp.ICMP.Echo(id=1, seq=1)))
    view = parse(ipv4(icmp, p=1), META)
    assert (view.proto, view.icmp_type, view.icmp_code, view.sport) == (1, 8, 0, None)


def test_icmpv6_after_extension_headers():
    rest = ext(60) + ext(43, 1) + ext(58) + b"\x80\x00\x00\x00\x00\x01\x00\x01"
    view = parse(ipv6(rest, 0), META)
    assert (view.proto, view.icmp_type, view.malformed) == (58, 128, False)


def test_l4_skipped_when_not_needed():
    view = parse(ipv4(TCP_SYN), META, needs=frozenset({"src", "proto"}))
    assert view.proto == 6 and view.sport is None and view.tcp_flags is None
    view = parse(ipv4(TCP_SYN), META, needs=frozenset({"dport"}))
    assert view.dport == 22 and view.tcp_flags == dpkt.tcp.TH_SYN


def test_ipv4_fragments():
    first = parse(ipv4(TCP_SYN, mf=1), META)
    later = parse(ipv4(TCP_SYN[:8], offset=1480), META)
    assert first.fragment == "first" and first.dport == 22
    assert later.fragment == "not-first" and later.dport is None and not later.malformed


def test_a_udp_first_fragment_is_not_malformed():
    """Its UDP length counts the whole datagram (3,008 bytes), more than
    the fragment holds; a whole datagram claiming more is still malformed."""
    udp = struct.pack("!HHHH", 5353, 53, 3008, 0) + b"\x00" * 1472
    first = parse(ipv4(udp, p=17, mf=1), META)
    assert (first.fragment, first.dport, first.malformed) == ("first", 53, False)
    whole = parse(ipv4(udp, p=17), META)
    assert whole.malformed and "UDP length 3008" in whole.reason
    v6 = parse(ipv6(struct.pack("!BBHI", 17, 0, 1, 9) + udp, 44), META)
    assert (v6.fragment, v6.dport, v6.malformed) == ("first", 53, False)


def test_ipv6_fragments():
    first = struct.pack("!BBHI", 6, 0, 1, 7) + TCP_SYN
    later = struct.pack("!BBHI", 6, 0, 185 << 3, 7) + b"\x00" * 16
    atomic = struct.pack("!BBHI", 6, 0, 0, 7) + TCP_SYN
    v1, v2, v3 = (parse(ipv6(x, 44), META) for x in (first, later, atomic))
    assert (v1.fragment, v1.proto, v1.dport) == ("first", 6, 22)
    assert (v2.fragment, v2.proto, v2.dport, v2.malformed) == ("not-first", 6, None, False)
    assert (v3.fragment, v3.dport) == ("none", 22)


def test_ah_is_walked():
    ah = bytes([6, 4]) + b"\x00" * 22          # (4 + 2) * 4 = 24 bytes
    view = parse(ipv6(ah + TCP_SYN, 51), META)
    assert (view.proto, view.dport, view.malformed) == (6, 22, False)


def test_no_next_header():
    view = parse(ipv6(b"", 59), META)
    assert (view.proto, view.malformed, view.sport) == (59, False, None)


def test_jumbo_payload_length():
    hbh = bytes([6, 0, 0xC2, 4]) + struct.pack("!I", 8 + len(TCP_SYN))
    packet = struct.pack("!IHBB", 6 << 28, 0, 0, 64) + A6 + B6 + hbh + TCP_SYN
    view = parse(packet, META)
    assert (view.length, view.dport, view.malformed) == (40 + 8 + 20, 22, False)


MALFORMED = [
    ("empty", b"", "empty packet"),
    ("version 5", b"\x50" + b"\x00" * 39, "bad IP version 5"),
    ("short IPv4", ipv4(TCP_SYN)[:12], "truncated IPv4 header"),
    ("IHL 4", b"\x44" + ipv4(TCP_SYN)[1:], "IPv4 header length 16 < 20"),
    ("IHL 15", b"\x4f" + ipv4(TCP_SYN)[1:30], "IPv4 header length 60 beyond the data"),
    ("total < header", ipv4(TCP_SYN)[:2] + b"\x00\x10" + ipv4(TCP_SYN)[4:],
     "IPv4 total length 16 < header length 20"),
    ("total > data", ipv4(TCP_SYN)[:30], "IPv4 total length 40 beyond the 30 bytes"),
    ("short TCP", ipv4(TCP_SYN[:12]), "truncated TCP header (12 of 20 bytes)"),
    ("TCP offset 4", ipv4(TCP_SYN[:12] + b"\x40" + TCP_SYN[13:]), "TCP data offset 16 < 20"),
    ("TCP offset 60", ipv4(TCP_SYN[:12] + b"\xf0" + TCP_SYN[13:]),
     "TCP header length 60 beyond the segment"),
    ("UDP length", ipv4(UDP_DNS[:4] + b"\x01\x00" + UDP_DNS[6:], p=17),
     "UDP length 256 outside 8..8"),
    ("short ICMP", ipv4(b"\x08\x00\x00\x00", p=1), "truncated ICMP header (4 of 8 bytes)"),
    ("short IPv6", ipv6(b"", 59)[:39], "truncated IPv6 header"),
    ("IPv6 payload > data", ipv6(UDP_DNS, 17)[:44], "IPv6 payload length 8 beyond the 4 bytes"),
    ("ext runs off", ipv6(ext(6)[:4], 0), "IPv6 extension header runs off the end"),
    ("ext length lies", ipv6(bytes([6, 9]) + b"\x00" * 6, 0),
     "IPv6 extension header runs off the end"),
    ("ext chain into the TCP header", ipv6(ext(60) * 9 + TCP_SYN, 60),
     "IPv6 extension header runs off the end"),
    ("ext past the real length", ipv6(ext(6, 2)[:16], 0)[:56],
     "IPv6 extension header runs off the end"),
]


@pytest.mark.parametrize("name,packet,reason", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed(name, packet, reason):
    view = parse(packet, META)
    assert view.malformed and view.reason == reason
    assert view.sport is None and view.dport is None and view.tcp_flags is None
    assert view.hook == 1 and view.mark == 0x10     # the meta survives


def test_any_number_of_extension_headers_is_walked():
    """As the kernel does: nine (or ninety) headers in front of TCP are a
    valid packet, bounded only by its length."""
    for count in (9, 90):
        chain = ext(60) * (count - 1) + ext(6)
        view = parse(ipv6(chain + TCP_SYN, 60), META)
        assert (view.proto, view.dport, view.malformed, view.hidden) == (6, 22, False, set())


def test_the_evasion_packets_show_their_ports():
    """The nine-header SYN is read in full; the 408-byte header hides the
    TCP header from a 256-byte copy, which the view says."""
    nine = syn_behind_headers("fd00::1", "fd00::2", 40000, 23)
    view = parse(nine[:256], META._replace(wire_len=len(nine)))
    assert (view.proto, view.dport, view.tcp_flags, view.malformed) == (6, 23, 0x02, False)
    big = syn_behind_one_big_header("fd00::1", "fd00::2", 40000, 23)
    assert len(big) == 40 + 408 + 20
    whole = parse(big, META)
    assert (whole.proto, whole.dport, whole.malformed, whole.hidden) == (6, 23, False, set())
    cut = parse(big[:256], META._replace(wire_len=len(big)))
    assert not cut.malformed and cut.proto == 6 and cut.dport is None
    assert cut.hidden == {"sport", "dport", "tcp_flags"}
    assert cut.reason == "transport header past copy_range"
    assert (cut.src_text, cut.length, cut.fragment) == ("fd00::1", 468, "none")


def test_a_copy_cut_inside_the_extension_chain_hides_the_protocol():
    chain = ext(60, 40) + ext(60, 40) + ext(6)           # two 328-byte headers, then TCP
    packet = ipv6(chain + TCP_SYN, 60)
    view = parse(packet[:256], META._replace(wire_len=len(packet)))
    assert not view.malformed and view.reason == "IPv6 extension headers past copy_range"
    assert view.hidden == {"proto", "fragment", "sport", "dport", "icmp_type", "icmp_code",
                           "tcp_flags"}
    assert view.proto is None and view.fragment is None
    fragment_first = ipv6(struct.pack("!BBHI", 60, 0, 1, 7) + chain + TCP_SYN, 44)
    view = parse(fragment_first[:256], META._replace(wire_len=len(fragment_first)))
    assert view.fragment == "first" and "fragment" not in view.hidden


def test_hidden_names_only_what_the_policy_reads():
    big = syn_behind_one_big_header("fd00::1", "fd00::2", 40000, 23)
    meta = META._replace(wire_len=len(big))
    assert parse(big[:256], meta, frozenset({"dport", "src"})).hidden == {"dport"}
    quiet = parse(big[:256], meta, frozenset({"src", "proto"}))
    assert not quiet.hidden and not quiet.malformed and quiet.reason == ""


def test_a_copy_cut_inside_the_ip_header_hides_it():
    packet = ipv6(UDP_DNS, 17)
    view = parse(packet[:32], META._replace(wire_len=len(packet)))
    assert not view.malformed and view.family == 6 and "src" in view.hidden
    assert view.reason == "IP header past copy_range"


def test_family_must_match_the_link_layer():
    view = parse(ipv6(UDP_DNS, 17), META._replace(family=4))
    assert view.malformed and view.reason == "IPv6 header in an IPv4 packet"


def test_cut_copy_hiding_a_needed_header_hides_its_fields():
    packet = ipv4(b"\x00" * 40 + TCP_SYN, p=6)      # pretend 40 bytes of IP options
    packet = b"\x4f" + packet[1:]                    # IHL 15: 60 bytes of header
    meta = META._replace(wire_len=len(packet))
    for cut in (packet[:64], packet[:48]):           # in the TCP header, in the options
        needing = parse(cut, meta)
        not_needing = parse(cut, meta, frozenset({"src"}))
        assert not needing.malformed and needing.reason == "transport header past copy_range"
        assert needing.hidden == {"sport", "dport", "tcp_flags"} and needing.dport is None
        assert not not_needing.malformed and not not_needing.hidden
        assert not_needing.length == len(packet)


def test_cut_copy_after_the_l4_header_is_fine():
    packet = ipv4(TCP_SYN + b"x" * 500)
    view = parse(packet[:128], META._replace(wire_len=len(packet)))
    assert not view.malformed and view.length == 540 and view.dport == 22


def test_unexpected_exception_becomes_malformed(monkeypatch):
    import ipqd.decision.packet as packet

    def broken(*args):
        raise KeyError("boom")
    monkeypatch.setattr(packet, "_parse_ipv4", broken)
    view = parse(ipv4(TCP_SYN), META)
    assert view.malformed and view.reason == "KeyError"


def test_view_has_slots():
    with pytest.raises(AttributeError):
        PacketView().color = "red"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=120), st.sampled_from([None, 4, 6]), st.sampled_from([None, 2000]))
def test_never_raises_on_garbage(data, family, wire_len):
    view = parse(data, PacketMeta(family=family, wire_len=wire_len))
    assert view.malformed or view.family in (4, 6)
    if view.malformed:
        assert view.reason and view.sport is None


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=0, max_size=64), st.integers(0, 60))
def test_never_raises_on_damaged_real_headers(tail, cut):
    for packet in (ipv4(TCP_SYN), ipv6(ext(43) + UDP_DNS, 0)):
        damaged = packet[:cut] + tail
        view = parse(damaged, META)
        assert isinstance(view.malformed, bool)


def shared_captures():
    return sorted(glob.glob(os.path.join(SHARED, "*.pcap*")))


@pytest.mark.skipif(not os.path.isdir(SHARED), reason="shared captures not present")
@pytest.mark.parametrize("path", shared_captures(), ids=os.path.basename)
def test_shared_captures_parse(path):
    with open(path, "rb") as f:
        for frame in read_capture(f):
            try:
                ip = ip_payload(frame)
            except NotIP:
                continue
            for needs in (None, frozenset({"src"})):
                view = parse(ip.payload, META._replace(wire_len=ip.wire_len, family=ip.family),
                             needs)
                # A copy cut in the extension headers leaves the protocol unknown.
                assert view.malformed or view.proto is not None or needs is not None \
                    or "proto" in view.hidden


def test_protocol_numbers_are_dpkts():
    """The protocol numbers (ipqd.policy.model) and packet.py's header numbers
    are dpkt's constants written out, so that workers need not import it."""
    from ipqd.decision import packet
    from ipqd.policy import model
    for name, dpkt_name in [("PROTO_NONE", "NONE"), ("EXT_HOPOPTS", "HOPOPTS"),
                            ("EXT_ROUTING", "ROUTING"), ("EXT_FRAGMENT", "FRAGMENT"),
                            ("EXT_AH", "AH"), ("EXT_DSTOPTS", "DSTOPTS")]:
        assert getattr(packet, name) == getattr(dpkt.ip, "IP_PROTO_" + dpkt_name), name
    named = {"icmpv6": "ICMP6", "udplite": None}       # dpkt has no UDP-Lite (RFC 3828: 136)
    for name, number in model.PROTOCOLS.items():
        dpkt_name = named.get(name, name.upper())
        assert number == (getattr(dpkt.ip, "IP_PROTO_" + dpkt_name) if dpkt_name else 136), name
    for name in ("ICMP", "TCP", "UDP", "ICMPV6", "SCTP", "UDPLITE"):
        assert getattr(model, "PROTO_" + name) == model.PROTOCOLS[name.lower()]


def test_a_worker_imports_no_dpkt():
    import subprocess
    import sys
    code = "import sys, ipqd.daemon.worker; print('dpkt' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True,
                          text=True, check=True).stdout.strip() == "False"
