"""What ipqd's worker spends per packet between the socket and the verdict, without the kernel.

    .venv/bin/python bench/pipeline_cost.py [--rules N] [--packets N] [--batch N] [--profile]
                                            [--shadow] [--new-flows]

Feeds the worker's receive path (QueueSocket.receive_events with its
socket reads replaced by ready datagrams) and Worker.answer (with the send
replaced by a list) with packet messages like the kernel's for loopback UDP
hitting the LAST of N rules, as bench/run.py sends them. --new-flows: every
packet from a source address and port of its own, through the mixed policy
of bench/run.py's new: consumers (newflow_policy_yaml); no cache can answer,
so the "hit" figure is then the cached path's cost on new flows. Prints nanoseconds
per packet: decode only; decode + parse + decide + verdict encoding; and a
verdict cache hit (key read + lookup + verdict encoding). Each receive
drains --batch datagrams (256; 1 shows the cost of a wake-up with one packet,
as with one packet in flight). --profile prints a cProfile of the cache-hit
path (--no-cache: of the full path). --shadow gives the policy a shadow
policy (the same rules: a shadow that agrees, matching as much as the
enforced one), to show what deciding beside costs.
"""
from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import tempfile
import time
from dataclasses import replace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dpkt  # noqa: E402

from bench.run import PORT, newflow_policy_yaml, policy_yaml  # noqa: E402
from ipqd.wire import nfqueue as nfq  # noqa: E402
from ipqd.kernel import queue_socket  # noqa: E402
from ipqd.kernel.multi_receive import SLOTS  # noqa: E402
from ipqd.policy.loader import load  # noqa: E402
from ipqd.daemon.messages import WorkerConfig  # noqa: E402
from ipqd.daemon.worker import Worker  # noqa: E402

BATCH = 256


def kernel_datagrams(count: int, new_flows: bool = False, start: int = 0) -> list:
    """One packet message per datagram, as nfnetlink_queue sends them;
    `new_flows`: each from a source of its own in 127.64.0.0/10."""
    out = []
    for i in range(count):
        flow = start + i if new_flows else 0
        src = (0x7F400000 | (flow * 2654435761) & 0x3FFFFF) if new_flows else 0x7F00000A
        udp = dpkt.udp.UDP(sport=1024 + flow % 64512 if new_flows else 40000, dport=PORT,
                           data=b"x" * 36)
        udp.ulen = len(udp)
        ip = dpkt.ip.IP(src=src.to_bytes(4, "big"), dst=bytes([127, 0, 0, 1]), p=17, ttl=64,
                        data=udp)
        ip.len = len(ip)
        payload = bytes(ip)
        packet = nfq.Packet(1, 2, i + 1, 0x0800, 1)
        packet.indev = 1
        packet.hwaddr = b"\0" * 6
        packet.payload = payload
        out.append(nfq.encode_packet(packet, portid=0))
    return out


class ReplayReceiver:
    """Stands in for the socket's receiver: hands out the datagrams, as many
    per call as asked for, until `rewind` starts them over."""

    def __init__(self, datagrams: list, slots: int):
        self.datagrams = datagrams
        self.next = 0
        self.views = [memoryview(bytearray(4096)) for _ in range(slots)]

    def rewind(self) -> None:
        self.next = 0

    def receive(self, count: int) -> list:
        taken = self.datagrams[self.next:self.next + count]
        self.next += len(taken)
        for view, data in zip(self.views, taken):
            view[:len(data)] = data
        return [len(data) for data in taken]

    def close(self) -> None:
        pass


class Fixture:
    def __init__(self, rules: int, shadow: bool = False, new_flows: bool = False):
        directory = tempfile.mkdtemp()
        path = os.path.join(directory, "policy.yaml")
        with open(path, "w") as out:
            out.write(newflow_policy_yaml(rules, "1") if new_flows
                      else policy_yaml(rules, "1", False))
        policy = load(path)
        if shadow:
            policy = replace(policy, shadow=load(path))
        self.worker = Worker(WorkerConfig(0, 1, {1: None}, "stderr"), policy, conn=None)
        self.worker.qs.queues[1] = frozenset({2, 10})
        self.sent = []
        self.worker.qs.send_many = self.sent.extend
        # New flows: a new burst each round, from a pool larger than the cache.
        self.bursts = [kernel_datagrams(BATCH, new_flows, start=k * BATCH)
                       for k in range(512 if new_flows else 1)]
        self.datagrams = self.bursts[0]
        self.round = 0
        self.replay = self.worker.qs.transport.receiver = ReplayReceiver(self.datagrams, SLOTS)

    def _next(self) -> None:
        self.round += 1
        self.replay.datagrams = self.bursts[self.round % len(self.bursts)]
        self.replay.rewind()

    def decode(self) -> None:
        self._next()
        self.worker.qs.receive_events(0)

    def full(self) -> None:
        self._next()
        self.worker.answer(self.worker.qs.receive_events(0))

    def cached(self) -> None:
        self._next()
        self.worker.answer(self.worker.qs.receive_events(0, shortcut=self.worker.keys.take))


def ns_per_packet(fn, rounds: int) -> float:
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter_ns()
        for _ in range(rounds):
            fn()
        best = min(best, (time.perf_counter_ns() - start) / (rounds * BATCH))
    return best


def main() -> None:
    global BATCH            # the fixture and the timing read it
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rules", type=int, default=10)
    parser.add_argument("--packets", type=int, default=50_000)
    parser.add_argument("--batch", type=int, default=BATCH, help="datagrams per receive")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--reference-decode", action="store_true",
                        help="decode every message with QueueProtocol (no fast path)")
    parser.add_argument("--no-cache", action="store_true",
                        help="profile the full path, not the verdict cache's hits")
    parser.add_argument("--shadow", action="store_true",
                        help="with a shadow policy (the same rules) deciding beside")
    parser.add_argument("--new-flows", action="store_true",
                        help="every packet a new flow, through the mixed policy")
    args = parser.parse_args()
    BATCH = args.batch
    if args.reference_decode:
        queue_socket.decode_packet_datagram = lambda buf, n, view=None: None
    fixture = Fixture(args.rules, args.shadow, args.new_flows)
    fixture.full()
    assert fixture.worker.engine.counters.accepted == BATCH, "the packets must hit the last rule"
    rounds = max(1, args.packets // BATCH)
    if args.profile:
        profile = cProfile.Profile()
        step = fixture.full if args.no_cache else fixture.cached
        profile.runcall(lambda: [step() for _ in range(rounds)])
        pstats.Stats(profile).sort_stats("tottime").print_stats(18)
        return
    decode = ns_per_packet(fixture.decode, rounds)
    full = ns_per_packet(fixture.full, rounds)
    fixture.cached()
    cached = ns_per_packet(fixture.cached, rounds)
    fixture.worker.engine.settle()
    hits = fixture.worker.engine.cache.hits
    if args.new_flows:
        print(f"rules {args.rules}, new flows: decode {decode:,.0f} ns/packet, "
              f"decode+parse+decide+verdict {full:,.0f} ns/packet, "
              f"with the verdict cache {cached:,.0f} ns/packet ({hits} hits)")
        return
    assert hits >= rounds * BATCH, f"the cache must answer: {fixture.worker.engine.cache.stats()}"
    print(f"rules {args.rules}{' with a shadow' if args.shadow else ''}: decode {decode:,.0f} ns/packet, "
          f"decode+parse+decide+verdict {full:,.0f} ns/packet, "
          f"verdict cache hit {cached:,.0f} ns/packet")


if __name__ == "__main__":
    main()
