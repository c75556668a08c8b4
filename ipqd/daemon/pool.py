"""The supervisor's workers: one process per slot of the policy's queues,
each on a netlink socket the supervisor holds.

Holding the sockets is what keeps the queues bound when a worker dies or
is replaced: a reload's successor takes its predecessor's socket (see
ipqd.daemon.handover), and a worker that dies is replaced by one that
recovers the same socket (mode RECOVER), so the kernel holds the queue's
packets meanwhile and none bypasses the policy.
"""
from __future__ import annotations

import signal
import socket
import time
from typing import Callable, Dict, List, Optional, Tuple

from ipqd.daemon import child
from ipqd.daemon.messages import (BIND, COMPILING, RECOVER, STARTING, SUCCESSOR, AskCounters,
                                  Counters, Failed, Ready, Stats, Stop, TakeOver, WorkerConfig,
                                  WorkerPhase)
from ipqd.daemon.decision_log import LOG_ERR
from ipqd.errors import ProtocolError, StartupError
from ipqd.wire.nfnetlink import NETLINK_NETFILTER

READY_TIMEOUT = 15.0
STALE_AFTER = 5.0          # a worker silent this long is wedged: no watchdog ping
RETIRE_WITHIN = 10.0       # a handed-over worker has this long to write its log and exit
STABLE_AFTER = 5.0         # a worker that lived this long counts as started well
BACKOFF_FIRST = 0.25       # a worker failing again soon waits this long before its restart,
BACKOFF_MAX = 5.0          # doubling up to this
FRESH_SOCKET_AFTER = 5     # quick failures in a row, after which the slot gets a new socket


class WorkerHandle:
    """One worker process as the supervisor sees it."""

    def __init__(self, index: int, process, conn, queues: Dict[int, Optional[str]],
                 mode: str = BIND):
        self.index = index
        self.process = process
        self.conn = conn
        self.queues = queues
        self.phase = WorkerPhase(index, COMPILING if mode == SUCCESSOR else STARTING)
        self.stats: Dict[str, int] = {}
        self.carried: Optional[dict] = None     # its latest counters, for a restart
        self.failure = ""                       # why it said it cannot go on
        self.reported_dead = False              # a hand-over was told it died
        self.started = self.seen = time.monotonic()

    def take(self) -> Tuple[bool, List[object]]:
        """Read what the worker has said: reports are kept, the other
        messages returned in order. (Whether it lives, those messages.)
        A message out of order ends the worker: it is treated as dead."""
        others: List[object] = []
        try:
            while self.conn.poll():
                message = self.conn.recv()
                self.seen = time.monotonic()
                self.phase.accept(message)
                if isinstance(message, Stats):
                    self.stats, self.carried = message.stats, message.carried
                    continue
                if isinstance(message, Failed):
                    self.failure = message.detail
                others.append(message)
        except (EOFError, OSError):
            return False, others
        except ProtocolError as error:
            self.failure = str(error)
            self.process.kill()
            return False, others
        return self.process.is_alive(), others

    def end(self, wait: float) -> None:
        """Give the process `wait` seconds to exit, kill it if it has not,
        close its pipe."""
        if wait:
            self.process.join(wait)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(2)
        self.conn.close()

    def stop(self, wait: float = 5) -> None:
        try:
            self.conn.send(Stop())
        except OSError:
            pass
        self.end(wait)


class WorkerPool:
    """The workers by slot, their sockets, their restarts."""

    def __init__(self, log, target: str, batch: bool, cache: bool):
        self.log = log
        self.target, self.batch, self.cache = target, batch, cache
        self.pickled = b""                                  # the policy new workers compile
        self.workers: Dict[int, WorkerHandle] = {}
        self.sockets: Dict[int, socket.socket] = {}         # slot -> its netlink socket
        self.failures: Dict[int, int] = {}                  # slot -> quick failures in a row
        self.restarts: Dict[int, tuple] = {}                # slot -> (due, queues, carried)
        self.retiring: List[Tuple[float, WorkerHandle]] = []
        # The dynamic sets' entries a new worker starts with (ipqd.daemon.sets).
        self.sets_snapshot: Callable[[], Optional[dict]] = lambda: None

    # ------------------------------------------------------------ starting

    def spawn(self, index: int, count: int, queues: Dict[int, Optional[str]],
              mode: str = BIND) -> WorkerHandle:
        """Start the worker of slot `index` (modes: ipqd.daemon.messages):
        BIND on a new socket; SUCCESSOR of the running one, on its socket
        (the caller hands over); RECOVER on the socket of one that died.
        Raises StartupError."""
        try:
            if mode == BIND:
                self.close_socket(index)
                sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
                sock.bind((0, 0))
                self.sockets[index] = sock
            fd = self.sockets[index].fileno()
            config = WorkerConfig(index, count, queues, self.target, batch=self.batch,
                                  cache=self.cache, sets=self.sets_snapshot())
            process = child.start("worker", config, fd, mode, payload=self.pickled, fds=(fd,))
        except OSError as error:
            raise StartupError(f"ipqd: cannot start worker {index}: {error}")
        handle = WorkerHandle(index, process, process.conn, queues, mode)
        if mode != SUCCESSOR:
            self.workers[index] = handle
        return handle

    def start_all(self, layout: Dict[int, Tuple[int, Optional[str]]],
                  waiting: Callable[[], None]) -> None:
        """A worker per slot of `layout` (queue -> (slot, conntrack state)),
        each bound before this returns. Raises StartupError."""
        per_slot: Dict[int, Dict[int, Optional[str]]] = {}
        for number, (index, state) in layout.items():
            per_slot.setdefault(index, {})[number] = state
        for index, queues in sorted(per_slot.items()):
            self.spawn(index, len(per_slot), queues)
        deadline = time.monotonic() + READY_TIMEOUT
        starting = set(self.workers)
        while starting:
            for index in sorted(starting):
                worker = self.workers[index]
                if not worker.conn.poll(0.05):
                    continue
                alive, said = worker.take()
                if any(isinstance(m, Ready) for m in said):
                    starting.discard(index)
                elif not alive:
                    raise StartupError(f"ipqd: worker {index} cannot start: "
                                       f"{worker.failure or _exit_reason(worker.process.exitcode)}")
            waiting()
            if time.monotonic() > deadline:
                raise StartupError(f"ipqd: workers {sorted(starting)} did not start in "
                                   f"{READY_TIMEOUT:.0f} s")

    def close_socket(self, index: int) -> None:
        """Let go of a slot's socket: once no process holds it, the kernel
        unbinds its queues (and drops what they held)."""
        sock = self.sockets.pop(index, None)
        if sock is not None:
            sock.close()

    def stop_all(self) -> None:
        """Stop every worker (each answers what it has, then unbinds) and
        let go of the sockets."""
        self.restarts.clear()
        for worker in self.workers.values():
            try:
                worker.conn.send(Stop())
            except OSError:
                pass
        for worker in self.workers.values():
            worker.end(5)
        self.workers = {}
        self.reap_retired(float("inf"))
        for index in list(self.sockets):
            self.close_socket(index)

    # ------------------------------------------------------------ while running

    def read(self, worker: WorkerHandle) -> List[object]:
        """What a worker said besides its reports; one that died is restarted."""
        alive, said = worker.take()
        if not alive:
            self.died(worker)
        return said

    def read_all(self) -> None:
        for worker in list(self.workers.values()):
            self.read(worker)

    def died(self, worker: WorkerHandle) -> None:
        """A worker that dies is restarted on the same socket, so its queues
        stay bound and the kernel holds their packets for the new one. It
        starts from the counters of the dead one's last report. One that
        keeps failing waits longer each time before its restart."""
        index = worker.index
        if self.workers.get(index) is not worker:
            return
        worker.process.join(1)
        worker.conn.close()
        now = time.monotonic()
        quick = now - worker.started < STABLE_AFTER
        failures = self.failures[index] = self.failures.get(index, 0) + 1 if quick else 1
        delay = 0.0 if failures == 1 else min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (failures - 2))
        reason = worker.failure or _exit_reason(worker.process.exitcode)
        when = f"in {delay:.2g} s ({failures} failures in a row)" if delay else "at once"
        self.log.event(f"ipqd: worker {index} exited: {reason}; restarting it {when}",
                       LOG_ERR, IPQD_EVENT="worker-died", IPQD_WORKER=str(index))
        del self.workers[index]
        self.restarts[index] = (now + delay, worker.queues, worker.carried)
        self.restart_due(now)

    def restart_due(self, now: float) -> None:
        """Start the workers whose restart is due (see died)."""
        for index, (due, queues, carried) in sorted(self.restarts.items()):
            if due > now:
                continue
            del self.restarts[index]
            # A socket that keeps failing its workers is made anew (the
            # queues are unbound a moment, and what they held is lost).
            fresh = self.failures.get(index, 0) >= FRESH_SOCKET_AFTER or index not in self.sockets
            try:
                handle = self.spawn(index, len(self.workers) + len(self.restarts) + 1, queues,
                                    BIND if fresh else RECOVER)
            except StartupError as error:
                self.log.event(str(error), LOG_ERR, IPQD_EVENT="worker-died")
                self.restarts[index] = (now + BACKOFF_MAX, queues, carried)
                continue
            self.hand_counters(handle, carried)

    def hand_counters(self, handle: WorkerHandle, carried: Optional[dict]) -> None:
        """Give a new worker the counters it counts on from."""
        handle.carried = carried
        if carried is not None:
            try:
                handle.conn.send(TakeOver(carried))
            except OSError:
                pass                # it died: the loop sees it

    def retire(self, worker: WorkerHandle) -> None:
        """A handed-over worker: it exits by itself once its log is written."""
        self.retiring.append((time.monotonic(), worker))

    def reap_retired(self, now: float) -> None:
        """Retired workers that have exited; one still there after
        RETIRE_WITHIN is killed (it has nothing left but its log to write)."""
        for entry in list(self.retiring):
            since, worker = entry
            if worker.process.is_alive() and now - since < RETIRE_WITHIN:
                continue
            worker.end(1)
            self.retiring.remove(entry)

    def healthy(self, now: float) -> bool:
        """Every slot has a live worker that reported lately."""
        return not self.restarts and all(now - w.seen < STALE_AFTER and w.process.is_alive()
                                         for w in self.workers.values())

    def totals(self) -> Dict[str, int]:
        total: Dict[str, int] = {}
        for worker in self.workers.values():
            for key, value in worker.stats.items():
                total[key] = total.get(key, 0) + value
        return total

    def ask_counters(self, timeout: float) -> Dict[int, Counters]:
        """Every worker's Counters (those that answer within `timeout` s)."""
        for worker in self.workers.values():
            try:
                worker.conn.send(AskCounters())
            except OSError:
                pass
        answers: Dict[int, Counters] = {}
        deadline = time.monotonic() + timeout
        while len(answers) < len(self.workers) and time.monotonic() < deadline:
            for worker in list(self.workers.values()):
                if worker.index not in answers and worker.conn.poll(0.01):
                    for message in self.read(worker):
                        if isinstance(message, Counters):
                            answers[worker.index] = message
        return answers


def _exit_reason(code: Optional[int]) -> str:
    """A child's exit status in words."""
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"
