"""What a rate kept per key costs per packet in `Matcher.decide`.

    .venv/bin/python bench/rate_cost.py [--packets N]

One rule `proto: udp, dport: 53, action: accept` with: no rate; one bucket
(`rate: 1000/second`); one bucket per source (`per: src`) hit by one
source; and the same per source under a flood of distinct sources (every
packet a new key, past the 16,384-key bound, so every packet also evicts).
Each figure is the median of 5 runs, in nanoseconds per packet, parse
excluded (the views are built beforehand).
"""
from __future__ import annotations

import argparse
import statistics
import time

from ipqd.decision.compiler import compile_policy
from ipqd.decision.packet import PacketView
from ipqd.policy.model import RATE_KEYS_DEFAULT, Match, Policy, RangeMatch, Rate, Rule

PER_SRC = Rate(1000.0, 1000, "1000/second per src", per=(("src", 32, 128),),
               keys=RATE_KEYS_DEFAULT)
CASES = (("no rate", None, False), ("one bucket", Rate(1000.0, 1000, "1000/second"), False),
         ("per src, one source", PER_SRC, False), ("per src, flood of new sources", PER_SRC, True))


def views(count: int, distinct: bool):
    return [PacketView.build(family=4, proto=17, src=0x0A000000 + (i if distinct else 1),
                             dst=0x0A0000FE, sport=40000, dport=53, length=60,
                             fragment="none", hook=1) for i in range(count)]


def run(rate, distinct: bool, count: int) -> float:
    rule = Rule("dns", Match(proto=frozenset({17}), dport=RangeMatch(((53, 53),))), "accept",
                rate=rate)
    matcher = compile_policy(Policy("bench.yaml", rules=(rule,)))
    packets = views(count, distinct)
    now = 0.0
    started = time.perf_counter()
    for view in packets:
        now += 1e-6
        matcher.decide(view, now)
    return (time.perf_counter() - started) / count * 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--packets", type=int, default=200_000)
    args = parser.parse_args()
    for name, rate, distinct in CASES:
        runs = [run(rate, distinct, args.packets) for _ in range(5)]
        print(f"{name:<32} {statistics.median(runs):8.0f} ns/packet")


if __name__ == "__main__":
    main()
