"""Rates kept per key: one bucket per source (network, port, ...), at most
`keys` keys, the least recently used forgotten; the compiled matcher and
the reference agree on them."""
from __future__ import annotations

import ipaddress
import random

import pytest

from ipqd.decision.compiler import compile_policy
from ipqd.decision.packet import PacketView
from ipqd.decision.rate_table import RateTable
from ipqd.errors import PolicyErrors
from ipqd.policy.loader import loads
from ipqd.policy.model import Default, Match, Policy, Rate, Rule
from policy_strategies import assert_agrees

PER_SRC = Rate(1.0, 3, "1/second burst 3 per src", per=(("src", 32, 128),), keys=2)


def view(src: str, dport: int = 53, family: int = 4) -> PacketView:
    return PacketView.build(family=family, proto=17, src=int(ipaddress.ip_address(src)),
                            dst=1, sport=1000, dport=dport, length=40, fragment="none")


def takes(table, packets, now=0.0) -> int:
    taken = 0
    for v in packets:
        if table.available(now, v):
            taken += table.take(now, v)
    return taken


def test_each_source_has_its_own_bucket():
    table = RateTable(PER_SRC)
    assert takes(table, [view("10.0.0.1")] * 10) == 3
    assert takes(table, [view("10.0.0.2")] * 10) == 3        # not starved by the first
    assert takes(table, [view("10.0.0.1")] * 10, now=2.0) == 2    # refilled 2 in 2 s


def test_a_prefix_groups_addresses_and_ipv6_by_its_own_prefix():
    rate = Rate(1.0, 2, per=(("src", 24, 64), ("dport", 0, 0)), keys=10)
    table = RateTable(rate)
    assert takes(table, [view("10.0.0.1"), view("10.0.0.200"), view("10.0.0.9")]) == 2
    assert takes(table, [view("10.0.1.1")]) == 1                  # another /24
    assert takes(table, [view("10.0.0.1", dport=80)]) == 1        # another port
    assert takes(table, [view("fd00::1", family=6), view("fd00::ffff:1", family=6),
                         view("fd00::2", family=6)]) == 2          # one /64


def test_past_the_bound_the_least_recently_used_key_is_forgotten_and_counted():
    table = RateTable(PER_SRC)
    takes(table, [view("10.0.0.1")] * 2 + [view("10.0.0.2")])
    takes(table, [view("10.0.0.1")])                    # a token taken: .1 is the most recent
    takes(table, [view("10.0.0.3")])                    # forgets .2, not .1
    assert len(table) == 2 and set(k[1] for k in table.entries) == {0x0A000001, 0x0A000003}
    assert (table.evicted, table.evicted_early) == (1, 1)        # .2 had not refilled
    takes(table, [view("10.0.0.4")], now=100.0)          # .1 refilled long ago: nothing lost
    assert (table.evicted, table.evicted_early) == (2, 1)
    # a forgotten key comes back with a full bucket
    assert takes(table, [view("10.0.0.2")] * 5, now=100.0) == 3


def test_looking_tracks_nothing():
    table = RateTable(PER_SRC)
    for i in range(100):
        assert table.available(0.0, view(f"10.0.1.{i}"))
    assert len(table) == 0


def test_compiled_and_reference_agree_on_rates_per_key_with_dense_packets():
    """Packets 0.1 s apart from a few sources, so that buckets run dry and
    the small tables evict."""
    rng = random.Random(17)
    sources = ["10.0.0.1", "10.0.0.2", "10.0.1.1", "192.168.1.10", "fd00::1", "fd00::2",
               "fd00:1::1"]
    for _ in range(60):
        rules = []
        for i in range(rng.randint(1, 6)):
            per = rng.choice([(("src", 32, 128),), (("src", 24, 64),),
                              (("src", 16, 48), ("dport", 0, 0)), (("dport", 0, 0),),
                              (("dst", 32, 128), ("sport", 0, 0))])
            rate = Rate(rng.choice([1.0, 3.0]), rng.choice([1, 2]), per=per,
                        keys=rng.choice([1, 2, 3, 100]))
            match = Match(dport=None) if rng.random() < 0.5 else Match(proto=frozenset({17}))
            rules.append(Rule(f"r{i}", match, rng.choice(["accept", "drop", "log"]), rate=rate))
        policy = Policy("dense.yaml", rules=tuple(rules), default=Default("drop"))
        packets = []
        for n in range(80):
            src = rng.choice(sources)
            packets.append(view(src, dport=rng.choice([53, 80]), family=6 if ":" in src else 4))
        assert_agrees(policy, packets, step=0.1)


def test_the_loader_reads_a_rate_per_key():
    policy = loads("version: 1\nhooks: [{chain: input}]\ndefault: {action: drop}\nrules:\n"
                   "  - {proto: udp, action: accept,\n"
                   "     rate: {limit: 20/second, burst: 40, per: [dport, src/24], keys: 500}}\n")
    rate = policy.rules[0].rate
    assert (rate.per_second, rate.burst, rate.keys) == (20.0, 40, 500)
    assert rate.per == (("src", 24, 64), ("dport", 0, 0))
    assert rate.text == "20/second burst 40 per src/24/64,dport"
    matcher = compile_policy(policy)
    assert matcher.rate_stats() == {"rate_keys": 0, "rate_evicted": 0, "rate_evicted_early": 0}


@pytest.mark.parametrize("rate, message", [
    ("{limit: 20/second, per: srcip}", "unknown per 'srcip' (did you mean 'src'?)"),
    ("{limit: 20/second, per: src/33}", "an IPv4 prefix is 0-32"),
    ("{limit: 20/second, per: [src, src/24]}", "per names src twice"),
    ("{limit: 20/second, keys: 10}", "keys only works with per"),
    ("{limit: 20/second, per: src, keys: 0}", "keys must be a number from 1 to 1000000"),
    ("{per: src}", "missing 'limit'"),
    ("{limit: 20/second burst 5, per: src}", "write the burst as 'burst: N'"),
    ("{limit: 20/second, per: src, every: 1}", "unknown field 'every'"),
])
def test_what_the_loader_refuses(rate, message):
    with pytest.raises(PolicyErrors) as caught:
        loads("version: 1\nhooks: [{chain: input}]\ndefault: {action: drop}\nrules:\n"
              f"  - {{proto: udp, action: accept, rate: {rate}}}\n")
    assert message in str(caught.value)
