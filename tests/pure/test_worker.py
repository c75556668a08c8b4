"""The worker's packet loop without a kernel: verdict cache hits and full
decisions of one round go out together, and every packet is covered."""
from __future__ import annotations

import pickle
import socket
import struct
import threading

import pytest

from ipqd.daemon import worker as worker_module
from ipqd.daemon.child import Channel
from ipqd.daemon.messages import HandOver
from ipqd.decision.engine import fallback_verdict
from ipqd.decision.packet import PacketMeta, parse

from ipqd.wire import nfnetlink as nl
from ipqd.wire import nfqueue as nfq
from ipqd.wire.nfnetlink import NLMSG_HDRLEN
from ipqd.policy.loader import loads
from ipqd.daemon.messages import WorkerConfig
from ipqd.daemon.worker import Worker

POLICY = """version: 1
queue: {num: 1}
default: {action: drop, log: false}
rules:
  - {name: dns, proto: udp, dport: 53, action: accept}
  - {name: marked, proto: udp, dport: 54, action: accept, set_mark: 7}
  - {name: other, proto: udp, dport: 55, action: accept}
"""


def datagram(packet_id: int, dport: int) -> bytes:
    udp = struct.pack("!HHHH", 40000, dport, 8, 0)
    ip = struct.pack("!BBHHHBBHII", 0x45, 0, 28, 1, 0, 64, 17, 0, 0x7F000001, 0x7F000001) + udp
    packet = nfq.Packet(1, 2, packet_id, 0x0800, 1)
    packet.indev = 1
    packet.payload = ip
    return nfq.encode_packet(packet)


class ReplayReceiver:
    """Stands in for the socket's receiver: hands out the datagrams of one
    round, up to the count asked for, then "none waiting"."""

    def __init__(self, rounds, slots: int = 4):
        self.rounds = rounds
        self.views = [memoryview(bytearray(4096)) for _ in range(slots)]

    def receive(self, count):
        if not self.rounds:
            return []
        current = self.rounds[0]
        if not current:
            self.rounds.pop(0)
            return []
        taken, current[:count] = current[:count], []
        if len(taken) < count:          # a short read says the round is over
            self.rounds.pop(0)
        for view, data in zip(self.views, taken):
            view[:len(data)] = data
        return [len(data) for data in taken]

    def close(self):
        pass


def verdicts(data: bytes) -> list:
    """(type, queue, id, verdict) of each verdict message in one datagram sent."""
    out, offset = [], 0
    while offset < len(data):
        length, msg_type = struct.unpack_from("=IH", data, offset)
        queue = struct.unpack_from("!H", data, offset + 18)[0]
        # NFQA_VERDICT_HDR: verdict, id (network order)
        verdict, packet_id = struct.unpack_from("!II", data, offset + NLMSG_HDRLEN + 4 + 4)
        out.append((msg_type & 0xFF, queue, packet_id, verdict))
        offset += (length + 3) & ~3
    return out


def worker_with_rounds(rounds, policy: str = POLICY):
    worker = Worker(WorkerConfig(0, 1, {1: None}, "stderr"), loads(policy, "p.yaml"), conn=None)
    worker.qs.queues[1] = frozenset({2, 10})
    sent = []
    worker.qs.send_many = lambda messages: sent.append(b"".join(messages))
    worker.qs.transport.receiver = ReplayReceiver(rounds)
    for _ in range(len(rounds)):
        events = worker.qs.receive_events(0, shortcut=worker.keys.take)
        worker.answer(events)
    return worker, sent


def test_a_round_of_hits_and_misses_is_covered_by_its_verdicts():
    rounds = [[datagram(1, 53), datagram(2, 80)],            # misses: both stored
              [datagram(3, 55), datagram(4, 53), datagram(5, 80), datagram(6, 54)]]
    worker, sent = worker_with_rounds([list(r) for r in rounds])
    worker.engine.settle()
    # 4 (dns) and 5 (default) are kept on this second sight, not hit: the
    # policy's generated function decides them, as every new key.
    assert worker.engine.cache.hits == 0 and worker.engine.cache.misses == 6
    batch, single = nfq.NFQNL_MSG_VERDICT_BATCH, nfq.NFQNL_MSG_VERDICT
    assert verdicts(sent[0]) == [(single, 1, 2, nfq.NF_DROP), (batch, 1, 1, nfq.NF_ACCEPT)]
    # 3 (a miss, accepted, decided after the hits) must not lower the batch below 4
    assert sorted(verdicts(sent[1])) == sorted([
        (single, 1, 5, nfq.NF_DROP), (single, 1, 6, nfq.NF_ACCEPT), (batch, 1, 4, nfq.NF_ACCEPT)])
    assert len(sent) == 2                                    # one datagram per round
    counters = worker.engine.matcher.counters()
    assert counters["rules"]["dns"]["hits"] == 2 and counters["default"]["hits"] == 2
    assert worker.engine.counters.packets == 6 == worker.qs.stats.packets


def test_logged_drops_past_the_log_rate_are_answered_from_the_cache(monkeypatch):
    """A flood of logged drops with a log rate: the worker writes what the
    rate allows and answers the rest from its cache, every one dropped."""
    written = []
    monkeypatch.setattr("ipqd.daemon.decision_log.DecisionLog._stderr_send_all",
                        lambda self, entries: written.extend(m for m, _, _ in entries))
    policy = POLICY.replace("default: {action: drop, log: false}",
                            "default: {action: drop, log: true}\nlogging: {rate: 2/minute burst 2}")
    rounds = [[datagram(i, 80)] for i in range(1, 4)] + [[datagram(i, 80) for i in range(4, 24)]]
    worker, sent = worker_with_rounds(rounds, policy)
    worker.log.close()
    dropped = [v for data in sent for v in verdicts(data)]
    assert [v[2] for v in dropped] == list(range(1, 24))
    assert {v[3] for v in dropped} == {nfq.NF_DROP}
    assert len([m for m in written if m.startswith("DROP")]) == 2 and worker.log.suppressed == 21
    worker.engine.settle()
    assert worker.engine.cache.hits == 21
    assert worker.engine.counters.dropped == 23 == worker.engine.matcher.counters()["default"]["hits"]


def udp_view(dport: int):
    return parse(bytes(datagram(1, dport))[-28:], PacketMeta(family=4))


def test_a_worker_told_to_hand_over_stops_at_once_and_its_successor_counts_on(monkeypatch):
    """No packets and no timeout: the hand-over request alone ends the loop
    (worker_main then exits without closing the socket); a successor with a
    changed policy takes every counter over (rules by name)."""
    monkeypatch.setattr(worker_module, "IDLE_WAIT", 60.0)
    ours, theirs = (Channel(end.detach()) for end in socket.socketpair())
    worker, _ = worker_with_rounds([[datagram(1, 53), datagram(2, 53), datagram(3, 80)]])
    worker.conn = theirs
    loop = threading.Thread(target=worker.serve, daemon=True)
    loop.start()
    ours.send(HandOver())
    loop.join(20)
    assert not loop.is_alive(), "the hand-over waited for the receive's timeout"
    assert worker.handing_over and not worker._stop       # not a stop: nothing drained
    successor = Worker(WorkerConfig(0, 1, {1: None}, "stderr"),
                       loads(POLICY.replace("dport: 53", "dport: 5353"), "p.yaml"), conn=None)
    successor.take_over(pickle.loads(pickle.dumps(worker.carry_over())))     # through the pipe
    counters = successor.engine.matcher.counters()
    assert counters["rules"]["dns"]["hits"] == 2 and counters["default"]["hits"] == 1
    stats = successor.stats()
    assert (stats["packets"], stats["accepted"], stats["dropped"]) == (3, 2, 1)
    assert stats["socket_packets"] == 3
    worker.qs.queues.clear()        # a fake socket: no kernel to acknowledge an unbind
    worker.close()
    successor.close()



def test_a_successor_sets_up_the_queue_only_when_its_settings_differ():
    """Each setting waits for an acknowledgement on a socket that may hold a
    backlog; equal settings are taken as they are."""
    calls = []
    worker = Worker(WorkerConfig(0, 1, {1: None, 2: None}, "stderr"), loads(POLICY, "p.yaml"),
                    conn=None)
    worker.qs.adopt = lambda number, family: calls.append(("adopt", number))
    worker.qs.configure = lambda number, family, **settings: calls.append(("configure", number))
    worker.bind(taken_over=True, predecessor=dict(worker.queue_settings))
    assert calls == [("adopt", 1), ("adopt", 2)]
    calls.clear()
    worker.bind(taken_over=True, predecessor=dict(worker.queue_settings, flags=0, flags_mask=0))
    assert calls == [("configure", 1), ("configure", 2)]
    worker.close()


def undecodable(packet_id: int) -> bytes:
    """A packet message whose header reads but whose mark does not (1 byte)."""
    body = (nl.encode_nfgenmsg(nl.NFPROTO_IPV4, 1)
            + nl.encode_attr(nfq.NFQA_PACKET_HDR, struct.pack(">IHB", packet_id, 0x0800, 1))
            + nl.encode_attr(nfq.NFQA_MARK, b"\x01"))
    return nl.encode_nlmsg(nfq.MSG_PACKET, 0, 0, body)


def of_family(packet_id: int, family: int) -> bytes:
    packet = nfq.Packet(1, family, packet_id, 0x86DD, 1)
    packet.payload = b"\x60" + bytes(39)
    return nfq.encode_packet(packet)


def verdict_of_each(sent: list, ids) -> dict:
    """The verdict each packet id got from the datagrams sent: its own, or
    the first batch verdict that covers it."""
    got = {}
    for data in sent:
        for msg_type, _, packet_id, verdict in verdicts(data):
            if msg_type == nfq.NFQNL_MSG_VERDICT:
                got.setdefault(packet_id, verdict)
            else:
                for covered in ids:
                    if covered <= packet_id:
                        got.setdefault(covered, verdict)
    return got


@pytest.mark.parametrize("action, expected", [("accept", nfq.NF_ACCEPT), ("drop", nfq.NF_DROP)])
def test_what_cannot_be_decided_gets_the_one_fallback_verdict(action, expected):
    """Four packets no rule decides, each on its own path: a message that
    does not decode and one of a family the queue was not bound for (the
    socket answers), one the matcher fails on (the engine's boundary) and
    one Engine.decide itself fails on (the worker's). Each gets
    fallback_verdict: the policy's default action."""
    policy = loads(POLICY.replace("default: {action: drop, log: false}",
                                  f"default: {{action: {action}, log: false}}"), "p.yaml")
    assert fallback_verdict(policy) == expected
    worker = Worker(WorkerConfig(0, 1, {1: None}, "stderr"), policy, conn=None)
    worker.qs.queues[1] = frozenset({nl.NFPROTO_IPV4})          # bound for IPv4 only
    sent = []
    worker.qs.send_many = lambda messages: sent.append(b"".join(messages))
    worker.qs._send = lambda data, op: sent.append(data)
    engine = worker.engine
    real_decide = engine.decide

    def matcher_decide(view, now):
        raise ZeroDivisionError("injected fault in the matcher")

    def engine_decide(packet, *args):
        if packet.packet_id == 4:
            raise RuntimeError("injected fault in Engine.decide")
        return real_decide(packet, *args)

    engine.matcher.decide = matcher_decide
    engine.decide = engine_decide
    worker.qs.transport.receiver = ReplayReceiver(
        [[undecodable(1), of_family(2, nl.NFPROTO_IPV6), datagram(3, 53), datagram(4, 53)]])
    worker.answer(worker.qs.receive_events(0))
    assert verdict_of_each(sent, [1, 2, 3, 4]) == {1: expected, 2: expected, 3: expected,
                                                   4: expected}
    assert (worker.qs.stats.undecodable, worker.qs.stats.foreign, engine.counters.errors) == \
        (1, 1, 2)
    worker.qs.queues.clear()        # a fake socket: no kernel to acknowledge an unbind
    worker.close()


def test_batched_sends_are_counted_as_verdicts_and_batches():
    """The stats line's socket_verdicts and socket_batches count what the
    worker's one datagram per round carried."""
    from ipqd.kernel.queue_socket import QueueSocket
    qs = QueueSocket()
    sent = []
    qs.transport.send = lambda data, op: sent.append(data)
    qs.send_many([nfq.encode_verdict(1, 7, nfq.NF_DROP), nfq.encode_verdict(1, 8, nfq.NF_ACCEPT, mark=3),
                  nfq.encode_verdict_batch(1, 9, nfq.NF_ACCEPT)])
    qs.send_many([nfq.encode_verdict_batch(2, 4, nfq.NF_ACCEPT)])
    assert len(sent) == 2
    assert (qs.stats.verdicts, qs.stats.batches) == (2, 2)
    qs.close()
