"""One worker: a queue socket bound to its queues, answering every packet.

A worker runs in a process of its own (one per queue of a `queue.num`
range, so the kernel's --queue-balance spreads flows over the cores). It
talks to the supervisor over a pipe: it reports ready and stats, and takes
counter requests, stop and hand-over.

A reload starts a new worker process (a successor) with the new policy on
the same netlink socket, which the supervisor holds: the successor
compiles in its own process, beside the running worker, so the packet
loop never waits for a compile. Once every successor has compiled, each
running worker answers what it has received and stops reading; its
successor starts at once, reading the packets that queued meanwhile, and
adds up the counters the old worker sends before it exits (without
unbinding). A successor that fails changes nothing.

Verdicts: the packets drained in one wake-up are answered in one datagram:
individual verdicts first (drops, marks), then one batch verdict per queue
for the plain accepts. The batch covers only ids already decided, since
every earlier packet was answered in an earlier datagram; nothing waits for
company.
"""
from __future__ import annotations

import errno
import gc
import os
import signal
import socket
import time
from typing import Dict, List, Optional

from ipqd.wire import nfqueue as nfq
from ipqd.daemon.child import schedule
from ipqd.daemon.messages import (BIND, RECOVER, SUCCESSOR, TO_WORKER, AskCounters, Compiled,
                                  Counters, Failed, Go, HandOver, Handed, Ready, SetChange, Stats,
                                  Stop, Stopped, TakeOver, WorkerConfig, expect)
from ipqd.daemon.decision_log import DecisionLog
from ipqd.decision.engine import Engine
from ipqd.errors import IpqdError, NetlinkError
from ipqd.policy import transfer
from ipqd.policy.model import Policy, Rate
from ipqd.kernel.queue_socket import QueueSocket, QueueState, queue_states
from ipqd.decision.verdict_cache import KeyMaker

STATS_EVERY = 1.0
SETTLE_AT = 256                     # cache entries hit before the totals are brought up to date
IDLE_WAIT = 0.5                     # seconds a receive waits for packets before looking at stats
FLUSH_WAIT = 0.005                  # ... while a large report (Counters) still waits for the pipe


def share_rate(rate: Optional[Rate], workers: int) -> Optional[Rate]:
    """Each worker's part of the policy's log rate, so the total stays the cap."""
    if rate is None or workers <= 1:
        return rate
    return Rate(rate.per_second / workers, max(1, rate.burst // workers), rate.text)


class _IfNames(dict):
    """Interface names for one batch of packets: each index looked up once."""

    def __init__(self, lookup):
        super().__init__({None: None})
        self.lookup = lookup

    def __missing__(self, index):
        name = self[index] = self.lookup(index)
        return name

    def forget(self) -> None:
        """Ask again from the next round on (in place: the cache's reader holds us)."""
        self.clear()
        self[None] = None


class Worker:
    def __init__(self, config: WorkerConfig, policy: Policy, conn, sock=None):
        self.config = config
        self.conn = conn
        self.engine = engine = Engine(policy, caching=config.cache)
        for name, entries in (config.sets or {}).items():
            engine.change_set(name, "load", entries)
        self.log = DecisionLog(config.log_target, share_rate(policy.logging.rate, config.workers),
                               digest=policy.digest,
                               shadow_digest=policy.shadow.digest if policy.shadow else "")
        # What the engine cannot decide and what the socket cannot hand it
        # (undecodable, foreign family) get the same verdict.
        self.qs = QueueSocket(rcvbuf=config.rcvbuf, no_enobufs=False, sock=sock,
                              undecodable_verdict=engine.fallback_verdict,
                              foreign_verdict=engine.fallback_verdict)
        self.queue_settings = _queue_settings(policy)
        self._names = _IfNames(self.qs.ifname)       # interface names, per round
        self._ifname = self._names.__getitem__
        # The cache answers hits as the receive reads them, into its round;
        # the full path adds its own verdicts, and `answer` sends them all.
        self.keys = KeyMaker(engine.needs, engine.cache, batch=config.batch,
                             ifname=self._ifname, log_gate=self.log.wants_entry)
        self._round = self.keys.round
        self._single: List[bytes] = []          # the full path's verdicts, one per packet
        self._stop = False
        self.handing_over = False           # told to hand over: the loop ends, nothing unbinds
        self._last_stats = 0.0
        self.kernel_errors = 0

    def bind(self, taken_over: bool = False, predecessor: Optional[dict] = None) -> None:
        """Bind the worker's queues. `taken_over`: the socket came from a
        predecessor and is bound already, so only the settings are sent, and
        not even those when they equal the `predecessor`'s (each waits for an
        acknowledgement, which a full receive buffer could lose)."""
        for number in self.config.queues:
            if not taken_over:
                self.qs.bind(number, family="both", **self.queue_settings)
            elif predecessor == self.queue_settings:
                self.qs.adopt(number, family="both")
            else:
                self.qs.configure(number, family="both", **self.queue_settings)

    def rebind(self) -> None:
        """Take over the socket of a worker that died: its queues stay bound
        (the supervisor holds the socket), so each is configured again; one
        the dead worker had not bound yet is bound."""
        for number in self.config.queues:
            try:
                self.qs.configure(number, family="both", **self.queue_settings)
            except NetlinkError as error:
                if error.errno != errno.ENODEV:     # ENODEV: no such queue bound
                    raise
                self.qs.bind(number, family="both", **self.queue_settings)

    def requeue_unanswered(self, states: Optional[Dict[int, QueueState]] = None) -> int:
        """Send the packets a dead worker had read but not answered through
        the hook again (NF_REPEAT), so that this worker reads and decides
        them: without it they would wait in the kernel, and a later batch
        verdict would accept them undecided. Returns the number of queues
        asked.

        They are the queue's packets with an id below the first one still
        unread on the socket; with nothing unread, every packet up to the
        table's id_sequence. `states`: the kernel's queue table (default:
        read now, from this process's network namespace)."""
        states = queue_states() if states is None else states
        pending = {q: states[q] for q in self.config.queues
                   if q in states and states[q].portid == self.qs.portid and states[q].total}
        if not pending:
            return 0
        events = self.qs.receive_events(timeout=0)
        first: Dict[int, int] = {}
        unread: Dict[int, int] = {}
        for event in events:
            if type(event) is nfq.Packet and event.queue in pending \
                    and _not_after(event.packet_id, pending[event.queue].id_sequence):
                first.setdefault(event.queue, event.packet_id)
                unread[event.queue] = unread.get(event.queue, 0) + 1
        requests = []
        for number, state in pending.items():
            if unread.get(number, 0) >= state.total:
                continue                # all still unread: nothing was left halfway
            up_to = first[number] - 1 if number in first else state.id_sequence
            if up_to > 0:
                requests.append(nfq.encode_verdict_batch(number, up_to, nfq.NF_REPEAT))
        self.qs.send_many(requests)
        self.answer(events)
        return len(requests)

    # -------------------------------------------------------- the loop

    def serve(self) -> None:
        wake = self.conn.fileno()
        shortcut = self.keys.take if self.config.cache else None
        qs = self.qs
        receive = qs.receive_events
        while not (self._stop or self.handing_over):
            if len(self._names) > 1:        # a lookup was made: the next round asks again
                self._names.forget()
            # A report larger than the pipe (the Counters of thousands of
            # rules) goes on between rounds, never waiting on the supervisor.
            unsent = self.conn.unsent and not self.conn.flush_nowait()
            events = receive(FLUSH_WAIT if unsent else IDLE_WAIT, 256, wake, shortcut)
            if events or self._round.batch or self._round.single:
                self.answer(events)
            # The receive's own wait watched the pipe: look only when it was readable.
            # Every message waiting: a burst of set changes is applied at once.
            while qs.woken and self.conn.poll():
                self._control(self.conn.recv())
            now = time.monotonic()
            if now - self._last_stats >= STATS_EVERY:
                self._last_stats = now
                # Never a wait here: a stopped supervisor must not stall the
                # packets (a report it misses is replaced by the next one).
                self.conn.send_nowait(Stats(self.config.index, self.stats(), self.carry_over()))
        # Every packet received so far is answered (the round's answer comes
        # before control). On a hand-over the rest stays queued for the successor.
        if self._stop:
            self.drain()

    def drain(self, rounds: int = 100) -> None:
        """Answer what is already queued before unbinding: unbinding would drop it."""
        for _ in range(rounds):
            events = self.qs.receive_events(timeout=0)
            if not events:
                return
            self.answer(events)

    def answer(self, events: List) -> None:
        """Decide `events` and send every verdict of this round, those the
        shortcut already found included, in one datagram."""
        if events:
            self._decide(events)
        answers = self._round
        single = self._single
        if answers.single:
            for queue, packet_id, entry in answers.single:
                single.append(nfq.encode_verdict(queue, packet_id, entry.verdict, mark=entry.mark))
            answers.single.clear()
        if answers.batch:
            for queue, max_id in answers.batch.items():
                single.append(nfq.encode_verdict_batch(queue, max_id, nfq.NF_ACCEPT))
            answers.batch.clear()
        if answers.misses:              # keys whose datagram came back as no Packet
            answers.misses.clear()
        self._single = []
        self.qs.send_many(single)
        if events:
            self.log.flush()        # the round's log entries: after its verdicts
        # Hits into the totals in bounded steps: never a whole cache's worth
        # of entries at once in the packet loop (stats() settles the rest).
        self.engine.settle(at_least=SETTLE_AT)

    def _decide(self, events: List) -> None:
        """The full path: decide each Packet of `events`, adding its verdict
        to this round's."""
        engine = self.engine
        ct_of = self.config.queues
        ifname = self._ifname
        log = self.log
        now = time.monotonic()
        # `time:` windows need the wall clock, which may be set while running.
        engine.matcher.clock_offset = time.time() - now
        single = self._single
        batch = self._round.batch
        use_batch = self.config.batch
        keys = self._round.misses
        for event in events:
            if type(event) is nfq.Packet:
                key = keys.pop((event.queue, event.packet_id), None) if keys else None
                try:
                    verdict = engine.decide(event, ifname, ct_of.get(event.queue), now, key)
                except Exception:       # decide has its own boundary; this one is the last
                    verdict = engine.fallback()
                if use_batch and verdict.verdict == nfq.NF_ACCEPT and verdict.mark is None:
                    # after the shortcut's, so not always the highest id of the round
                    if event.packet_id > batch.get(event.queue, -1):
                        batch[event.queue] = event.packet_id
                else:
                    single.append(nfq.encode_verdict(event.queue, event.packet_id, verdict.verdict,
                                                     mark=verdict.mark))
                decision = verdict.decision
                if decision.log:
                    rule = decision.rule
                    log.decision(decision.action, rule.name if rule else "default",
                                 verdict.view, event.queue, verdict.mark,
                                 rule.position if rule else None,
                                 verdict.enforced, decision.log_rules)
                if engine.disagreement is not None:     # a shadow policy decided otherwise
                    log.disagreement(decision, engine.disagreement, verdict.view, event.queue)
            elif isinstance(event, nfq.KernelError):
                self.kernel_errors += 1
            # Undecodable packets with an id were answered by the socket (fallback_verdict).

    # -------------------------------------------------------- control

    def _control(self, message) -> None:
        kind = type(expect(message, TO_WORKER, "the supervisor"))
        if kind is AskCounters:
            self.engine.settle()
            self.conn.send_nowait(Counters(self.config.index, self.engine.matcher.counters(),
                                           self.stats()))
        elif kind is HandOver:
            self.handing_over = True
        elif kind is TakeOver:              # a predecessor, or a dead worker, counted these
            self.take_over(message.carried)
        elif kind is SetChange:             # from the next packet on, cached verdicts too
            self.engine.change_set(message.name, message.op, message.entries)
        elif kind is Stop:
            self._stop = True

    def carry_over(self) -> dict:
        """What the successor takes over (`take_over`): every counter."""
        return {"engine": self.engine.carry_over(), "socket": self.qs.stats.as_dict(),
                "kernel_errors": self.kernel_errors,
                "log": (self.log.logged, self.log.suppressed, self.log.overflowed,
                        self.log.failed)}

    def take_over(self, state: dict) -> None:
        """Count on from a predecessor's `carry_over`."""
        self.engine.take_over(state["engine"])
        for name, value in state["socket"].items():
            setattr(self.qs.stats, name, getattr(self.qs.stats, name) + value)
        self.kernel_errors += state["kernel_errors"]
        log = self.log
        logged, suppressed, overflowed, failed = state["log"]
        log.logged += logged
        log.suppressed += suppressed
        log.overflowed += overflowed
        log.failed += failed

    def stats(self) -> dict:
        self.engine.settle()
        stats = self.engine.counters.as_dict()
        stats.update({f"socket_{k}": v for k, v in self.qs.stats.as_dict().items()})
        stats["kernel_errors"] = self.kernel_errors
        stats["reports_dropped"] = getattr(self.conn, "dropped", 0)
        stats.update(self.engine.cache.stats())
        stats.update(self.engine.matcher.rate_stats())
        stats.update(log_logged=self.log.logged, log_suppressed=self.log.suppressed,
                     log_overflowed=self.log.overflowed, log_failed=self.log.failed)
        return stats

    def close(self) -> None:
        try:
            self.qs.close()
        finally:
            self.log.close()


def _queue_settings(policy: Policy) -> dict:
    """How the policy has its queues set up (QueueSocket.configure's arguments)."""
    queue = policy.queue
    mask = nfq.NFQA_CFG_F_FAIL_OPEN
    flags = mask if queue.fail_open else 0
    if {"uid", "gid"} & policy.fields():
        flags |= nfq.NFQA_CFG_F_UID_GID
        mask |= nfq.NFQA_CFG_F_UID_GID
    return {"copy_range": queue.copy_range, "maxlen": queue.maxlen, "flags": flags,
            "flags_mask": mask}


def _not_after(packet_id: int, other: int) -> bool:
    """Whether packet id `packet_id` came no later than `other`, as the
    kernel compares them (ids wrap at 2**32)."""
    return ((other - packet_id) & 0xFFFFFFFF) < 1 << 31


def _settle_heap() -> None:
    """Set aside what exists now from the cyclic collector, which then only
    walks what the packet path makes.

    A worker's heap is mostly its compiled policy, hundreds of thousands of
    objects that live until the next reload and hold no cycles; a full
    collection over them stalls the loop for hundreds of milliseconds.
    """
    gc.freeze()
    gc.enable()


def worker_main(config: WorkerConfig, pickled_policy: bytes, conn, sock_fd: int,
                mode: str = BIND) -> None:
    """Entry point of a worker process. The policy comes pickled (as the
    supervisor keeps it), the netlink socket as an fd the supervisor holds
    too. A SUCCESSOR (a reload's new worker) finds the socket bound: it
    compiles, says "compiled", then waits for "go" before it touches the
    socket (its predecessor's counters come later, as "take_over"), or for
    "stop" (the reload was called off: the socket is left as it is). A
    RECOVER worker takes a dead worker's socket at once, and the packets
    the dead one left unanswered are decided again (requeue_unanswered)."""
    # The supervisor handles signals; a worker stops when told (or when the pipe closes).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    # The compile makes hundreds of thousands of objects: collections while
    # it runs would only walk them again and again (_settle_heap turns it on).
    gc.disable()
    try:
        policy = transfer.unpack(pickled_policy)
        del pickled_policy
        worker = Worker(config, policy, conn, sock=socket.socket(fileno=sock_fd))
        del policy
        if mode == BIND:
            worker.bind()
        elif mode == RECOVER:
            worker.rebind()
    except Exception as error:          # the supervisor says it; the running policy stays
        _fail(conn, config, error)
    _settle_heap()
    if mode == SUCCESSOR:
        _await_go(worker, conn, config)
    conn.send(Ready(config.index, sorted(config.queues)))
    try:
        if mode == RECOVER:
            worker.requeue_unanswered()
        worker.serve()
    except (EOFError, BrokenPipeError):
        pass                                   # the supervisor is gone: stop cleanly
    if worker.handing_over:
        # No unbind, no close: the socket goes on with the successor, which
        # may start at once; the counters follow (it adds them up).
        conn.send(Stopped(config.index, worker.queue_settings))
        # It only counts and exits now, maybe on its successor's CPU: it
        # gives way to anything else there (and never needs to come back).
        schedule(os.SCHED_IDLE)
        conn.send(Handed(config.index, worker.carry_over()))
        worker.log.close()
    else:
        worker.close()
    os._exit(0)


def _await_go(worker: Worker, conn, config: WorkerConfig) -> None:
    """A successor has compiled: say so, then wait for Go (take the socket
    over, as the predecessor had it set up) or anything else (exit,
    leaving the socket to the running worker)."""
    schedule(os.SCHED_OTHER)            # compiled (see ipqd.daemon.child._worker); idle until Go
    conn.send(Compiled(config.index))
    try:
        message = conn.recv()
        while isinstance(message, SetChange):       # a change made while it compiled
            worker.engine.change_set(message.name, message.op, message.entries)
            message = conn.recv()
    except EOFError:
        message = Stop()
    if not isinstance(message, Go):
        os._exit(0)                     # not worker.close(): the socket is the running worker's
    try:
        worker.bind(taken_over=True, predecessor=message.settings)
    except (IpqdError, OSError) as error:
        _fail(conn, config, error)
    # Its first stats report waits a period, so that it already holds
    # the predecessor's counters (TakeOver comes milliseconds later).
    worker._last_stats = time.monotonic()


def _fail(conn, config: WorkerConfig, error: Exception) -> None:
    """Say why this worker cannot go on, and exit."""
    detail = str(error) if isinstance(error, (IpqdError, OSError)) \
        else f"{type(error).__name__}: {error}"
    try:
        conn.send(Failed(config.index, detail))
    except OSError:
        pass
    os._exit(1)
