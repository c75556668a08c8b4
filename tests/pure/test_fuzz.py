"""Hostile packets: the netlink decoder, the packet view and the engine never
raise past the per-packet boundary, and every packet gets exactly one verdict.

Each property runs a few hundred cases in every `make test`; `make fuzz`
(`pytest -m fuzz`) runs the same properties with FUZZ_CASES cases in total
(default 120,000), seeded from real captures and kernel messages, then
mutated. The per-packet work bound is measured here too.
"""
from __future__ import annotations

import os
import struct
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fuzz_corpus
from ipqd.wire import nfnetlink as nl
from ipqd.wire import nfqueue as nfq
from ipqd.decision.engine import Engine
from ipqd.decision.packet import PacketMeta, PacketView, parse
from ipqd.policy.loader import loads
from ipqd.policy.model import CT_STATES, L4_FIELDS

pytestmark = pytest.mark.fuzz

SEEDS = fuzz_corpus.seeds()
MESSAGES = fuzz_corpus.kernel_messages()
POLICY = loads(fuzz_corpus.FUZZ_POLICY, "fuzz.yaml")
EXAMPLE_POLICY = loads(open(os.path.join(fuzz_corpus.ROOT, "etc", "ipqd", "policy.yaml")).read(),
                       "policy.yaml")
# Share of the fuzz run each property gets (they sum to 1).
SHARES = {"decoder_bytes": 0.10, "decoder_mutated": 0.10, "decoder_attrs": 0.10,
          "parse_random": 0.10, "parse_mutated": 0.30, "engine": 0.30}
QUICK = 150


def cases(request, name: str) -> int:
    """Few cases in a normal run; the property's share of FUZZ_CASES under -m fuzz."""
    if "fuzz" in (request.config.getoption("markexpr") or ""):
        return max(QUICK, int(int(os.environ.get("FUZZ_CASES", "120000")) * SHARES[name]))
    return QUICK


def run(request, name: str, prop) -> None:
    settings(max_examples=cases(request, name), deadline=None, database=None,
             suppress_health_check=list(HealthCheck))(prop)()


# ------------------------------------------------------------------ strategies

@st.composite
def mutated(draw, pool=SEEDS) -> bytes:
    """A real packet (or message) with a few byte-level changes."""
    data = bytearray(draw(st.sampled_from(pool)))
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["flip", "cut", "insert", "field16", "field8"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "cut":
            data = data[:at]
        elif kind == "insert":
            data[at:at] = draw(st.binary(max_size=16))
        elif kind == "field16" and len(data) >= at + 2:
            data[at:at + 2] = struct.pack("!H", draw(st.sampled_from(
                [0, 1, 7, 8, 20, 40, 0x7fff, 0xfff8, 0xffff]) | st.integers(0, 0xffff)))
        elif kind == "field8" and data:
            data[at] = draw(st.sampled_from([0, 4, 6, 17, 44, 58, 60, 0x45, 0x60, 0xff])
                            | st.integers(0, 255))
    return bytes(data)


payloads = st.one_of(st.binary(max_size=128), mutated())
metas = st.builds(
    PacketMeta,
    hook=st.none() | st.integers(0, 6),
    indev=st.none() | st.sampled_from(["lo", "eth0", "veth-s", "a\nb", "\x1b[2J", ""]),
    outdev=st.none() | st.sampled_from(["eth9", "x" * 15]),
    mark=st.integers(0, 0xffffffff),
    uid=st.none() | st.integers(0, 0xffffffff),
    gid=st.none() | st.integers(0, 0xffffffff),
    ct_state=st.none() | st.sampled_from(CT_STATES),
    wire_len=st.none() | st.integers(0, 70000),
    family=st.none() | st.sampled_from([4, 6]))
needs = st.none() | st.sets(st.sampled_from(sorted(L4_FIELDS | {"src", "malformed"}))).map(frozenset)


def check_view(view) -> None:
    assert isinstance(view, PacketView)
    l4 = (view.sport, view.dport, view.icmp_type, view.icmp_code, view.tcp_flags)
    if view.malformed:
        # An unexpected exception inside parse would name only its type.
        assert " " in view.reason, f"parse hit an unexpected {view.reason}"
        assert l4 == (None,) * 5
    if view.fragment == "not-first":
        assert l4 == (None,) * 5         # later fragments carry no transport header


# ------------------------------------------------------------------ the decoder

EVENT_TYPES = (nfq.Packet, nfq.Ack, nfq.KernelError, nfq.Undecodable)


def check_events(data: bytes, events) -> None:
    assert isinstance(events, list)
    assert all(isinstance(e, EVENT_TYPES) for e in events)
    assert bool(events) == bool(data)     # a datagram always says something


def test_decoder_on_random_bytes(request):
    @given(st.binary(max_size=512))
    def prop(data):
        check_events(data, nfq.QueueProtocol().receive_data(data))
    run(request, "decoder_bytes", prop)


def test_decoder_on_mutated_kernel_messages(request):
    framed = [fuzz_corpus.packet_message(p[:256], packet_id=i) for i, p in enumerate(SEEDS[::3])]

    @given(mutated(MESSAGES + framed))
    def prop(data):
        check_events(data, nfq.QueueProtocol().receive_data(data))
    run(request, "decoder_mutated", prop)


attribute = st.tuples(st.integers(0, 0xffff), st.binary(max_size=24)
                      | st.sampled_from([b"", b"\x00", b"\x00" * 4, b"\x00" * 8]))


def test_decoder_packet_with_any_attributes_gets_one_event_with_its_id(request):
    """A well-framed packet message with arbitrary attributes: exactly one
    event, a Packet or an Undecodable that still knows the id (so the socket
    gives it the default verdict)."""
    @given(st.integers(0, 0xffffffff), st.lists(attribute, max_size=8), st.binary(max_size=64))
    def prop(packet_id, attrs, payload):
        body = nl.encode_nfgenmsg(2, 0) + nl.encode_attr(
            nfq.NFQA_PACKET_HDR, struct.pack(">IHB", packet_id, 0x0800, 1))
        for attr_type, value in attrs:
            if attr_type & nl.NLA_TYPE_MASK != nfq.NFQA_PACKET_HDR:
                body += nl.encode_attr(attr_type, value)
        body += nl.encode_attr(nfq.NFQA_PAYLOAD, payload)
        events = nfq.QueueProtocol().receive_data(nl.encode_nlmsg(nfq.MSG_PACKET, 0, 0, body))
        assert len(events) == 1
        event = events[0]
        if isinstance(event, nfq.Packet):
            assert event.packet_id == packet_id and event.payload == payload
        else:
            assert isinstance(event, nfq.Undecodable) and event.packet_id == packet_id
    run(request, "decoder_attrs", prop)


# ------------------------------------------------------------------ the packet view

def test_parse_random_bytes(request):
    @given(st.binary(max_size=256), metas, needs)
    def prop(data, meta, need):
        check_view(parse(data, meta, need))
    run(request, "parse_random", prop)


def test_parse_mutated_real_packets(request):
    @given(mutated(), metas, needs)
    def prop(data, meta, need):
        check_view(parse(data, meta, need))
    run(request, "parse_mutated", prop)


# ------------------------------------------------------------------ the engine

@st.composite
def queued_packets(draw) -> nfq.Packet:
    packet = nfq.Packet(draw(st.integers(0, 0xffff)), draw(st.sampled_from([2, 10, 0, 7, 255])),
                        draw(st.integers(0, 0xffffffff)), draw(st.integers(0, 0xffff)),
                        draw(st.integers(0, 255)))
    packet.payload = draw(st.none() | payloads)
    packet.mark = draw(st.integers(0, 0xffffffff))
    for name in ("indev", "outdev", "uid", "gid", "cap_len", "ct_info", "skb_info"):
        setattr(packet, name, draw(st.none() | st.integers(0, 0xffffffff)))
    return packet


NAMES = {1: "lo", 2: "eth0", 3: "eth9", 4: "v\x1b]0;x\x07", 5: "a" * 15}


def test_engine_gives_exactly_one_verdict_and_never_errs(request):
    engines = [Engine(POLICY), Engine(EXAMPLE_POLICY)]
    clock = [1000.0]

    @given(queued_packets(), st.sampled_from(CT_STATES + (None,)), st.integers(0, 1),
           st.floats(0, 2))
    def prop(packet, ct_state, which, step):
        engine = engines[which]
        before = engine.counters.as_dict()
        clock[0] += step
        verdict = engine.decide(packet, NAMES.get, ct_state, clock[0])
        after = engine.counters.as_dict()
        assert verdict.verdict in (nfq.NF_ACCEPT, nfq.NF_DROP, nfq.NF_REPEAT)
        assert verdict.mark is None or verdict.verdict in (nfq.NF_ACCEPT, nfq.NF_REPEAT)
        if verdict.verdict == nfq.NF_REPEAT:     # an offload or reject request, never twice
            assert packet.mark & 0xC0000000 == 0 and verdict.mark & 0xC0000000
            assert (verdict.mark & 0xC0000000 == 0xC0000000) == \
                (verdict.decision.action == "reject")
        assert after["packets"] == before["packets"] + 1
        assert (after["accepted"] - before["accepted"]) + (after["dropped"] - before["dropped"]) == 1
        assert after["errors"] == 0, "the matcher raised"
        check_view(verdict.view)
    run(request, "engine", prop)


# FUZZ_POLICY without the rules the generated decision function leaves to the
# matcher in front (ct_state, interfaces, hook, mark, fragment), without
# logging or offload: the function then answers many packets itself.
FAST_POLICY = loads("\n".join(
    line.replace("copy_range: 256}", "copy_range: 256, offload: off}")
    .replace("log: true}", "log: false}")
    for line in fuzz_corpus.FUZZ_POLICY.splitlines()
    if not any(word in line for word in ("ct_state", "in: lo", "hook: output", "mark:",
                                         "fragment:"))), "fuzz-fast.yaml")


def test_the_generated_function_decides_as_the_engine_where_it_answers(request):
    engines = [Engine(POLICY), Engine(FAST_POLICY)]

    @given(payloads, metas, st.integers(0, 1))
    def prop(payload, meta, which):
        engine = engines[which]
        packet = nfq.Packet(1, 2 if (meta.family or 4) == 4 else 10, 1, 0x0800, meta.hook or 0)
        packet.payload = payload
        packet.mark = meta.mark
        verdict = engine.decide(packet, lambda index: None, None, 0.0)
        view = verdict.view
        if view is None or view.malformed or view.hidden:
            return
        fresh = engine.decider.decide_packet(payload, meta.family or 4, meta.hook, None, None,
                                             meta.mark)
        if fresh is not None:
            assert fresh.rule_index == verdict.decision.rule_index
            assert fresh.verdict == verdict.verdict and fresh.mark == verdict.mark
    run(request, "engine", prop)


def test_engine_error_in_the_matcher_gives_the_default_and_is_counted():
    engine = Engine(POLICY)

    def broken(view, now):
        raise ZeroDivisionError("injected")
    engine.matcher.decide = broken
    packet = nfq.Packet(0, 2, 1, 0x0800, 1)
    packet.payload = fuzz_corpus.worst_cases()["ipv4-plain-tcp"]
    verdict = engine.decide(packet, NAMES.get, None, 1.0)
    assert verdict.verdict == nfq.NF_DROP and verdict.decision.action == "drop"
    assert engine.counters.errors == 1 and engine.counters.dropped == 1


# ------------------------------------------------------------------ fragments

FRAGMENT_POLICY = """\
version: 1
default: {action: accept}
rules:
  - {name: not-ssh, proto: [tcp, udp], dport: "!22", action: drop}
  - {name: dns, proto: udp, dport: 53, action: drop}
  - {name: later, fragment: not-first, action: accept, set_mark: 7}
"""


@pytest.mark.parametrize("name", ["ipv4", "ipv6"])
def test_rules_with_ports_never_match_non_first_fragments(name):
    """As iptables: a later fragment has no ports, so neither `dport: 53` nor
    `dport: "!22"` matches it; only `fragment: not-first` does."""
    engine = Engine(loads(FRAGMENT_POLICY, "frag.yaml"))
    if name == "ipv4":
        first = fuzz_corpus.ipv4(fuzz_corpus.udp(dport=53), frag=0x2000)
        later = fuzz_corpus.ipv4(fuzz_corpus.udp(dport=53), frag=0x0003)
    else:
        frag = lambda offset_mf: bytes([17, 0]) + struct.pack("!HI", offset_mf, 9)
        first = fuzz_corpus.ipv6(frag(0x0001) + fuzz_corpus.udp(dport=53), nxt=44)
        later = fuzz_corpus.ipv6(frag(0x0018) + fuzz_corpus.udp(dport=53), nxt=44)
    results = {}
    for label, payload in (("first", first), ("later", later)):
        packet = nfq.Packet(0, 2 if name == "ipv4" else 10, 1, 0, 1)
        packet.payload = payload
        verdict = engine.decide(packet, NAMES.get, None, 1.0)
        results[label] = (verdict.decision.rule.name if verdict.decision.rule else "default",
                          verdict.view.fragment, verdict.view.dport)
    assert results["first"] == ("not-ssh", "first", 53)
    assert results["later"] == ("later", "not-first", None)


# ------------------------------------------------------------------ work per packet

def cost(engine: Engine, payload: bytes, rounds: int) -> float:
    """Seconds per packet for parse + decide, the best of 5 runs."""
    packet = nfq.Packet(0, 10 if payload[0] >> 4 == 6 else 2, 1, 0, 1)
    packet.payload = payload
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(rounds):
            engine.decide(packet, NAMES.get, "new", 1.0)
        best = min(best, (time.perf_counter() - started) / rounds)
    return best


BOUND = 50


def test_the_slowest_packet_costs_at_most_50_times_a_typical_one():
    """The work per packet is bounded: the worst packets we can build (8
    IPv6 extension headers of 2 KiB each, 180 of 8 bytes in 1,500 bytes, a
    2 KiB jumbo-option search, 40 bytes of IPv4 options, lying lengths,
    fragments) cost at most BOUND times a plain TCP packet through the same
    policy, measured here."""
    engine = Engine(POLICY)
    engine.needs = None          # read every field: the most work parse can do
    typical = cost(engine, fuzz_corpus.worst_cases()["ipv4-plain-tcp"], 2000)
    worst = {name: cost(engine, payload, 200) for name, payload in fuzz_corpus.worst_cases().items()}
    name, slowest = max(worst.items(), key=lambda item: item[1])
    report = f"typical {typical * 1e6:.1f} us; slowest {name} {slowest * 1e6:.1f} us " \
             f"({slowest / typical:.1f}x)"
    print(report)
    assert slowest < BOUND * typical, report
