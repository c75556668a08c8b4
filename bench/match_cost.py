"""What parse + decide cost per packet, for 10, 1,000 and 10,000 rules.

    .venv/bin/python bench/match_cost.py [--iterations N]

Rule i: proto tcp (even i) or udp (odd i), dport 1000+i, src 10.x.y.0/24 of
its own. The packets hit the LAST rule (the worst case for a linear matcher)
or nothing at all (the default). A last group puts every rule on the same
port so only the address tables can tell them apart. Each figure is the
median of 5 runs of N packets, in nanoseconds per packet.
"""
from __future__ import annotations

import argparse
import ipaddress
import statistics
import time

import dpkt

from ipqd.decision.compiler import compile_policy
from ipqd.decision.packet import PacketMeta, parse
from ipqd.policy.model import AddrMatch, Match, Policy, RangeMatch, Rule

SIZES = (10, 1_000, 10_000)
META = PacketMeta(hook=1, indev="eth0")


def rule_src(i: int) -> str:
    return f"10.{(i >> 8) & 255}.{i & 255}.0/24"


def make_policy(count: int, same_port: bool = False) -> Policy:
    rules = []
    for i in range(count):
        proto = 6 if i % 2 == 0 else 17
        port = 443 if same_port else 1000 + i
        rules.append(Rule(
            name=f"r{i}", action="accept",
            match=Match(proto=frozenset({proto}), dport=RangeMatch(((port, port),)),
                        src=AddrMatch((ipaddress.ip_network(rule_src(i)),)))))
    return Policy(path=f"bench-{count}.yaml", rules=tuple(rules))


def make_packet(proto: int, src: str, dport: int) -> bytes:
    l4 = (dpkt.tcp.TCP(sport=40000, dport=dport, flags=dpkt.tcp.TH_SYN) if proto == 6
          else dpkt.udp.UDP(sport=40000, dport=dport, ulen=8))
    ip = dpkt.ip.IP(src=ipaddress.ip_address(src).packed,
                    dst=ipaddress.ip_address("10.255.255.1").packed, p=proto, ttl=64, data=l4)
    ip.len = len(ip)
    return bytes(ip)


def last_rule_packet(count: int, same_port: bool = False) -> bytes:
    last = count - 1
    network = ipaddress.ip_network(rule_src(last))
    return make_packet(6 if last % 2 == 0 else 17, str(network.network_address + 7),
                       443 if same_port else 1000 + last)


def per_packet_ns(fn, iterations: int) -> float:
    runs = []
    for _ in range(5):
        start = time.perf_counter_ns()
        for _ in range(iterations):
            fn()
        runs.append((time.perf_counter_ns() - start) / iterations)
    return statistics.median(runs)


def measure(policy: Policy, payload: bytes, expect_index: int, iterations: int) -> tuple:
    matcher = compile_policy(policy)
    needs = matcher.fields
    view = parse(payload, META, needs)
    decision = matcher.decide(view, 0.0)
    assert decision.rule_index == expect_index, (decision, expect_index)
    decide = matcher.decide
    parse_ns = per_packet_ns(lambda: parse(payload, META, needs), iterations)
    decide_ns = per_packet_ns(lambda: decide(view, 0.0), iterations)
    total_ns = per_packet_ns(lambda: decide(parse(payload, META, needs), 0.0), iterations)
    empty_ns = per_packet_ns(lambda: None, iterations)       # the loop and call themselves
    return parse_ns - empty_ns, decide_ns - empty_ns, total_ns - empty_ns


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=20_000)
    args = parser.parse_args()
    cases = []
    for count in SIZES:
        cases.append(("last rule", count, make_policy(count), last_rule_packet(count), count - 1))
    for count in SIZES:
        cases.append(("default", count, make_policy(count),
                      make_packet(6, "192.168.0.1", 9), -1))
    for count in SIZES:
        cases.append(("same port, last", count, make_policy(count, same_port=True),
                      last_rule_packet(count, same_port=True), count - 1))
    print(f"{'case':<16} {'rules':>6} {'parse ns':>9} {'decide ns':>10} {'total ns':>9} "
          f"{'vs 10':>6}")
    base = {}
    for name, count, policy, payload, index in cases:
        parse_ns, decide_ns, total_ns = measure(policy, payload, index, args.iterations)
        base.setdefault(name, total_ns)
        print(f"{name:<16} {count:>6} {parse_ns:>9.0f} {decide_ns:>10.0f} {total_ns:>9.0f} "
              f"{total_ns / base[name]:>6.2f}")


if __name__ == "__main__":
    main()
