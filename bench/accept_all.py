"""Accept-all consumers in Python, the peers of bench/nfq_accept.c.

    python bench/accept_all.py netfilterqueue QUEUE   # PyPI's python-netfilterqueue
    python bench/accept_all.py queuesocket QUEUE      # ipqd's own client, batch verdicts

Each prints "ready" once bound and runs until killed (SIGTERM).
"""
from __future__ import annotations

import sys


def run_netfilterqueue(queue: int) -> None:
    from netfilterqueue import NetfilterQueue

    nfq = NetfilterQueue()
    nfq.bind(queue, lambda packet: packet.accept(), max_len=1024)
    print("ready", flush=True)
    nfq.run()


def run_queuesocket(queue: int) -> None:
    from ipqd.wire.nfqueue import NF_ACCEPT
    from ipqd.kernel.queue_socket import QueueSocket

    with QueueSocket(rcvbuf=8 << 20) as qs:
        qs.bind(queue, copy_range=0xFFFF)
        print("ready", flush=True)
        while True:
            last = {}
            for packet in qs.receive(timeout=None):
                last[packet.queue] = packet.packet_id
            # One batch verdict per wake-up covers every id drained in it.
            for number, max_id in last.items():
                qs.verdict_batch(number, max_id, NF_ACCEPT)


if __name__ == "__main__":
    kind, number = sys.argv[1], int(sys.argv[2])
    {"netfilterqueue": run_netfilterqueue, "queuesocket": run_queuesocket}[kind](number)
