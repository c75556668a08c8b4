"""What a dynamic set costs: a lookup at 10 and at 1,000,000 entries, the
memory per entry, and the time to add entries.

    .venv/bin/python bench/set_cost.py [--iterations N] [--sizes 10,1000000]

For each size, the set holds that many single IPv4 addresses plus a few
networks (/16, /24) and IPv6 /64s, as a ban list does. Lookups ask for
addresses in the set and not in it, through the compiled matcher (a policy
whose first rule reads the set), in nanoseconds per decision (the median
of 5 runs of N), and through AddressSet.contains alone. Memory: the growth
of the traced heap per entry, for the worker's store (membership) and the
supervisor's (with an expiry each).
"""
from __future__ import annotations

import argparse
import ipaddress
import random
import statistics
import time
import tracemalloc

from ipqd.decision.address_set import AddressSet, parse_entry
from ipqd.decision.compiler import compile_policy
from ipqd.decision.packet import PacketView
from ipqd.policy.model import AddrMatch, Default, DynamicSet, Match, Policy, RangeMatch, Rule


def entries(count: int, seed: int = 1) -> list:
    """`count` entries: mostly single IPv4 addresses, some networks, some IPv6."""
    rng = random.Random(seed)
    out = set()
    while len(out) < count:
        kind = rng.random()
        if kind < 0.9:
            out.add((4, 32, rng.getrandbits(32)))
        elif kind < 0.95:
            out.add((4, 24, rng.getrandbits(24)))
        else:
            out.add((6, 64, rng.getrandbits(64)))
    return list(out)


def policy() -> Policy:
    return Policy(path="bench.yaml", sets=(DynamicSet("banned", None, 2_000_000),), rules=(
        Rule(name="banned", match=Match(src=AddrMatch((), False, ("banned",))), action="drop"),
        Rule(name="web", match=Match(proto=frozenset({6}), dport=RangeMatch(((443, 443),))),
             action="accept")), default=Default(action="drop", log=False))


def views(present: list, count: int) -> list:
    """Packet views: half from addresses in the set, half from others."""
    rng = random.Random(7)
    out = []
    for i in range(count):
        if i % 2 and present:
            version, prefix, key = rng.choice(present)
            address = key << ((32 if version == 4 else 128) - prefix)
        else:
            version, address = 4, rng.getrandbits(32)
        out.append(PacketView.build(family=version, proto=6, src=address, dst=1, sport=40000,
                                    dport=443, length=60, fragment="none"))
    return out


def per_op(run, count: int) -> float:
    times = []
    for _ in range(5):
        started = time.perf_counter()
        run()
        times.append((time.perf_counter() - started) / count * 1e9)
    return statistics.median(times)


def measure(size: int, iterations: int) -> dict:
    listed = entries(size)
    matcher = compile_policy(policy())
    store = matcher.sets["banned"]
    started = time.perf_counter()
    for entry in listed:
        store.add(entry)
    add_ns = (time.perf_counter() - started) / size * 1e9
    packets = views(listed, iterations)
    decide = matcher.decide
    contains = store.contains
    pairs = [(v.family, v.src) for v in packets]
    decide_ns = per_op(lambda: [decide(v) for v in packets], iterations)
    contains_ns = per_op(lambda: [contains(f, a) for f, a in pairs], iterations)
    return {"size": size, "decide_ns": decide_ns, "contains_ns": contains_ns, "add_ns": add_ns}


def memory_per_entry(size: int) -> dict:
    listed = entries(size, seed=3)
    out = {}
    for role, expires in (("worker", None), ("supervisor", time.time() + 3600)):
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        store = AddressSet("m", size + 1)
        for entry in listed:
            store.add(entry, expires if expires is None else expires + entry[2] % 1000)
        used = tracemalloc.get_traced_memory()[0] - base
        tracemalloc.stop()
        out[role] = used / size
        del store
    return out


def parse_cost(count: int) -> float:
    texts = [str(ipaddress.IPv4Address(random.getrandbits(32))) for _ in range(count)]
    started = time.perf_counter()
    for text in texts:
        parse_entry(text)
    return (time.perf_counter() - started) / count * 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", type=int, default=100_000)
    parser.add_argument("--sizes", default="10,1000,100000,1000000")
    parser.add_argument("--memory-size", type=int, default=200_000)
    args = parser.parse_args()
    print(f"{'entries':>9}  {'decide ns':>9}  {'contains ns':>11}  {'add ns':>7}")
    for size in (int(s) for s in args.sizes.split(",")):
        r = measure(size, args.iterations)
        print(f"{r['size']:>9}  {r['decide_ns']:>9.0f}  {r['contains_ns']:>11.0f}  "
              f"{r['add_ns']:>7.0f}")
    memory = memory_per_entry(args.memory_size)
    print(f"memory per entry ({args.memory_size} entries): worker {memory['worker']:.0f} B, "
          f"supervisor {memory['supervisor']:.0f} B (with its expiry and heap item)")
    print(f"parse_entry: {parse_cost(100_000):.0f} ns per IPv4 address")


if __name__ == "__main__":
    main()
