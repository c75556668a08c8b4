"""The verdict cache: its key reader agrees with parse, and a cached engine
decides (and counts) exactly as one that decides every packet in full."""
from __future__ import annotations

import ipaddress
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ipqd import nfqueue as nfq
from ipqd.engine import Engine
from ipqd.packet import PacketMeta, parse
from ipqd.policy.model import Default, Match, Policy, RangeMatch, Rate, Rule
from ipqd.queue_socket import decode_packet_datagram, packet_summary
from ipqd.verdict_cache import PAYLOAD_FIELDS, KeyMaker, VerdictCache, payload_fields
from test_compiler_property import ACTIONS, IFACES, MATCHES, SET_MARKS, LOGS, DEFAULTS, V4, V6

SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
PROTOS = [1, 6, 17, 58, 132, 136, 47, 59, 0, 44]


def checksum_free_packet(family: int, proto: int, src: int, dst: int, sport: int, dport: int,
                         flags: int, icmp: tuple, data: bytes) -> bytes:
    """An IP packet with plausible headers (checksums zero: parse does not read them)."""
    if proto == 6:
        l4 = struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, flags, 1024, 0, 0) + data
    elif proto in (17, 136):
        l4 = struct.pack("!HHHH", sport, dport, 8 + len(data), 0) + data
    elif proto == 132:
        l4 = struct.pack("!HHII", sport, dport, 0, 0) + data
    elif proto in (1, 58):
        l4 = struct.pack("!BBHI", icmp[0], icmp[1], 0, 0) + data
    else:
        l4 = data
    if family == 4:
        return struct.pack("!BBHHHBBHII", 0x45, 0, 20 + len(l4), 1, 0, 64, proto, 0,
                           src, dst) + l4
    return (struct.pack("!IHBB", 6 << 28, len(l4), proto, 64) + src.to_bytes(16, "big")
            + dst.to_bytes(16, "big") + l4)


@st.composite
def packets(draw):
    family = draw(st.sampled_from([4, 6]))
    addresses = V4 if family == 4 else V6
    payload = checksum_free_packet(
        family, draw(st.sampled_from(PROTOS)), draw(st.sampled_from(addresses)),
        draw(st.sampled_from(addresses)), draw(st.sampled_from([22, 53, 80, 40000])),
        draw(st.sampled_from([22, 53, 80, 443])), draw(st.sampled_from([0x02, 0x12, 0x10, 0])),
        (draw(st.sampled_from([0, 8, 128])), draw(st.sampled_from([0, 1]))),
        draw(st.binary(max_size=24)))
    mutation = draw(st.integers(0, 3))
    if mutation == 1 and payload:            # one byte changed anywhere
        at = draw(st.integers(0, len(payload) - 1))
        payload = payload[:at] + bytes([draw(st.integers(0, 255))]) + payload[at + 1:]
    elif mutation == 2:                      # cut or padded
        payload = payload[:draw(st.integers(0, len(payload)))] + draw(st.binary(max_size=4))
    return family, payload


def as_view_value(name: str, value):
    if name in ("src", "dst") and isinstance(value, bytes):
        return int.from_bytes(value, "big")
    return value


@SETTINGS
@given(packets(), st.booleans())
def test_payload_fields_are_what_parse_reads(packet, want_l4):
    family, payload = packet
    found = payload_fields(payload, 0, len(payload), family, want_l4)
    view = parse(payload, PacketMeta(family=family), None if want_l4 else frozenset())
    if found is None:
        return
    assert not view.malformed, view.reason
    assert view.fragment == "none"
    for name, value in zip(PAYLOAD_FIELDS, found):
        assert as_view_value(name, value) == getattr(view, name), name


def test_plain_packets_get_a_key_and_odd_ones_do_not():
    udp = checksum_free_packet(4, 17, V4[0], V4[1], 40000, 53, 0, (0, 0), b"x" * 8)
    assert payload_fields(udp, 0, len(udp), 4, True) == (17, V4[0], V4[1], 40000, 53, None,
                                                          None, None, len(udp))
    options = bytes([0x46]) + udp[1:2] + struct.pack("!H", len(udp) + 4) + udp[4:20] + \
        b"\x01\x01\x01\x00" + udp[20:]
    fragment = udp[:6] + b"\x20\x00" + udp[8:]          # more fragments
    padded = udp + b"\0"
    for odd in (options, fragment, padded, udp[:-1], udp[:6] + b"\x00\x01" + udp[8:]):
        assert payload_fields(odd, 0, len(odd), 4, True) is None
    hop_by_hop = checksum_free_packet(6, 0, V6[0], V6[1], 0, 0, 0, (0, 0), b"\x11\0" + b"\0" * 6)
    assert payload_fields(hop_by_hop, 0, len(hop_by_hop), 6, True) is None
    assert payload_fields(udp, 0, len(udp), 6, True) is None      # the queue said IPv6


def summary_of(packet: nfq.Packet):
    data = bytearray(nfq.encode_packet(packet))
    return packet_summary(data, len(data)), data


def test_keys_hold_only_what_the_policy_reads():
    def packet(sport, indev=1):
        p = nfq.Packet(1, 2, 7, 0x0800, 1)
        p.indev = indev
        p.payload = checksum_free_packet(4, 17, V4[0], V4[1], sport, 53, 0, (0, 0), b"")
        return p
    names = {1: "eth0", 2: "eth1"}.get
    by_dport = KeyMaker(frozenset({"proto", "dport"}))
    by_sport = KeyMaker(frozenset({"proto", "sport", "in"}))
    a, b, c = packet(1000), packet(2000), packet(1000, indev=2)
    assert by_dport.from_packet(a, names) == by_dport.from_packet(b, names) \
        == by_dport.from_packet(c, names)
    assert by_sport.from_packet(a, names) != by_sport.from_packet(b, names)
    assert by_sport.from_packet(a, names) != by_sport.from_packet(c, names)
    # the receive path's key is the same as the full path's
    summary, data = summary_of(a)
    assert by_sport.from_summary(summary, data, names) == by_sport.from_packet(a, names)
    cut = packet(1000)
    cut.cap_len = 1500
    assert by_dport.from_packet(cut, names) is None


def test_the_cache_starts_over_when_full():
    cache = VerdictCache(size=2)
    for key in range(5):
        cache.store((key,), object())
    assert len(cache.entries) == 1 and cache.flushes == 2


# ---- a cached engine against one that decides every packet in full -----------

RATES = st.sampled_from([None, None, None, Rate(2.0, 2, "2/second")])


@st.composite
def policies(draw):
    rules = tuple(Rule(name=f"r{i}", match=draw(MATCHES), action=draw(ACTIONS),
                       set_mark=draw(SET_MARKS), log=draw(LOGS), rate=draw(RATES))
                  for i in range(draw(st.integers(0, 12))))
    return Policy(path="cache.yaml", rules=rules, default=draw(DEFAULTS))


@st.composite
def queued(draw):
    family, payload = draw(packets())
    packet = nfq.Packet(draw(st.sampled_from([0, 1, 2])), 2 if family == 4 else 10, 1,
                        0x0800, draw(st.sampled_from([0, 1, 3])))
    packet.payload = payload
    packet.indev = draw(st.sampled_from([None, 1, 2, 3]))
    packet.outdev = draw(st.sampled_from([None, 1, 4]))
    packet.mark = draw(st.sampled_from([0, 0x10, 0x11]))
    packet.uid = draw(st.sampled_from([None, 0, 1000]))
    packet.gid = draw(st.sampled_from([None, 0, 100]))
    if draw(st.integers(0, 9)) == 0:
        packet.cap_len = len(payload) + 100
    return packet


CT_OF = {0: None, 1: "new", 2: "established"}
IFNAME = dict(zip(range(1, 5), IFACES)).get


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(policies(), st.lists(queued(), min_size=1, max_size=40), st.data())
def test_a_cached_engine_decides_and_counts_as_a_full_one(policy, stream, data):
    full, cached = Engine(policy), Engine(policy)
    now = 0.0
    # Repeat packets so that the cache is hit.
    stream = stream + [data.draw(st.sampled_from(stream)) for _ in range(len(stream))]
    for n, packet in enumerate(stream):
        packet.packet_id = n + 1
        now += data.draw(st.sampled_from([0.0, 0.1, 1.0]))
        expected = full.judge(packet, IFNAME, CT_OF[packet.queue], now)
        summary, buf = summary_of(packet)
        entry = cached.judge_summary(summary, buf, IFNAME) if summary else None
        if entry is None:
            got = cached.judge(packet, IFNAME, CT_OF[packet.queue], now)
            got = (got.verdict, got.mark, got.decision.rule_index)
        else:
            got = (entry.verdict, entry.mark, entry.rule_index)
        assert got == (expected.verdict, expected.mark, expected.decision.rule_index), packet
    assert cached.counters.as_dict() == full.counters.as_dict()
    assert cached.matcher.counters() == full.matcher.counters()


def test_rated_and_logged_decisions_are_not_cached():
    def rule(name, dport, **extra):
        return Rule(name=name, match=Match(proto=frozenset({17}), dport=RangeMatch(((dport, dport),))),
                    action="accept", **extra)
    policy = Policy(path="p.yaml", rules=(rule("rated", 53, rate=Rate(1.0, 1, "1/second")),
                                          rule("logged", 54, log=True), rule("plain", 55)),
                    default=Default(action="drop", log=False))
    engine = Engine(policy)
    for dport in (53, 54, 55, 56):
        packet = nfq.Packet(0, 2, 1, 0x0800, 1)
        packet.payload = checksum_free_packet(4, 17, V4[0], V4[1], 1000, dport, 0, (0, 0), b"")
        for _ in range(3):
            summary, buf = summary_of(packet)
            if engine.judge_summary(summary, buf, IFNAME) is None:
                engine.judge(packet, IFNAME, None, 0.0)
    # 55 (plain) and 56 (the default) were cached: a miss then two hits each.
    assert engine.cache.hits == 4 and len(engine.cache.entries) == 2
    assert engine.matcher.counters()["rules"]["rated"]["hits"] == 1     # one token
    assert engine.matcher.counters()["default"]["hits"] == 3 + 2        # 56, and 53 without tokens


def test_a_summary_agrees_with_the_decoded_packet():
    packet = nfq.Packet(3, 10, 9, 0x86DD, 3)
    packet.payload = checksum_free_packet(6, 6, V6[0], V6[1], 1, 2, 0x02, (0, 0), b"")
    packet.outdev, packet.mark, packet.uid, packet.gid = 4, 0x11, 1000, 100
    packet.timestamp = (1, 2)
    summary, buf = summary_of(packet)
    decoded = decode_packet_datagram(buf, len(buf))
    assert summary[:9] == (decoded.queue, decoded.family, decoded.packet_id, decoded.hook,
                           decoded.mark, decoded.indev, decoded.outdev, decoded.uid, decoded.gid)
    assert bytes(buf[summary[9]:summary[10]]) == decoded.payload
    assert str(ipaddress.IPv6Address(V6[0])) == "fd00::1"


def random_queued(rng) -> nfq.Packet:
    """A packet from a small universe: the same key comes back often, with
    the fields a policy may or may not read changed one at a time."""
    family = rng.choice([4, 6])
    addresses = V4 if family == 4 else V6
    proto = rng.choice([6, 17, 17, 1, 58, 47])
    payload = checksum_free_packet(family, proto, rng.choice(addresses[:2]),
                                   rng.choice(addresses[:2]), rng.choice([22, 40000]),
                                   rng.choice([22, 53, 443]), rng.choice([0x02, 0x10]),
                                   (rng.choice([0, 8, 128]), rng.choice([0, 1])),
                                   b"x" * rng.choice([0, 4, 1200]))
    packet = nfq.Packet(rng.choice([0, 1, 2]), 2 if family == 4 else 10, 1, 0x0800,
                        rng.choice([1, 3]))
    packet.payload = payload
    packet.indev = rng.choice([None, 1, 2])
    packet.outdev = rng.choice([None, 4])
    packet.mark = rng.choice([0, 0x10, 0x11])
    packet.uid = rng.choice([None, 0, 1000])
    packet.gid = rng.choice([None, 100])
    return packet


def test_many_random_policies_and_streams_with_many_hits():
    """Seeded and dense in collisions, so every field a key might wrongly
    leave out changes between packets that share the rest."""
    import dataclasses
    import random
    from test_compiler_property import random_policy
    rng = random.Random(5)
    hits = 0
    for _ in range(150):
        policy = random_policy(rng, rng.randint(1, 25))
        rules = tuple(dataclasses.replace(r, log=rng.random() < 0.1,
                                          rate=Rate(3.0, 2, "3/second") if rng.random() < 0.1
                                          else None) for r in policy.rules)
        policy = dataclasses.replace(policy, rules=rules, default=Default(
            action=rng.choice(["accept", "drop"]), log=False))
        full, cached = Engine(policy), Engine(policy)
        now = 0.0
        for n in range(120):
            packet = random_queued(rng)
            packet.packet_id = n + 1
            now += rng.choice([0.0, 0.2])
            expected = full.judge(packet, IFNAME, CT_OF[packet.queue], now)
            summary, buf = summary_of(packet)
            entry = cached.judge_summary(summary, buf, IFNAME)
            if entry is None:
                got = cached.judge(packet, IFNAME, CT_OF[packet.queue], now)
                got = (got.verdict, got.mark, got.decision.rule_index)
            else:
                got = (entry.verdict, entry.mark, entry.rule_index)
            assert got == (expected.verdict, expected.mark, expected.decision.rule_index), \
                (packet, policy)
        assert cached.counters.as_dict() == full.counters.as_dict()
        assert cached.matcher.counters() == full.matcher.counters()
        hits += cached.cache.hits
    assert hits > 500                     # the cache answered often enough to be tested
