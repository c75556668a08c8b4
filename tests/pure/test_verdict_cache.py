"""The verdict cache: its key reader agrees with parse, and a cached engine
decides (and counts) exactly as one that decides every packet in full."""
from __future__ import annotations

import ipaddress
import os
import struct

import pytest

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ipqd.wire import nfqueue as nfq
from ipqd.decision.engine import Engine
from ipqd.decision.packet import PacketMeta, parse
from ipqd.policy.model import Default, Match, Policy, RangeMatch, Rate, Rule
from ipqd.wire.fast_decode import decode_packet_datagram, packet_summary
from ipqd.decision.verdict_cache import CachedVerdict, KeyMaker, VerdictCache
from ipqd.decision.address_set import parse_entry
from policy_strategies import (ACTIONS, DEFAULTS, DYNAMIC, IFACES, LOGS, MATCHES, NETWORKS,
                               SET_MARKS, V4, V6)

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


# Every field a key may hold, and the metadata a queued packet comes with.
KEY_FIELDS = ("proto", "src", "dst", "sport", "dport", "tcp_flags", "icmp_type", "icmp_code",
              "length", "hook", "mark", "in", "out", "uid", "gid", "ct_state")
VIEW_NAME = {"in": "indev", "out": "outdev"}


def kernel_bytes(packet: nfq.Packet, padded: bool = False) -> bytearray:
    """The packet message as the kernel sends it: its length stops where the
    payload does (encode_packet pads the last attribute too)."""
    data = bytearray(nfq.encode_packet(packet))
    if padded or packet.payload is None:
        return data
    unpadded = len(data) - (-len(packet.payload) % 4)
    struct.pack_into("=I", data, 0, unpadded)
    return data[:unpadded]


def queued_message(family: int, payload: bytes, queue: int = 1, packet_id: int = 7,
                   padded: bool = False, **meta) -> bytearray:
    packet = nfq.Packet(queue, 2 if family == 4 else 10, packet_id, 0x0800, 1)
    packet.payload = payload
    for name, value in meta.items():
        setattr(packet, name, value)
    return kernel_bytes(packet, padded)


def read_key(keys: KeyMaker, data: bytearray):
    """The key read from one datagram by a cache that holds no verdicts
    (None: no key, the full path decodes the packet)."""
    keys.round.clear()
    assert keys.take([room(data)], [len(data)]) == [0]  # nothing to answer from
    misses = list(keys.round.misses.values())
    return misses[0] if misses else None


def room(data: bytearray) -> bytearray:
    """A datagram in a buffer with room after it, as the receiver's are:
    the readers read past short packets (and take too short a buffer to
    the full path)."""
    return data + bytes(256)


def key_maker(fields, **options) -> KeyMaker:
    return KeyMaker(frozenset(fields), ifname=IFNAME, **options)


def view_of(family: int, payload: bytes):
    return parse(payload, PacketMeta(family=family), None)


@SETTINGS
@given(packets(), st.booleans())
def test_a_key_is_read_only_from_packets_parse_takes_whole(packet, padded):
    family, payload = packet
    data = queued_message(family, payload, padded=padded)
    keys = key_maker(KEY_FIELDS)
    if read_key(keys, data) is not None:
        assert list(keys.round.misses) == [(1, 7)]          # its queue and id
        view = view_of(family, payload)
        assert not view.malformed, view.reason
        assert view.fragment == "none" and not view.hidden


@SETTINGS
@given(packets(), packets(), st.sets(st.sampled_from(KEY_FIELDS[1:])))
def test_equal_keys_mean_equal_fields(a, b, fields):
    """What the cache rests on: two packets with one key agree on every
    field the policy reads."""
    keys = key_maker(set(fields) | {"proto"})
    key_a, key_b = read_key(keys, queued_message(*a)), read_key(keys, queued_message(*b))
    if key_a is None or key_a != key_b:
        return
    view_a, view_b = view_of(*a), view_of(*b)
    for name in fields | {"proto", "family"}:
        name = VIEW_NAME.get(name, name)
        assert getattr(view_a, name) == getattr(view_b, name), name


def test_plain_packets_get_a_key_and_odd_ones_do_not():
    keys = key_maker(KEY_FIELDS)
    udp = checksum_free_packet(4, 17, V4[0], V4[1], 40000, 53, 0, (0, 0), b"x" * 8)
    assert read_key(keys, queued_message(4, udp)) is not None
    options = bytes([0x46]) + udp[1:2] + struct.pack("!H", len(udp) + 4) + udp[4:20] + \
        b"\x01\x01\x01\x00" + udp[20:]
    fragment = udp[:6] + b"\x20\x00" + udp[8:]          # more fragments
    padded = udp + b"\0"
    for odd in (options, fragment, padded, udp[:-1], udp[:6] + b"\x00\x01" + udp[8:]):
        assert read_key(keys, queued_message(4, odd)) is None
    hop_by_hop = checksum_free_packet(6, 0, V6[0], V6[1], 0, 0, 0, (0, 0), b"\x11\0" + b"\0" * 6)
    assert read_key(keys, queued_message(6, hop_by_hop)) is None
    assert read_key(keys, queued_message(6, udp)) is None      # the queue said IPv6
    cut = nfq.Packet(1, 2, 7, 0x0800, 1)
    cut.payload, cut.cap_len = udp, 1500
    data = bytearray(nfq.encode_packet(cut))
    assert read_key(keys, data) is None                          # a cut copy: the full path


@pytest.mark.parametrize("name", ["packet-ipv4-udp-output-mark", "packet-ipv6-udp-input"])
def test_the_kernels_own_messages_get_keys(name):
    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures", "kernel", name + ".hex")) as f:
        data = bytearray(bytes.fromhex(f.read().strip()))
    assert read_key(key_maker(KEY_FIELDS), data) is not None


def test_keys_hold_only_what_the_policy_reads():
    def key(keys, sport, indev=1, mark=0):
        payload = checksum_free_packet(4, 17, V4[0], V4[1], sport, 53, 0, (0, 0), b"")
        return read_key(keys, queued_message(4, payload, indev=indev, mark=mark))
    by_dport = key_maker({"proto", "dport"})
    by_sport = key_maker({"proto", "sport", "in"})
    by_mark = key_maker({"proto", "mark"})
    assert key(by_dport, 1000) == key(by_dport, 2000) == key(by_dport, 1000, indev=2)
    assert key(by_sport, 1000) != key(by_sport, 2000)
    assert key(by_sport, 1000) != key(by_sport, 1000, indev=2)
    assert key(by_mark, 1000, mark=1) == key(by_mark, 2000, mark=1) != key(by_mark, 1000, mark=2)
    # the queue stands for ct_state and is always in the key
    payload = checksum_free_packet(4, 17, V4[0], V4[1], 1, 53, 0, (0, 0), b"")
    assert read_key(by_dport, queued_message(4, payload, queue=1)) != \
        read_key(by_dport, queued_message(4, payload, queue=2))


def test_the_cache_admits_on_second_sight_and_keeps_what_hits():
    cache = VerdictCache(size=8)            # generations of 4
    hot = CachedVerdict(1, None, 0)
    cache.admit(("hot",), hot)
    assert not cache.entries                # seen once: not kept
    cache.admit(("hot",), hot)
    assert cache.entries == {("hot",): hot}
    # A flood of keys seen once each keeps nothing and pushes nothing out.
    for key in range(1000):
        cache.admit((key,), CachedVerdict(1, None, 0))
    assert cache.entries == {("hot",): hot} and cache.flushes == 0
    # Keys seen twice fill the young generation, then the old one; the hot
    # flow, hit in the old generation, moves back and stays.
    for round_ in range(5):
        for key in range(3):
            for _ in range(2):
                cache.admit((round_, key), CachedVerdict(1, None, 0))
        assert cache.entries.get(("hot",)) or cache.recall(("hot",)) is hot
    assert cache.flushes >= 2 and ("hot",) in cache.entries
    assert len(cache.entries) + len(cache.older) <= 8


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


def cached_engine(policy: Policy) -> Engine:
    """An engine with a reader of its cache beside it, as a worker has one
    (no batching: every hit comes with its entry)."""
    engine = Engine(policy)
    engine.keys = KeyMaker(engine.needs, engine.cache, batch=False, ifname=IFNAME)
    return engine


def decide_cached(engine: Engine, packet: nfq.Packet, now: float) -> tuple:
    """What the worker does: the cache first, then the full path, which
    stores the decision under the key read."""
    data = kernel_bytes(packet)
    answers = engine.keys.round
    answers.clear()
    if engine.keys.take([room(data)], [len(data)]) == []:
        ((queue, packet_id, entry),) = answers.single      # no batching: the entry is there
        assert (queue, packet_id) == (packet.queue, packet.packet_id)
        return entry.verdict, entry.mark, entry.rule_index
    key = answers.misses.get((packet.queue, packet.packet_id))
    got = engine.decide(packet, IFNAME, CT_OF[packet.queue], now, key)
    return got.verdict, got.mark, got.decision.rule_index


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(policies(), st.lists(queued(), min_size=1, max_size=40), st.data())
def test_a_cached_engine_decides_and_counts_as_a_full_one(policy, stream, data):
    full, cached = Engine(policy), cached_engine(policy)
    now = 0.0
    # Repeat packets so that the cache is hit.
    stream = stream + [data.draw(st.sampled_from(stream)) for _ in range(len(stream))]
    for n, packet in enumerate(stream):
        packet.packet_id = n + 1
        now += data.draw(st.sampled_from([0.0, 0.1, 1.0]))
        if data.draw(st.integers(0, 3)) == 0:       # a dynamic set changes (both engines)
            name = data.draw(st.sampled_from(DYNAMIC))
            op = data.draw(st.sampled_from(["add", "add", "del", "flush"]))
            entry = parse_entry(str(data.draw(st.sampled_from(NETWORKS))))
            for engine in (full, cached):
                engine.change_set(name, op, (entry,))
        expected = full.decide(packet, IFNAME, CT_OF[packet.queue], now)
        got = decide_cached(cached, packet, now)
        assert got == (expected.verdict, expected.mark, expected.decision.rule_index), packet
    cached.settle()
    assert cached.counters.as_dict() == full.counters.as_dict()
    assert cached.matcher.counters() == full.matcher.counters()


def test_rated_decisions_are_not_cached_and_logged_ones_are_answered_in_full():
    def rule(name, dport, **extra):
        return Rule(name=name, match=Match(proto=frozenset({17}), dport=RangeMatch(((dport, dport),))),
                    action="accept", **extra)
    policy = Policy(path="p.yaml", rules=(rule("rated", 53, rate=Rate(1.0, 1, "1/second")),
                                          rule("logged", 54, log=True), rule("plain", 55)),
                    default=Default(action="drop", log=False))
    engine = cached_engine(policy)
    for dport in (53, 54, 55, 56):
        packet = nfq.Packet(0, 2, 1, 0x0800, 1)
        packet.payload = checksum_free_packet(4, 17, V4[0], V4[1], 1000, dport, 0, (0, 0), b"")
        for _ in range(3):
            decide_cached(engine, packet, 0.0)
    # 55 (plain) and 56 (the default) were cached on their second sight: then
    # a hit each. 54 (logged) is kept, but with no log rate to suppress its
    # entries, every packet of it is decided in full.
    engine.settle()
    assert engine.cache.hits == 2 and len(engine.cache.entries) == 3
    assert engine.matcher.counters()["rules"]["rated"]["hits"] == 1     # one token
    assert engine.matcher.counters()["default"]["hits"] == 3 + 2        # 56, and 53 without tokens


def test_hits_are_settled_after_a_flush_and_a_reload():
    policy = Policy(path="p.yaml", rules=(Rule(name="dns", match=Match(
        proto=frozenset({17}), dport=RangeMatch(((53, 53),))), action="accept"),),
        default=Default(action="drop", log=False))
    engine = cached_engine(policy)
    engine.cache.size = 1                   # every store starts the cache over

    def packet(dport):
        p = nfq.Packet(0, 2, 1, 0x0800, 1)
        p.payload = checksum_free_packet(4, 17, V4[0], V4[1], 1000, dport, 0, (0, 0), b"")
        return p
    for dport in (53, 53, 53, 80, 80):      # dns: kept on its second sight, a hit; 80 pushes it out
        decide_cached(engine, packet(dport), 0.0)
    reloaded = cached_engine(policy)                # a reload's new worker
    reloaded.take_over(engine.carry_over())
    decide_cached(reloaded, packet(80), 0.0)        # a new cache: misses
    decide_cached(reloaded, packet(80), 0.0)
    reloaded.settle()
    assert reloaded.counters.as_dict()["packets"] == 7
    assert (reloaded.counters.accepted, reloaded.counters.dropped) == (3, 4)
    counters = reloaded.matcher.counters()
    assert counters["rules"]["dns"]["hits"] == 3 and counters["default"]["hits"] == 4
    assert reloaded.cache.hits == 1                 # carried over


def test_settling_waits_for_enough_entries_when_asked_to():
    policy = Policy(path="p.yaml", rules=(Rule(name="one", match=Match(
        proto=frozenset({17}), dport=RangeMatch(((1, 1),))), action="accept"),),
        default=Default(action="drop", log=False))
    engine = cached_engine(policy)
    engine.cache.decide = None              # every packet through the cache: misses, then hits

    def packet(dport):
        p = nfq.Packet(0, 2, 1, 0x0800, 1)
        p.payload = checksum_free_packet(4, 17, V4[0], V4[1], 1000, dport, 0, (0, 0), b"")
        return p
    for dport in (1, 2, 1, 2, 1, 2):            # two entries, each hit once
        decide_cached(engine, packet(dport), 0.0)
    engine.settle(at_least=3)
    assert engine.counters.packets == 4 and len(engine.cache.touched) == 2
    engine.settle(at_least=2)
    assert engine.counters.packets == 6 and not engine.cache.touched


def test_a_summary_agrees_with_the_decoded_packet():
    packet = nfq.Packet(3, 10, 9, 0x86DD, 3)
    packet.payload = checksum_free_packet(6, 6, V6[0], V6[1], 1, 2, 0x02, (0, 0), b"")
    packet.outdev, packet.mark, packet.uid, packet.gid = 4, 0x11, 1000, 100
    packet.timestamp = (1, 2)
    buf = bytearray(nfq.encode_packet(packet))
    summary = packet_summary(buf, len(buf))
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
    from policy_strategies import random_policy
    rng = random.Random(5)
    hits = 0
    for _ in range(180):     # rejects are never cached: more policies for as many hits
        policy = random_policy(rng, rng.randint(1, 25),
                               actions=("accept", "drop", "reject", "log"))
        rules = tuple(dataclasses.replace(r, log=rng.random() < 0.1,
                                          rate=Rate(3.0, 2, "3/second") if rng.random() < 0.1
                                          else None) for r in policy.rules)
        policy = dataclasses.replace(policy, rules=rules, default=Default(
            action=rng.choice(["accept", "drop"]), log=False))
        full, cached = Engine(policy), cached_engine(policy)
        now = 0.0
        for n in range(120):
            packet = random_queued(rng)
            packet.packet_id = n + 1
            now += rng.choice([0.0, 0.2])
            expected = full.decide(packet, IFNAME, CT_OF[packet.queue], now)
            got = decide_cached(cached, packet, now)
            assert got == (expected.verdict, expected.mark, expected.decision.rule_index), \
                (packet, policy)
        cached.settle()
        assert cached.counters.as_dict() == full.counters.as_dict()
        assert cached.matcher.counters() == full.matcher.counters()
        hits += cached.cache.hits
    assert hits > 150                     # the cache answered often enough to be tested


def test_one_take_answers_a_batch_of_mixed_layouts():
    """The kernel's layout changes with the metadata (a mark or not, the
    family): each layout's reader takes its own datagrams, and what the
    cache cannot answer, an acknowledgement among them, comes back in order."""
    from ipqd.wire import nfnetlink as nl
    from ipqd.decision.verdict_cache import CachedVerdict
    keys = key_maker({"proto", "dport"})
    udp4 = checksum_free_packet(4, 17, V4[0], V4[1], 1000, 53, 0, (0, 0), b"")
    udp6 = checksum_free_packet(6, 17, V6[0], V6[1], 1000, 53, 0, (0, 0), b"")
    ack = nl.encode_nlmsg(nl.NLMSG_ERROR, 0, 1, struct.pack("=i", 0) + bytes(16))
    batch = [queued_message(4, udp4, packet_id=1), queued_message(4, udp4, packet_id=2, mark=5),
             queued_message(6, udp6, packet_id=3), bytearray(ack),
             queued_message(4, udp4, packet_id=5)]
    lengths = [len(data) for data in batch]
    batch = [room(data) for data in batch]
    assert keys.take(batch, lengths) == [0, 1, 2, 3, 4]         # an empty cache
    assert sorted(keys.round.misses) == [(1, 1), (1, 2), (1, 3), (1, 5)]
    assert len(set(keys.round.misses.values())) == 2            # the mark is not in the key
    for key in set(keys.round.misses.values()):
        keys.cache.store(key, CachedVerdict(nfq.NF_ACCEPT, None, 0))
    keys.round.clear()
    assert keys.take(batch, lengths) == [3]
    assert keys.round.batch == {1: 5} and not keys.round.single and not keys.round.misses
    assert sum(entry.hits for entry in keys.cache.touched) == 4
    # A hit in a buffer that ends with the message: the reads past a short
    # packet do not fit, and the full path takes it.
    assert keys.take([batch[0][:lengths[0]]], lengths[:1]) == [0]
    assert sum(entry.hits for entry in keys.cache.touched) == 4


def answers_of(keys: KeyMaker, data: bytearray, n: int):
    """What one take of data[:n] answers: the rest, the hits with their
    verdicts, the misses."""
    keys.round.clear()
    rest = keys.take([room(data)], [n])
    single = [(queue, packet_id, entry.verdict) for queue, packet_id, entry in keys.round.single]
    return rest, single, dict(keys.round.misses)


def exact_and_careful(fields, data: bytearray):
    """Two readers of one cache, with and without the exact-match layer; the
    cache holds a verdict for `data`, and the exact layer has seen it taken
    (None when `data` gets no key)."""
    from ipqd.decision.verdict_cache import CachedVerdict
    cache = VerdictCache()
    exact = KeyMaker(frozenset(fields), cache, batch=False, ifname=IFNAME)
    careful = KeyMaker(frozenset(fields), cache, batch=False, ifname=IFNAME, exact=False)
    key = read_key(exact, data)
    if key is None:
        return None
    cache.store(key, CachedVerdict(nfq.NF_DROP, None, 3))
    assert answers_of(exact, data, len(data))[0] == []          # a careful hit, remembered
    return exact, careful, key


@settings(max_examples=500, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(packets(), st.sets(st.sampled_from(KEY_FIELDS[1:])), st.data())
def test_the_exact_layer_answers_as_the_careful_read(packet, fields, data):
    """Whatever byte of a remembered datagram changes, or its length, the
    exact-match layer answers as the careful read does."""
    family, payload = packet
    base = queued_message(family, payload, packet_id=1, mark=data.draw(st.sampled_from([0, 5])),
                          indev=data.draw(st.sampled_from([None, 1, 2])))
    readers = exact_and_careful(set(fields) | {"proto"}, base)
    if readers is None:
        return
    exact, careful, _ = readers
    other = bytearray(base)
    start = len(base) - len(payload)            # where the IP packet starts
    at = data.draw(st.one_of(st.integers(0, len(other) - 1),        # mostly in the headers
                             st.integers(start, min(start + 54, len(other) - 1))))
    other[at] = data.draw(st.integers(0, 255))
    n = len(other) + data.draw(st.sampled_from([0, 0, 0, -1, 1, -4, 4]))
    assert answers_of(exact, other, n) == answers_of(careful, other, n)


def test_the_exact_layer_takes_a_flow_by_its_bytes_not_its_id():
    udp = checksum_free_packet(4, 17, V4[0], V4[1], 1000, 53, 0, (0, 0), b"abcdefgh")
    exact, careful, key = exact_and_careful({"proto", "dport"}, queued_message(4, udp))
    later = queued_message(4, udp, packet_id=99)
    # Without the verdict under its key, only the exact layer can answer.
    del exact.cache.entries[key]
    assert answers_of(exact, later, len(later)) == ([], [(1, 99, nfq.NF_DROP)], {})
    assert answers_of(careful, later, len(later))[0] == [0]


def test_a_batch_verdict_covers_the_latest_hit_of_either_layer():
    from ipqd.decision.verdict_cache import CachedVerdict
    accept = CachedVerdict(nfq.NF_ACCEPT, None, 0)
    keys = key_maker({"proto", "dport"})
    flows = [checksum_free_packet(4, 17, V4[0], V4[1], 1000, port, 0, (0, 0), b"")
             for port in (53, 80)]
    for flow in flows:
        keys.cache.store(read_key(keys, queued_message(4, flow)), accept)
    keys.round.clear()
    first = queued_message(4, flows[0])
    assert keys.take([room(first)], [len(first)]) == []     # careful: remembered exactly
    # ids 10-12 of the first flow (exact hits), 13 of the second (careful).
    burst = [queued_message(4, flows[0], packet_id=i) for i in (10, 11, 12)] + \
        [queued_message(4, flows[1], packet_id=13)]
    keys.round.clear()
    assert keys.take([room(d) for d in burst], [len(d) for d in burst]) == []
    assert keys.round.batch == {1: 13} and not keys.round.single
    keys.round.clear()
    assert keys.take([room(d) for d in burst[:3]], [len(d) for d in burst[:3]]) == []
    assert keys.round.batch == {1: 12}


def test_icmp_and_interface_names_are_read_carefully_every_time():
    """An ICMP echo's checksum changes with its sequence number, and an
    interface may be renamed under its index: neither goes in the exact layer."""
    icmp = checksum_free_packet(4, 1, V4[0], V4[1], 0, 0, 0, (8, 0), b"ping")
    udp = checksum_free_packet(4, 17, V4[0], V4[1], 1000, 53, 0, (0, 0), b"")
    for fields, payload in (({"proto", "icmp_type"}, icmp), ({"proto", "in"}, udp)):
        data = queued_message(4, payload, indev=1)
        exact, _, key = exact_and_careful(fields, data)
        del exact.cache.entries[key]
        assert answers_of(exact, data, len(data))[0] == [0], fields


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("proto", [6, 17])
@pytest.mark.parametrize("fields", [{"proto"}, {"proto", "dport", "tcp_flags"},
                                    {"proto", "src", "dst", "sport", "length", "mark"}])
def test_every_byte_the_careful_read_looks_at_is_in_the_exact_read(family, proto, fields):
    """Each byte of a remembered datagram changed in turn, in several ways:
    the exact-match layer never answers where the careful read would not."""
    addresses = V4 if family == 4 else V6
    payload = checksum_free_packet(family, proto, addresses[0], addresses[1], 1000, 53, 0x10,
                                   (0, 0), b"0123456789")
    base = queued_message(family, payload, mark=5, indev=1)
    exact, careful, _ = exact_and_careful(fields, base)
    for at in range(len(base)):
        for value in {0, 0xFF, base[at] ^ 0x01, base[at] ^ 0x10, base[at] ^ 0x80}:
            other = bytearray(base)
            other[at] = value
            assert answers_of(exact, other, len(other)) == answers_of(careful, other, len(other)), at
    for n in (len(base) - 1, len(base) + 1, len(base) + 4):
        assert answers_of(exact, base, n) == answers_of(careful, base, n), n


def test_a_logged_decision_the_log_rate_suppresses_is_answered_from_the_cache():
    """A flood of logged drops: the entries the rate allows are decided in
    full and written, the rest answered from the cache and counted as
    suppressed, and every counter agrees with a full engine's."""
    from ipqd.daemon.decision_log import DecisionLog
    from test_decision_log import Clock
    policy = Policy(path="p.yaml", rules=(Rule(name="no-dns", match=Match(
        proto=frozenset({17}), dport=RangeMatch(((53, 53),))), action="drop", log=True),),
        default=Default(action="accept", log=False))
    written = []
    clock = Clock()
    log = DecisionLog(rate=Rate(2, 2), send=lambda m, p, f: written.append(m), clock=clock)
    full, cached = Engine(policy), Engine(policy)
    cached.keys = KeyMaker(cached.needs, cached.cache, batch=False, ifname=IFNAME,
                           log_gate=log.wants_entry)
    in_full = 0
    for n in range(53):
        if n == 50:
            clock.now += 1.0            # two more lines allowed: the exact layer asks too
        packet = nfq.Packet(0, 2, n + 1, 0x0800, 1)
        packet.payload = checksum_free_packet(4, 17, V4[0], V4[1], 1000 + n % 3, 53, 0,
                                              (0, 0), b"")
        full.decide(packet, IFNAME, None, 0.0)
        data = kernel_bytes(packet)
        cached.keys.round.clear()
        if cached.keys.take([room(data)], [len(data)]):         # the full path, as the worker
            in_full += 1
            key = cached.keys.round.misses.get((packet.queue, packet.packet_id))
            verdict = cached.decide(packet, IFNAME, None, 0.0, key)
            log.decision(verdict.decision.action, "no-dns", verdict.view, 0, None)
        else:
            assert [entry.verdict for _, _, entry in cached.keys.round.single] == [nfq.NF_DROP]
    log.close()
    # The first (a miss), the second (a hit the rate still allows a line for),
    # and two of the last three.
    assert in_full == 4 and len([m for m in written if m.startswith("DROP")]) == 4
    assert log.suppressed == 49
    cached.settle()
    assert cached.counters.as_dict() == full.counters.as_dict()
    assert cached.matcher.counters() == full.matcher.counters()


def test_a_set_change_reaches_flows_the_cache_and_its_exact_layer_hold():
    """A flow accepted and cached (the careful key and the exact bytes), then
    its source added to a dynamic set: the next packet is dropped; deleted:
    accepted again."""
    from ipqd.policy.model import AddrMatch
    policy = Policy(path="p.yaml", rules=(
        Rule(name="banned", match=Match(src=AddrMatch((), False, ("banned",))), action="drop"),
        Rule(name="dns", match=Match(proto=frozenset({17}), dport=RangeMatch(((53, 53),))),
             action="accept")), default=Default(action="drop", log=False))
    engine = cached_engine(policy)
    packet = nfq.Packet(0, 2, 1, 0x0800, 1)
    packet.payload = checksum_free_packet(4, 17, V4[0], V4[1], 1000, 53, 0, (0, 0), b"")
    for _ in range(3):                      # a miss, a careful hit, an exact hit
        assert decide_cached(engine, packet, 0.0) == (nfq.NF_ACCEPT, None, 1)
    assert engine.cache.entries
    source = str(ipaddress.IPv4Address(V4[0]))
    engine.change_set("banned", "add", (parse_entry(source),))
    for _ in range(2):
        assert decide_cached(engine, packet, 0.0) == (nfq.NF_DROP, None, 0)
    engine.change_set("banned", "del", (parse_entry(source),))
    assert decide_cached(engine, packet, 0.0) == (nfq.NF_ACCEPT, None, 1)
    engine.change_set("banned", "add", (parse_entry("10.0.0.0/8"),))     # V4[0] is 10.0.0.1
    assert decide_cached(engine, packet, 0.0) == (nfq.NF_DROP, None, 0)
    engine.change_set("banned", "flush")
    assert decide_cached(engine, packet, 0.0) == (nfq.NF_ACCEPT, None, 1)
    assert engine.cache.invalidations == 4


def test_a_burst_of_new_flows_turns_the_exact_layer_off_for_the_next_burst():
    from ipqd.decision.verdict_cache import CachedVerdict
    keys = key_maker({"proto", "dport"})
    flow = queued_message(4, checksum_free_packet(4, 17, V4[0], V4[1], 1000, 53, 0, (0, 0), b""))
    key = read_key(keys, flow)
    flood = [queued_message(4, checksum_free_packet(4, 17, V4[0], V4[1], 1000, port, 0, (0, 0),
                                                    b"")) for port in range(2000, 2010)]

    def take(burst):
        keys.round.clear()
        return keys.take([room(d) for d in burst], [len(d) for d in burst])
    keys.cache.store(key, CachedVerdict(nfq.NF_ACCEPT, None, 0))
    assert take(flood) == list(range(10))          # all misses: a flood
    assert take([flow]) == []                       # a careful hit: the exact layer was off...
    del keys.cache.entries[key]
    assert take([flow]) == [0]                      # ...so it did not learn the flow
    keys.cache.store(key, CachedVerdict(nfq.NF_ACCEPT, None, 0))
    assert take([flow]) == []                       # on again after a burst of hits: it learns
    del keys.cache.entries[key]
    assert take([flow]) == [] and keys.round.batch == {1: 7}


def test_cache_hits_count_their_bytes_as_the_full_path_does():
    """Packets of one flow of several lengths: the careful read's hits, the
    exact layer's, and the full path's add the same bytes to the rule."""
    policy = Policy(path="p.yaml", rules=(
        Rule(name="dns", match=Match(proto=frozenset({17}), dport=RangeMatch(((53, 53),))),
             action="accept"),), default=Default(action="drop", log=False))
    cached, full = cached_engine(policy), Engine(policy)
    sizes = []
    for n in range(12):
        packet = nfq.Packet(0, 2, n + 1, 0x0800, 1)
        packet.payload = checksum_free_packet(4, 17, V4[0], V4[1], 1000, 53, 0, (0, 0),
                                              b"x" * (n % 4 * 100))
        sizes.append(len(packet.payload))
        assert decide_cached(cached, packet, 0.0) == (nfq.NF_ACCEPT, None, 0)
        full.decide(packet, IFNAME, None, 0.0)
    cached.settle()
    assert cached.cache.hits >= 8
    assert cached.matcher.counters()["rules"]["dns"]["bytes"] == sum(sizes)
    assert full.matcher.counters()["rules"]["dns"]["bytes"] == sum(sizes)
