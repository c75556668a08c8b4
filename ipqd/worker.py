"""One worker: a queue socket bound to its queues, answering every packet.

A worker runs in a process of its own (one per queue of a `queue.num`
range, so the kernel's --queue-balance spreads flows over the cores). It
talks to the supervisor over a pipe: it reports ready, stats and reload
results, and takes new policies, counter requests and stop. Reloads compile
in a thread, so the packet loop keeps answering while a large policy
compiles, and the swap is one reference assignment.

Verdicts: the packets drained in one wake-up are answered in one datagram:
individual verdicts first (drops, marks), then one batch verdict per queue
for the plain accepts. The batch covers only ids already judged, since
every earlier packet was answered in an earlier datagram; nothing waits for
company.
"""
from __future__ import annotations

import gc
import os
import signal
import sys
import threading
import time
from sys import getrefcount
from types import FunctionType
from typing import Dict, List, Optional, Tuple

from ipqd import nfqueue as nfq
from ipqd.compiler import compile_policy
from ipqd.decision_log import DecisionLog
from ipqd.engine import Engine
from ipqd.errors import IpqdError
from ipqd.policy import transfer
from ipqd.policy.model import Policy, Rate
from ipqd.queue_socket import QueueSocket

STATS_EVERY = 1.0
RELOAD_SWITCH_INTERVAL = 0.0005     # seconds; see _start_reload
SETTLE_AT = 256                     # cache entries hit before the totals are brought up to date
IDLE_WAIT = 0.5                     # seconds a receive waits for packets before looking at stats
_SWITCH_INTERVAL = sys.getswitchinterval()


class WorkerConfig:
    """What a worker needs besides the policy; picklable."""

    def __init__(self, index: int, workers: int, queues: Dict[int, Optional[str]],
                 log_target: str, rcvbuf: int = 8 << 20, batch: bool = True,
                 cache: bool = True):
        self.index = index
        self.workers = workers
        self.queues = queues                  # queue number -> conntrack state (or None)
        self.log_target = log_target
        self.rcvbuf = rcvbuf
        self.batch = batch
        self.cache = cache                    # the verdict cache (ipqd.verdict_cache)


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


class Worker:
    def __init__(self, config: WorkerConfig, policy: Policy, conn, sock=None):
        self.config = config
        self.conn = conn
        self.engine = Engine(policy, caching=config.cache)
        self.log = DecisionLog(config.log_target, share_rate(policy.logging.rate, config.workers))
        self.qs = QueueSocket(rcvbuf=config.rcvbuf, no_enobufs=False, sock=sock,
                              undecodable_verdict=self.engine.default_verdict)
        self._reloaded = None
        self._compiling = False
        # The compile thread's "done": it wakes the loop, which would
        # otherwise notice the new policy only at its next packet or timeout.
        self._compiled_r, self._compiled_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._names = _IfNames(self.qs.ifname)       # interface names, per round
        self._ifname = self._names.__getitem__
        self._single: List[bytes] = []          # this round's verdicts: one per packet,
        self._batch: Dict[int, int] = {}        # and queue -> highest id of the plain accepts
        self._keys: Dict[Tuple[int, int], tuple] = {}    # (queue, id) -> key of a cache miss
        self._stop = False
        self._last_stats = 0.0
        self.kernel_errors = 0

    def bind(self, policy: Policy) -> None:
        queue = policy.queue
        mask = nfq.NFQA_CFG_F_FAIL_OPEN
        flags = mask if queue.fail_open else 0
        if {"uid", "gid"} & policy.fields():
            flags |= nfq.NFQA_CFG_F_UID_GID
            mask |= nfq.NFQA_CFG_F_UID_GID
        for number in self.config.queues:
            self.qs.bind(number, family="both", copy_range=queue.copy_range, maxlen=queue.maxlen,
                         flags=flags, flags_mask=mask)

    # -------------------------------------------------------- the loop

    def serve(self) -> None:
        wake = (self.conn.fileno(), self._compiled_r)
        shortcut = self._shortcut if self.config.cache else None
        qs = self.qs
        receive = qs.receive_events
        while not self._stop:
            if len(self._names) > 1:        # a lookup was made: the next round asks again
                self._names = _IfNames(qs.ifname)
                self._ifname = self._names.__getitem__
            events = receive(IDLE_WAIT, 256, wake, shortcut)
            if events or self._single or self._batch:
                self.answer(events)
            # The receive's own wait watched the pipes: look only when one was readable.
            if qs.woken:
                if self.conn.poll():
                    self._control(self.conn.recv())
                _drain(self._compiled_r)
            if self._reloaded is not None:
                self._finish_reload()
            now = time.monotonic()
            if now - self._last_stats >= STATS_EVERY:
                self._last_stats = now
                self.conn.send(("stats", self.config.index, self.stats()))
        self.drain()

    def drain(self, rounds: int = 100) -> None:
        """Answer what is already queued before unbinding: unbinding would drop it."""
        for _ in range(rounds):
            events = self.qs.receive_events(timeout=0)
            if not events:
                return
            self.answer(events)

    def _shortcut(self, buf, n: int) -> bool:
        """Answer the datagram in buf[:n] from the verdict cache, in place:
        its verdict joins those of this round (sent by `answer`). False sends
        it the full way, with its key kept for `answer` to store the
        decision under. The worker binds both families, so nothing a
        shortcut sees is foreign."""
        try:
            found = self.engine.keys.read(buf, n, self._ifname)
        except Exception:                   # the full path is the boundary that counts
            return False
        if found is None:
            return False
        queue, packet_id, key, entry = found
        if entry is None:
            if key is not None:
                self._keys[queue, packet_id] = key
            return False
        if entry.batchable and self.config.batch:
            self._batch[queue] = packet_id      # ids grow: the latest is the highest
        else:
            self._single.append(nfq.encode_verdict(queue, packet_id, entry.verdict,
                                                   mark=entry.mark))
        return True

    def answer(self, events: List) -> None:
        """Judge `events` and send every verdict of this round, those the
        shortcut already found included, in one datagram."""
        if events:
            self._judge(events)
        single = self._single
        for queue, max_id in self._batch.items():
            single.append(nfq.encode_verdict_batch(queue, max_id, nfq.NF_ACCEPT))
        self._single, self._batch = [], {}
        self.qs.send_many(single)
        # Hits into the totals in bounded steps: never a whole cache's worth
        # of entries at once in the packet loop (stats() settles the rest).
        self.engine.settle(at_least=SETTLE_AT)

    def _judge(self, events: List) -> None:
        """The full path: decide each Packet of `events`, adding its verdict
        to this round's."""
        engine = self.engine
        ct_of = self.config.queues
        ifname = self._ifname
        log = self.log
        now = time.monotonic()
        single = self._single
        batch = self._batch
        use_batch = self.config.batch
        keys = self._keys
        for event in events:
            if type(event) is nfq.Packet:
                key = keys.pop((event.queue, event.packet_id), None) if keys else None
                try:
                    verdict = engine.judge(event, ifname, ct_of.get(event.queue), now, key)
                except Exception:       # judge has its own boundary; this one is the last
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
                    log.decision(decision.action,
                                 decision.rule.name if decision.rule else "default",
                                 verdict.view, event.queue, verdict.mark)
            elif isinstance(event, nfq.KernelError):
                self.kernel_errors += 1
            # Undecodable packets with an id were answered by the socket (default verdict).
        keys.clear()                # a key whose packet did not come back as a Packet

    # -------------------------------------------------------- control

    def _control(self, message) -> None:
        kind = message[0]
        if kind == "policy":
            self._start_reload(message[1])
        elif kind == "counters":
            self.engine.settle()
            self.conn.send(("counters", self.config.index, self.engine.matcher.counters(),
                            self.stats()))
        elif kind == "stop":
            self._stop = True

    def _start_reload(self, packed: bytes) -> None:
        """Unpickle, compile and pair the rule counters in a thread: a large
        policy takes a second or more, which the packet loop must not wait for.

        The cyclic collector stays off until the swap: the compile makes
        hundreds of thousands of objects, and each full collection it would
        trigger walks the whole heap for hundreds of milliseconds while
        holding the GIL, in whichever thread allocates.
        """
        old = self.engine.matcher

        def compile_it() -> None:
            box: list = []
            try:
                box.append(transfer.unpack(packed))
                matcher = compile_policy(box[0])
                matcher.adopt_counters(old)     # the swap then adds only the hits since
                reloaded = (transfer.outline(box[0]), matcher, None)
            except Exception as error:          # the old policy stays
                reloaded = (None, None, f"{type(error).__name__}: {error}")
            # The rules themselves are needed no more (the matcher keeps what
            # it uses): freed here, a piece at a time, not by the packet loop.
            if box:
                release(box)
            self._reloaded = reloaded
            try:
                os.write(self._compiled_w, b"!")
            except BlockingIOError:         # full: the loop has wake-ups enough
                pass

        gc.disable()
        self._compiling = True
        # The packet loop gets the GIL back this soon from the compile thread
        # (the default 5 ms, twice per round, would be a 10 ms verdict).
        sys.setswitchinterval(RELOAD_SWITCH_INTERVAL)
        threading.Thread(target=compile_it, daemon=True).start()

    def _finish_reload(self) -> None:
        policy, matcher, error = self._reloaded
        self._reloaded = None
        self._compiling = False
        if error is None:
            old = self.engine
            self.engine = old.replaced_by(policy, matcher)
            self.qs.undecodable_verdict = self.engine.default_verdict
            self.log.set_rate(share_rate(policy.logging.rate, self.config.workers))
            # The short switch interval stays until the old policy is freed:
            # that thread, too, would otherwise keep the GIL 5 ms at a time.
            threading.Thread(target=self._release, args=([old],), daemon=True).start()
            del old, policy, matcher
        else:
            sys.setswitchinterval(_SWITCH_INTERVAL)
        _settle_heap()
        self.conn.send(("reloaded", self.config.index, error))

    def _release(self, box: list) -> None:
        """release(box), then the usual switch interval, unless another
        reload has begun meanwhile (see _start_reload)."""
        try:
            release(box)
        finally:
            if not self._compiling:
                sys.setswitchinterval(_SWITCH_INTERVAL)

    def stats(self) -> dict:
        self.engine.settle()
        stats = self.engine.counters.as_dict()
        stats.update({f"socket_{k}": v for k, v in self.qs.stats.as_dict().items()})
        stats["kernel_errors"] = self.kernel_errors
        stats.update(self.engine.cache.stats())
        stats.update(log_logged=self.log.logged, log_suppressed=self.log.suppressed,
                     log_overflowed=self.log.overflowed, log_failed=self.log.failed)
        return stats

    def close(self) -> None:
        try:
            self.qs.close()
        finally:
            self.log.close()
            os.close(self._compiled_r)
            os.close(self._compiled_w)


def _drain(fd: int) -> None:
    """Empty a non-blocking wake pipe."""
    try:
        while os.read(fd, 64):
            pass
    except BlockingIOError:
        pass


def _settle_heap() -> None:
    """Set aside what exists now from the cyclic collector, which then only
    walks what the packet path makes.

    A worker's heap is mostly its compiled policy, hundreds of thousands of
    objects that live until the next reload and hold no cycles; a full
    collection over them stalls the loop for hundreds of milliseconds.
    """
    gc.freeze()
    gc.enable()


def release(box: list) -> None:
    """Drop the one object in `box` a piece at a time (from a background thread).

    Freeing a compiled 10,000-rule policy at once is one C call of tens of
    milliseconds that no thread switch can interrupt, so the packet loop
    would wait for the GIL that long. Instead the containers reachable from
    it are listed first (parents before children) and let go one by one:
    each step frees one object, its children being still listed. Only lists,
    tuples, dicts, sets, instances and closures are followed: never types,
    modules or a function's globals.
    """
    order = [box.pop()]
    seen = {id(order[0])}               # only objects with other holders can come again
    for obj in order:                   # grows while it is walked: breadth first
        if isinstance(obj, FunctionType):
            referents = obj.__closure__ or ()
        elif isinstance(obj, _LEAVES):
            continue
        else:
            referents = gc.get_referents(obj)
        for ref in referents:
            if not gc.is_tracked(ref) or isinstance(ref, _LEAVES):
                continue
            if getrefcount(ref) > 4:        # held by obj, `referents`, `ref` and the call only?
                if id(ref) in seen:
                    continue
                seen.add(id(ref))
            order.append(ref)
    seen = None
    order.reverse()
    while order:                        # the root was first: it goes first
        order.pop()


_LEAVES = (type, type(os), type(release.__code__))     # types, modules, code


def worker_main(config: WorkerConfig, pickled_policy: bytes, conn) -> None:
    """Entry point of a worker process; the policy comes pickled (as the
    supervisor keeps it)."""
    # The supervisor handles signals; a worker stops when told (or when the pipe closes).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        policy = transfer.unpack(pickled_policy)
        worker = Worker(config, policy, conn)
        worker.bind(policy)
    except (IpqdError, OSError) as error:
        conn.send(("failed", config.index, str(error)))
        os._exit(1)
    del policy, pickled_policy
    _settle_heap()
    conn.send(("ready", config.index, sorted(config.queues)))
    try:
        worker.serve()
    except (EOFError, BrokenPipeError):
        pass                                   # the supervisor is gone: stop cleanly
    finally:
        worker.close()
    os._exit(0)
